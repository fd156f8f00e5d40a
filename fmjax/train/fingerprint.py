"""What a run is, as JSON-able strings stored in its checkpoints: the loss by its content (for a
loss of ``fmjax.losses`` each part of its ``structure``: model, pair sampler or coupling,
schedule, time sampler, target, reduction, divergence, batch size; for another function its name
and the values its closure holds), the optimizer configuration, EMA, aux, the parameters'
structure, shapes and dtypes, a module's kind, class and carried state (Flax NNX / Equinox), the
instances of ``fit_many``, the keys, and the number of processes and devices the run spans. A
resume compares the stored fingerprint with the new run's (:func:`differences`)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import numbers
import re

import jax
import numpy as np

from fmjax._typing import PyTree
from fmjax.train.config import FitConfig, OptimizerSpec

__all__ = ["describe", "differences", "fingerprint"]

_DEPTH = 8  # how deep closures and containers are described
_LONG = 4000  # longer descriptions are cut and hashed
_SHOWN = 160  # characters of a description shown around its first difference


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


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")


def _array(obj) -> str:
    try:
        arr = np.asarray(obj)
    except Exception:  # noqa: BLE001 - e.g. typed keys: their data, else the shape only
        try:
            arr = np.asarray(jax.random.key_data(obj))
        except Exception:  # noqa: BLE001
            return f"array({obj.dtype}, {tuple(obj.shape)})"
    if arr.size <= 16 and arr.dtype.kind in "biuf":
        return f"array({arr.dtype}, {arr.tolist()})"
    digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]
    return f"array({arr.dtype}, {arr.shape}, sha256={digest})"


def _is_array(obj) -> bool:
    return isinstance(obj, np.ndarray | np.generic | jax.Array)


def _structure(obj):
    try:
        return getattr(obj, "structure", None)
    except Exception:  # noqa: BLE001 - a property that fails
        return None


def _digest(leaves) -> str:
    """dtypes and shapes of arrays, and one sha256 over their bytes."""
    h = hashlib.sha256()
    shapes = []
    for leaf in leaves:
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{arr.dtype.str}{arr.shape};".encode())
        h.update(arr.tobytes())
        shapes.append(f"{arr.dtype}{list(arr.shape)}")
    return f"[{', '.join(shapes)}] sha256={h.hexdigest()[:16]}"


def _is_linen(obj) -> bool:
    return any(c.__module__.startswith("flax.linen") for c in type(obj).__mro__[1:])


def _function(f, depth: int) -> str:
    """A plain function: its name, the values its closure holds (by name), its default
    arguments and the arrays it reads from its module's globals."""
    parts = []
    code = getattr(f, "__code__", None)
    names = code.co_freevars if code is not None else ()
    for name, cell in zip(names, f.__closure__ or (), strict=False):
        try:
            parts.append(f"{name}={describe(cell.cell_contents, depth + 1)}")
        except ValueError:  # an empty cell
            parts.append(f"{name}=<empty>")
    if f.__defaults__ or f.__kwdefaults__:
        parts.append(f"defaults={describe((f.__defaults__, f.__kwdefaults__), depth + 1)}")
    glob = getattr(f, "__globals__", {})
    for name in code.co_names if code is not None else ():
        value = glob.get(name)
        if _is_array(value) or (callable(value) and isinstance(_structure(value), dict)):
            parts.append(f"{name}={describe(value, depth + 1)}")
    return f"{_name(f)}[{', '.join(parts)}]" if parts else _name(f)


def describe(obj, depth: int = 0) -> str:
    """A stable description of ``obj`` by content, for a run's fingerprint: numbers, strings
    and small arrays by value, other arrays by dtype, shape and sha256 of their bytes;
    functions by name and the values their closures hold (recursively; ``jax.jit`` wrappers
    unwrapped, bound methods with their object); dataclasses (schedules, Bregman divergences,
    Flax linen modules, ...) by their fields; other pytrees (mixtures, couplings) by structure
    and leaves; a loss of ``fmjax.losses`` by its ``structure``. No memory addresses."""
    if depth > _DEPTH:
        return "..."
    if obj is None or isinstance(obj, bool | str | numbers.Number):
        return repr(obj)
    if isinstance(obj, np.dtype):
        return f"dtype({obj})"
    if isinstance(obj, type):
        return _name(obj)
    if inspect.ismodule(obj):
        return f"module {obj.__name__}"
    if isinstance(obj, jax.sharding.Mesh):  # (its device array holds objects: no bytes to hash)
        return f"Mesh({dict(obj.shape)})"
    if _is_array(obj) or (
        hasattr(obj, "shape") and hasattr(obj, "dtype") and not inspect.ismodule(obj)
    ):
        return _array(obj)
    if isinstance(obj, tuple | list):
        inner = ", ".join(describe(o, depth + 1) for o in obj)
        return f"{type(obj).__name__}({inner})"
    if isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: repr(kv[0]))
        return "{" + ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in items) + "}"
    out = _ADDRESS.sub("", _describe_object(obj, depth))
    if len(out) > _LONG:  # kept short in the checkpoint's metadata
        digest = hashlib.sha256(out.encode()).hexdigest()[:16]
        out = f"{out[: _LONG // 2]}... ({len(out)} characters, sha256={digest})"
    return out


