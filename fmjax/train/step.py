"""The compiled part of a fit: the train state, its initial value, and the chunk of optimizer
steps run in one device loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fmjax._typing import PyTree
from fmjax.train.config import FitConfig

__all__ = ["State", "init_state", "make_chunk", "output_structs"]


class State(NamedTuple):
    """The donated train state: everything that changes from step to step."""

    params: PyTree
    opt_state: PyTree
    ema_params: PyTree  # None without EMA
    step: jax.Array  # int32 scalar: number of steps done


def init_state(config: FitConfig, params: PyTree) -> State:
    """The state before step 0; copies of ``params``, so donating never deletes the caller's."""
    tx = config.transformation
    params = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    opt_state = (jax.vmap(tx.init) if config.batched else tx.init)(params)
    ema = None
    if config.ema_decay is not None:
        ema = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    return State(params, opt_state, ema, jnp.zeros((), jnp.int32))


def _call(config: FitConfig, params, key, instance):
    fn = config.loss_fn
    return fn(params, key, instance) if config.with_instances else fn(params, key)


def output_structs(fn: str, config: FitConfig, params, keys, instances, m: int | None):
    """Shapes of one step's ``(loss, aux)`` (with a leading ``m`` when batched), checking that
    ``loss_fn`` returns a scalar (and an aux with ``has_aux``); errors name ``fn``."""
    first = (lambda tree: jax.tree.map(lambda x: x[0], tree)) if m is not None else (lambda t: t)
    try:
        out = jax.eval_shape(
            lambda p, k, i: _call(config, p, k, i), first(params), first(keys), first(instances)
        )
    except Exception as e:
        raise ValueError(
            f"{fn}: `loss_fn` must run on the given params and key, got {type(e).__name__}: {e}"
        ) from e
    loss, aux = out, None
    if config.has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"{fn}: with `has_aux=True`, `loss_fn` must return (loss, aux)")
        loss, aux = out
    if not (hasattr(loss, "shape") and loss.shape == ()):
        hint = "" if config.has_aux else " (or set `has_aux=True` if it returns (loss, aux))"
        raise ValueError(f"{fn}: `loss_fn` must return a scalar loss{hint}, got {loss}")
    if m is not None:
        loss, aux = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((m, *s.shape), s.dtype), (loss, aux)
        )
    return loss, aux


def make_chunk(config: FitConfig, loss_struct: Any, aux_struct: Any) -> Callable:
    """``chunk(state, keys, n, instances) -> (state, losses, aux)``: ``n <= config.chunk_len``
    optimizer steps; the loss / aux buffers have ``chunk_len`` rows, zeros past ``n``."""
    tx, decay, length = config.transformation, config.ema_decay, config.chunk_len

    def _loss(params, key, inst):
        out = _call(config, params, key, inst)
        return out if config.has_aux else (out, None)

    grad_fn = jax.value_and_grad(_loss, has_aux=True)

    def update(params, opt_state, ema, key, step, inst):
        (loss, aux), grads = grad_fn(params, jax.random.fold_in(key, step), inst)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if decay is not None:
            ema = jax.tree.map(
                lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params
            )
        return params, opt_state, ema, loss, aux

    if config.batched:
        update = jax.vmap(update, in_axes=(0, 0, 0, 0, None, 0 if config.with_instances else None))

    def _buffer(struct):
        return jax.tree.map(lambda s: jnp.zeros((length, *s.shape), s.dtype), struct)

    def chunk(state: State, keys, n, instances):
        def body(i, carry):
            st, losses, auxes = carry
            params, opt_state, ema, loss, aux = update(
                st.params, st.opt_state, st.ema_params, keys, st.step, instances
            )
            losses = losses.at[i].set(loss)
            auxes = jax.tree.map(lambda b, a: b.at[i].set(a), auxes, aux)
            return State(params, opt_state, ema, st.step + 1), losses, auxes

        init = (state, _buffer(loss_struct), _buffer(aux_struct))
        return jax.lax.fori_loop(0, n, body, init)

    return chunk
