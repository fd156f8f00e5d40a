"""Jitted training loops: optax, many steps per compiled call, EMA, orbax checkpoints, progress.

A loss is any function ``loss_fn(params, key) -> scalar`` (or ``-> (scalar, aux)`` with
``has_aux=True``) that ``jax.grad`` can differentiate, e.g. one built by ``fmjax.losses.cfm``.
:func:`fit` trains one model; :func:`fit_many` trains a batch of models (seeds or problem
instances, parameters with a leading axis) in one compiled call with ``vmap``.

How a run is organised:

* The host calls one compiled function per *chunk* of at most ``steps_per_call`` steps; inside it
  the steps run in a device loop (``lax.fori_loop`` with the number of steps as a traced argument,
  i.e. a ``lax.scan`` whose length may vary without recompiling). The function is compiled once
  per distinct configuration and shapes, whatever the chunk lengths (the last chunk and the
  chunks cut at checkpoints are shorter), and the train state is donated so its buffers are
  updated in place.
* Compiled functions are kept in a small module-level cache (the last 16), so a later
  :func:`fit` / :func:`fit_many` with the same ``loss_fn`` object, the same options that shape
  the program (optimizer, learning rate, schedule and, for ``"cosine"``, ``steps``, clipping,
  EMA, ``has_aux``, chunk length, mesh) and arguments of the same structure, shapes, dtypes and
  shardings, under the same JAX config (x64, default matmul precision, PRNG), does not compile
  again; its ``compile_time`` is then 0.0. As with ``jax.jit``, ``loss_fn`` is assumed pure:
  Python state it reads is frozen at its first trace. A new closure (e.g. another call of
  ``fmjax.losses.cfm``) is a new ``loss_fn`` and compiles; a ``loss_fn`` that cannot be hashed
  compiles every time. The cache keeps its loss functions (and what they close over) alive.
* The key of step ``i`` is ``jax.random.fold_in(key, i)``: results depend on the key and the step
  index only, not on ``steps_per_call``, and resuming from a checkpoint continues bit-identically.
* With ``mesh`` (a ``jax.sharding.Mesh``, e.g. ``fmjax.sharding.data_mesh()``), :func:`fit`
  replicates params / optimizer state / EMA on every device and the loss shards its batch by
  drawing it with ``fmjax.sharding.sharded_pairs`` (data parallelism; XLA inserts the gradient
  all-reduce); :func:`fit_many` instead splits the model axis ``M`` across the devices. The
  same program runs for one device or many.
* The host only logs between chunks (progress bar, ``callback``) and saves checkpoints at
  multiples of ``checkpoint_every`` and at the end. The loss of chunk ``k`` is read while chunk
  ``k + 1`` runs.

The compiled chunk and the train state live in ``fmjax._fit_step``, the host-side bookkeeping
(history, progress, chunk bounds, checkpoint opening) in ``fmjax._fit_host``, the compile cache
in ``fmjax._cache``; this module holds the options, the driver and the public API.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax._cache import LRU, signature, trace_config
from fmjax._fit_host import History, Progress, chunk_bounds, open_checkpoints
from fmjax._fit_step import State, make_chunk, output_structs
from fmjax.sharding import batch_sharding, replicated

__all__ = ["FitResult", "fit", "fit_many", "make_optimizer"]

PyTree = Any
LossFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What a fit returns.

    Attributes:
        params: final parameters (for :func:`fit_many`, with a leading model axis ``M``).
        ema_params: exponential moving average of the parameters, or ``None`` without EMA.
        opt_state: final optimizer state.
        step: number of optimizer steps done, counting those restored from a checkpoint.
        losses: loss of every step ``0 .. step - 1``, shape ``(step,)`` (``(M, step)`` for
            :func:`fit_many`), on the host; includes the history restored from a checkpoint.
        aux: with ``has_aux=True``, the aux output of every step stacked along the step axis like
            ``losses`` (numpy pytree); else ``None``.
        wall_time: seconds of the whole call (compilation, checkpoint I/O and logging included).
        compile_time: seconds spent compiling the chunk function; 0.0 when a compiled function
            of an earlier call with the same configuration and shapes was reused.
        steps_per_second: steps run in this call divided by the time spent running them (wall
            time minus compile time); ``nan`` when no step was run.
    """

    params: PyTree
    ema_params: PyTree
    opt_state: PyTree
    step: int
    losses: np.ndarray
    aux: PyTree
    wall_time: float
    compile_time: float
    steps_per_second: float


# ----------------------------------------------------------------------------- validation


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")
    return v


