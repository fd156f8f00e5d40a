"""Training loops: :func:`fit` minimises a loss over one model's parameters with optax, many steps
per compiled call, with optional EMA, checkpoints, progress and data parallelism; :func:`fit_many`
trains a batch of models (seeds or problem instances) in one compiled call with ``vmap``.

A loss is any function ``loss_fn(params, key) -> scalar`` (or ``-> (scalar, aux)`` with
``has_aux=True``) that ``jax.grad`` can differentiate, e.g. one built by ``fmjax.losses.cfm``.
:func:`fit` also trains a Flax NNX or Equinox module passed whole (``loss_fn(model, key)``; see
``fmjax.train.modules`` for what is trained, carried and fixed).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Float, PRNGKeyArray

from fmjax import _checks
from fmjax._typing import LossFn, PyTree
from fmjax.sharding import batch_sharding, place, replicated, to_host
from fmjax.train import modules
from fmjax.train.cache import LRU, signature, trace_config
from fmjax.train.checkpoint import Checkpointer, check_writable, restore
from fmjax.train.config import FitConfig, RunOptions
from fmjax.train.fingerprint import fingerprint
from fmjax.train.host import History, Progress, chunk_bounds
from fmjax.train.step import (
    State,
    checkpointed,
    from_checkpoint,
    init_state,
    make_chunk,
    output_structs,
)

__all__ = ["FitResult", "fit", "fit_many"]

# Compiled programs (and the loss's output shapes, one trace each) kept across calls. Their keys
# are the FitConfig, the abstract signature of the arguments and the JAX trace configuration.
_STRUCTS = LRU(16)
_PROGRAMS = LRU(16)


class FitResult(NamedTuple):
    """What a fit returns.

    Attributes:
        params: final parameters (for :func:`fit_many`, with a leading model axis ``M``); for a
            Flax NNX / Equinox module passed to :func:`fit`, the trained module, a new object of
            the same kind (NNX: in the mode it was given, usually train mode; call
            ``result.params.eval()`` before using it as a velocity field).
        ema_params: exponential moving average of the parameters, or ``None`` without EMA (for
            a module: a module with the averaged parameters and the final carried state).
        opt_state: final optimizer state.
        step: number of optimizer steps done, counting those restored from a checkpoint.
        losses: loss of every step ``0 .. step - 1``, shape ``(step,)`` (``(M, step)`` for
            :func:`fit_many`), on the host; includes the history restored from a checkpoint.
        aux: with ``has_aux=True``, the aux output of every step stacked along the step axis like
            ``losses`` (numpy pytree); else ``None``.
        wall_time: seconds of the whole call (compilation, checkpoint I/O and logging included).
        compile_time: seconds spent compiling; 0.0 when the compiled program of an earlier call
            with an equal configuration and arguments of the same shapes was reused.
        steps_per_second: steps run in this call divided by the time spent running them (wall
            time minus compile time); ``nan`` when no step was run.
        resumed_from: the step of the checkpoint this call resumed from, or ``None`` when it
            started from ``params`` (the progress bar then reads "resumed from step N of
            <checkpoint_dir>").
    """

    params: PyTree
    ema_params: PyTree | None
    opt_state: PyTree
    step: int
    losses: Float[np.ndarray, "*models steps"]
    aux: PyTree | None
    wall_time: float
    compile_time: float
    steps_per_second: float
    resumed_from: int | None = None


class _Placement(NamedTuple):
    """Shardings of the state, keys, instances and per-step outputs on a mesh."""

    state: Any
    keys: Any
    instances: Any
    outputs: Any


# ----------------------------------------------------------------------------- prepare


def _check_keys(fn: str, keys: Any, m: int | None) -> jax.Array:
    """One key (``m`` None), or ``m`` keys: ``(m,)`` typed or ``(m, 2)`` uint32."""
    if m is None:
        return jnp.asarray(_checks.check_key(fn, "key", keys))
    what = f"{m} PRNG keys, one per model (shape ({m},) typed or ({m}, 2) uint32)"
    if not (hasattr(keys, "dtype") and hasattr(keys, "shape")):
        _checks.fail(fn, "keys", what, keys, TypeError)
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if not typed and keys.dtype != np.uint32:
        _checks.fail(fn, "keys", what, f"dtype {keys.dtype}", TypeError)
    if keys.shape != ((m,) if typed else (m, 2)):
        _checks.fail(fn, "keys", what, f"shape {keys.shape}")
    return jnp.asarray(keys)


def _models(fn: str, config: FitConfig, params: PyTree, instances: PyTree) -> int | None:
    """The number of models ``M`` of a batched fit (None for one model); checks the leaves."""
    name = "params_batch" if config.batched else "params"
    if not _checks.is_concrete(params, instances):
        _checks.fail(fn, name, "concrete arrays (call it outside jit/vmap)", "a tracer", TypeError)
    if not jax.tree.leaves(params):
        _checks.fail(fn, name, "a pytree with array leaves", params)
    if config.model is None:  # a module's parts are checked by its library
        modules.check_params(fn, name, params)
    if not config.batched:
        return None
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(params)}
    if len(sizes) != 1 or None in sizes:
        _checks.fail(fn, name, "leaves with one shared leading model axis", f"sizes {sizes}")
    m = sizes.pop()
    for leaf in jax.tree.leaves(instances):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != m:
            _checks.fail(fn, "instances", f"leaves with a leading axis of {m}", np.shape(leaf))
    if config.mesh is not None and m % config.mesh.size:
        what = f"a number of models that is a multiple of {config.mesh.size} (the mesh's devices)"
        _checks.fail(fn, name, what, f"{m} models")
    return m


def _output_structs(fn: str, config: FitConfig, params, keys, instances, m: int | None,
                    model_state: PyTree = None):  # fmt: skip
    """``(loss, aux)`` shapes of one step, from one trace of the loss per configuration."""

    def key() -> tuple:  # output shapes do not depend on where the inputs live
        args = (params, keys, instances, model_state)
        return config, signature(args, shardings=False), trace_config()

    structs, _ = _STRUCTS.get_or_make(
        key, lambda: output_structs(fn, config, params, keys, instances, m, model_state)
    )
    return structs


def _module(fn: str, config: FitConfig, params) -> tuple[FitConfig, PyTree, PyTree, PyTree]:
    """For a Flax NNX / Equinox module: ``(config with its spec, trained params, carried state,
    RNG state)``; a pytree of parameters passes through (``config, params, None, None``)."""
    if not modules.is_module(params):
        return config, params, None, None
    if config.batched:
        _checks.fail(
            fn, "params_batch",
            "a pytree of parameters with a leading model axis (train Flax NNX / Equinox modules "
            "one at a time with fit)", type(params).__qualname__, TypeError,
        )  # fmt: skip
    spec, params, model_state, rngs = modules.split(fn, params)
    return dataclasses.replace(config, model=spec), params, model_state, rngs


def _placement(config: FitConfig, state: State, instances, m: int | None) -> _Placement | None:
    """Where everything lives on ``config.mesh`` (None without a mesh).

    One model: everything replicated (the loss shards its own batch). ``M`` models: the model
    axis of state, keys and instances split across the mesh, the step counter replicated.
    """
    mesh = config.mesh
    if mesh is None:
        return None
    rep = replicated(mesh)
    if m is None:
        return _Placement(jax.tree.map(lambda _: rep, state), rep, rep, rep)
    split = batch_sharding(mesh)
    state_sh = State(
        *(jax.tree.map(lambda _: split, part) for part in state[:3]),
        rep,
        jax.tree.map(lambda _: split, state.model_state),
    )
    return _Placement(state_sh, split, jax.tree.map(lambda _: split, instances), rep)


def _place(placement: _Placement | None, state: State, keys, instances):
    if placement is None:
        return state, keys, instances
    return place((state, keys, instances), placement[:3])


# ----------------------------------------------------------------------------- run


def _program(config: FitConfig, structs, placement: _Placement | None, args) -> tuple[Any, float]:
    """The compiled chunk for ``args`` (reused when cached) and the seconds spent compiling."""

    def compile_chunk():
        chunk = make_chunk(config, *structs)
        out = {}  # with a mesh the state keeps its placement from chunk to chunk
        if placement is not None:
            out["out_shardings"] = (placement.state, placement.outputs, placement.outputs)
        return jax.jit(chunk, donate_argnums=0, **out).lower(*args).compile()

    t0 = time.perf_counter()
    compiled, hit = _PROGRAMS.get_or_make(
        lambda: (config, signature(args), trace_config()), compile_chunk
    )
    return compiled, 0.0 if hit else time.perf_counter() - t0


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))


def _state_finite(state) -> bool:
    """Whether every floating leaf of ``state`` is finite: on the host for a host state, else
    one reduction on the device and one boolean read back (no copy of the state)."""
    floats = [a for a in jax.tree.leaves(state) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
    if not any(isinstance(a, jax.Array) for a in floats):
        return all(np.isfinite(a).all() for a in floats)
    return bool(_all_finite(floats))


def _check_finite(
    fn: str, losses=None, *, begin: int, end: int, state_ok: bool = True, ckpt: Checkpointer | None
) -> None:
    """``FloatingPointError`` if the losses of steps ``begin .. end - 1`` (``(steps,)``, for
    ``fit_many`` ``(steps, M)``; None: none) are not finite, or ``state_ok`` is False.

    The one policy of ``fit`` and ``fit_many``, with or without checkpoints: the losses of every
    chunk are checked as they are read (on the host already), the state (params, optimizer
    state, EMA) wherever a checkpoint is due and at the end of the run. A non-finite state is
    never saved, so no finite checkpoint is rotated out."""
    losses = np.zeros(0) if losses is None else np.asarray(losses)[: end - begin]
    bad = ~np.isfinite(losses).all(axis=tuple(range(1, losses.ndim)))
    if not bad.any() and state_ok:
        return
    if ckpt is None:
        kept = "no checkpoint_dir was given: nothing was saved"
    else:
        last = ckpt.latest_step()
        kept = f"the state of step {end} was not saved and " + (
            f"the last finite checkpoint is kept at step {last} in {ckpt.path}"
            if last is not None
            else f"no checkpoint was written to {ckpt.path}"
        )
    if bad.any():
        row = int(np.argmax(bad))
        what = f"the loss became non-finite at step {begin + row} ({losses[row]})"
        if losses.ndim > 1:  # fit_many: which models
            what += f" for model(s) {np.flatnonzero(~np.isfinite(losses[row])).tolist()}"
    else:
        what = f"the train state (params / optimizer state) became non-finite by step {end}"
    raise FloatingPointError(
        f"{fn}: {what}; the fit stopped at step {end} and {kept}. Lower the learning rate, clip "
        "the gradients or check `loss_fn`."
    )


def _writable_once(fn: str, path) -> None:
    """``check_writable`` of ``checkpoint_dir``, by process 0 alone across processes (it makes
    the directory and writes its probe); the others learn its answer, so all raise or none."""
    if jax.process_count() == 1:
        check_writable(fn, "checkpoint_dir", path)
        return
    from jax.experimental import multihost_utils

    error = None
    if jax.process_index() == 0:
        try:
            check_writable(fn, "checkpoint_dir", path)
        except ValueError as e:
            error = e
    if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))):
        raise error or ValueError(
            f"{fn}: `checkpoint_dir` must be a folder that can be created and written to, got "
            f"{os.path.abspath(os.fspath(path))!r} (process 0 could not write to it)"
        )


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (every process must ask; one process: ``flag``).
    A stop seen by one process (a signal it alone received) stops them all at the same step."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _run_chunks(program, state: State, keys, instances, *, start: int, chunk_len: int,
                options: RunOptions, history: History, report: Progress,
                ckpt: Checkpointer | None, run_fingerprint: dict | None,
                fn: str) -> State:  # fmt: skip
    """Run steps ``start .. options.steps`` chunk by chunk; the losses of chunk ``k`` are read
    (and checked) while chunk ``k + 1`` runs. Saves checkpoints at multiples of
    ``checkpoint_every``, at the end and when ``options.stop()`` turns true (then stops). A
    non-finite loss or state stops the fit with ``FloatingPointError`` (``_check_finite``), with
    or without checkpoints: a non-finite loss when its chunk is read (at most one chunk after
    it ran), a non-finite state where a checkpoint is due and at the end."""
    steps, every = options.steps, options.checkpoint_every
    pending = None  # (begin, end, losses, aux) of the chunk whose outputs are not read yet

    def drain(end: int):
        b, e, losses, auxes = pending
        losses = np.asarray(losses)[: e - b]
        auxes = jax.tree.map(lambda a: np.asarray(a)[: e - b], auxes)
        history.append(losses, auxes)
        report(e, losses, auxes if history.has_aux else None)
        _check_finite(fn, losses, begin=b, end=end, ckpt=ckpt)

    e = start
    for b, e in chunk_bounds(start, steps, chunk_len, every):
        state, losses, auxes = program(state, keys, jnp.asarray(e - b, jnp.int32), instances)
        if pending is not None:
            drain(e)
        pending = (b, e, losses, auxes)
        stopping = options.stop is not None and _any_process(bool(options.stop()))
        if ckpt is not None and (e == steps or (every and e % every == 0) or stopping):
            drain(e)
            pending = None
            host_state = to_host(state)
            _check_finite(fn, begin=e, end=e, state_ok=_state_finite(host_state), ckpt=ckpt)
            ckpt.save(e, checkpointed(host_state), history.as_dict(), run_fingerprint)
        if stopping:
            break
    if pending is not None:
        drain(e)
        _check_finite(fn, begin=e, end=e, state_ok=_state_finite(state), ckpt=ckpt)
    return jax.block_until_ready(state)


# ----------------------------------------------------------------------------- pipeline


def _train(fn: str, config: FitConfig, options: RunOptions, state: State, keys, instances,
           history: History, ckpt: Checkpointer | None, m: int | None,
           run_fingerprint: dict | None):  # fmt: skip
    """Restore, place, compile and run: ``(state, compile_time, steps run, run seconds,
    start)``."""
    start = 0
    if ckpt is not None:
        saved, restored, start = restore(
            ckpt, checkpointed(state), history.target, steps=options.steps,
            resume=options.resume, fingerprint=run_fingerprint, fn=fn,
        )  # fmt: skip
        state = from_checkpoint(saved)
        history.append(restored["loss"], restored.get("aux"))
    placement = _placement(config, state, instances, m)
    state, keys, instances = _place(placement, state, keys, instances)
    if options.steps <= start:
        return state, 0.0, 0, 0.0, start
    args = (state, keys, jnp.asarray(0, jnp.int32), instances)
    program, compile_time = _program(
        config, (history.loss_struct, history.aux_struct), placement, args
    )
    del args  # the first chunk donates the state's buffers: keep no reference to them
    desc = f"fit (resumed from step {start} of {ckpt.path})" if start else "fit"
    # One bar per run, process 0's; every process calls the callback.
    bar = options.progress and jax.process_index() == 0
    report = Progress(bar, start, options.steps, options.floor, options.callback, desc=desc)
    t0 = time.perf_counter()
    try:
        state = _run_chunks(
            program, state, keys, instances, start=start, chunk_len=config.chunk_len,
            options=options, history=history, report=report, ckpt=ckpt,
            run_fingerprint=run_fingerprint, fn=fn,
        )  # fmt: skip
    finally:
        report.close()
    return state, compile_time, int(state.step) - start, time.perf_counter() - t0, start


def _assemble(config: FitConfig, state: State, history: History, *, t_start: float,
              compile_time: float, run_steps: int, run_time: float,
              start: int, rngs: PyTree = None) -> FitResult:  # fmt: skip
    """The :class:`FitResult` of a finished run (model axis first for a batch of models); a
    module's params (and EMA) merged back into a module of the kind ``fit`` was given."""
    hist = history.as_dict()
    losses, aux = hist["loss"], hist.get("aux")
    if config.batched:  # (steps, M, ...) -> (M, steps, ...)
        losses, aux = jax.tree.map(lambda a: np.swapaxes(a, 0, 1), (losses, aux))
    params, ema = state.params, state.ema_params
    if config.model is not None:
        params = modules.assemble(config.model, params, state.model_state, rngs)
        if ema is not None:
            ema = modules.assemble(config.model, ema, state.model_state, rngs)
    return FitResult(
        params=params,
        ema_params=ema,
        opt_state=state.opt_state,
        step=int(state.step),
        losses=losses,
        aux=aux,
        wall_time=time.perf_counter() - t_start,
        compile_time=compile_time,
        steps_per_second=run_steps / run_time if run_steps else float("nan"),
        resumed_from=start or None,
    )


def _fit(fn: str, config: FitConfig, options: RunOptions, params, keys, instances) -> FitResult:
    """prepare (check, initial state, history) -> restore / run chunks -> assemble."""
    t_start = time.perf_counter()
    if options.checkpoint_dir is not None:  # before any work: fail in milliseconds
        _checks.require("orbax.checkpoint", fn)
        _writable_once(fn, options.checkpoint_dir)
    config, params, model_state, rngs = _module(fn, config, params)
    m = _models(fn, config, params, instances)
    keys = _check_keys(fn, keys, m)
    structs = _output_structs(fn, config, params, keys, instances, m, model_state)
    state = init_state(config, params, model_state)
    history = History(*structs, config.has_aux)
    ckpt, run_fingerprint = None, None
    if options.checkpoint_dir is not None:
        run_fingerprint = fingerprint(config, params, keys, model_state, instances)
        ckpt = Checkpointer(options.checkpoint_dir, options.max_checkpoints, fn)
    done = False
    try:
        state, compile_time, run_steps, run_time, start = _train(
            fn, config, options, state, keys, instances, history, ckpt, m, run_fingerprint
        )
        done = True
    finally:
        if ckpt is not None:  # after another error, a failed write does not hide it
            ckpt.close(check=done)
    return _assemble(config, state, history, t_start=t_start, compile_time=compile_time,
                     run_steps=run_steps, run_time=run_time, start=start, rngs=rngs)  # fmt: skip


# ----------------------------------------------------------------------------- public API


def fit(
    loss_fn: LossFn,
    params: PyTree,
    *,
    key: PRNGKeyArray,
    steps: int,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float | None = None,
    lr_schedule: str | optax.Schedule | None = None,
    clip_norm: float | None = None,
    ema_decay: float | None = None,
    has_aux: bool = False,
    steps_per_call: int = 500,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    max_checkpoints: int | None = 3,
    resume: bool | str = True,
    progress: bool = True,
    floor: float | None = None,
    callback: Callable[[int, np.ndarray, Any], None] | None = None,
    stop: Callable[[], bool] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> FitResult:
    """Minimise ``loss_fn`` over ``params`` with optax, many steps per compiled call.

    Step ``i`` (counting from 0 over the whole run, resumed steps included) evaluates
    ``loss_fn(params, jax.random.fold_in(key, i))``, so the result depends on ``key`` and ``steps``
    only, not on ``steps_per_call`` or on interruptions. Steps run in a device loop of at most
    ``steps_per_call`` steps per call; the host logs and checkpoints between calls.

    The compiled program is reused by a later call with the same ``loss_fn`` object, an equal
    configuration (optimizer, EMA, aux, chunk length, mesh) and arguments of the same structure,
    shapes, dtypes and shardings (``compile_time`` is then 0.0). As with ``jax.jit``, ``loss_fn``
    must be pure: Python state it reads is frozen at its first trace.

    Modules: ``params`` may be a Flax NNX or an Equinox module passed whole, with a loss that
    takes the module (``losses.cfm(model, ...)`` calls ``model(t, x)``; any
    ``loss_fn(model, key)`` will do). Each step merges the module from its parts, calls the loss
    and differentiates the trained part only:

    * NNX (``nnx.split(model, nnx.Param, nnx.RngState, ...)``): the ``nnx.Param`` variables are
      trained. Every other variable (BatchNorm's running statistics ``BatchStat``, a user's
      ``nnx.Variable``) is carried: what the loss call leaves in it is what the next step sees,
      and it is checkpointed with the parameters. The RNG streams (``nnx.Rngs``, e.g. of
      ``nnx.Dropout``) are reseeded at every step from that step's key (stream ``j`` from
      ``fold_in(fold_in(key, i), 0x0D0F0000 + j)``), so the masks depend on ``key`` and the step
      only, as the loss's draws do, and a resumed run draws the same ones. The module trains in
      the mode it is given (new NNX modules are in train mode: BatchNorm normalises by batch
      statistics and updates its running averages, Dropout drops); switch the result to eval
      mode with ``result.params.eval()`` (running statistics, no dropout) to use it as a field.
    * Equinox (``eqx.partition(model, eqx.is_inexact_array)``): floating arrays are trained, the
      rest (integer arrays, functions, ...) is static. Stateful layers that take an
      ``eqx.nn.State`` are not carried: call them with a state of your own inside the model.

    ``FitResult.params`` (and ``ema_params``) is then a new module of the same kind; the module
    given is not modified. The compiled program is reused for a module of equal structure.

    Args:
        loss_fn: ``loss_fn(params, key) -> scalar`` (``-> (scalar, aux)`` with ``has_aux=True``);
            must be jit- and grad-able. For a module, ``loss_fn(model, key)``.
        params: initial parameters (pytree of floating-point arrays), or a Flax NNX / Equinox
            module (above); not modified (copied before donation). A leaf that cannot be
            differentiated (integer, key, function) is a ``TypeError`` naming ``params``.
        key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
        steps: total number of optimizer steps (a resumed run trains ``steps - restored`` more).
        optimizer: an optax transformation (compose clipping, schedules, ... with optax). When
            given, ``learning_rate``, ``lr_schedule`` and ``clip_norm`` must be left ``None``.
        learning_rate: without ``optimizer``: learning rate of the default Adam (1e-3).
        lr_schedule: without ``optimizer``: ``None``, ``"cosine"`` (decay to 0 over ``steps``) or
            an optax schedule (then ``learning_rate`` stays ``None``).
        clip_norm: without ``optimizer``: clip gradients to this global norm before Adam.
        ema_decay: if given, keep ``ema <- d * ema + (1 - d) * params`` after every step,
            starting from the initial params (no bias correction).
        has_aux: ``loss_fn`` returns ``(loss, aux)``; aux of every step is kept in the result.
        steps_per_call: maximum number of steps fused in one compiled call.
        checkpoint_dir: directory for orbax checkpoints (created if missing; needs
            ``fmjax[checkpoint]``); ``None``: none. It must be writable: a probe file is
            written before any work, so a read-only or full folder fails at once
            (``ValueError``). Each checkpoint stores a sha256 checksum of its arrays and the
            run's fingerprint: the loss by content (for a loss of ``fmjax.losses``, each part
            of its ``structure``: model, pair sampler or coupling with a hash of its arrays,
            schedule, time sampler, target, reduction, divergence, batch size; for another
            function, its name and the values its closure holds, arrays by hash), the
            optimizer's configuration, ``ema_decay``, ``has_aux``, the params' structure,
            shapes and dtypes, a module's class and carried state, ``fit_many``'s instances,
            the key, the number of processes and devices. The directory is locked while the fit
            runs: a second fit on it raises ``RuntimeError``. Across processes it must be on a
            file system all of them see; process 0 locks it and orbax writes it once.
        checkpoint_every: save every that many steps (and always at the end). A state whose
            losses since the last save or whose params / optimizer state are not finite is
            never saved (the last finite checkpoint is kept): see ``FloatingPointError``.
        max_checkpoints: how many checkpoints to keep (``None``: all).
        resume: ``True``: continue from the latest checkpoint in ``checkpoint_dir`` if there is
            one (bit-identical to an uninterrupted run); its checksum must verify (else
            ``RuntimeError`` naming the step directory) and its fingerprint must equal this
            run's (else ``ValueError`` saying what differs). ``"force"``: continue it even with
            a different fingerprint, i.e. with new hyperparameters (a warning says what
            differs). ``False``: a non-empty ``checkpoint_dir`` raises ``ValueError`` rather
            than being overwritten.
        progress: show a tqdm progress bar with the loss and steps/s.
        floor: a known lower bound of the loss (e.g. the CFM loss floor); the progress bar then
            also shows the excess loss ``loss - floor``.
        callback: ``callback(step, losses, aux)`` called on the host after every chunk with the
            losses (and aux) of that chunk.
        stop: ``stop() -> bool`` called on the host after every chunk (e.g. a flag set by a
            signal handler): when it returns True the fit saves a checkpoint of that step (with
            ``checkpoint_dir``) and returns early, with ``FitResult.step < steps``; a later
            call with the same arguments resumes from there.
        mesh: data parallelism over the devices of this mesh (``fmjax.sharding.data_mesh()``):
            params, optimizer state and EMA are replicated on every device, and a loss whose
            pairs come from ``fmjax.sharding.sharded_pairs(sample_pairs, mesh)`` draws and
            processes its batch shard by shard (the batch size must divide by ``mesh.size``);
            XLA all-reduces the gradients. Same result as ``mesh=None`` up to the summation
            order of the batch mean (bit-identical on a 1-device mesh). Across processes
            (``fmjax.sharding.initialize_distributed``, a mesh over the devices of all of them)
            every process calls ``fit`` with the same arguments: only process 0 shows the
            progress bar, ``callback`` runs on every process, ``stop()`` true on any process
            stops all of them at the same step, and the result's parameters are replicated
            global arrays.

    Returns:
        A :class:`FitResult`; ``losses`` has shape ``(steps,)``.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a bad value, a ``loss_fn`` that does not return a scalar, a
            ``checkpoint_dir`` that cannot be created or written to, or a checkpoint of another
            run (different fingerprint; the message lists "name: saved X, now Y" for each
            difference) without ``resume="force"``.
        RuntimeError: a checkpoint that cannot be restored or fails its checksum (the message
            names its path), a ``checkpoint_dir`` locked by another fit, or a checkpoint that
            cannot be written (e.g. the disk filled up; the message names the step and the
            cause; the earlier checkpoints are kept).
        FloatingPointError: a non-finite loss or state, with or without ``checkpoint_dir``;
            the message names the step where the loss became non-finite. The losses of every
            chunk are checked as they are read (the fit stops at most one chunk of
            ``steps_per_call`` steps later), the params / optimizer state / EMA where a
            checkpoint is due and at the end (one reduction on the device).
    """
    fn = "train.fit"
    config = FitConfig.create(
        fn, loss_fn, steps=steps, optimizer=optimizer, learning_rate=learning_rate,
        lr_schedule=lr_schedule, clip_norm=clip_norm, ema_decay=ema_decay, has_aux=has_aux,
        steps_per_call=steps_per_call, batched=False, with_instances=False, mesh=mesh,
    )  # fmt: skip
    options = RunOptions.create(
        fn, steps=steps, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        max_checkpoints=max_checkpoints, resume=resume, progress=progress, floor=floor,
        callback=callback, stop=stop,
    )  # fmt: skip
    return _fit(fn, config, options, params, key, None)


def fit_many(
    loss_fn: LossFn,
    params_batch: PyTree,
    *,
    keys: PRNGKeyArray,
    steps: int,
    instances: PyTree | None = None,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float | None = None,
    lr_schedule: str | optax.Schedule | None = None,
    clip_norm: float | None = None,
    ema_decay: float | None = None,
    has_aux: bool = False,
    steps_per_call: int = 500,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    max_checkpoints: int | None = 3,
    resume: bool | str = True,
    progress: bool = True,
    floor: float | None = None,
    callback: Callable[[int, np.ndarray, Any], None] | None = None,
    stop: Callable[[], bool] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> FitResult:
    """Train ``M`` models at once (seeds and/or problem instances), ``vmap``-ed in one call.

    Model ``m`` follows exactly the recipe of :func:`fit` with ``params_batch[m]`` and
    ``keys[m]``, up to floating-point round-off of the batched computation. The compiled
    program is reused as for :func:`fit` (a different ``M`` or instance shape compiles again).

    Args:
        loss_fn: ``loss_fn(params, key) -> scalar`` for one model, or
            ``loss_fn(params, key, instance)`` when ``instances`` is given.
        params_batch: initial parameters with a leading model axis ``M`` on every leaf
            (e.g. ``jax.vmap(model.init)(keys, ...)``); a pytree of floating-point arrays (a
            Flax NNX / Equinox module is a ``TypeError``: train modules with :func:`fit`).
        keys: ``M`` PRNG keys (shape ``(M,)`` typed keys or ``(M, 2)`` raw keys).
        steps: number of optimizer steps (the same for all models).
        instances: optional pytree with a leading axis ``M`` (e.g. a batch of mixtures) passed
            as third argument of ``loss_fn``.
        mesh: split the ``M`` models across the devices of this mesh (``M`` must be a
            multiple of ``mesh.size``): model parallelism over problem instances, no
            communication between devices but the loss history.
        optimizer, learning_rate, lr_schedule, clip_norm, ema_decay, has_aux, steps_per_call,
        checkpoint_dir, checkpoint_every, max_checkpoints, resume, progress, floor, callback,
        stop: as in :func:`fit`; the progress bar shows the mean loss over models.

    Returns:
        A :class:`FitResult` whose params, ema params and opt state have the leading axis
        ``M`` and whose ``losses`` have shape ``(M, steps)``.

    Raises:
        FloatingPointError: as :func:`fit`, when any model's loss or state is non-finite; the
            message names the step and the models.
    """
    fn = "train.fit_many"
    config = FitConfig.create(
        fn, loss_fn, steps=steps, optimizer=optimizer, learning_rate=learning_rate,
        lr_schedule=lr_schedule, clip_norm=clip_norm, ema_decay=ema_decay, has_aux=has_aux,
        steps_per_call=steps_per_call, batched=True, with_instances=instances is not None,
        mesh=mesh,
    )  # fmt: skip
    options = RunOptions.create(
        fn, steps=steps, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        max_checkpoints=max_checkpoints, resume=resume, progress=progress, floor=floor,
        callback=callback, stop=stop,
    )  # fmt: skip
    return _fit(fn, config, options, params_batch, keys, instances)
