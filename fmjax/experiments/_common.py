"""What the experiments share: config presets, the result type, output files, figures, training."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _checks, exact, losses, metrics, models, schedules, train
from fmjax._report import phase as _phase  # noqa: F401 (the experiments import it from here)
from fmjax._report import to_json, write_json
from fmjax.mixtures import GaussianMixture, JointGaussianMixture


def quick_from_env(default: bool = False) -> bool:
    """True when the environment variable ``FMJAX_QUICK`` is 1 / true / yes (CI settings).

    Args:
        default: the value when ``FMJAX_QUICK`` is not set.

    Returns:
        whether to run the quick settings.
    """
    value = os.environ.get("FMJAX_QUICK")
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


class ExperimentResult(NamedTuple):
    """What an experiment returns and writes to ``results.json`` (plain JSON values).

    Attributes:
        experiment: the experiment's name.
        config: its config as a dict.
        metrics: its numbers (documented by each experiment).
        figures: figure name -> PNG path.
        wall_time_s: seconds the run took.
    """

    experiment: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    figures: dict[str, str]
    wall_time_s: float


_MAY_BE_ZERO = ("seed", "pretrain_steps", "gmm_pool", "cond_weights", "cond_grid_weights")


def _check_field(fn: str, name: str, kind: str, v):
    """``v`` checked (and normalised) against the field type ``kind`` (a string annotation)."""
    if kind.endswith(" | None"):  # optional: None (the library's default) or the inner type
        return None if v is None else _check_field(fn, name, kind[: -len(" | None")], v)
    zero = name.split("[")[0] in _MAY_BE_ZERO  # a tuple's items: "field[i]"
    if kind == "int":
        return _checks.check_int(fn, name, v, minimum=0 if zero else 1)
    if kind == "float":
        return _checks.check_positive(fn, name, v, allow_zero=zero)
    if kind in ("str", "bool"):
        if not isinstance(v, str if kind == "str" else bool):
            _checks.fail(fn, name, f"a {kind}", v, TypeError)
        return v
    if kind.startswith("tuple[") and kind.endswith(", ...]"):
        inner = kind[len("tuple[") : -len(", ...]")]
        if not isinstance(v, tuple | list):
            _checks.fail(fn, name, f"a tuple of {inner}", v, TypeError)
        return tuple(_check_field(fn, f"{name}[{i}]", inner, x) for i, x in enumerate(v))
    return v


class _Config:
    """Mixin for the experiment configs: quick() preset and validation of sizes."""

    _QUICK: dict = {}

    @classmethod
    def quick(cls, **overrides):
        """The small CI configuration, with ``overrides`` applied."""
        return cls(**{**cls._QUICK, **overrides})

    def __post_init__(self):
        """Check every field against its declared type (``int``, ``float``, ``str``, ``bool``,
        ``tuple[X, ...]``, ``X | None``): a value of another type (``steps = 1.5`` in a config
        file) is a ``TypeError`` naming the field; ints are >= 1 (>= 0 for seeds), floats finite
        > 0 (>= 0 for guidance weights).
        Ints given for floats become floats, lists given for tuples become tuples."""
        fn = f"experiments.{type(self).__name__}"
        for f in dataclasses.fields(self):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            value = _check_field(fn, f.name, kind, getattr(self, f.name))
            object.__setattr__(self, f.name, value)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _resolve(fn: str, cls, config, quick):
    """The config to run: ``config`` if given, else the quick or the full preset."""
    if config is not None:
        return _checks.check_instance(fn, "config", config, cls, f"a {cls.__name__}")
    quick = quick_from_env() if quick is None else bool(quick)
    return cls.quick() if quick else cls()


def _outdir(out) -> Path:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _finish(name: str, config, out: Path, metrics_: dict, figures: dict, t0: float):
    """The ExperimentResult, also written to ``out/results.json`` (the same JSON values)."""
    result = ExperimentResult(
        experiment=name,
        config=to_json(config.as_dict()),
        metrics=to_json(metrics_),
        figures={k: str(v) for k, v in figures.items()},
        wall_time_s=round(time.perf_counter() - t0, 2),
    )
    write_json(out / "results.json", result)
    return result


def _mlp(dim: int, width: int, depth: int, **kw) -> models.MLP:
    return models.MLP(dim=dim, width=width, depth=depth, **kw)


def _train(model, loss_fn, key, steps: int, lr: float, progress: bool, floor=None, **checkpoint):
    """Adam with cosine decay from a fresh initialisation; returns the FitResult.

    ``checkpoint``: ``checkpoint_dir``, ``checkpoint_every``, ``resume``, ``stop`` of ``fit``
    (chunks then end at every checkpoint, so that ``stop`` is seen at least that often)."""
    params = models.init(model, key=jax.random.fold_in(key, 0))
    chunk = max(1, min(steps, 1000, checkpoint.get("checkpoint_every") or 1000))
    return train.fit(
        loss_fn,
        params,
        key=jax.random.fold_in(key, 1),
        steps=steps,
        learning_rate=lr,
        lr_schedule="cosine",
        steps_per_call=chunk,
        progress=progress,
        floor=floor,
        **checkpoint,
    )


def _f(x) -> float:
    return float(np.asarray(x))


def _energy(x, y) -> float:
    return _f(metrics.energy_distance(x, y))


def _exact_field(coupling: JointGaussianMixture, schedule: schedules.Schedule):
    """The exact velocity u_t(x); it carries the schedule (and so its valid interval)."""
    return exact.velocity_field(coupling, schedule)


def _exact_apply(coupling, schedule):
    """The exact velocity in model form ``apply(params, t, x)`` (params ignored)."""
    return lambda params, t, x: exact.velocity(coupling, schedule, t, x)


def _diag_gmm(weights, means, stds) -> GaussianMixture:
    means = np.asarray(means, float)
    stds = np.broadcast_to(np.asarray(stds, float), means.shape)
    covs = np.stack([np.diag(s**2) for s in stds])
    return GaussianMixture(np.asarray(weights, float), means, covs)


def _times(schedule: schedules.Schedule, n: int) -> np.ndarray:
    """``n`` evenly spaced times over the schedule's valid interval."""
    return np.linspace(schedule.t_min, schedule.t_max, n)


@functools.partial(jax.jit, static_argnames=("n",))
def _exact_cfm_terms(coupling, schedule, key, n):
    """CFM loss of the exact velocity on the draw ``losses.cfm`` makes with ``key``."""
    return losses.cfm(_exact_apply(coupling, schedule), coupling.sample, schedule, n)(None, key)


@functools.partial(jax.jit, static_argnames=("model", "n"))
def _velocity_errors(model, params, coupling, schedule, key, ts, n):
    """E|v - u|^2 over ts for the model and for the zero field (baseline), one compiled call."""
    v = functools.partial(model.apply, params)
    zero = lambda t, x: jnp.zeros_like(x)  # noqa: E731
    return {
        "model": metrics.velocity_error(v, coupling, schedule, ts, n, key=key),
        "zero": metrics.velocity_error(zero, coupling, schedule, ts, n, key=key),
    }
