"""Flax NNX and Equinox modules as trained objects: what a fit differentiates (the parameters),
what it carries from step to step (NNX batch statistics and other variables), what stays fixed
(the graph or static part), and the module merged back for each loss call and for the result.

* NNX: ``nnx.split(model, nnx.Param, nnx.RngState, ...)``. The ``nnx.Param`` variables are
  trained; the RNG streams (``nnx.Rngs`` of Dropout, ...) are reseeded at every step from that
  step's key (:func:`merge`), so they are not carried; every other variable (``BatchStat`` of
  BatchNorm, a user's ``nnx.Variable``) is carried: the value the module holds after one loss call
  is what the next call sees.
* Equinox: ``eqx.partition(model, eqx.is_inexact_array)``: floating arrays are trained, the rest
  (integer arrays, functions, ...) is static; nothing is carried.

Plain pytrees of parameters pass through unchanged; :func:`check_params` refuses a leaf that
``jax.grad`` cannot differentiate with an error naming ``params``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmjax import _checks
from fmjax._typing import PyTree

__all__ = ["ModelSpec", "assemble", "check_params", "is_module", "merge", "split", "state_of"]

# The NNX streams of step i draw from fold_in(fold_in(key, i), _RNG_SALT + j), j the stream's
# index: a salt far from the small integers and from the losses' latent-noise salt (0x5EED1), so
# Dropout masks are independent of the pairs, times and noise the loss draws from the same key.
_RNG_SALT = 0x0D0F0000


def is_module(obj: Any) -> bool:
    """True for a Flax NNX module or an Equinox module (the objects :func:`split` takes)."""
    return isinstance(obj, nnx.Module | eqx.Module)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What stays fixed while a module trains; hashable when its static part is (then equal
    specs reuse the compiled program).

    Attributes:
        kind: ``"nnx"`` or ``"equinox"``.
        name: the module's class name (for the run's fingerprint).
        static: the NNX ``GraphDef`` or the Equinox static part (``eqx.partition``).
        rng_treedef: NNX: the tree structure of the RNG state (``None`` without streams).
        rng_leaves: NNX: per leaf of the RNG state, ``("key", impl, shape)`` or
            ``("count", dtype, shape)``.
    """

    kind: str
    name: str
    static: Any
    rng_treedef: Any = None
    rng_leaves: tuple = ()


def split(fn: str, module: Any) -> tuple[ModelSpec, PyTree, PyTree, PyTree]:
    """``(spec, params, state, rngs)`` of a module: the trained part, the carried part (NNX
    variables other than parameters and RNG streams; ``None`` for Equinox) and the RNG state
    the result is given back with (``None`` for Equinox)."""
    name = type(module).__qualname__
    if isinstance(module, eqx.Module):
        params, static = eqx.partition(module, eqx.is_inexact_array)
        if not jax.tree.leaves(params):
            _checks.fail(fn, "params", "a module with floating-point arrays to train", name)
        return ModelSpec("equinox", name, static), params, None, None
    graphdef, params, rngs, state = nnx.split(module, nnx.Param, nnx.RngState, ...)
    if not jax.tree.leaves(params):
        _checks.fail(fn, "params", "an NNX module with nnx.Param variables to train", name)
    leaves, treedef = jax.tree.flatten(rngs)
    kinds = []
    for leaf in leaves:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            kinds.append(("key", str(jax.random.key_impl(leaf)), tuple(leaf.shape)))
        else:
            kinds.append(("count", np.dtype(leaf.dtype).str, tuple(leaf.shape)))
    spec = ModelSpec("nnx", name, graphdef, treedef if leaves else None, tuple(kinds))
    return spec, params, state, rngs


def _reseeded(spec: ModelSpec, key) -> PyTree:
    """The RNG state of one step: stream ``j`` keyed from ``fold_in(key, _RNG_SALT + j)`` in the
    implementation the module uses, counts at zero."""
    leaves = []
    for j, (what, a, shape) in enumerate(spec.rng_leaves):
        if what == "count":
            leaves.append(jnp.zeros(shape, a))
            continue
        seed = jax.random.bits(jax.random.fold_in(key, _RNG_SALT + j), (), jnp.uint32)
        k = jax.random.key(seed, impl=a)
        if shape:
            k = jax.random.split(k, math.prod(shape)).reshape(shape)
        leaves.append(k)
    return jax.tree.unflatten(spec.rng_treedef, leaves)


def merge(spec: ModelSpec, params: PyTree, state: PyTree, key) -> Any:
    """The module of one loss call: ``params`` and the carried ``state``, NNX streams reseeded
    from ``key`` (the step's key)."""
    if spec.kind == "equinox":
        return eqx.combine(params, spec.static)
    parts = [params] if spec.rng_treedef is None else [params, _reseeded(spec, key)]
    return nnx.merge(spec.static, *parts, state, copy=True)


def state_of(spec: ModelSpec, module: Any) -> PyTree:
    """The carried state a module holds (after a loss call updated it); ``None`` for Equinox."""
    if spec.kind == "equinox":
        return None
    _, _, state = nnx.state(module, nnx.Param, nnx.RngState, ...)
    return state


def assemble(spec: ModelSpec, params: PyTree, state: PyTree, rngs: PyTree) -> Any:
    """The module a fit returns: trained ``params``, final ``state``, the RNG state it came with."""
    if spec.kind == "equinox":
        return eqx.combine(params, spec.static)
    parts = [params] if spec.rng_treedef is None else [params, rngs]
    return nnx.merge(spec.static, *parts, state, copy=True)


def _describe_leaf(leaf: Any) -> str:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None:
        return f"an array of dtype {dtype}"
    return f"a value of type {type(leaf).__qualname__}"


def check_params(fn: str, name: str, params: PyTree) -> None:
    """``TypeError`` naming ``name`` unless every leaf is a floating (or complex) array or a
    Python float: integer, boolean, key and non-array leaves cannot be differentiated."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_module)[0]:
        dtype = getattr(leaf, "dtype", None)
        if isinstance(leaf, float) or (
            dtype is not None and jax.dtypes.issubdtype(dtype, np.inexact)
        ):
            continue
        if is_module(leaf):
            what = f"the {type(leaf).__qualname__} module inside a pytree"
            hint = "pass the module itself as `params`"
        elif dtype is not None and (
            jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
            or jax.dtypes.issubdtype(dtype, np.unsignedinteger)
        ):
            what = _describe_leaf(leaf)
            hint = (
                "a key or uint32 leaf is often an RNG stream of an nnx.state: pass the NNX "
                "module itself"
            )
        else:
            what = _describe_leaf(leaf)
            hint = "only floating-point leaves can be trained"
        _checks.fail(
            fn, name,
            "a pytree of floating-point arrays or a Flax NNX / Equinox module passed whole "
            f"({hint})",
            f"{what} at {name}{jax.tree_util.keystr(path)}", TypeError,
        )  # fmt: skip