def make_optimizer(
    optimizer: optax.GradientTransformation | None = None,
    *,
    learning_rate: float = 1e-3,
    lr_schedule: str | optax.Schedule | None = None,
    clip_norm: float | None = None,
    steps: int | None = None,
) -> optax.GradientTransformation:
    """The optimizer :func:`fit` uses: Adam, optional cosine/custom schedule, optional clipping.

    Args:
        optimizer: an optax transformation used as is (then ``learning_rate`` and ``lr_schedule``
            must be left at their defaults); ``None`` builds ``optax.adam``.
        learning_rate: peak learning rate of the default Adam.
        lr_schedule: ``None`` (constant), ``"cosine"`` (cosine decay from ``learning_rate`` to 0
            over ``steps``) or an optax schedule ``step -> learning rate``.
        clip_norm: if given, gradients are clipped to this global norm before the optimizer
            (``optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)``).
        steps: total number of steps, needed by ``"cosine"``.

    Returns:
        An ``optax.GradientTransformation``.
    """
    if optimizer is None:
        lr: float | optax.Schedule = _check_positive(learning_rate, "learning_rate")
        if lr_schedule is None:
            pass
        elif isinstance(lr_schedule, str):
            if lr_schedule != "cosine":
                raise ValueError(
                    "`lr_schedule` must be None, 'cosine' or an optax schedule, "
                    f"got {lr_schedule!r}"
                )
            if steps is None:
                raise ValueError("`lr_schedule='cosine'` needs the total number of `steps`")
            lr = optax.cosine_decay_schedule(lr, max(int(steps), 1))
        elif callable(lr_schedule):
            lr = lr_schedule
        else:
            raise ValueError(
                f"`lr_schedule` must be None, 'cosine' or an optax schedule, got {lr_schedule!r}"
            )
        optimizer = optax.adam(lr)
    else:
        if not isinstance(optimizer, optax.GradientTransformation):
            raise ValueError(
                f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer)}"
            )
        if lr_schedule is not None or learning_rate != 1e-3:
            raise ValueError(
                "`learning_rate` and `lr_schedule` configure the default Adam only; "
                "build them into the `optimizer` you pass instead"
            )
    if clip_norm is not None:
        optimizer = optax.chain(
            optax.clip_by_global_norm(_check_positive(clip_norm, "clip_norm")), optimizer
        )
    return optimizer


# ----------------------------------------------------------------------------- compile cache


def _optimizer_key(optimizer, learning_rate, lr_schedule, clip_norm, steps) -> tuple:
    """What of :func:`make_optimizer`'s (validated) arguments its transformation bakes in."""
    clip = None if clip_norm is None else float(clip_norm)
    if optimizer is not None:  # learning_rate and lr_schedule are unused then
        return "given", optimizer, clip
    horizon = max(int(steps), 1) if isinstance(lr_schedule, str) else None  # only "cosine"
    return "adam", float(learning_rate), lr_schedule, clip, horizon


# Output shapes of the loss (one trace of it) and compiled chunk functions, across calls.
_STRUCTS = LRU(16)
_CHUNKS = LRU(16)


# ----------------------------------------------------------------------------- the driver


def _check_options(
    steps, steps_per_call, ema_decay, checkpoint_dir, checkpoint_every, floor, callback
):
    steps = _check_int(steps, "steps", 0)
    steps_per_call = _check_int(steps_per_call, "steps_per_call", 1)
    if ema_decay is not None:
        ema_decay = float(ema_decay)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {ema_decay}")
    if checkpoint_every is not None:
        checkpoint_every = _check_int(checkpoint_every, "checkpoint_every", 1)
        if checkpoint_dir is None:
            raise ValueError("`checkpoint_every` needs a `checkpoint_dir`")
    if floor is not None:
        floor = float(floor)
    if callback is not None and not callable(callback):
        raise ValueError("`callback` must be callable or None")
    return steps, steps_per_call, ema_decay, checkpoint_every, floor


def _is_key_array(keys) -> bool:
    return jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)


