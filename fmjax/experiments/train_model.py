"""Train a velocity MLP by CFM from N(0, I) to a 2-D target, save it, load it back.

``train_model`` is what ``fmjax train`` runs and ``load_model`` what ``fmjax sample --model``
reads: a folder with ``params.msgpack`` (the parameters), ``model.json`` (the config that
rebuilds the model), ``training_loss.png`` and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _checks, data, losses, metrics, models, plot, schedules, train
from fmjax._report import write_json
from fmjax._typing import PyTree
from fmjax.experiments._common import _Config, _mlp, _times, _train
from fmjax.experiments.demo import demo_problem
from fmjax.experiments.ot_vs_vp import DATASETS
from fmjax.mixtures import JointGaussianMixture

_FN = "experiments.train_model"

#: Schedule name -> constructor, for ``TrainConfig.schedule``.
SCHEDULES: dict[str, Callable[[], schedules.Schedule]] = {
    "linear": schedules.linear,
    "cosine": schedules.cosine,
    "vp": schedules.vp,
}
#: Target names for ``TrainConfig.data``: "gmm" (the demo mixture, with exact answers) and the
#: 2-D datasets of ``fmjax.data``.
TARGETS = ("gmm", *DATASETS)


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Config):
    """Settings of :func:`train_model`."""

    data: str = "gmm"
    schedule: str = "linear"
    steps: int = 3000
    batch_size: int = 256
    width: int = 128
    depth: int = 3
    learning_rate: float = 3e-3
    time_embedding: str = "raw"
    seed: int = 0

    _QUICK = dict(steps=300, width=32, depth=2)

    def __post_init__(self):
        super().__post_init__()
        fn = "experiments.TrainConfig"
        _checks.check_choice(fn, "data", self.data, TARGETS)
        _checks.check_choice(fn, "schedule", self.schedule, SCHEDULES)
        _checks.check_choice(fn, "time_embedding", self.time_embedding, ("raw", "fourier"))


class TrainedModel(NamedTuple):
    """A trained (or loaded) velocity model.

    Attributes:
        config: the TrainConfig it was trained with.
        model: the Flax MLP.
        params: its parameters.
        schedule: the interpolation schedule it was trained on.
        fit: the FitResult of training (None when loaded from a folder).
        loss_floor: the exact CFM loss floor (target "gmm" only, else None).
        velocity_error: mean E|v - u|^2 over t against the exact field ("gmm" only, else None).
    """

    config: TrainConfig
    model: models.MLP
    params: PyTree
    schedule: schedules.Schedule
    fit: train.FitResult | None = None
    loss_floor: float | None = None
    velocity_error: float | None = None

    @property
    def velocity(self) -> Callable:
        """The learned field ``(t, x) -> v_t(x)``."""
        return functools.partial(self.model.apply, self.params)


def target(name: str) -> tuple[Callable, JointGaussianMixture | None]:
    """The sampler ``(key, n) -> (n, 2)`` of target ``name`` and, for "gmm", its exact coupling."""
    _checks.check_choice(_FN, "data", name, TARGETS)
    if name == "gmm":
        coupling, _ = demo_problem()
        return coupling.target().sample, coupling
    return DATASETS[name], None


def _model(cfg: TrainConfig) -> models.MLP:
    return _mlp(2, cfg.width, cfg.depth, time_embedding=cfg.time_embedding)


def _exact_scores(trained: TrainedModel, coupling, key) -> TrainedModel:
    """Loss floor and velocity error against the exact field of ``coupling``."""
    s = trained.schedule
    floor = float(losses.loss_floor(coupling, s, 20_000, key=key).mean)
    ts = jnp.asarray(_times(s, 21))
    err = metrics.velocity_error(
        trained.velocity, coupling, s, ts, 1000, key=jax.random.fold_in(key, 1)
    )
    return trained._replace(loss_floor=floor, velocity_error=float(jnp.mean(err)))


def train_model(
    config: TrainConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    progress: bool = False,
) -> TrainedModel:
    """Train an MLP velocity by CFM from N(0, I) to ``config.data``; save it to ``out`` if given.

    With the "gmm" target (the demo mixture) the exact loss floor and the velocity error are
    computed too. Training: Adam with cosine decay (``fmjax.fit``).
    """
    cfg = TrainConfig() if config is None else config
    _checks.check_instance(_FN, "config", cfg, TrainConfig, "a TrainConfig")
    sampler, coupling = target(cfg.data)
    s = SCHEDULES[cfg.schedule]()
    model = _model(cfg)
    pairs = data.independent_pairs(data.gaussian_source(2), sampler)
    loss_fn = losses.cfm(model.apply, pairs, s, cfg.batch_size)
    key = jax.random.key(cfg.seed)
    fit = _train(model, loss_fn, key, cfg.steps, cfg.learning_rate, progress)
    trained = TrainedModel(cfg, model, fit.params, s, fit)
    if coupling is not None:
        trained = _exact_scores(trained, coupling, jax.random.fold_in(key, 2))
    if out is not None:
        save_model(trained, out)
    return trained


def save_model(trained: TrainedModel, out: str | os.PathLike) -> dict:
    """Write the model folder (parameters, config, loss figure, results); returns the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.msgpack").write_bytes(flax.serialization.to_bytes(trained.params))
    write_json(out / "model.json", {"config": trained.config.as_dict()})
    fit = trained.fit
    results = {"config": trained.config.as_dict(), "loss_floor": trained.loss_floor,
               "velocity_error": trained.velocity_error}  # fmt: skip
    if fit is not None:
        path = out / "training_loss.png"
        plot.training_loss(fit.losses, floor=trained.loss_floor, path=path)
        tail = max(1, len(fit.losses) // 10)
        results.update(
            final_loss=float(np.mean(np.asarray(fit.losses)[-tail:])),
            steps_per_second=fit.steps_per_second,
            wall_time_s=fit.wall_time,
            compile_time_s=fit.compile_time,
            figures={"training_loss": str(path)},
        )
    write_json(out / "results.json", results)
    return results


def load_model(folder: str | os.PathLike) -> TrainedModel:
    """The model saved by ``train_model(..., out=folder)`` (``fit`` and scores None)."""
    folder = Path(folder)
    if not (folder / "model.json").is_file():
        _checks.fail("experiments.load_model", "folder", "a folder written by train_model "
                     "(with model.json)", str(folder))  # fmt: skip
    spec = json.loads((folder / "model.json").read_text())["config"]
    cfg = TrainConfig(**spec)
    model = _model(cfg)
    template = models.init(model, key=jax.random.key(0))
    params = flax.serialization.from_bytes(template, (folder / "params.msgpack").read_bytes())
    return TrainedModel(cfg, model, params, SCHEDULES[cfg.schedule]())
