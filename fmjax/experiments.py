"""The seed experiments, shared by the ``fmjax`` command and the notebooks.

Each experiment is one function ``name(config=None, *, quick=None, out=..., progress=False)``
that writes PNG figures and ``results.json`` into ``out`` and returns a JSON-able dict::

    {"experiment": name, "config": {...}, "metrics": {...}, "figures": {name: path},
     "wall_time_s": seconds}

``config`` is the experiment's frozen config dataclass; when it is None, ``quick`` picks the
small CI configuration (``Config.quick()``) or the full one (``Config()``), and ``quick=None``
reads the environment variable ``FMJAX_QUICK`` (``1``/``true``/``yes`` mean quick).

Experiments (``EXPERIMENTS`` maps names to functions):

* ``demo``: the 2-D N(0, I) -> 5-component GMM problem behind ``fmjax demo``: exact density,
  velocity and trajectories; a short CFM training; ODE and SDE sampling; a table comparing
  the learned model with the exact velocity (loss, loss floor, velocity error, energy
  distances, NLL).
* ``gmm_to_gmm``: stochastic interpolants between Gaussian mixtures: an independent and a joint
  (cross-covariance) coupling with the same marginals, under the linear, cosine and VP
  schedules; exact velocities, responsibilities and trajectories; learned-vs-exact velocity
  error over t; the 1-D problem 2 modes (+-3) -> 3 modes (-6, 0, 6).
* ``ot_vs_vp``: conditional-OT (linear) path vs VP-diffusion path on the checkerboard and two
  moons (Lipman et al., 2023): samples over t, trajectories, adaptive-solver NFE.
* ``flows_and_scores``: a 2-mode GMM in R^3, Fourier-time MLP, RK4 ODE vs Euler-Maruyama SDE
  (score from the velocity), histograms of the predicted target x_hat_1 along the path and the
  time each settles on the modes.
* ``cfm_equals_fm``: gradients of the conditional and the marginal (exact-target) losses agree:
  cosine similarity to the exact gradient vs batch size.

The VP schedule has db_t -> -inf as t -> 1, so VP velocities are integrated on [0, 1 - eps]
(``vp_eps``, 1e-3) and VP models are trained on t ~ U[eps, 1 - eps].
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from fmjax import convert, data, exact, losses, metrics, models, plot, sample, schedules, train
from fmjax.likelihood import log_likelihood
from fmjax.mixtures import GaussianMixture, JointGaussianMixture, independent_coupling

__all__ = [
    "DemoConfig",
    "GMMConfig",
    "OTvsVPConfig",
    "FlowsScoresConfig",
    "CFMConfig",
    "EXPERIMENTS",
    "quick_from_env",
    "demo_problem",
    "demo",
    "gmm_to_gmm",
    "ot_vs_vp",
    "flows_and_scores",
    "cfm_equals_fm",
    "format_table",
]

# ----------------------------------------------------------------------------- shared helpers


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


# ----------------------------------------------------------------------------- demo


@dataclasses.dataclass(frozen=True)
class DemoConfig(_Config):
    """Settings of :func:`demo` (defaults: the ``fmjax demo`` run, ~20 s on 2 CPU cores)."""

    steps: int = 3000
    batch_size: int = 256
    width: int = 128
    depth: int = 3
    learning_rate: float = 3e-3
    n_eval: int = 2000
    n_paths: int = 300
    sde_steps: int = 200
    diffusion: float = 1.0
    seed: int = 0

    _QUICK = dict(steps=300, width=32, depth=2, n_eval=500, n_paths=100, sde_steps=50)


def demo_problem() -> tuple[JointGaussianMixture, schedules.Schedule]:
    """The demo problem: N(0, I_2) -> 5 anisotropic Gaussians on a ring of radius 4, linear path.

    The source is standard normal (a 1-component mixture) so that the SDE sampler can take the
    score from the velocity (``fmjax.sample.sde``).
    """
    k = 5
    angles = 2 * np.pi * np.arange(k) / k + np.pi / 2
    means = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    covs = []
    for a in angles:  # long axis tangent to the ring
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        covs.append(rot @ np.diag([0.15**2, 0.6**2]) @ rot.T)
    weights = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    target = GaussianMixture(weights, means, np.stack(covs))
    return independent_coupling(_standard_normal(2), target), schedules.linear()


def demo(
    config: DemoConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/demo",
    progress: bool = False,
) -> dict:
    """2-D GMM -> GMM: exact fields, a short CFM training, ODE/SDE sampling, learned vs exact.

    Metrics (rows "learned" and "exact"): ``loss`` (CFM loss on one held-out batch of
    ``n_eval``, the same draw for both), ``loss_floor`` (irreducible CFM loss, Monte Carlo),
    ``velocity_error`` (E|v - u|^2 averaged over 21 times in [0, 1]), ``energy_ode`` /
    ``energy_sde`` (energy distance of ``n_eval`` ODE (Tsit5) / SDE (Euler-Maruyama) samples to
    exact target samples), ``nll`` (mean -log p(x) of exact target samples under the flow,
    augmented ODE). ``reference`` holds the energy distance between two exact target samples
    (the noise level) and the exact target entropy estimate -E log p1(X1).

    Returns:
        the result dict (module docstring); ``result["table"]`` is the printed table.
    """
    cfg = _resolve(DemoConfig, config, quick)
    t0 = time.perf_counter()
    out = _outdir(out)
    coupling, sched = demo_problem()
    target = coupling.target()
    key = jax.random.key(cfg.seed)
    k_train, k_eval, k_x0, k_ref, k_ref2, k_sde, k_err = jax.random.split(key, 7)
    figures = {}

    timer = _Timer()
    ts_panels = (0.0, 0.25, 0.5, 0.75, 1.0)
    lim = (-6.0, 6.0)
    figures["exact_density_velocity"] = out / "exact_density_velocity.png"
    plot.density_and_velocity(
        coupling, sched, ts_panels, lim=lim, ncols=5, path=figures["exact_density_velocity"]
    )
    timer("exact density figure")
    u_exact = _exact_field(coupling, sched)

    model = _mlp(2, cfg.width, cfg.depth)
    loss_fn = losses.cfm(model.apply, coupling.sample, sched, cfg.batch_size)
    # Floor on the same draw as the held-out loss below (same key, same n): the exact row's
    # loss then equals the floor up to float round-off.
    floor = _f(losses.loss_floor(coupling, sched, k_eval, cfg.n_eval))
    fit = _train(model, loss_fn, k_train, cfg.steps, cfg.learning_rate, progress, floor)
    v_model = functools.partial(model.apply, fit.params)
    timer("train")

    eval_loss = jax.jit(losses.cfm(model.apply, coupling.sample, sched, cfg.n_eval))
    ts_err = jnp.linspace(0.0, 1.0, 21)
    err = _velocity_errors(model, fit.params, coupling, sched, k_err, ts_err, 1000)
    err_learned, err_zero = err["model"], err["zero"]
    timer("velocity error")

    x_ref = target.sample(k_ref, cfg.n_eval)
    x_ref2 = target.sample(k_ref2, cfg.n_eval)
    x0 = sample.draw_source(k_x0, max(cfg.n_eval, cfg.n_paths), 2)
    rows = {}
    samples = {"exact target samples": x_ref}
    save_ts = np.linspace(0.0, 1.0, 41)
    for name, v in (("learned", v_model), ("exact", u_exact)):
        ode_sol = sample.ode(v, x0, save_ts=save_ts)
        timer(f"{name} ODE")
        sde_sol = sample.sde(
            v, sched, x0, k_sde, diffusion=cfg.diffusion, steps=cfg.sde_steps, brownian="unsafe"
        )
        timer(f"{name} SDE")
        ll = log_likelihood(v, x_ref)
        timer(f"{name} NLL")
        rows[name] = {
            "loss": _f(eval_loss(fit.params, k_eval))
            if name == "learned"
            else _f(_exact_cfm_terms(coupling, sched, k_eval, cfg.n_eval)),
            "loss_floor": floor,
            "velocity_error": float(err_learned.mean()) if name == "learned" else 0.0,
            "energy_ode": _energy(ode_sol.x[: cfg.n_eval], x_ref),
            "energy_sde": _energy(sde_sol.x[: cfg.n_eval], x_ref),
            "nll": -_f(jnp.mean(ll.log_prob)),
            "nfe_ode": int(ode_sol.nfe),
        }
        samples[f"{name} ODE"] = ode_sol.x[: cfg.n_eval]
        samples[f"{name} SDE"] = sde_sol.x[: cfg.n_eval]
        if name == "exact":
            figures["exact_trajectories"] = out / "exact_trajectories.png"
            plot.trajectories(
                ode_sol.xs[:, : cfg.n_paths],
                title="Exact ODE trajectories",
                lim=lim,
                path=figures["exact_trajectories"],
            )
    reference = {
        "energy_between_target_samples": _energy(x_ref2, x_ref),
        "target_entropy": -_f(jnp.mean(target.log_prob(x_ref))),
        "zero_field_velocity_error": float(err_zero.mean()),
    }

    figures["samples"] = out / "samples.png"
    plot.samples_grid(
        samples,
        lim=lim,
        ncols=5,
        title="Samples: exact target, ODE and SDE",
        path=figures["samples"],
    )
    figures["velocity_error"] = out / "velocity_error.png"
    plot.error_curve(
        np.asarray(ts_err),
        {"learned model": err_learned, "zero field": err_zero},
        ylabel=r"$E\,|v_t - u_t|^2$",
        title="Velocity error against the exact field",
        path=figures["velocity_error"],
    )
    figures["training_loss"] = out / "training_loss.png"
    _loss_figure(fit.losses, floor, figures["training_loss"])
    timer("figures")

    columns = ("loss", "loss_floor", "velocity_error", "energy_ode", "energy_sde", "nll")
    table = format_table(rows, columns)
    metrics_ = {
        "rows": rows,
        "reference": reference,
        "timings_s": timer.times,
        "train": {
            "steps": fit.step,
            "wall_time_s": fit.wall_time,
            "compile_time_s": fit.compile_time,
            "steps_per_second": fit.steps_per_second,
        },
    }
    result = _finish("demo", cfg, out, metrics_, figures, t0)
    result["table"] = table
    return result


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


# ----------------------------------------------------------------------------- 1. GMM -> GMM


@dataclasses.dataclass(frozen=True)
class GMMConfig(_Config):
    """Settings of :func:`gmm_to_gmm`."""

    steps: int = 4000
    batch_size: int = 256
    width: int = 128
    depth: int = 3
    learning_rate: float = 3e-3
    n_paths: int = 200
    n_eval: int = 1000
    n_grid: int = 120
    vp_eps: float = 1e-3
    schedules: tuple[str, ...] = ("linear", "cosine", "vp")
    trained: tuple[str, ...] = ("independent", "joint")
    seed: int = 0

    _QUICK = dict(
        steps=300, width=32, depth=2, n_paths=60, n_eval=300, n_grid=60,
        schedules=("linear", "vp"), trained=("independent",),
    )  # fmt: skip


def gmm_problems() -> dict[str, JointGaussianMixture]:
    """Two 2-D couplings with the same marginals (3 source and 3 target components).

    "joint": component k pairs source N(m0_k, 0.4^2 I) with target N(m1_k, S1_k), correlation
    0.9 per axis between x0 and x1 (cross-covariance); the sources on the left go to the
    targets on the right in reversed vertical order. "independent": p0 x p1 of its marginals.
    """
    m0 = np.array([[-4.0, 3.0], [-4.0, 0.0], [-4.0, -3.0]])
    m1 = np.array([[4.0, -3.0], [4.0, 0.0], [4.0, 3.0]])
    s0 = np.full((3, 2), 0.4)
    s1 = np.array([[0.3, 0.8], [0.7, 0.3], [0.5, 0.5]])
    rho = 0.9
    covs = np.zeros((3, 4, 4))
    for k in range(3):
        covs[k, :2, :2] = np.diag(s0[k] ** 2)
        covs[k, 2:, 2:] = np.diag(s1[k] ** 2)
        covs[k, :2, 2:] = covs[k, 2:, :2] = np.diag(rho * s0[k] * s1[k])
    weights = np.array([0.4, 0.35, 0.25])
    joint = JointGaussianMixture(weights, np.concatenate([m0, m1], axis=1), covs)
    return {"independent": independent_coupling(joint.source(), joint.target()), "joint": joint}


def gmm_1d_problem() -> tuple[GaussianMixture, GaussianMixture]:
    """1-D: p0 = 2 modes at +-3 (std 0.5), p1 = 3 modes at -6, 0, 6 (std 0.5); returns (p0, p1)."""
    p0 = _diag_gmm([0.5, 0.5], [[-3.0], [3.0]], 0.5)
    p1 = _diag_gmm([0.3, 0.4, 0.3], [[-6.0], [0.0], [6.0]], 0.5)
    return p0, p1


def _schedules() -> dict[str, schedules.Schedule]:
    return {"linear": schedules.linear(), "cosine": schedules.cosine(), "vp": schedules.vp()}


def _t_end(name: str, eps: float) -> float:
    return 1.0 - eps if name == "vp" else 1.0


def gmm_to_gmm(
    config: GMMConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/gmm_to_gmm",
    progress: bool = False,
) -> dict:
    """Stochastic interpolants between Gaussian mixtures: exact fields, paths, learned error.

    Metrics: ``nfe[coupling][schedule]`` (adaptive Tsit5, rtol = atol = 1e-5, exact field),
    ``energy_exact_ode[coupling][schedule]`` (exact-ODE samples vs exact target samples),
    ``velocity_error[coupling]`` (mean over t of the learned model's E|v - u|^2, linear
    schedule) and ``zero_field_error[coupling]`` (the same for v = 0), and for the 1-D problem
    ``mode_fractions_1d[schedule]`` (fraction of exact-ODE paths ending nearest each target
    mode; the weights are 0.3, 0.4, 0.3) and ``energy_1d[schedule]``.
    """
    cfg = _resolve(GMMConfig, config, quick)
    t0 = time.perf_counter()
    out = _outdir(out)
    key = jax.random.key(cfg.seed)
    problems = gmm_problems()
    all_scheds = _schedules()
    for name in cfg.schedules:
        if name not in all_scheds:
            raise ValueError(
                f"gmm_to_gmm: unknown schedule {name!r}; choose from {list(all_scheds)}"
            )
    for name in cfg.trained:
        if name not in problems:
            raise ValueError(f"gmm_to_gmm: unknown coupling {name!r}; choose from {list(problems)}")
    scheds = {name: all_scheds[name] for name in cfg.schedules}
    linear = all_scheds["linear"]
    figures = {}
    lim = (-7.0, 7.0)
    panel_ts = (0.0, 0.25, 0.5, 0.75, 1.0)
    timer = _Timer()

    for cname, c in problems.items():
        figures[f"velocity_{cname}"] = out / f"velocity_{cname}_linear.png"
        fig = plot.density_and_velocity(c, linear, panel_ts, lim=lim, n_grid=cfg.n_grid, ncols=5)
        fig.suptitle(f"{cname} coupling, linear schedule: exact log p_t and u_t")
        _save(fig, figures[f"velocity_{cname}"])
        figures[f"responsibilities_{cname}"] = out / f"responsibilities_{cname}_linear.png"
        fig = plot.responsibilities(c, linear, panel_ts, lim=lim, n_grid=cfg.n_grid, ncols=5)
        fig.suptitle(f"{cname} coupling: posterior P(component | x_t)")
        _save(fig, figures[f"responsibilities_{cname}"])
        timer(f"field figures {cname}")

    # Exact ODE trajectories, every coupling x schedule, with adaptive NFE.
    nfe, energy = {}, {}
    fig, axes = _styled_figure(len(problems), len(scheds), size=3.4)
    k_paths, k_ref, k_train, k_err, k_1d = jax.random.split(key, 5)
    for i, (cname, c) in enumerate(problems.items()):
        nfe[cname], energy[cname] = {}, {}
        x_ref = c.target().sample(k_ref, cfg.n_eval)
        for j, (sname, s) in enumerate(scheds.items()):
            t1 = _t_end(sname, cfg.vp_eps)
            x0 = exact.marginal(c, s, 0.0).sample(k_paths, cfg.n_eval)
            sol = sample.ode(_exact_field(c, s), x0, t1=t1, save_ts=np.linspace(0.0, t1, 41))
            nfe[cname][sname] = int(sol.nfe)
            energy[cname][sname] = _energy(sol.x, x_ref)
            with mpl.rc_context(plot._RC):
                plot.trajectories(
                    sol.xs[:, : cfg.n_paths],
                    ax=axes[i, j],
                    lim=lim,
                    title=f"{cname}, {sname}: NFE {int(sol.nfe)}",
                )
            timer(f"exact ODE {cname} {sname}")
    fig.suptitle("Exact ODE trajectories (t = 0 to 1; VP to 1 - eps)")
    figures["trajectories"] = _save(fig, out / "trajectories.png")

    # Learned vs exact velocity error over t (linear schedule), one model per coupling.
    ts_err = jnp.linspace(0.0, 1.0, 26)
    curves, vel_err, zero_err = {}, {}, {}
    for cname in cfg.trained:
        c = problems[cname]
        model = _mlp(2, cfg.width, cfg.depth)
        loss_fn = losses.cfm(model.apply, c.sample, linear, cfg.batch_size)
        fit = _train(model, loss_fn, k_train, cfg.steps, cfg.learning_rate, progress)
        err = _velocity_errors(model, fit.params, c, linear, k_err, ts_err, 1000)
        e, z = np.asarray(err["model"]), np.asarray(err["zero"])
        timer(f"train {cname}")
        curves[f"learned ({cname})"] = e
        curves[f"zero field ({cname})"] = z
        vel_err[cname], zero_err[cname] = float(e.mean()), float(z.mean())
    figures["velocity_error"] = out / "velocity_error.png"
    plot.error_curve(
        np.asarray(ts_err),
        curves,
        ylabel=r"$E\,|v_t - u_t|^2$",
        title="Learned vs exact velocity (linear schedule)",
        path=figures["velocity_error"],
    )

    # 1-D: 2 modes -> 3 modes, density over time with exact trajectories.
    p0, p1 = gmm_1d_problem()
    c1 = independent_coupling(p0, p1)
    x_ref1 = p1.sample(k_ref, cfg.n_eval)
    modes = np.asarray(p1.means)[:, 0]
    fractions, energy_1d = {}, {}
    fig, axes = _styled_figure(1, len(scheds), size=3.6, extra_w=1.5)
    xs = np.linspace(-9.0, 9.0, 240)
    for j, (sname, s) in enumerate(scheds.items()):
        t1 = _t_end(sname, cfg.vp_eps)
        ax = axes[0, j]
        plot.density_over_time(
            c1, s, xs, np.linspace(0.0, 1.0, 160), ax=ax, title=f"{sname} schedule"
        )
        x0 = exact.marginal(c1, s, 0.0).sample(k_1d, cfg.n_eval)
        ts = np.linspace(0.0, t1, 61)
        sol = sample.ode(_exact_field(c1, s), x0, t1=t1, save_ts=ts)
        with mpl.rc_context(plot._RC):
            plot.trajectories_1d(ts, sol.xs[:, : min(cfg.n_paths, 80)], ax=ax)
            ax.legend().set_visible(False)
        ends = np.asarray(sol.x)[:, 0]
        nearest = np.argmin(np.abs(ends[:, None] - modes[None, :]), axis=1)
        fractions[sname] = np.bincount(nearest, minlength=modes.size) / ends.size
        energy_1d[sname] = _energy(sol.x, x_ref1)
        timer(f"1-D {sname}")
    fig.suptitle("1-D: 2 modes (+-3) -> 3 modes (-6, 0, 6): exact density and ODE paths")
    figures["density_1d"] = _save(fig, out / "density_1d.png")

    metrics_ = {
        "nfe": nfe,
        "energy_exact_ode": energy,
        "energy_between_target_samples": _energy(
            problems["joint"].target().sample(jax.random.fold_in(k_ref, 1), cfg.n_eval),
            problems["joint"].target().sample(k_ref, cfg.n_eval),
        ),
        "velocity_error": vel_err,
        "zero_field_error": zero_err,
        "velocity_error_curve": {k: v for k, v in curves.items()},
        "velocity_error_ts": np.asarray(ts_err),
        "mode_fractions_1d": fractions,
        "mode_weights_1d": np.asarray(p1.weights),
        "energy_1d": energy_1d,
        "timings_s": timer.times,
    }
    return _finish("gmm_to_gmm", cfg, out, metrics_, figures, t0)


# ----------------------------------------------------------------------------- 2. OT vs VP


@dataclasses.dataclass(frozen=True)
class OTvsVPConfig(_Config):
    """Settings of :func:`ot_vs_vp`. ``datasets`` from ``fmjax.data`` ("checkerboard", "moons")."""

    datasets: tuple[str, ...] = ("checkerboard", "moons")
    steps: int = 5000
    batch_size: int = 512
    width: int = 128
    depth: int = 3
    learning_rate: float = 2e-3
    n_samples: int = 2000
    n_paths: int = 200
    tol: float = 1e-5
    vp_eps: float = 1e-3
    seed: int = 0

    _QUICK = dict(steps=1000, batch_size=256, width=64, n_samples=500)


_DATASETS: dict[str, Callable] = {
    "checkerboard": data.checkerboard,
    "moons": data.two_moons,
    "eight_gaussians": data.eight_gaussians,
    "rings": data.rings,
    "swiss_roll": data.swiss_roll,
}
_PANEL_TS = (0.1, 0.5, 0.7, 0.9, 0.95, 0.97, 1.0)


def ot_vs_vp(
    config: OTvsVPConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/ot_vs_vp",
    progress: bool = False,
) -> dict:
    """Conditional-OT (linear) vs VP-diffusion path on 2-D toy data (Lipman et al., 2023).

    For each dataset both paths train the same MLP by CFM from N(0, I) (VP on t ~ U[eps,
    1 - eps]); samples are shown at t in (0.1, 0.5, 0.7, 0.9, 0.95, 0.97, 1) (VP: 1 - eps in
    place of 1); ``nfe[dataset][path]`` is the number of velocity evaluations of adaptive Tsit5
    with rtol = atol = ``tol`` on ``n_samples`` points (one batched solve: the step size is
    shared, the error measured by the max norm over all points); ``energy[dataset][path]`` the
    energy distance of the final samples to fresh data samples. ``nfe_exact_8gaussians`` is the
    same NFE for the exact velocities of the 8-Gaussians mixture (no training): the ground truth
    that the OT path is easier to integrate.

    The MLP takes [x, t] (``time_embedding="raw"``, as Meta's 2-D example): high Fourier
    time frequencies make a briefly trained field wiggly in t and inflate the NFE of both paths.
    """
    cfg = _resolve(OTvsVPConfig, config, quick)
    for name in cfg.datasets:
        if name not in _DATASETS:
            raise ValueError(f"ot_vs_vp: unknown dataset {name!r}; choose from {sorted(_DATASETS)}")
    t0 = time.perf_counter()
    out = _outdir(out)
    key = jax.random.key(cfg.seed)
    paths = {"OT": schedules.linear(), "VP": schedules.vp()}
    source = data.gaussian_source(2)
    nfe, energy, figures = {}, {}, {}
    for di, dname in enumerate(cfg.datasets):
        sampler = _DATASETS[dname]
        kd = jax.random.fold_in(key, di)
        k_train, k_x0, k_ref = jax.random.split(kd, 3)
        x_ref = sampler(k_ref, cfg.n_samples)
        nfe[dname], energy[dname] = {}, {}
        panels, trajs = {}, {}
        for pname, s in paths.items():
            t1 = 1.0 - cfg.vp_eps if pname == "VP" else 1.0
            times = losses.uniform_eps_time(cfg.vp_eps) if pname == "VP" else "uniform"
            model = _mlp(2, cfg.width, cfg.depth, time_embedding="raw")
            loss_fn = losses.cfm(
                model.apply, data.independent_pairs(source, sampler), s, cfg.batch_size,
                time_sampler=times,
            )  # fmt: skip
            fit = _train(model, loss_fn, k_train, cfg.steps, cfg.learning_rate, progress)
            v = functools.partial(model.apply, fit.params)
            x0 = source(k_x0, cfg.n_samples)
            # One adaptive solve gives the panels, the paths and the NFE (dense output at the
            # saved times does not change the steps taken).
            panel_ts = np.array([min(t, t1) for t in _PANEL_TS])
            save_ts = np.union1d(np.linspace(0.0, t1, 41), panel_ts)
            sol = sample.ode(v, x0, t1=t1, save_ts=save_ts, rtol=cfg.tol, atol=cfg.tol)
            xs = np.asarray(sol.xs)
            for t, tp in zip(_PANEL_TS, panel_ts, strict=True):
                label = f"{pname}, t = {t:g}" if t < 1 or pname == "OT" else f"{pname}, t = 1 - eps"
                panels[label] = xs[int(np.argmin(np.abs(save_ts - tp)))]
            trajs[pname] = xs[:, : cfg.n_paths]
            nfe[dname][pname] = int(sol.nfe)
            energy[dname][pname] = _energy(sol.x, x_ref)
        figures[f"samples_{dname}"] = out / f"samples_{dname}.png"
        plot.samples_grid(
            panels,
            lim=(-5.0, 5.0),
            ncols=len(_PANEL_TS),
            max_points=cfg.n_samples,
            title=f"{dname}: samples x_t of the learned flow (top: OT path, bottom: VP path)",
            path=figures[f"samples_{dname}"],
        )
        fig, axes = _styled_figure(1, 2, size=4.0)
        for ax, (pname, tr) in zip(axes[0], trajs.items(), strict=True):
            with mpl.rc_context(plot._RC):
                plot.trajectories(
                    tr,
                    ax=ax,
                    lim=(-5.0, 5.0),
                    title=f"{pname} path: NFE {nfe[dname][pname]} (Tsit5, tol {cfg.tol:g})",
                )
        fig.suptitle(f"{dname}: {cfg.n_paths} trajectories")
        figures[f"trajectories_{dname}"] = _save(fig, out / f"trajectories_{dname}.png")
    gmm = independent_coupling(_standard_normal(2), data.eight_gaussians_mixture())
    x0 = source(jax.random.fold_in(key, 99), cfg.n_samples)
    nfe_exact = {
        pname: int(
            sample.ode(
                _exact_field(gmm, s), x0, t1=1.0 - cfg.vp_eps if pname == "VP" else 1.0,
                rtol=cfg.tol, atol=cfg.tol,
            ).nfe
        )
        for pname, s in paths.items()
    }  # fmt: skip
    metrics_ = {
        "nfe": nfe,
        "nfe_exact_8gaussians": nfe_exact,
        "energy": energy,
        "nfe_ratio_vp_over_ot": {d: nfe[d]["VP"] / nfe[d]["OT"] for d in nfe},
    }
    return _finish("ot_vs_vp", cfg, out, metrics_, figures, t0)


# ----------------------------------------------------------------------------- 3. flows, scores


@dataclasses.dataclass(frozen=True)
class FlowsScoresConfig(_Config):
    """Settings of :func:`flows_and_scores`."""

    steps: int = 4000
    batch_size: int = 512
    width: int = 128
    depth: int = 3
    n_frequencies: int = 8
    max_frequency: float = 8.0
    learning_rate: float = 3e-3
    n_samples: int = 2000
    n_steps: int = 100
    diffusion: float = 1.0
    settle_fraction: float = 0.95
    seed: int = 0

    _QUICK = dict(steps=500, width=64, n_samples=500, n_steps=50)


def flows_scores_target() -> GaussianMixture:
    """The 2-mode target in R^3: means (-1, -0.5, 1.5), (1, 1.5, 0.25), std (0.25, 0.25, 0.15)."""
    return _diag_gmm([0.5, 0.5], [[-1.0, -0.5, 1.5], [1.0, 1.5, 0.25]], [0.25, 0.25, 0.15])


def _x1_histograms(runs: dict, pdf, path: Path, show_ts=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0)):
    """Rows: runs (name -> (ts, x_hat (T, N, d))); columns: times; first coordinate of x_hat."""
    fig, axes = _styled_figure(len(runs), len(show_ts), size=2.3, extra_w=0.5)
    edges = np.linspace(-2.2, 2.2, 56)
    grid = np.linspace(-2.2, 2.2, 300)
    ref = pdf(grid)
    with mpl.rc_context(plot._RC):
        for r, (name, (ts, xh)) in enumerate(runs.items()):
            for c, t in enumerate(show_ts):
                i = int(np.argmin(np.abs(ts - t)))
                ax = axes[r, c]
                ax.hist(np.clip(xh[i, :, 0], -2.2, 2.2), bins=edges, density=True,
                        color="tab:blue", alpha=0.6, label=r"$\hat x_1$")  # fmt: skip
                ax.plot(grid, ref, color="black", linewidth=1.0, label="target pdf")
                ax.set_xlim(-2.2, 2.2)
                ax.set_title(f"{name}, t = {ts[i]:.2f}")
                ax.set_xlabel(r"$\hat x_{1}$, first coordinate")
                if c == 0:
                    ax.set_ylabel("density")
                if r == 0 and c == 0:
                    ax.legend(loc="upper left")
        fig.suptitle(
            r"Predicted target $\hat x_1 = E[X_1 | x_t]$ along the learned ODE (RK4) and "
            "SDE (Euler-Maruyama) paths"
        )
    return _save(fig, path)


def _settled(x_hat, means, stds):
    """Fraction (T,) of x_hat (T, N, d) within 3 std (every axis) of some mode."""
    z = jnp.abs(x_hat[:, :, None, :] - means[None, None]) / stds[None, None]
    return jnp.mean(jnp.any(jnp.all(z <= 3.0, axis=-1), axis=-1), axis=-1)


def _first_time(ts, frac, level) -> float | None:
    hit = np.nonzero(np.asarray(frac) > level)[0]
    return float(ts[hit[0]]) if hit.size else None


def flows_and_scores(
    config: FlowsScoresConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/flows_and_scores",
    progress: bool = False,
) -> dict:
    """ODE (RK4) vs SDE (Euler-Maruyama, score from the velocity) on a 2-mode GMM in R^3.

    Along each path the predicted target x_hat_1 = E[X1 | x_t] = ``convert.velocity_to_x1``
    (for the linear schedule x_t + (1 - t) u_t(x_t)) is histogrammed; ``settle_time[name]`` is
    the first t at which more than ``settle_fraction`` of x_hat_1 lie within 3 std (every axis)
    of a mode, for the learned model and the exact field ("exact ODE", "exact SDE").
    ``energy[name]``: energy distance of the final samples to exact target samples.
    """
    cfg = _resolve(FlowsScoresConfig, config, quick)
    t0 = time.perf_counter()
    out = _outdir(out)
    key = jax.random.key(cfg.seed)
    k_train, k_x0, k_sde, k_ref, k_ref2 = jax.random.split(key, 5)
    target = flows_scores_target()
    coupling = independent_coupling(_standard_normal(3), target)
    s = schedules.linear()
    model = _mlp(
        3,
        cfg.width,
        cfg.depth,
        time_embedding="fourier",
        n_frequencies=cfg.n_frequencies,
        max_frequency=cfg.max_frequency,
    )
    loss_fn = losses.cfm(model.apply, coupling.sample, s, cfg.batch_size)
    fit = _train(model, loss_fn, k_train, cfg.steps, cfg.learning_rate, progress)
    fields = {
        "learned": functools.partial(model.apply, fit.params),
        "exact": _exact_field(coupling, s),
    }
    x0 = sample.draw_source(k_x0, cfg.n_samples, 3)
    x_ref = target.sample(k_ref, cfg.n_samples)
    means, stds = target.means, jnp.sqrt(jnp.diagonal(target.covs, axis1=1, axis2=2))
    ts_ode = np.linspace(0.0, 1.0, cfg.n_steps + 1)

    def predicted_x1(v, ts, xs):
        return jax.vmap(lambda t, x: convert.velocity_to_x1(s, t, x, v(t, x)))(ts, xs)

    x_hats, fracs, settle, energy, nfes = {}, {}, {}, {}, {}
    for fname, v in fields.items():
        ode_sol = sample.ode(v, x0, solver="rk4", steps=cfg.n_steps, save_ts=ts_ode)
        sde_sol = sample.sde(
            v, s, x0, k_sde, diffusion=cfg.diffusion, steps=cfg.n_steps, save_trajectory=True
        )
        for mname, ts, xs, xend, n in (
            ("ODE", ts_ode, ode_sol.xs, ode_sol.x, ode_sol.nfe),
            ("SDE", np.asarray(sde_sol.ts), sde_sol.xs, sde_sol.x, sde_sol.nfe),
        ):
            name = f"{fname} {mname}"
            xh = predicted_x1(v, jnp.asarray(ts, xs.dtype), xs)
            frac = np.asarray(_settled(xh, means, stds))
            x_hats[name], fracs[name] = (np.asarray(ts), np.asarray(xh)), frac
            settle[name] = _first_time(ts, frac, cfg.settle_fraction)
            energy[name] = _energy(xend, x_ref)
            nfes[name] = int(n)

    figures = {"x1_histograms": out / "x1_histograms.png", "settling": out / "settling.png"}
    pdf0 = GaussianMixture(target.weights, target.means[:, :1], target.covs[:, :1, :1])
    _x1_histograms(
        {"ODE (RK4)": x_hats["learned ODE"], "SDE (EM)": x_hats["learned SDE"]},
        lambda x: np.exp(np.asarray(pdf0.log_prob(jnp.asarray(x)[:, None]))),
        figures["x1_histograms"],
    )
    fig, axes = _styled_figure(1, 1, size=4.4)
    ax = axes[0, 0]
    with mpl.rc_context(plot._RC):
        styles = {"learned ODE": "-", "learned SDE": "-", "exact ODE": "--", "exact SDE": "--"}
        for name, frac in fracs.items():
            st = settle[name]
            label = f"{name} (settles at t = {st:.2f})" if st is not None else f"{name} (never)"
            ax.plot(x_hats[name][0], frac, styles[name], label=label)
        ax.axhline(cfg.settle_fraction, color="0.5", linewidth=0.8, linestyle=":")
        ax.set_xlabel("t")
        ax.set_ylabel(r"fraction of $\hat x_1$ within 3 std of a mode")
        ax.set_title("When the predicted target settles on the modes")
        ax.legend(loc="lower right")
    _save(fig, figures["settling"])
    figures["samples"] = out / "samples.png"
    plot.histograms(
        {"exact target": x_ref, "learned ODE (RK4)": x_hats["learned ODE"][1][-1],
         "learned SDE (EM)": x_hats["learned SDE"][1][-1]},
        ncols=3,
        bins=50,
        title="Final samples, per coordinate",
        path=figures["samples"],
    )  # fmt: skip
    metrics_ = {
        "settle_time": settle,
        "energy": energy,
        "energy_between_target_samples": _energy(target.sample(k_ref2, cfg.n_samples), x_ref),
        "nfe": nfes,
        "final_settled_fraction": {k: float(v[-1]) for k, v in fracs.items()},
    }
    return _finish("flows_and_scores", cfg, out, metrics_, figures, t0)


# ----------------------------------------------------------------------------- 4. CFM = FM


@dataclasses.dataclass(frozen=True)
class CFMConfig(_Config):
    """Settings of :func:`cfm_equals_fm`."""

    batch_sizes: tuple[int, ...] = (8, 32, 128, 512, 2048, 8192)
    repeats: int = 32
    n_reference: int = 65536
    width: int = 64
    depth: int = 2
    pretrain_steps: int = 20
    learning_rate: float = 3e-3
    seed: int = 0

    _QUICK = dict(batch_sizes=(8, 64, 512, 4096), repeats=8, n_reference=16384)


def _flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


@functools.partial(jax.jit, static_argnums=0)
def _batch_grad(loss, params, key):
    return _flat(jax.grad(loss)(params, key))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _nested_cosines(loss, params, g_ref, key, n_chunks: int, repeats: int):
    """Cosine to ``g_ref`` of the running-mean gradient after each chunk: (n_chunks, repeats).

    Repeat r draws chunk gradients on independent keys; after c chunks of b0 points the running
    mean is the loss gradient on a batch of (c + 1) b0 points (nested batches), so one compiled
    scan gives every batch size that is a multiple of b0.
    """
    grad = jax.vmap(lambda k: _flat(jax.grad(loss)(params, k)))
    keys = jax.random.split(key, (n_chunks, repeats))
    ref = g_ref / jnp.linalg.norm(g_ref)

    def step(total, kc):
        c, k = kc
        total = total + grad(k)
        mean = total / (c + 1.0)
        return total, (mean @ ref) / jnp.linalg.norm(mean, axis=-1)

    init = jnp.zeros((repeats, g_ref.shape[0]), g_ref.dtype)
    _, cosines = jax.lax.scan(step, init, (jnp.arange(n_chunks, dtype=g_ref.dtype), keys))
    return cosines


def cfm_equals_fm(
    config: CFMConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/cfm_equals_fm",
    progress: bool = False,
) -> dict:
    """The conditional (CFM) and marginal (FM, exact target) losses have the same gradients.

    On the demo problem and an MLP briefly trained (``pretrain_steps``, so the gradient is not
    the easy one of a fresh network; the longer the training, the smaller the true gradient
    relative to the sampling noise and the larger the batch needed), the reference gradient is
    the marginal-FM gradient on ``n_reference`` points. For each batch size B, ``repeats``
    independent CFM and FM gradients on B points (nested batches, ``_nested_cosines``) are
    compared with it by cosine similarity: both converge to 1 (same
    expectation), FM faster (no conditional noise). ``cosine_large_batch`` compares the CFM and
    FM gradients on ``n_reference`` points directly.
    """
    cfg = _resolve(CFMConfig, config, quick)
    sizes = cfg.batch_sizes
    if list(sizes) != sorted(set(sizes)) or any(b % sizes[0] for b in sizes):
        raise ValueError(
            f"cfm_equals_fm: `batch_sizes` must increase and be multiples of the first, got {sizes}"
        )
    t0 = time.perf_counter()
    out = _outdir(out)
    key = jax.random.key(cfg.seed)
    k_train, k_ref, k_ref2, k_rep = jax.random.split(key, 4)
    coupling, s = demo_problem()
    model = _mlp(2, cfg.width, cfg.depth)
    if cfg.pretrain_steps:
        loss = losses.cfm(model.apply, coupling.sample, s, 256)
        params = _train(
            model, loss, k_train, cfg.pretrain_steps, cfg.learning_rate, progress
        ).params
    else:
        params = models.init(model, jax.random.fold_in(k_train, 0))

    g_ref = _batch_grad(
        losses.marginal_fm(model.apply, coupling, s, cfg.n_reference), params, k_ref
    )
    g_ref_cfm = _batch_grad(
        losses.cfm(model.apply, coupling.sample, s, cfg.n_reference), params, k_ref2
    )
    b0 = cfg.batch_sizes[0]
    n_chunks = cfg.batch_sizes[-1] // b0
    at = np.asarray(cfg.batch_sizes) // b0 - 1  # chunk index after which the batch is complete
    cos, spread = {}, {}
    for kind in ("cfm", "fm"):
        loss = (
            losses.cfm(model.apply, coupling.sample, s, b0)
            if kind == "cfm"
            else losses.marginal_fm(model.apply, coupling, s, b0)
        )
        c = np.asarray(
            _nested_cosines(loss, params, g_ref, jax.random.fold_in(k_rep, len(kind)),
                            n_chunks, cfg.repeats)
        )[at]  # fmt: skip
        cos[kind] = c.mean(axis=1).tolist()
        spread[kind] = c.std(axis=1).tolist()

    fig, axes = _styled_figure(1, 1, size=4.2)
    ax = axes[0, 0]
    with mpl.rc_context(plot._RC):
        bs = np.asarray(cfg.batch_sizes)
        for kind, label, color in (
            ("cfm", "conditional FM (CFM)", "tab:blue"),
            ("fm", "marginal FM (exact target)", "tab:orange"),
        ):
            m, sd = np.asarray(cos[kind]), np.asarray(spread[kind])
            ax.plot(bs, m, "o-", color=color, label=label)
            ax.fill_between(bs, m - sd, np.minimum(m + sd, 1.0), color=color, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.minorticks_off()
        ax.set_xlabel("batch size B")
        ax.set_ylabel(f"cosine to the FM gradient on {cfg.n_reference} points")
        ax.set_title(f"CFM and FM gradients agree (mean ± std, {cfg.repeats} batches)")
        ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle="--")
        ax.legend(loc="lower right")
    figures = {"gradient_cosine": _save(fig, out / "gradient_cosine.png")}
    metrics_ = {
        "batch_sizes": list(cfg.batch_sizes),
        "cosine_cfm": cos["cfm"],
        "cosine_fm": cos["fm"],
        "cosine_cfm_std": spread["cfm"],
        "cosine_fm_std": spread["fm"],
        "cosine_large_batch": _f(
            jnp.dot(g_ref_cfm, g_ref) / (jnp.linalg.norm(g_ref_cfm) * jnp.linalg.norm(g_ref))
        ),
    }
    return _finish("cfm_equals_fm", cfg, out, metrics_, figures, t0)


#: Experiment name -> function, as used by ``fmjax experiment NAME``.
EXPERIMENTS: dict[str, Callable[..., dict]] = {
    "demo": demo,
    "gmm_to_gmm": gmm_to_gmm,
    "ot_vs_vp": ot_vs_vp,
    "flows_and_scores": flows_and_scores,
    "cfm_equals_fm": cfm_equals_fm,
}

#: Experiment name -> config class.
CONFIGS: dict[str, type] = {
    "demo": DemoConfig,
    "gmm_to_gmm": GMMConfig,
    "ot_vs_vp": OTvsVPConfig,
    "flows_and_scores": FlowsScoresConfig,
    "cfm_equals_fm": CFMConfig,
}