def _check_batch(params, keys, instances, batched: bool) -> int | None:
    """Validate params / keys / instances; the number of models M (None when not batched)."""
    for leaf in jax.tree.leaves(params):
        if isinstance(leaf, jax.core.Tracer):
            raise ValueError("`params` must be concrete arrays (call fit outside jit/vmap)")
    if not jax.tree.leaves(params):
        raise ValueError("`params` has no array leaves")
    if not batched:
        ok = keys.shape == () if _is_key_array(keys) else keys.shape == (2,)
        if not ok or not (_is_key_array(keys) or keys.dtype == jnp.uint32):
            raise ValueError(
                f"`key` must be a single PRNG key (jax.random.key or PRNGKey), got {keys.shape}"
            )
        return None
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(params)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"`params_batch` leaves must share a leading model axis, got leading sizes {sizes}"
        )
    m = sizes.pop()
    n_keys = keys.shape[0] if (_is_key_array(keys) and keys.ndim == 1) or keys.ndim == 2 else None
    if n_keys != m:
        raise ValueError(
            f"`keys` must hold one key per model (leading axis {m}), got shape {keys.shape}"
        )
    for leaf in jax.tree.leaves(instances):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != m:
            raise ValueError(
                f"`instances` leaves must have a leading axis of size {m}, got {np.shape(leaf)}"
            )
    return m


def _placement(mesh, state: State, keys, instances, m: int | None):
    """Shardings ``(state, keys, instances, outputs)`` on ``mesh`` (all None without a mesh).

    One model: everything replicated (the loss shards its own batch). ``M`` models: the model
    axis of state, keys and instances split across the mesh, the step counter replicated.
    """
    if mesh is None:
        return None, None, None, None
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(
            f"`mesh` must be a jax.sharding.Mesh (see fmjax.sharding.data_mesh), got {mesh!r}"
        )
    rep = replicated(mesh)
    if m is None:
        return jax.tree.map(lambda _: rep, state), rep, rep, rep
    if m % mesh.size:
        raise ValueError(
            f"with `mesh`, fit_many splits the {m} models of `params_batch` across the "
            f"{mesh.size} devices: the number of models must be a multiple of {mesh.size}"
        )
    split = batch_sharding(mesh)
    state_sh = State(*(jax.tree.map(lambda _: split, part) for part in state[:3]), rep)
    return state_sh, split, jax.tree.map(lambda _: split, instances), rep


