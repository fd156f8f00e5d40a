"""The validated options of a fit: what shapes its compiled program, what the host loop does, and
the default optimizer built from a learning rate, schedule and clipping norm."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import optax

from fmjax import _checks
from fmjax._typing import LossFn
from fmjax.train.modules import ModelSpec

__all__ = ["FitConfig", "OptimizerSpec", "RunOptions", "make_optimizer"]

_DEFAULT_LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The options of :func:`make_optimizer`, validated: Adam with an optional schedule and
    gradient clipping. Equal options give equal specs, whereas building the transformation
    twice gives two unequal objects (optax transformations are tuples of fresh closures).

    Attributes:
        learning_rate: constant or peak learning rate; ``None`` with a callable ``lr_schedule``.
        lr_schedule: ``None`` (constant), ``"cosine"`` or an optax schedule ``step -> rate``.
        clip_norm: global norm the gradients are clipped to, or ``None``.
        horizon: decay steps of ``"cosine"`` (``None`` for other schedules).
    """

    learning_rate: float | None = _DEFAULT_LEARNING_RATE
    lr_schedule: str | optax.Schedule | None = None
    clip_norm: float | None = None
    horizon: int | None = None

    @classmethod
    def create(
        cls,
        fn: str,
        *,
        learning_rate: float | None = None,
        lr_schedule: str | optax.Schedule | None = None,
        clip_norm: float | None = None,
        steps: int | None = None,
    ) -> OptimizerSpec:
        """Validate the builder's arguments (error messages name the public function ``fn``)."""
        lr, horizon = None, None
        if lr_schedule is not None and not isinstance(lr_schedule, str):
            _checks.check_callable(fn, "lr_schedule", lr_schedule, "None, 'cosine' or a schedule")
            if learning_rate is not None:
                _checks.fail(
                    fn, "learning_rate", "None with a callable `lr_schedule`", learning_rate
                )
        else:
            lr = _DEFAULT_LEARNING_RATE
            if learning_rate is not None:
                lr = _checks.check_positive(fn, "learning_rate", learning_rate)
        if isinstance(lr_schedule, str):
            _checks.check_choice(fn, "lr_schedule", lr_schedule, ("cosine",))
            if steps is None:
                _checks.fail(fn, "steps", "given with `lr_schedule='cosine'` (its horizon)", None)
            horizon = max(_checks.check_int(fn, "steps", steps, minimum=0), 1)
        clip = None if clip_norm is None else _checks.check_positive(fn, "clip_norm", clip_norm)
        return cls(lr, lr_schedule, clip, horizon)

    def build(self) -> optax.GradientTransformation:
        """The optax transformation these options describe."""
        if isinstance(self.lr_schedule, str):  # "cosine"
            lr = optax.cosine_decay_schedule(self.learning_rate, self.horizon)
        else:
            lr = self.learning_rate if self.lr_schedule is None else self.lr_schedule
        tx = optax.adam(lr)
        if self.clip_norm is not None:
            tx = optax.chain(optax.clip_by_global_norm(self.clip_norm), tx)
        return tx


def make_optimizer(
    *,
    learning_rate: float | None = None,
    lr_schedule: str | optax.Schedule | None = None,
    clip_norm: float | None = None,
    steps: int | None = None,
) -> optax.GradientTransformation:
    """Adam with an optional learning-rate schedule and gradient clipping.

    A convenience in front of optax: ``fit(..., learning_rate=..., lr_schedule=..., clip_norm=...)``
    trains with this transformation. Compose your own with optax for anything else.

    Args:
        learning_rate: constant (or peak, with ``"cosine"``) learning rate; default 1e-3. Leave
            it ``None`` with a callable ``lr_schedule``.
        lr_schedule: ``None`` (constant), ``"cosine"`` (cosine decay from ``learning_rate`` to 0
            over ``steps``) or an optax schedule ``step -> learning rate``.
        clip_norm: if given, gradients are clipped to this global norm before Adam
            (``optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(...))``).
        steps: total number of steps, needed by ``"cosine"``.

    Returns:
        An ``optax.GradientTransformation``.
    """
    return OptimizerSpec.create(
        "train.make_optimizer",
        learning_rate=learning_rate,
        lr_schedule=lr_schedule,
        clip_norm=clip_norm,
        steps=steps,
    ).build()


def _optimizer(
    fn: str, optimizer, *, learning_rate, lr_schedule, clip_norm, steps: int
) -> optax.GradientTransformation | OptimizerSpec:
    """The user's transformation (then no builder option may be given) or the builder's spec."""
    if optimizer is None:
        return OptimizerSpec.create(
            fn,
            learning_rate=learning_rate,
            lr_schedule=lr_schedule,
            clip_norm=clip_norm,
            steps=steps,
        )
    what = "an optax.GradientTransformation or None"
    _checks.check_instance(fn, "optimizer", optimizer, optax.GradientTransformation, what)
    builder = {"learning_rate": learning_rate, "lr_schedule": lr_schedule, "clip_norm": clip_norm}
    for name, value in builder.items():
        if value is not None:
            _checks.fail(fn, name, "None when `optimizer` is given (build it into that)", value)
    return optimizer