def _describe_object(obj, depth: int) -> str:
    structure = _structure(obj)
    if callable(obj) and isinstance(structure, dict):  # a loss of fmjax.losses
        return f"{_name(obj)}{describe(structure, depth + 1)}"
    if isinstance(obj, functools.partial):
        args = describe((obj.args, obj.keywords), depth + 1)
        return f"partial({describe(obj.func, depth + 1)}, {args})"
    if inspect.ismethod(obj):
        return f"{describe(obj.__self__, depth + 1)}.{obj.__func__.__name__}"
    wrapped = getattr(obj, "__wrapped__", None)
    if wrapped is not None and wrapped is not obj:  # jax.jit, functools.wraps
        return describe(wrapped, depth)
    if inspect.isfunction(obj):
        return _function(obj, depth)
    if dataclasses.is_dataclass(obj):
        skip = ("parent", "name") if _is_linen(obj) else ()
        fields = [f.name for f in dataclasses.fields(obj) if f.name not in skip]
        inner = ", ".join(f"{n}={describe(getattr(obj, n, None), depth + 1)}" for n in fields)
        return f"{type(obj).__qualname__}({inner})"
    leaves, treedef = jax.tree.flatten(obj)
    if not (len(leaves) == 1 and leaves[0] is obj):  # a registered pytree (mixtures, ...)
        if all(_is_array(leaf) for leaf in leaves):
            content = _digest(leaves)
        else:
            content = describe(leaves, depth + 1)
        return f"{type(obj).__qualname__}({treedef}, {content})"
    if callable(obj) and not hasattr(obj, "__dict__"):  # a builtin or C function
        return _name(obj)
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict) and attrs:
        return f"{type(obj).__qualname__}{describe(attrs, depth + 1)}"
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
        sched = sched if sched is None or isinstance(sched, str) else describe(sched)
        return (
            f"make_optimizer(learning_rate={opt.learning_rate!r}, lr_schedule={sched!r}, "
            f"clip_norm={opt.clip_norm!r}, horizon={opt.horizon!r})"
        )
    return f"optax[{describe(opt.init)}, {describe(opt.update)}]"


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


def _loss(loss_fn) -> dict[str, str]:
    """``loss.<part>`` for each part of the ``structure`` of a loss made by ``fmjax.losses``,
    else one ``loss`` entry describing the function by content."""
    structure = getattr(loss_fn, "structure", None)
    if isinstance(structure, dict):
        return {f"loss.{k}": describe(v) for k, v in structure.items()}
    return {"loss": describe(loss_fn)}


def _layout(config: FitConfig) -> str:
    """The processes and devices a run spans: a resume on another layout is refused unless
    forced (a checkpoint holds whole arrays, so it restores on any layout, but the run's batch
    is then summed in another order and a model split over other devices)."""
    devices = 1 if config.mesh is None else config.mesh.size
    return f"{jax.process_count()} process(es), {devices} device(s)"


def fingerprint(
    config: FitConfig, params: PyTree, keys, model_state: PyTree = None, instances: PyTree = None
) -> dict[str, str]:
    """The run's fingerprint: name -> description (strings, stored as JSON). For a module,
    ``params`` are its trained arrays and ``model_state`` its carried state."""
    out = {
        "loss_fn": _name(config.loss_fn),
        **_loss(config.loss_fn),
        "batch_size": repr(_batch_size(config.loss_fn)),
        "optimizer": _optimizer(config),
        "ema_decay": repr(config.ema_decay),
        "has_aux": repr(config.has_aux),
        "models": "batched" if config.batched else "single",
        "with_instances": repr(config.with_instances),
        "params": _tree(params),
        "model": _model(config, model_state),
        "key": _keys(keys),
        "layout": _layout(config),
    }
    if instances is not None:
        out["instances"] = describe(instances)
    return out


def _shown(saved, now) -> tuple[str, str]:
    """Both descriptions, or for long ones the part from a little before their first
    difference (``...`` marks what is cut)."""
    if not (isinstance(saved, str) and isinstance(now, str)) or max(len(saved), len(now)) <= _SHOWN:
        return repr(saved), repr(now)
    pairs = enumerate(zip(saved, now, strict=False))
    first = next((i for i, (a, b) in pairs if a != b), min(len(saved), len(now)))
    begin = max(0, first - 40)

    def cut(s: str) -> str:
        part = s[begin : begin + _SHOWN]
        return ("..." if begin else "") + repr(part) + ("..." if begin + _SHOWN < len(s) else "")

    return cut(saved), cut(now)


def _structured(fp: dict) -> bool:
    return any(k.startswith("loss.") for k in fp)


def _joined(fp: dict) -> dict:
    """``fp`` with its ``loss.<part>`` entries joined into one ``loss`` entry."""
    parts = sorted((k, v) for k, v in fp.items() if k.startswith("loss."))
    if not parts:
        return fp
    out = {k: v for k, v in fp.items() if not k.startswith("loss.")}
    out["loss"] = "{" + ", ".join(f"{k[5:]}: {v}" for k, v in parts) + "}"
    return out


def differences(saved: dict, now: dict) -> list[str]:
    """``"name: saved X, now Y"`` for every entry that differs; an entry the saved fingerprint
    lacks (written by an older fmjax, e.g. before ``batch_size`` was recorded) is not
    compared."""
    if _structured(saved) != _structured(now):  # a loss of fmjax.losses against another
        saved, now = _joined(saved), _joined(now)
    out = []
    for k in sorted(saved):
        if saved.get(k) != now.get(k):
            was, now_ = _shown(saved.get(k), now.get(k))
            out.append(f"{k}: saved {was}, now {now_}")
    return out