def _run(
    loss_fn: LossFn,
    params: PyTree,
    keys,
    *,
    batched: bool,
    instances: PyTree,
    steps: int,
    optimizer,
    learning_rate,
    lr_schedule,
    clip_norm,
    ema_decay,
    has_aux: bool,
    steps_per_call: int,
    checkpoint_dir,
    checkpoint_every,
    max_checkpoints,
    resume: bool,
    progress: bool,
    floor: float | None,
    callback,
    mesh,
) -> FitResult:
    """Shared driver of :func:`fit` (``batched=False``) and :func:`fit_many`."""
    t_start = time.perf_counter()
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable, got {type(loss_fn)}")
    steps, steps_per_call, ema_decay, checkpoint_every, floor = _check_options(
        steps, steps_per_call, ema_decay, checkpoint_dir, checkpoint_every, floor, callback
    )
    tx = make_optimizer(
        optimizer,
        learning_rate=learning_rate,
        lr_schedule=lr_schedule,
        clip_norm=clip_norm,
        steps=steps,
    )
    keys = keys if isinstance(keys, jax.Array) else jnp.asarray(keys)
    m = _check_batch(params, keys, instances, batched)

    def structs_key() -> tuple:  # output shapes do not depend on where the inputs live
        inputs = signature((params, keys, instances), shardings=False)
        return loss_fn, has_aux, batched, inputs, trace_config()

    (loss_struct, aux_struct), _ = _STRUCTS.get_or_make(  # one trace of the loss per key
        structs_key, lambda: output_structs(loss_fn, params, keys, instances, has_aux, m)
    )

    # Fresh state; copies, so that donating never invalidates the caller's arrays.
    params = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    opt_state = (jax.vmap(tx.init) if batched else tx.init)(params)
    ema = jax.tree.map(lambda p: jnp.array(p, copy=True), params) if ema_decay is not None else None
    state = State(params, opt_state, ema, jnp.zeros((), jnp.int32))

    state_sh, keys_sh, inst_sh, out_sh = _placement(mesh, state, keys, instances, m)
    history = History(loss_struct, aux_struct, has_aux)
    ckpt, start = None, 0
    if checkpoint_dir is not None:
        ckpt, state, start = open_checkpoints(
            checkpoint_dir, max_checkpoints, resume, state, steps, history
        )
    if mesh is not None:
        state = jax.device_put(state, state_sh)
        keys = jax.device_put(keys, keys_sh)
        instances = jax.device_put(instances, inst_sh)

    compile_time, run_steps, run_time = 0.0, 0, 0.0
    chunk_len = max(1, min(steps_per_call, steps - start))
    if steps > start:
        args = (state, keys, jnp.asarray(0, jnp.int32), instances)

        def compile_chunk():
            chunk = make_chunk(
                loss_fn, tx, has_aux=has_aux, ema_decay=ema_decay, batched=batched,
                with_instances=instances is not None, chunk_len=chunk_len,
                loss_struct=loss_struct, aux_struct=aux_struct,
            )  # fmt: skip
            # With a mesh the state keeps its placement from chunk to chunk.
            out = {} if mesh is None else {"out_shardings": (state_sh, out_sh, out_sh)}
            return jax.jit(chunk, donate_argnums=0, **out).lower(*args).compile()

        def cache_key() -> tuple:  # everything the compiled program depends on
            opt = _optimizer_key(optimizer, learning_rate, lr_schedule, clip_norm, steps)
            return (
                loss_fn, opt, has_aux, ema_decay, batched, instances is not None, chunk_len, mesh,
                signature((loss_struct, aux_struct)), signature(args), trace_config(),
            )  # fmt: skip

        t0 = time.perf_counter()
        compiled, hit = _CHUNKS.get_or_make(cache_key, compile_chunk)
        compile_time = 0.0 if hit else time.perf_counter() - t0
        del args  # the first chunk donates these buffers: keep no reference to them

    report = Progress(progress, start, steps, floor, callback)
    t_run = time.perf_counter()
    pending = None  # (begin, end, losses, aux) of the chunk whose outputs are not read yet

    def drain():
        b, e, losses, auxes = pending
        losses = np.asarray(losses)[: e - b]
        auxes = jax.tree.map(lambda a: np.asarray(a)[: e - b], auxes)
        history.append(losses, auxes)
        report(e, losses, auxes if has_aux else None)

    try:
        for b, e in chunk_bounds(start, steps, chunk_len, checkpoint_every):
            state, losses, auxes = compiled(state, keys, jnp.asarray(e - b, jnp.int32), instances)
            run_steps += e - b
            if pending is not None:  # read chunk k while chunk k + 1 runs
                drain()
            pending = (b, e, losses, auxes)
            if ckpt is not None and (
                e == steps or (checkpoint_every and e % checkpoint_every == 0)
            ):
                drain()
                pending = None
                ckpt.save(e, state, history.as_dict())
        if pending is not None:
            drain()
        jax.block_until_ready(state)
        run_time = time.perf_counter() - t_run
    finally:
        report.close()
        if ckpt is not None:
            ckpt.close()

    hist = history.as_dict()
    losses, aux = hist["loss"], hist.get("aux")
    if batched:  # (steps, M, ...) -> (M, steps, ...)
        losses, aux = jax.tree.map(lambda a: np.swapaxes(a, 0, 1), (losses, aux))
    return FitResult(
        params=state.params,
        ema_params=state.ema_params,
        opt_state=state.opt_state,
        step=int(state.step),
        losses=losses,
        aux=aux,
        wall_time=time.perf_counter() - t_start,
        compile_time=compile_time,
        steps_per_second=run_steps / run_time if run_steps else float("nan"),
    )


# ----------------------------------------------------------------------------- public API


