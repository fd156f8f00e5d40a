"""Train a velocity MLP or UNet by CFM to a 2-D target or a named problem, save it, load it back.

``train_model`` is what ``fmjax train`` runs and ``load_model`` what ``fmjax sample --model``
reads: a folder with ``params.msgpack`` (the parameters), ``model.json`` (the config that
rebuilds the model), ``training_loss.png`` and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _checks, data, losses, metrics, models, plot, problems, schedules, sharding, train
from fmjax._report import write_json
from fmjax._typing import PyTree
from fmjax.experiments._common import _Config, _mlp, _phase, _times, _train
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
#: The problems whose points are images (``Problem.image_shape``): what a UNet can train on.
_IMAGE_PROBLEMS = ("digits_gmm",)


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Config):
    """Settings of :func:`train_model` (the flags of ``fmjax train``).

    Attributes:
        data: target from N(0, I): "gmm" (the demo mixture, with exact scores) or a 2-D dataset
            of ``fmjax.data`` ("checkerboard", "moons", "eight_gaussians", "rings",
            "swiss_roll"); left at "gmm" when ``problem`` is given.
        schedule: "linear", "cosine" or "vp".
        steps: optimizer steps.
        batch_size: pairs per step.
        width: hidden width of the MLP.
        depth: hidden layers of the MLP.
        learning_rate: peak learning rate of Adam with cosine decay.
        time_embedding: "raw" or "fourier" (MLP).
        seed: random seed.
        problem: a name of ``fmjax.problems`` to train on instead of ``data`` (pairs from its
            coupling; exact loss floor and velocity error reported), or None.
        model: "mlp", or "unet" for a problem of images ("digits_gmm").
        channels: base channels of the UNet.
    """

    data: str = "gmm"
    schedule: str = "linear"
    steps: int = 3000
    batch_size: int = 256
    width: int = 128
    depth: int = 3
    learning_rate: float = 3e-3
    time_embedding: str = "raw"
    seed: int = 0
    problem: str | None = None
    model: str = "mlp"
    channels: int = 32

    _QUICK = dict(steps=300, width=32, depth=2)

    def __post_init__(self):
        super().__post_init__()
        fn = "experiments.TrainConfig"
        _checks.check_choice(fn, "data", self.data, TARGETS)
        _checks.check_choice(fn, "schedule", self.schedule, SCHEDULES)
        _checks.check_choice(fn, "time_embedding", self.time_embedding, ("raw", "fourier"))
        _checks.check_choice(fn, "model", self.model, ("mlp", "unet"))
        if self.problem is not None:
            _checks.check_choice(fn, "problem", self.problem, problems.names())
            if self.data != "gmm":
                what = "left at 'gmm' when `problem` is given (the problem is the target)"
                _checks.fail(fn, "data", what, self.data)
        if self.model == "unet" and self.problem not in _IMAGE_PROBLEMS:
            what = f"one of {_IMAGE_PROBLEMS} (a problem of images) with model 'unet'"
            _checks.fail(fn, "problem", what, self.problem)


class TrainedModel(NamedTuple):
    """A trained (or loaded) velocity model.

    Attributes:
        config: the TrainConfig it was trained with.
        model: the Flax MLP or UNet.
        params: its parameters.
        schedule: the interpolation schedule it was trained on.
        fit: the FitResult of training (None when loaded from a folder).
        loss_floor: the exact CFM loss floor (target "gmm" or a problem, else None).
        velocity_error: mean E|v - u|^2 over t against the exact field ("gmm" or a problem,
            else None).
    """

    config: TrainConfig
    model: models.MLP | models.UNet
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


def trained_target(cfg: TrainConfig) -> tuple[Callable, JointGaussianMixture | None, int]:
    """``(target sampler (key, n) -> (n, d), exact coupling or None, d)`` of a config: its
    ``problem`` (the problem's coupling; its target) if given, else ``target(cfg.data)``."""
    if cfg.problem is not None:
        coupling = problems.get(cfg.problem).coupling
        return coupling.target().sample, coupling, coupling.dim
    sampler, coupling = target(cfg.data)
    return sampler, coupling, 2


def _model(cfg: TrainConfig) -> models.MLP | models.UNet:
    if cfg.model == "unet":
        image_shape = problems.get(cfg.problem).image_shape
        return models.UNet(image_shape=image_shape, channels=cfg.channels, channel_mults=(1, 2))
    dim = 2 if cfg.problem is None else problems.get(cfg.problem).dim
    return _mlp(dim, cfg.width, cfg.depth, time_embedding=cfg.time_embedding)


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
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool | str = True,
    stop: Callable[[], bool] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainedModel:
    """Train a velocity by CFM; save it to ``out`` if given.

    The target is ``config.problem`` (a name of ``fmjax.problems``: pairs drawn from its
    coupling) if given, else ``config.data`` from N(0, I); the network is ``config.model``
    ("mlp", or "unet" for a problem of images such as "digits_gmm"). With the "gmm" target (the
    demo mixture) or a problem the exact loss floor and the velocity error are computed too.
    Training: Adam with cosine decay (``fmjax.fit``), checkpointed into ``checkpoint_dir`` every
    ``checkpoint_every`` steps and resumed from there (``resume``) if given. When ``stop()``
    turns true the fit saves a checkpoint and returns early (the result's ``fit.step <
    config.steps``); then, or if ``stop()`` is true once training is done, no scores are
    computed and nothing is saved to ``out`` (a rerun with ``resume`` does it). With
    ``progress``, a bar for training and a status line on stderr for each other phase.

    Args:
        config: the settings (default ``TrainConfig()``).
        out: folder for the model files, or None.
        progress: progress bar and status lines on stderr.
        checkpoint_dir: folder of orbax checkpoints, or None.
        checkpoint_every: steps between checkpoints.
        resume: as ``fit(resume=...)``: continue from the latest checkpoint.
        stop: a callable polled between chunks of steps: True saves a checkpoint and returns.
        mesh: a data mesh (``fmjax.sharding.data_mesh()``): the batch is drawn and processed
            shard by shard (``sharding.sharded_pairs``; ``batch_size`` must divide by
            ``mesh.size``). Across processes (``jax.distributed``) every process calls
            ``train_model`` with the same arguments; each returns the model (parameters on its
            host), process 0 alone writes ``out`` and the others wait until it is written.

    Returns:
        the ``TrainedModel``; ``fit.step < config.steps`` if stopped early.
    """
    cfg = TrainConfig() if config is None else config
    _checks.check_instance(_FN, "config", cfg, TrainConfig, "a TrainConfig")
    sampler, coupling, _ = trained_target(cfg)
    s = SCHEDULES[cfg.schedule]()
    model = _model(cfg)
    if cfg.problem is not None:
        pairs = data.coupling_pairs(coupling)
    else:
        pairs = data.independent_pairs(data.gaussian_source(2), sampler)
    if mesh is not None:
        pairs = sharding.sharded_pairs(pairs, mesh)
    loss_fn = losses.cfm(model.apply, pairs, s, cfg.batch_size)
    key = jax.random.key(cfg.seed)
    ckpt = {}
    if checkpoint_dir is not None:
        ckpt = dict(checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                    resume=resume)  # fmt: skip
    if stop is not None:
        ckpt["stop"] = stop
    if mesh is not None:
        ckpt["mesh"] = mesh
    many = jax.process_count() > 1
    progress = progress and jax.process_index() == 0  # one bar and one set of status lines
    fit = _train(model, loss_fn, key, cfg.steps, cfg.learning_rate, progress, **ckpt)
    params = sharding.to_host(fit.params) if many else fit.params  # not on other processes' devices
    trained = TrainedModel(cfg, model, params, s, fit)
    stopped = stop is not None and bool(stop())
    if many:  # a signal to one process stops them all (else the others would wait for it)
        from jax.experimental import multihost_utils

        stopped = bool(np.any(multihost_utils.process_allgather(np.asarray(stopped))))
    if fit.step < cfg.steps or stopped:  # stopped (maybe at the end)
        return trained
    if coupling is not None:
        with _phase("exact loss floor and velocity error (20000 + 21 x 1000 points)", progress):
            trained = _exact_scores(trained, coupling, jax.random.fold_in(key, 2))
    if out is not None and jax.process_index() == 0:
        with _phase(f"writing the model, results.json and training_loss.png to {out}", progress):
            save_model(trained, out)
    if out is not None and many:  # the others return once the files are there
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fmjax train_model: model saved")
    return trained


#: Files :func:`save_model` writes.
MODEL_FILES = ("params.msgpack", "model.json", "results.json", "training_loss.png")


def save_model(trained: TrainedModel, out: str | os.PathLike) -> dict:
    """Write the model folder (parameters, config, loss figure, results); returns the results.

    ``model.json`` holds the config and the sha256 of ``params.msgpack`` (``params_sha256``),
    which :func:`load_model` verifies.

    ``final_loss`` in the results is the mean per-step training loss (the CFM loss of each
    step's minibatch) over the last 10% of steps, ``final_loss_steps`` those steps; the
    progress bar shows the same per-step loss, averaged over the steps of its last update.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = flax.serialization.to_bytes(trained.params)
    (out / "params.msgpack").write_bytes(raw)
    spec = {"config": trained.config.as_dict(), "params_sha256": hashlib.sha256(raw).hexdigest()}
    write_json(out / "model.json", spec)
    fit = trained.fit
    results = {"config": trained.config.as_dict(), "loss_floor": trained.loss_floor,
               "velocity_error": trained.velocity_error}  # fmt: skip
    if fit is not None:
        path = out / "training_loss.png"
        plot.training_loss(fit.losses, floor=trained.loss_floor, path=path)
        n = len(fit.losses)
        tail = max(1, n // 10)
        results.update(
            final_loss=float(np.mean(np.asarray(fit.losses)[-tail:])),
            final_loss_steps=[n - tail, n],
            steps_per_second=fit.steps_per_second,
            wall_time_s=fit.wall_time,
            compile_time_s=fit.compile_time,
            resumed_from=fit.resumed_from,
            figures={"training_loss": str(path)},
        )
    write_json(out / "results.json", results)
    return results


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"experiments.load_model: {path}: {what}")


def _read_config(folder: Path) -> tuple[TrainConfig, str | None]:
    """The config of ``model.json`` and the sha256 of ``params.msgpack`` it records (None in
    a folder written before checksums were)."""
    path = folder / "model.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(path, f"cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise _bad(path, f"is not valid JSON ({e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise _bad(path, 'must be a JSON object {"config": {...}} as written by train_model')
    digest = spec.get("params_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise _bad(path, f"holds an invalid params_sha256 (64 hex digits), got {digest!r:.80}")
    try:
        return TrainConfig(**spec["config"]), digest
    except (TypeError, ValueError) as e:
        raise _bad(path, f"holds an invalid config: {e}") from None


def _read_params(folder: Path, cfg: TrainConfig, template: PyTree, digest: str | None) -> PyTree:
    path = folder / "params.msgpack"
    if not path.is_file():
        raise _bad(path, "is missing (the parameters of the model; rerun `fmjax train`)")
    raw = path.read_bytes()
    try:
        state = flax.serialization.msgpack_restore(raw)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types for broken input
        raise _bad(path, f"is truncated or not a msgpack file ({type(e).__name__}: {e})") from None
    if digest is None:
        warnings.warn(
            f"experiments.load_model: {folder / 'model.json'} records no sha256 of params.msgpack "
            "(written by an older fmjax): its parameters are loaded unverified",
            stacklevel=3,
        )
    elif hashlib.sha256(raw).hexdigest() != digest:
        what = "does not match the sha256 checksum recorded in model.json: it was changed or"
        raise _bad(path, f"{what} damaged after `fmjax train` wrote it (rerun `fmjax train`)")
    want = jax.tree_util.tree_flatten_with_path(flax.serialization.to_state_dict(template))[0]
    try:
        got = dict(jax.tree_util.tree_flatten_with_path(state)[0])
    except Exception:  # noqa: BLE001
        got = {}
    what = f"the MLP of model.json (width {cfg.width}, depth {cfg.depth}, {cfg.time_embedding})"
    if cfg.model == "unet":
        what = f"the UNet of model.json ({cfg.channels} channels, problem {cfg.problem})"
    for p, leaf in want:
        name = jax.tree_util.keystr(p)
        if p not in got:
            raise _bad(path, f"does not hold parameters of {what}: {name} is missing")
        if np.shape(got[p]) != np.shape(leaf):
            raise _bad(path, f"does not hold parameters of {what}: {name} has shape "
                       f"{np.shape(got[p])}, expected {np.shape(leaf)}")  # fmt: skip
    if len(got) != len(want):
        raise _bad(path, f"does not hold parameters of {what}: {len(got)} arrays, expected "
                   f"{len(want)}")  # fmt: skip
    return flax.serialization.from_state_dict(template, state)


def load_model(folder: str | os.PathLike) -> TrainedModel:
    """The model saved by ``train_model(..., out=folder)`` (``fit`` and scores None).

    ``params.msgpack`` is verified against the sha256 that ``save_model`` records in
    ``model.json`` (a folder without one, from an older fmjax, loads with a warning).

    Args:
        folder: a folder written by ``train_model(..., out=folder)`` or ``fmjax train``.

    Returns:
        the ``TrainedModel`` (config, model, params, schedule).

    Raises:
        ValueError: one line naming the file and what is wrong: no folder or ``model.json``,
            ``model.json`` unreadable or holding an invalid config, ``params.msgpack`` missing,
            truncated, changed since it was written (its sha256 differs from the one in
            ``model.json``), or holding parameters of another shape (e.g. another width).
    """
    folder = Path(folder)
    if not (folder / "model.json").is_file():
        _checks.fail("experiments.load_model", "folder", "a folder written by train_model "
                     "(with model.json)", str(folder))  # fmt: skip
    cfg, digest = _read_config(folder)
    model = _model(cfg)
    template = models.init(model, key=jax.random.key(0))
    params = _read_params(folder, cfg, template, digest)
    return TrainedModel(cfg, model, params, SCHEDULES[cfg.schedule]())
