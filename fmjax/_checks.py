"""Eager argument checks with one error format: ``module.function: `arg` must be ..., got ...``.

``TypeError`` for a value of the wrong type, ``ValueError`` for a value of the right type that is
out of range. Every check runs on concrete Python / NumPy / JAX values outside any trace; a
traced value is a ``TypeError`` naming the argument (it must be concrete).

Every error raised here (and by ``named_error``) carries ``.fn`` (the public function) and
``.arg`` (the argument it blames), so tests classify errors by type and argument, not by message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

__all__ = [
    "as_float",
    "check_callable",
    "check_choice",
    "check_instance",
    "check_int",
    "check_interval_time",
    "check_key",
    "check_positive",
    "check_real_array",
    "check_float_dtype",
    "SUPPORTED_FLOATS",
    "fail",
    "is_concrete",
    "named_error",
    "require",
]

# Optional dependencies: import name -> (pip name, fmjax extra that installs it).
_EXTRAS = {
    "matplotlib": ("matplotlib", "plot"),
    "ott": ("ott-jax", "ot"),
    "orbax.checkpoint": ("orbax-checkpoint", "checkpoint"),
    "sklearn": ("scikit-learn", "images"),
}


def require(module: str, fn: str):
    """Import an optional dependency, or raise ``ImportError`` naming the extra that installs it.

    Args:
        module: import name, one of ``matplotlib``, ``ott``, ``orbax.checkpoint``, ``sklearn``.
        fn: the public function that needs it (``module.function``), for the message.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        pip_name, extra = _EXTRAS[module]
        raise ImportError(
            f"{fn} needs {pip_name}, which is not installed: pip install 'fmjax[{extra}]' "
            f"(or 'fmjax[all]')"
        ) from e


def _fmt(fn: str, name: str, what: str, got: Any) -> str:
    return f"{fn}: `{name}` must be {what}, got {got!r}"


def named_error(
    fn: str, name: str | None, message: str, error: type[Exception] = ValueError
) -> Exception:
    """``error(message)`` carrying ``.fn = fn`` and ``.arg = name`` (None: no one argument).

    For messages that do not fit ``fail``'s "must be ..., got ..." (``raise named_error(...)``).
    """
    e = error(message)
    e.fn, e.arg = fn, name
    return e


def fail(fn: str, name: str, what: str, got: Any, error: type[Exception] = ValueError):
    """Raise ``error`` in the common format, carrying ``.fn`` and ``.arg = name``."""
    raise named_error(fn, name, _fmt(fn, name, what, got), error)


def is_concrete(*xs: Any) -> bool:
    """True when no leaf of ``xs`` is a tracer (eager checks may then read values)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(xs))


def as_float(fn: str, name: str, value: Any) -> float:
    """A real number (Python, NumPy or 0-d JAX scalar, integers included) as a Python float."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        fail(fn, name, "a real number", value, TypeError)
    if isinstance(value, jax.core.Tracer):
        fail(fn, name, "a concrete number (not traced)", value, TypeError)
    if np.ndim(value) != 0:
        fail(fn, name, "a scalar", f"shape {np.shape(value)}", TypeError)
    if np.iscomplexobj(value):  # float() of a NumPy complex drops the imaginary part
        fail(fn, name, "a real number", value, TypeError)
    try:
        v = float(value)
    except (TypeError, ValueError):
        fail(fn, name, "a real number", value, TypeError)
    return v


