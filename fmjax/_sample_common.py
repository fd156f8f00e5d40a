"""Pieces shared by ODE and SDE sampling (``fmjax._ode``, ``fmjax._sde``, ``fmjax.likelihood``).

The ``Velocity`` type, eager argument checks (states, times, step counts, tolerances, solver
names, save times) that raise ``ValueError`` naming the argument, ``_as_pytree`` (a
``functools.partial`` velocity becomes a ``jax.tree_util.Partial`` so compiled solves are reused),
and ``draw_source``, the source samples x0 that a solve starts from. Public names are re-exported
by ``fmjax.sample``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from fmjax.mixtures import GaussianMixture

__all__ = ["Velocity", "draw_source"]


Velocity = Callable[[Array, Array], Array]


# ----------------------------------------------------------------------------- validation


def _check_x(fn: str, x, name: str = "x0") -> Array:
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"{fn}: `{name}` must have shape (..., d), got a scalar")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _check_time(fn: str, name: str, t) -> float:
    try:
        t = float(t)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{fn}: `{name}` must be a concrete number, got {t!r}") from None
    if not (0.0 <= t <= 1.0):
        raise ValueError(f"{fn}: `{name}` must lie in [0, 1], got {t}")
    return t


def _check_positive_int(fn: str, name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int, got {n!r}")
    return int(n)


def _check_tol(fn: str, name: str, v) -> float:
    v = float(v)
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{fn}: `{name}` must be a finite number > 0, got {v}")
    return v


def _resolve_solver(fn: str, solver, table: dict) -> tuple[str, diffrax.AbstractSolver]:
    if isinstance(solver, str) and solver.lower() in table:
        name = solver.lower()
        return name, table[name]()
    raise ValueError(f"{fn}: `solver` must be one of {sorted(table)}, got {solver!r}")


def _check_save_ts(fn: str, save_ts, t0: float, t1: float) -> np.ndarray:
    try:
        ts = np.asarray(save_ts, dtype=np.float64)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{fn}: `save_ts` must be a concrete 1-D array of times") from None
    if ts.ndim != 1 or ts.size < 1:
        raise ValueError(f"{fn}: `save_ts` must be a non-empty 1-D array, got shape {ts.shape}")
    lo, hi = min(t0, t1), max(t0, t1)
    if np.any(ts < lo) or np.any(ts > hi):
        raise ValueError(f"{fn}: `save_ts` must lie between t0={t0} and t1={t1}")
    if np.any(np.diff(ts) * np.sign(t1 - t0) <= 0):
        raise ValueError(f"{fn}: `save_ts` must be strictly monotone from t0 towards t1")
    return ts


def _as_pytree(velocity: Velocity) -> Velocity:
    """A ``functools.partial`` becomes a ``jax.tree_util.Partial``: the arrays it binds (model
    parameters, mixtures) are then traced rather than baked in as constants, so a new partial of
    the same function with same-shaped arrays reuses the compiled solve instead of recompiling.
    Left as is when the function or a non-array bound value is unhashable.
    """
    if type(velocity) is not functools.partial:
        return velocity
    pv = jax.tree_util.Partial(velocity.func, *velocity.args, **velocity.keywords)
    try:
        hash(pv.func)
        for leaf in jax.tree.leaves(pv):
            if not isinstance(leaf, jax.Array | np.ndarray):
                hash(leaf)
    except TypeError:
        return velocity
    return pv


def draw_source(
    key: PRNGKeyArray,
    n: int,
    dim: int | None = None,
    source: GaussianMixture | Callable[[PRNGKeyArray, int], Array] | None = None,
    dtype=None,
) -> Float[Array, "n d"]:
    """Draw ``n`` source samples x0 deterministically from ``key``.

    Args:
        key: PRNG key.
        n: number of samples (static).
        dim: dimension d; required for the default source, checked against the others.
        source: None for N(0, I), a ``GaussianMixture``, or a sampler ``(key, n) -> (n, d)``.
        dtype: float dtype for the default source (default: JAX's default float).

    Returns:
        (n, d) samples.
    """
    n = _check_positive_int("draw_source", "n", n)
    if source is None:
        if dim is None:
            raise ValueError("draw_source: `dim` is required for the default N(0, I) source")
        dim = _check_positive_int("draw_source", "dim", dim)
        return jax.random.normal(key, (n, dim), dtype or jnp.result_type(float))
    if isinstance(source, GaussianMixture):
        x = source.sample(key, n)
    elif callable(source):
        x = jnp.asarray(source(key, n))
    else:
        raise ValueError(
            f"draw_source: `source` must be None, a GaussianMixture or a callable (key, n), "
            f"got {source!r}"
        )
    if x.ndim != 2 or x.shape[0] != n or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"draw_source: `source` returned shape {x.shape}, expected ({n}, d)")
    return x
