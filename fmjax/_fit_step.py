"""The compiled part of a fit: the donated train state and the chunk of optimizer steps that
runs in one device loop, and the loss's output shapes that size its buffers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[..., Any]


class State(NamedTuple):
    """The donated train state: everything that changes from step to step."""

    params: PyTree
    opt_state: PyTree
    ema_params: PyTree  # None without EMA
    step: jax.Array  # int32 scalar: number of steps done


def output_structs(loss_fn, params, keys, instances, has_aux: bool, m: int | None):
    """Shapes of one step's (loss, aux), batched by M; checks the loss contract."""
    with_instances = instances is not None

    def one(p, k, inst):
        return loss_fn(p, k, inst) if with_instances else loss_fn(p, k)

    first = (lambda tree: jax.tree.map(lambda x: x[0], tree)) if m is not None else (lambda t: t)
    try:
        out = jax.eval_shape(one, first(params), first(keys), first(instances))
    except Exception as e:
        raise ValueError(f"`loss_fn(params, key)` failed on the given params: {e}") from e
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("with `has_aux=True`, `loss_fn` must return (loss, aux)")
        loss, aux = out
    else:
        loss, aux = out, None
    if not (hasattr(loss, "shape") and loss.shape == ()):
        hint = "" if has_aux else " (or set `has_aux=True` if it returns (loss, aux))"
        raise ValueError(f"`loss_fn` must return a scalar loss{hint}, got {loss}")
    if m is not None:
        loss, aux = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((m, *s.shape), s.dtype), (loss, aux)
        )
    return loss, aux


def make_chunk(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool,
    ema_decay: float | None,
    batched: bool,
    with_instances: bool,
    chunk_len: int,
    loss_struct: Any,
    aux_struct: Any,
) -> Callable:
    """Build ``chunk(state, keys, n, instances) -> (state, losses (chunk_len, ...), aux)``.

    Runs ``n <= chunk_len`` steps; entries of the loss/aux buffers past ``n`` are zeros.
    """

    def _loss(params, key, inst):
        out = loss_fn(params, key, inst) if with_instances else loss_fn(params, key)
        return out if has_aux else (out, None)

    grad_fn = jax.value_and_grad(_loss, has_aux=True)

    def _update(params, opt_state, ema, key, step, inst):
        (loss, aux), grads = grad_fn(params, jax.random.fold_in(key, step), inst)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema_decay is not None:
            d = ema_decay
            ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
        return params, opt_state, ema, loss, aux

    if batched:
        _update = jax.vmap(_update, in_axes=(0, 0, 0, 0, None, 0 if with_instances else None))

    def _buffer(struct):
        return jax.tree.map(lambda s: jnp.zeros((chunk_len, *s.shape), s.dtype), struct)

    def chunk(state: State, keys, n, instances):
        def body(i, carry):
            st, losses, auxes = carry
            params, opt_state, ema, loss, aux = _update(
                st.params, st.opt_state, st.ema_params, keys, st.step, instances
            )
            losses = losses.at[i].set(loss)
            auxes = jax.tree.map(lambda b, a: b.at[i].set(a), auxes, aux)
            return State(params, opt_state, ema, st.step + 1), losses, auxes

        init = (state, _buffer(loss_struct), _buffer(aux_struct))
        return jax.lax.fori_loop(0, n, body, init)

    return chunk
