"""Shared helpers of the experiments: configs, output folders, JSON, figures, training."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from fmjax import exact, losses, metrics, models, plot, schedules, train
from fmjax.mixtures import GaussianMixture, JointGaussianMixture


def quick_from_env(default: bool = False) -> bool:
    """True when the environment variable ``FMJAX_QUICK`` is 1 / true / yes (CI settings)."""
    value = os.environ.get("FMJAX_QUICK")
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


_MAY_BE_ZERO = ("seed", "pretrain_steps")


class _Config:
    """Mixin for the experiment configs: quick() preset and validation of sizes."""

    _QUICK: dict = {}

    @classmethod
    def quick(cls, **overrides):
        """The small CI configuration, with ``overrides`` applied."""
        return cls(**{**cls._QUICK, **overrides})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if (
                isinstance(v, int)
                and not isinstance(v, bool)
                and v < 1
                and f.name not in _MAY_BE_ZERO
            ):
                raise ValueError(f"{type(self).__name__}: `{f.name}` must be >= 1, got {v}")
            if isinstance(v, float) and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{type(self).__name__}: `{f.name}` must be > 0, got {v}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _resolve(cls, config, quick):
    if config is not None:
        if not isinstance(config, cls):
            raise ValueError(f"`config` must be a {cls.__name__}, got {type(config).__name__}")
        return config
    quick = quick_from_env() if quick is None else bool(quick)
    return cls.quick() if quick else cls()


def _outdir(out) -> Path:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _to_json(obj):
    """Numbers, arrays and paths to plain JSON types (NaN/inf become None)."""
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray | jax.Array):
        return _to_json(np.asarray(obj).tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _finish(name: str, config, out: Path, metrics_: dict, figures: dict, t0: float) -> dict:
    result = {
        "experiment": name,
        "config": config.as_dict(),
        "metrics": metrics_,
        "figures": {k: str(v) for k, v in figures.items()},
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    result = _to_json(result)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _styled_figure(nrows: int, ncols: int, size: float = 3.2, extra_w: float = 0.0) -> tuple:
    """A constrained-layout figure with the look of fmjax.plot (no pyplot state)."""
    with mpl.rc_context(plot._RC):
        fig = Figure(figsize=(size * ncols + extra_w, size * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    with mpl.rc_context(plot._RC):
        fig.savefig(path)
    return path


def _mlp(dim: int, width: int, depth: int, **kw) -> models.MLP:
    return models.MLP(dim=dim, width=width, depth=depth, **kw)


def _train(model, loss_fn, key, steps: int, lr: float, progress: bool, floor=None):
    """Adam with cosine decay; returns the FitResult (params + loss history)."""
    params = models.init(model, jax.random.fold_in(key, 0))
    return train.fit(
        loss_fn,
        params,
        jax.random.fold_in(key, 1),
        steps=steps,
        learning_rate=lr,
        lr_schedule="cosine",
        steps_per_call=max(1, min(steps, 1000)),
        progress=progress,
        floor=floor,
    )


def _f(x) -> float:
    return float(np.asarray(x))


def _energy(x, y) -> float:
    return _f(metrics.energy_distance(x, y))


def _exact_field(coupling: JointGaussianMixture, schedule: schedules.Schedule):
    return functools.partial(exact.velocity, coupling, schedule)


def _exact_apply(coupling, schedule):
    """The exact velocity in model form ``apply(params, t, x)`` (params ignored)."""
    return lambda params, t, x: exact.velocity(coupling, schedule, t, x)


def _diag_gmm(weights, means, stds) -> GaussianMixture:
    means = np.asarray(means, float)
    stds = np.broadcast_to(np.asarray(stds, float), means.shape)
    covs = np.stack([np.diag(s**2) for s in stds])
    return GaussianMixture(np.asarray(weights, float), means, covs)


def _standard_normal(dim: int) -> GaussianMixture:
    return GaussianMixture(np.ones(1), np.zeros((1, dim)), np.eye(dim)[None])


def format_table(rows: dict[str, dict[str, float]], columns: Sequence[str]) -> str:
    """A plain-text table: one row per name, one column per metric (4 significant digits)."""
    head = ["model"] + list(columns)
    body = [
        [name] + [("-" if row.get(c) is None else f"{row[c]:.4g}") for c in columns]
        for name, row in rows.items()
    ]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def line(r):
        cells = enumerate(zip(r, widths, strict=True))
        return "  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in cells)

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep] + [line(r) for r in body])


class _Timer:
    """Wall time of successive phases (seconds, JSON-able dict)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self._last, 3)
        self._last = now


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
        "model": metrics.velocity_error(v, None, coupling, schedule, key, ts, n),
        "zero": metrics.velocity_error(zero, None, coupling, schedule, key, ts, n),
    }


def _loss_figure(loss_hist, floor: float, path: Path) -> Path:
    """Training loss (raw and moving mean) with the loss floor as a dashed line."""
    loss_hist = np.asarray(loss_hist)
    window = max(1, len(loss_hist) // 50)
    smooth = np.convolve(loss_hist, np.ones(window) / window, mode="valid")
    fig, axes = _styled_figure(1, 1, size=3.6)
    fig.set_size_inches(5.0, 3.4)
    ax = axes[0, 0]
    with mpl.rc_context(plot._RC):
        ax.plot(np.arange(loss_hist.size), loss_hist, color="tab:blue", alpha=0.25, lw=0.6,
                label="CFM loss per step")  # fmt: skip
        ax.plot(np.arange(smooth.size) + window, smooth, color="tab:blue", lw=1.5,
                label=f"moving mean ({window} steps)")  # fmt: skip
        if np.isfinite(floor):
            ax.axhline(floor, color="black", ls="--", lw=1.0, label="loss floor (exact)")
        hi = np.percentile(loss_hist, 99)
        lo = min(np.min(smooth), floor if np.isfinite(floor) else np.inf)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Training loss")
        ax.legend(loc="upper right")
    return _save(fig, path)
