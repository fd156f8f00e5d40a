"""Experiment 1: stochastic interpolants between Gaussian mixtures (2-D and 1-D)."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import matplotlib as mpl
import numpy as np

from fmjax import exact, losses, plot, sample, schedules
from fmjax.experiments._common import (
    _Config,
    _diag_gmm,
    _energy,
    _exact_field,
    _finish,
    _mlp,
    _outdir,
    _resolve,
    _save,
    _styled_figure,
    _Timer,
    _train,
    _velocity_errors,
)
from fmjax.mixtures import GaussianMixture, JointGaussianMixture, independent_coupling


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