def _check_bool(fn: str, name: str, value: Any) -> bool:
    return _checks.check_instance(fn, name, value, bool, "a bool")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Everything that shapes the compiled training program of a fit; frozen and hashable.

    Two fits with equal configs, arguments of the same abstract signature (structure, shapes,
    dtypes, shardings) and the same JAX trace configuration run the same compiled program.
    Build one with :meth:`create`, which validates the arguments of ``fit`` / ``fit_many``.

    Attributes:
        loss_fn: ``loss_fn(params, key) -> scalar`` (``-> (scalar, aux)`` with ``has_aux``), or
            ``loss_fn(params, key, instance)`` with ``with_instances``.
        optimizer: the user's optax transformation, or the :class:`OptimizerSpec` the
            transformation is built from.
        ema_decay: decay of the parameters' moving average, or ``None`` for no EMA.
        has_aux: ``loss_fn`` returns ``(loss, aux)``.
        chunk_len: most optimizer steps run by one compiled call.
        batched: train a batch of models (``fit_many``) with ``vmap``.
        with_instances: a batch of problem instances is the third argument of ``loss_fn``.
        mesh: the ``jax.sharding.Mesh`` the state and batch are placed on, or ``None``.
        model: for a Flax NNX / Equinox module passed to ``fit``, what stays fixed while it
            trains (a :class:`~fmjax.train.modules.ModelSpec`; ``loss_fn`` then takes the
            module), ``None`` for a pytree of parameters. Set by ``fit`` from its ``params``.
    """

    loss_fn: LossFn
    optimizer: optax.GradientTransformation | OptimizerSpec
    ema_decay: float | None
    has_aux: bool
    chunk_len: int
    batched: bool
    with_instances: bool
    mesh: jax.sharding.Mesh | None
    model: ModelSpec | None = None

    @classmethod
    def create(
        cls,
        fn: str,
        loss_fn: LossFn,
        *,
        steps: int,
        optimizer: optax.GradientTransformation | None,
        learning_rate: float | None,
        lr_schedule: str | optax.Schedule | None,
        clip_norm: float | None,
        ema_decay: float | None,
        has_aux: bool,
        steps_per_call: int,
        batched: bool,
        with_instances: bool,
        mesh: jax.sharding.Mesh | None,
    ) -> FitConfig:
        """Validate the arguments of ``fit`` / ``fit_many`` (named ``fn`` in errors)."""
        _checks.check_callable(fn, "loss_fn", loss_fn)
        steps = _checks.check_int(fn, "steps", steps, minimum=0)
        if ema_decay is not None:
            ema_decay = _checks.as_float(fn, "ema_decay", ema_decay)
            if not 0.0 <= ema_decay < 1.0:
                _checks.fail(fn, "ema_decay", "in [0, 1)", ema_decay)
        if mesh is not None:
            what = "a jax.sharding.Mesh (see fmjax.sharding.data_mesh) or None"
            _checks.check_instance(fn, "mesh", mesh, jax.sharding.Mesh, what)
        tx = _optimizer(
            fn, optimizer, learning_rate=learning_rate, lr_schedule=lr_schedule,
            clip_norm=clip_norm, steps=steps,
        )  # fmt: skip
        # A run never needs more than `steps` steps per call (nor buffers longer than that).
        chunk_len = max(1, min(_checks.check_int(fn, "steps_per_call", steps_per_call), steps))
        has_aux = _check_bool(fn, "has_aux", has_aux)
        return cls(loss_fn, tx, ema_decay, has_aux, chunk_len, batched, with_instances, mesh)

    @property
    def transformation(self) -> optax.GradientTransformation:
        """The optax transformation of the optimizer."""
        opt = self.optimizer
        return opt.build() if isinstance(opt, OptimizerSpec) else opt


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What the host does around the compiled program: how far to train, checkpoints, logging."""

    steps: int
    checkpoint_dir: str | None
    checkpoint_every: int | None
    max_checkpoints: int | None
    resume: bool | str  # True, False or "force"
    progress: bool
    floor: float | None
    callback: Callable[[int, Any, Any], None] | None
    stop: Callable[[], bool] | None = None

    @classmethod
    def create(
        cls,
        fn: str,
        *,
        steps: int,
        checkpoint_dir: str | os.PathLike | None,
        checkpoint_every: int | None,
        max_checkpoints: int | None,
        resume: bool | str,
        progress: bool,
        floor: float | None,
        callback: Callable[[int, Any, Any], None] | None,
        stop: Callable[[], bool] | None = None,
    ) -> RunOptions:
        """Validate the host-side arguments of ``fit`` / ``fit_many`` (named ``fn`` in errors)."""
        steps = _checks.check_int(fn, "steps", steps, minimum=0)
        if checkpoint_dir is not None:
            what = "a path (str or os.PathLike) or None"
            _checks.check_instance(fn, "checkpoint_dir", checkpoint_dir, str | os.PathLike, what)
            checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
            if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
                what = "a directory or a path where one can be created"
                _checks.fail(fn, "checkpoint_dir", what, f"{checkpoint_dir} (a file)")
        if checkpoint_every is not None:
            checkpoint_every = _checks.check_int(fn, "checkpoint_every", checkpoint_every)
            if checkpoint_dir is None:
                _checks.fail(fn, "checkpoint_dir", "given with `checkpoint_every`", None)
        if max_checkpoints is not None:
            max_checkpoints = _checks.check_int(fn, "max_checkpoints", max_checkpoints)
        if callback is not None:
            _checks.check_callable(fn, "callback", callback)
        if stop is not None:
            _checks.check_callable(fn, "stop", stop, "a callable () -> bool or None")
        floor = None if floor is None else _checks.as_float(fn, "floor", floor)
        if isinstance(resume, str):
            _checks.check_choice(fn, "resume", resume, ("force",))
        else:
            what = "True, False or 'force'"
            resume = _checks.check_instance(fn, "resume", resume, bool, what)
        progress = _check_bool(fn, "progress", progress)
        return cls(
            steps,
            checkpoint_dir,
            checkpoint_every,
            max_checkpoints,
            resume,
            progress,
            floor,
            callback,
            stop,
        )