def fit(
    loss_fn: LossFn,
    params: PyTree,
    key: jax.Array,
    *,
    steps: int,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    lr_schedule: str | optax.Schedule | None = None,
    clip_norm: float | None = None,
    ema_decay: float | None = None,
    has_aux: bool = False,
    steps_per_call: int = 500,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    max_checkpoints: int | None = 3,
    resume: bool = True,
    progress: bool = True,
    floor: float | None = None,
    callback: Callable[[int, np.ndarray, Any], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> FitResult:
    """Minimise ``loss_fn`` over ``params`` with optax, many steps per compiled call.

    Step ``i`` (counting from 0 over the whole run, resumed steps included) evaluates
    ``loss_fn(params, jax.random.fold_in(key, i))``, so the result depends on ``key`` and ``steps``
    only, not on ``steps_per_call`` or on interruptions.

    Compiled once per distinct configuration and shapes: a later call with the same ``loss_fn``
    object, options and argument shapes / dtypes / shardings reuses the compiled program
    (``compile_time`` 0.0; see the module docstring for what the cache compares).

    Args:
        loss_fn: ``loss_fn(params, key) -> scalar`` (``-> (scalar, aux)`` with ``has_aux=True``);
            must be jit- and grad-able, and pure (as for ``jax.jit``, it is not traced again
            when its compiled program is reused).
        params: initial parameters (pytree of arrays); not modified (copied before donation).
        key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
        steps: total number of optimizer steps (a resumed run trains ``steps - restored`` more).
        optimizer: optax transformation; default ``optax.adam(learning_rate)``.
        learning_rate: learning rate of the default Adam.
        lr_schedule: ``None``, ``"cosine"`` (decay to 0 over ``steps``) or an optax schedule.
        clip_norm: clip gradients to this global norm (``optax.clip_by_global_norm``).
        ema_decay: if given, keep ``ema <- d * ema + (1 - d) * params`` after every step,
            starting from the initial params (no bias correction).
        has_aux: ``loss_fn`` returns ``(loss, aux)``; aux of every step is kept in the result.
        steps_per_call: maximum number of steps fused in one compiled call; the host logs and
            checkpoints between calls only.
        checkpoint_dir: directory for orbax checkpoints (created if missing); ``None``: none.
        checkpoint_every: save every that many steps (and always at the end).
        max_checkpoints: how many checkpoints to keep (``None``: all).
        resume: continue from the latest checkpoint in ``checkpoint_dir`` if there is one
            (bit-identical to an uninterrupted run). With ``resume=False`` a non-empty
            ``checkpoint_dir`` raises ``ValueError`` rather than being overwritten.
        progress: show a tqdm progress bar with the loss and steps/s.
        floor: a known lower bound of the loss (e.g. the CFM loss floor); the progress bar then
            also shows the excess loss ``loss - floor``.
        callback: ``callback(step, losses, aux)`` called on the host after every chunk with the
            losses (and aux) of that chunk.
        mesh: data parallelism over the devices of this mesh (``fmjax.sharding.data_mesh()``):
            params, optimizer state and EMA are replicated on every device, and a loss whose
            pairs come from ``fmjax.sharding.sharded_pairs(sample_pairs, mesh)`` draws and
            processes its batch shard by shard (the batch size must divide by ``mesh.size``);
            XLA all-reduces the gradients. Same result as ``mesh=None`` up to the summation
            order of the batch mean (bit-identical on a 1-device mesh). A loss that does not
            shard its batch still runs, every device computing the whole batch.

    Returns:
        A :class:`FitResult`; ``losses`` has shape ``(steps,)``.

    Raises:
        ValueError: invalid arguments, or a ``loss_fn`` that does not return a scalar.
        RuntimeError: a checkpoint that cannot be restored (the message names its path).
    """
    options = dict(locals())  # first statement: exactly the arguments above
    return _run(options.pop("loss_fn"), options.pop("params"), options.pop("key"),
                batched=False, instances=None, **options)  # fmt: skip


def fit_many(
    loss_fn: LossFn,
    params_batch: PyTree,
    keys: jax.Array,
    *,
    steps: int,
    instances: PyTree | None = None,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    lr_schedule: str | optax.Schedule | None = None,
    clip_norm: float | None = None,
    ema_decay: float | None = None,
    has_aux: bool = False,
    steps_per_call: int = 500,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    max_checkpoints: int | None = 3,
    resume: bool = True,
    progress: bool = True,
    floor: float | None = None,
    callback: Callable[[int, np.ndarray, Any], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> FitResult:
    """Train ``M`` models at once (seeds and/or problem instances), ``vmap``-ed in one call.

    Model ``m`` follows exactly the recipe of :func:`fit` with ``params_batch[m]`` and
    ``keys[m]``, up to floating-point round-off of the batched computation. Compiled once per
    distinct configuration and shapes, as :func:`fit` (``compile_time`` 0.0 when reused; a
    different ``M`` or instance shape compiles again).

    Args:
        loss_fn: ``loss_fn(params, key) -> scalar`` for one model, or
            ``loss_fn(params, key, instance)`` when ``instances`` is given.
        params_batch: initial parameters with a leading model axis ``M`` on every leaf
            (e.g. ``jax.vmap(model.init)(keys, ...)``).
        keys: ``M`` PRNG keys (shape ``(M,)`` typed keys or ``(M, 2)`` raw keys).
        steps: number of optimizer steps (the same for all models).
        instances: optional pytree with a leading axis ``M`` (e.g. a batch of mixtures) passed
            as third argument of ``loss_fn``.
        mesh: split the ``M`` models across the devices of this mesh (``M`` must be a
            multiple of ``mesh.size``): model parallelism over problem instances, no
            communication between devices but the loss history.
        **others: as in :func:`fit`; the progress bar shows the mean loss over models.

    Returns:
        A :class:`FitResult` whose params, ema params and opt state have the leading axis
        ``M`` and whose ``losses`` have shape ``(M, steps)``.
    """
    options = dict(locals())  # first statement: exactly the arguments above
    return _run(options.pop("loss_fn"), options.pop("params_batch"), options.pop("keys"),
                batched=True, **options)  # fmt: skip
