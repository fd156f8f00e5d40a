"""The compiled part of a fit: the train state, its initial value, and the chunk of optimizer
steps run in one device loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fmjax import _checks
from fmjax._typing import PyTree
from fmjax.train import modules
from fmjax.train.config import FitConfig

__all__ = [
    "State",
    "checkpointed",
    "from_checkpoint",
    "init_state",
    "make_chunk",
    "output_structs",
]


class State(NamedTuple):
    """The donated train state: everything that changes from step to step."""

    params: PyTree
    opt_state: PyTree
    ema_params: PyTree  # None without EMA
    step: jax.Array  # int32 scalar: number of steps done
    # A module's carried variables (NNX batch statistics, ...): updated by the loss, not trained.
    model_state: PyTree = None


class _Saved(NamedTuple):
    """What a checkpoint holds for a state without module state: the four fields of the
    ``State`` of earlier fmjax, so their checkpoints restore (orbax matches the structure)."""

    params: PyTree
    opt_state: PyTree
    ema_params: PyTree
    step: jax.Array


def checkpointed(state: State) -> PyTree:
    """The pytree a checkpoint of ``state`` holds (and restores into)."""
    return state if state.model_state is not None else _Saved(*state[:4])


def from_checkpoint(tree: PyTree) -> State:
    """The ``State`` of a restored :func:`checkpointed` tree."""
    return tree if isinstance(tree, State) else State(*tree)


def _copy(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda p: jnp.array(p, copy=True), tree)


def init_state(config: FitConfig, params: PyTree, model_state: PyTree = None) -> State:
    """The state before step 0; copies of ``params`` (and of a module's carried
    ``model_state``), so donating never deletes the caller's."""
    tx = config.transformation
    params = _copy(params)
    opt_state = (jax.vmap(tx.init) if config.batched else tx.init)(params)
    ema = _copy(params) if config.ema_decay is not None else None
    return State(params, opt_state, ema, jnp.zeros((), jnp.int32), _copy(model_state))


def _call(config: FitConfig, params, key, instance, model_state=None):
    """``loss_fn``'s output, and with a module the carried state after the call (else None)."""
    fn, spec = config.loss_fn, config.model
    if spec is not None:  # the module of this step: its streams reseeded from the step's key
        params = modules.merge(spec, params, model_state, key)
    out = fn(params, key, instance) if config.with_instances else fn(params, key)
    return out, None if spec is None else modules.state_of(spec, params)


def output_structs(fn: str, config: FitConfig, params, keys, instances, m: int | None,
                   model_state: PyTree = None):  # fmt: skip
    """Shapes of one step's ``(loss, aux)`` (with a leading ``m`` when batched), checking that
    ``loss_fn`` returns a scalar (and an aux with ``has_aux``), and that a module's carried
    state keeps its structure, shapes and dtypes through a call; errors name ``fn``."""
    first = (lambda tree: jax.tree.map(lambda x: x[0], tree)) if m is not None else (lambda t: t)
    what = "the given module and key" if config.model is not None else "the given params and key"
    try:
        out, new_state = jax.eval_shape(
            lambda p, k, i, s: _call(config, p, k, i, s),
            first(params), first(keys), first(instances), model_state,
        )  # fmt: skip
    except Exception as e:
        raise _checks.named_error(
            fn, "loss_fn", f"{fn}: `loss_fn` must run on {what}, got {type(e).__name__}: {e}"
        ) from e
    if config.model is not None:

        def avals(tree):
            leaves, treedef = jax.tree.flatten(tree)
            return treedef, [(a.shape, jnp.dtype(a.dtype)) for a in leaves]

        if avals(model_state) != avals(new_state):
            raise _checks.named_error(
                fn,
                "loss_fn",
                f"{fn}: `loss_fn` must leave the module's variables other than nnx.Param with "
                "the structure, shapes and dtypes they had (they are carried from step to "
                f"step), got {jax.tree.structure(model_state)} before a call and "
                f"{jax.tree.structure(new_state)} after it",
            )
    loss, aux = out, None
    if config.has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise _checks.named_error(
                fn, "loss_fn", f"{fn}: with `has_aux=True`, `loss_fn` must return (loss, aux)"
            )
        loss, aux = out
    if hasattr(loss, "dtype") and not jnp.issubdtype(loss.dtype, jnp.floating):
        raise _checks.named_error(
            fn,
            "loss_fn",
            f"{fn}: `loss_fn` must return a floating-point loss, got {loss}",
            TypeError,
        )
    if not (hasattr(loss, "shape") and loss.shape == ()):
        hint = "" if config.has_aux else " (or set `has_aux=True` if it returns (loss, aux))"
        raise _checks.named_error(
            fn, "loss_fn", f"{fn}: `loss_fn` must return a scalar loss{hint}, got {loss}"
        )
    if m is not None:
        loss, aux = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((m, *s.shape), s.dtype), (loss, aux)
        )
    return loss, aux


def make_chunk(config: FitConfig, loss_struct: Any, aux_struct: Any) -> Callable:
    """``chunk(state, keys, n, instances) -> (state, losses, aux)``: ``n <= config.chunk_len``
    optimizer steps; the loss / aux buffers have ``chunk_len`` rows, zeros past ``n``."""
    tx, decay, length = config.transformation, config.ema_decay, config.chunk_len

    def _loss(params, key, inst, model_state):
        out, model_state = _call(config, params, key, inst, model_state)
        loss, aux = out if config.has_aux else (out, None)
        return loss, (aux, model_state)

    grad_fn = jax.value_and_grad(_loss, has_aux=True)

    def update(params, opt_state, ema, model_state, key, step, inst):
        step_key = jax.random.fold_in(key, step)
        (loss, (aux, model_state)), grads = grad_fn(params, step_key, inst, model_state)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if decay is not None:
            ema = jax.tree.map(
                lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params
            )
        return params, opt_state, ema, model_state, loss, aux

    if config.batched:
        inst_axis = 0 if config.with_instances else None
        update = jax.vmap(update, in_axes=(0, 0, 0, 0, 0, None, inst_axis))

    def _buffer(struct):
        return jax.tree.map(lambda s: jnp.zeros((length, *s.shape), s.dtype), struct)

    def chunk(state: State, keys, n, instances):
        def body(i, carry):
            st, losses, auxes = carry
            params, opt_state, ema, model_state, loss, aux = update(
                st.params, st.opt_state, st.ema_params, st.model_state, keys, st.step, instances
            )
            losses = losses.at[i].set(loss)
            auxes = jax.tree.map(lambda b, a: b.at[i].set(a), auxes, aux)
            return State(params, opt_state, ema, st.step + 1, model_state), losses, auxes

        init = (state, _buffer(loss_struct), _buffer(aux_struct))
        return jax.lax.fori_loop(0, n, body, init)

    return chunk