def check_positive(fn: str, name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (``>= 0`` with ``allow_zero``) as a float."""
    v = as_float(fn, name, value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        fail(fn, name, "a finite number >= 0" if allow_zero else "a finite number > 0", value)
    return v


def check_int(fn: str, name: str, value: Any, minimum: int | None = 1) -> int:
    """An integer (Python or NumPy, not bool) ``>= minimum`` as an int."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        fail(fn, name, "an int", value, TypeError)
    if minimum is not None and value < minimum:
        fail(fn, name, f"an int >= {minimum}", value)
    return int(value)


def check_choice(fn: str, name: str, value: Any, choices: Iterable[str]) -> str:
    """One of the string ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str):
        fail(fn, name, f"one of {choices}", value, TypeError)
    if value not in choices:
        fail(fn, name, f"one of {choices}", value)
    return value


def check_instance(fn: str, name: str, value: Any, types: type | tuple[type, ...], what: str):
    """``value`` if it is an instance of ``types``, else ``TypeError`` describing ``what``."""
    if not isinstance(value, types):
        fail(fn, name, what, type(value).__name__, TypeError)
    return value


def check_callable(fn: str, name: str, value: Any, what: str = "a callable") -> Callable:
    """``value`` if callable, else ``TypeError``."""
    if not callable(value):
        fail(fn, name, what, value, TypeError)
    return value


def check_key(fn: str, name: str, key: Any) -> jax.Array:
    """A single PRNG key: a new-style ``jax.random.key`` or a legacy uint32 ``PRNGKey``."""
    if key is None or not hasattr(key, "dtype") or not hasattr(key, "shape"):
        fail(fn, name, "a PRNG key (jax.random.key(seed))", key, TypeError)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            fail(fn, name, "a single PRNG key", f"shape {key.shape}")
        return key
    if key.dtype == np.uint32 and key.shape == (2,):
        return key
    fail(fn, name, "a PRNG key (jax.random.key(seed))", f"{key.dtype} {key.shape}", TypeError)


def check_precision(fn: str, name: str, value: Any) -> Any:
    """A matmul precision as ``jax.lax.dot`` takes it: None, a ``jax.lax.Precision`` (or its
    name: "default", "high", "highest", ...) or a ``jax.lax.DotAlgorithmPreset``."""
    if value is None or isinstance(value, jax.lax.Precision | jax.lax.DotAlgorithmPreset):
        return value
    if not isinstance(value, str):
        fail(fn, name, "None, a jax.lax.Precision or its name", value, TypeError)
    try:
        jax.lax.Precision(value)
    except ValueError:
        fail(fn, name, 'a jax.lax.Precision name ("default", "high", "highest")', value)
    return value


def check_interval_time(
    fn: str, name: str, value: Any, interval: tuple[float, float], owner: str = "the schedule"
) -> float:
    """A concrete time inside the closed ``interval`` (e.g. a schedule's valid interval)."""
    t = as_float(fn, name, value)
    lo, hi = interval
    if not (lo <= t <= hi):
        fail(fn, name, f"in [{lo:g}, {hi:g}], the valid interval of {owner}", t)
    return t


# Floating dtypes the library computes in; float16 / bfloat16 break the factorisations.
SUPPORTED_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def check_float_dtype(fn: str, name: str, dtype: Any) -> np.dtype:
    """``dtype`` if it is float32 or float64, else ``TypeError`` naming the supported dtypes."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        fail(fn, name, "a float dtype, float32 or float64", dtype, TypeError)
    if dt not in SUPPORTED_FLOATS:
        fail(fn, name, "of dtype float32 or float64", f"dtype {dt}", TypeError)
    return dt


def check_real_array(
    fn: str, name: str, x: Any, default_dtype: Any = None, *, any_float: bool = False
) -> jax.Array:
    """``x`` as a real floating JAX array (float32 or float64); works on traced values too.

    Integers and bools are cast to ``default_dtype`` (JAX's default float when None). Complex
    values are a ``TypeError`` (casting would drop the imaginary part), and so are other
    floating dtypes (float16, bfloat16: not supported; allowed with ``any_float``) and
    non-numeric input.
    """
    if x is None:
        fail(fn, name, "an array of real numbers", "None", TypeError)
    try:
        arr = jax.numpy.asarray(x)
    except (TypeError, ValueError) as e:
        fail(fn, name, "an array of real numbers", f"{type(x).__name__} ({e})", TypeError)
    dt = arr.dtype
    if jax.numpy.issubdtype(dt, jax.numpy.complexfloating):
        fail(fn, name, "real (float32 or float64)", f"complex dtype {dt}", TypeError)
    if jax.numpy.issubdtype(dt, jax.numpy.integer) or dt == np.bool_:
        return arr.astype(jax.numpy.result_type(float) if default_dtype is None else default_dtype)
    if not jax.numpy.issubdtype(dt, jax.numpy.floating):
        fail(fn, name, "an array of real numbers", f"dtype {dt}", TypeError)
    if dt not in SUPPORTED_FLOATS:
        fail(
            fn, name, "of dtype float32 or float64 (or an integer dtype)", f"dtype {dt}", TypeError
        )
    return arr
