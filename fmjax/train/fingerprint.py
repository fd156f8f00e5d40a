"""What a run is, as JSON-able strings stored in its checkpoints: the loss function and the batch
size it draws, the optimizer configuration, EMA, aux, the parameters' structure, shapes and
dtypes, a module's kind, class and carried state (Flax NNX / Equinox), and the keys. A resume
compares the stored fingerprint with the new run's (:func:`differences`)."""

from __future__ import annotations

import functools
import hashlib
import numbers

import jax
import numpy as np

from fmjax._typing import PyTree
from fmjax.train.config import FitConfig, OptimizerSpec

__all__ = ["differences", "fingerprint"]

_DEPTH = 8  # how deep the closures of a user's optax transformation are described


def _name(f) -> str:
    """``module.qualname`` of a callable (the wrapped function of a ``functools.partial``), with
    the module's last component only: the same file imported as ``pkg.mod`` or ``mod`` (a script
    run from another folder) names the same function."""
    while isinstance(f, functools.partial):
        f = f.func
    if not hasattr(f, "__qualname__"):
        f = type(f)
    module = str(getattr(f, "__module__", None) or "?").rsplit(".", 1)[-1]
    return f"{module}.{f.__qualname__}"


def _describe(obj, depth: int = 0) -> str:
    """A stable description of ``obj``: numbers and strings by value, small arrays by value,
    functions by name and (recursively) the values their closures hold; no memory addresses."""
    if depth > _DEPTH:
        return "..."
    if obj is None or isinstance(obj, bool | str | numbers.Number):
        return repr(obj)
    if isinstance(obj, tuple | list):
        inner = ", ".join(_describe(o, depth + 1) for o in obj)
        return f"{type(obj).__name__}({inner})"
    if isinstance(obj, dict):
        inner = ", ".join(f"{k!r}: {_describe(v, depth + 1)}" for k, v in sorted(obj.items()))
        return "{" + inner + "}"
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        try:
            arr = np.asarray(obj)
        except Exception:  # noqa: BLE001 - e.g. typed keys: describe by shape only
            return f"array({obj.dtype}, {tuple(obj.shape)})"
        if arr.size <= 16:
            return f"array({arr.dtype}, {arr.tolist()})"
        digest = hashlib.sha256(arr.tobytes()).hexdigest()[:16]
        return f"array({arr.dtype}, {arr.shape}, sha256={digest})"
    if isinstance(obj, functools.partial):
        args = _describe((obj.args, obj.keywords), depth + 1)
        return f"partial({_name(obj.func)}, {args})"
    if callable(obj):
        cells = getattr(obj, "__closure__", None) or ()
        values = []
        for c in cells:
            try:
                values.append(_describe(c.cell_contents, depth + 1))
            except ValueError:  # an empty cell
                values.append("<empty>")
        return f"{_name(obj)}[{', '.join(values)}]" if values else _name(obj)
    return type(obj).__qualname__


def _batch_size(loss_fn, depth: int = 0):
    """The batch size a loss function draws, where it can be known: its ``batch_size``
    attribute, else a closure variable named ``batch_size`` (the losses of ``fmjax.losses``),
    searched through ``functools.partial`` and the functions its closure holds (a wrapper such
    as ``lambda p, k: loss(p, k)``); ``None`` when none is found."""
    if depth > 3:
        return None
    while isinstance(loss_fn, functools.partial):
        if "batch_size" in loss_fn.keywords:
            return loss_fn.keywords["batch_size"]
        loss_fn = loss_fn.func
    value = getattr(loss_fn, "batch_size", None)
    if isinstance(value, numbers.Integral):
        return int(value)
    code, cells = getattr(loss_fn, "__code__", None), getattr(loss_fn, "__closure__", None)
    if code is None or not cells:
        return None
    inner = []
    for name, cell in zip(code.co_freevars, cells, strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if name == "batch_size" and isinstance(value, numbers.Integral):
            return int(value)
        if callable(value):
            inner.append(value)
    for f in inner:
        found = _batch_size(f, depth + 1)
        if found is not None:
            return found
    return None


def _optimizer(config: FitConfig) -> str:
    opt = config.optimizer
    if isinstance(opt, OptimizerSpec):
        sched = opt.lr_schedule
        sched = sched if sched is None or isinstance(sched, str) else _describe(sched)
        return (
            f"make_optimizer(learning_rate={opt.learning_rate!r}, lr_schedule={sched!r}, "
            f"clip_norm={opt.clip_norm!r}, horizon={opt.horizon!r})"
        )
    return f"optax[{_describe(opt.init)}, {_describe(opt.update)}]"


def _keys(keys) -> str:
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(keys))
        data = np.asarray(jax.random.key_data(keys))
    else:
        impl, data = "raw uint32", np.asarray(keys)
    return f"{impl} {data.shape} sha256={hashlib.sha256(data.tobytes()).hexdigest()[:16]}"


def _tree(tree: PyTree) -> str:
    """Structure, dtypes and shapes of a pytree of arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    shapes = ", ".join(f"{np.dtype(x.dtype)}{list(np.shape(x))}" for x in leaves)
    return f"{treedef} [{shapes}]"


def _model(config: FitConfig, model_state: PyTree) -> str:
    """A module's kind, class and carried state (NNX batch statistics, ...) and, for NNX, which
    variables are RNG streams; ``"None"`` for a pytree of parameters."""
    spec = config.model
    if spec is None:
        return "None"
    if spec.kind == "equinox":
        return f"equinox {spec.name}, static {jax.tree.structure(spec.static)}"
    rngs = [f"{what} {a}{list(shape)}" for what, a, shape in spec.rng_leaves]
    return f"nnx {spec.name}, state {_tree(model_state)}, rngs [{', '.join(rngs)}]"


def fingerprint(
    config: FitConfig, params: PyTree, keys, model_state: PyTree = None
) -> dict[str, str]:
    """The run's fingerprint: name -> description (strings, stored as JSON). For a module,
    ``params`` are its trained arrays and ``model_state`` its carried state."""
    return {
        "loss_fn": _name(config.loss_fn),
        "batch_size": repr(_batch_size(config.loss_fn)),
        "optimizer": _optimizer(config),
        "ema_decay": repr(config.ema_decay),
        "has_aux": repr(config.has_aux),
        "models": "batched" if config.batched else "single",
        "with_instances": repr(config.with_instances),
        "params": _tree(params),
        "model": _model(config, model_state),
        "key": _keys(keys),
    }


def differences(saved: dict, now: dict) -> list[str]:
    """``"name: saved X, now Y"`` for every entry that differs; an entry the saved fingerprint
    lacks (written by an older fmjax, e.g. before ``batch_size`` was recorded) is not
    compared."""
    out = []
    for k in sorted(saved):
        if saved.get(k) != now.get(k):
            out.append(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}")
    return out
