"""Experiment 1: stochastic interpolants between Gaussian mixtures (2-D and 1-D).

An independent and a joint (cross-covariance) coupling with the same marginals, under the
linear, cosine and VP schedules: exact fields, responsibilities, exact ODE paths, the velocity
error of a learned model against the exact one, and a 1-D problem, 2 modes -> 3 modes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _checks, exact, losses, models, plot, problems, sample, schedules
from fmjax.experiments._common import (
    ExperimentResult,
    _Config,
    _diag_gmm,
    _energy,
    _exact_field,
    _finish,
    _mlp,
    _outdir,
    _resolve,
    _times,
    _train,
    _velocity_errors,
)
from fmjax.mixtures import GaussianMixture, JointGaussianMixture, independent_coupling

_FN = "experiments.gmm_to_gmm"


@dataclasses.dataclass(frozen=True)
class GMMConfig(_Config):
    """Settings of :func:`gmm_to_gmm`.

    Attributes:
        steps: CFM training steps of each learned model.
        batch_size: pairs per training step.
        width: hidden layer size of the MLP.
        depth: number of hidden layers of the MLP.
        learning_rate: peak Adam learning rate (cosine decay).
        n_paths: exact ODE trajectories drawn per panel (at most 80 in the 1-D figure).
        n_eval: points per exact ODE solve and per exact target sample of the energy distances.
        n_grid: grid points per axis of the density / velocity and responsibility figures.
        schedules: schedules of the exact paths and the 1-D problem: "linear", "cosine", "vp".
        trained: couplings ("independent", "joint") on which an MLP is trained (linear
            schedule) and its velocity error measured.
        seed: seed of the run's PRNG key.
    """

    steps: int = 4000
    batch_size: int = 256
    width: int = 128
    depth: int = 3
    learning_rate: float = 3e-3
    n_paths: int = 200
    n_eval: int = 1000
    n_grid: int = 120
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

    Returns:
        ``{"independent": coupling, "joint": coupling}``, ``JointGaussianMixture``s on R^4.
    """
    joint = JointGaussianMixture(*problems._gmm_2d_parts())
    return {"independent": independent_coupling(joint.source(), joint.target()), "joint": joint}


def gmm_1d_problem() -> tuple[GaussianMixture, GaussianMixture]:
    """1-D: p0 = 2 modes at +-3 (std 0.5), p1 = 3 modes at -6, 0, 6 (std 0.5); returns (p0, p1).

    Returns:
        ``(p0, p1)``, two 1-D ``GaussianMixture``s.
    """
    p0 = _diag_gmm([0.5, 0.5], [[-3.0], [3.0]], 0.5)
    p1 = _diag_gmm([0.3, 0.4, 0.3], [[-6.0], [0.0], [6.0]], 0.5)
    return p0, p1


_SCHEDULES = {"linear": schedules.linear, "cosine": schedules.cosine, "vp": schedules.vp}
_LIM = (-7.0, 7.0)
_PANEL_TS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _check(cfg: GMMConfig, problems: dict) -> None:
    for name in cfg.schedules:
        _checks.check_choice(_FN, "config.schedules", name, _SCHEDULES)
    for name in cfg.trained:
        _checks.check_choice(_FN, "config.trained", name, problems)


def _field_figures(problems: dict, s: schedules.Schedule, cfg: GMMConfig, out: Path) -> dict:
    """Exact log p_t with u_t, and the responsibilities, of each coupling at five times."""
    figures = {}
    for cname, c in problems.items():
        fig = plot.density_and_velocity(c, s, _PANEL_TS, lim=_LIM, n_grid=cfg.n_grid, ncols=5)
        fig.suptitle(f"{cname} coupling, {s.name} schedule: exact log p_t and u_t")
        figures[f"velocity_{cname}"] = plot.save(fig, out / f"velocity_{cname}_{s.name}.png")
        fig = plot.responsibilities(c, s, _PANEL_TS, lim=_LIM, n_grid=cfg.n_grid, ncols=5)
        fig.suptitle(f"{cname} coupling: posterior P(component | x_t)")
        figures[f"responsibilities_{cname}"] = plot.save(
            fig, out / f"responsibilities_{cname}_{s.name}.png"
        )
    return figures


def _exact_paths(problems: dict, scheds: dict, cfg: GMMConfig, key, out: Path):
    """Exact ODE paths (adaptive Tsit5) of every coupling x schedule over its valid interval.

    Returns (nfe, energy, figure path): ``nfe[coupling][schedule]``, ``energy[...]`` the energy
    distance of the final points to exact target samples.
    """
    k_paths, k_ref = jax.random.split(key)
    nfe, energy = {}, {}
    fig, axes = plot.figure(len(problems), len(scheds), size=3.4)
    for i, (cname, c) in enumerate(problems.items()):
        nfe[cname], energy[cname] = {}, {}
        x_ref = c.target().sample(k_ref, cfg.n_eval)
        for j, (sname, s) in enumerate(scheds.items()):
            x0 = exact.marginal(c, s, s.t_min).sample(k_paths, cfg.n_eval)
            sol = sample.ode(_exact_field(c, s), x0, save_ts=_times(s, 41))
            nfe[cname][sname] = int(sol.nfe)
            energy[cname][sname] = _energy(sol.x, x_ref)
            title = f"{cname}, {sname}: NFE {int(sol.nfe)}"
            plot.trajectories(sol.xs[:, : cfg.n_paths], ax=axes[i, j], lim=_LIM, title=title)
    fig.suptitle("Exact ODE trajectories over each schedule's valid interval")
    return nfe, energy, plot.save(fig, out / "trajectories.png")


def _models(cfg: GMMConfig) -> dict[str, models.MLP]:
    """The networks this experiment trains, by label: one 2-D MLP (per coupling in ``trained``)."""
    return {"MLP": _mlp(2, cfg.width, cfg.depth)}


def _learned_errors(problems: dict, s, cfg: GMMConfig, key, progress: bool, out: Path) -> dict:
    """Train one MLP per coupling in ``cfg.trained``; E|v - u|^2 over t vs the zero field."""
    k_train, k_err = jax.random.split(key)
    ts = _times(s, 26)
    curves, vel_err, zero_err = {}, {}, {}
    for cname in cfg.trained:
        c = problems[cname]
        model = _models(cfg)["MLP"]
        loss_fn = losses.cfm(model.apply, c.sample, s, cfg.batch_size)
        fit = _train(model, loss_fn, k_train, cfg.steps, cfg.learning_rate, progress)
        err = _velocity_errors(model, fit.params, c, s, k_err, jnp.asarray(ts), 1000)
        e, z = np.asarray(err["model"]), np.asarray(err["zero"])
        curves[f"learned ({cname})"], curves[f"zero field ({cname})"] = e, z
        vel_err[cname], zero_err[cname] = float(e.mean()), float(z.mean())
    path = out / "velocity_error.png"
    plot.error_curve(ts, curves, ylabel=r"$E\,|v_t - u_t|^2$",
                     title=f"Learned vs exact velocity ({s.name} schedule)", path=path)  # fmt: skip
    return {
        "velocity_error": vel_err,
        "zero_field_error": zero_err,
        "velocity_error_curve": curves,
        "velocity_error_ts": ts,
        "figure": path,
    }


def _one_d(scheds: dict, cfg: GMMConfig, key, out: Path) -> dict:
    """1-D, 2 modes -> 3 modes: exact density over (t, x), exact paths, where the paths end."""
    p0, p1 = gmm_1d_problem()
    c1 = independent_coupling(p0, p1)
    k_paths, k_ref = jax.random.split(key)
    x_ref = p1.sample(k_ref, cfg.n_eval)
    modes = np.asarray(p1.means)[:, 0]
    fractions, energy = {}, {}
    fig, axes = plot.figure(1, len(scheds), size=3.6, extra_width=1.5)
    for j, (sname, s) in enumerate(scheds.items()):
        ax = axes[0, j]
        plot.density_over_time(
            c1, s, np.linspace(-9.0, 9.0, 240), _times(s, 160), ax=ax, title=f"{sname} schedule"
        )
        x0 = exact.marginal(c1, s, s.t_min).sample(k_paths, cfg.n_eval)
        ts = _times(s, 61)
        sol = sample.ode(_exact_field(c1, s), x0, save_ts=ts)
        plot.trajectories_1d(ts, sol.xs[:, : min(cfg.n_paths, 80)], ax=ax)
        ax.legend().set_visible(False)
        ends = np.asarray(sol.x)[:, 0]
        nearest = np.argmin(np.abs(ends[:, None] - modes[None, :]), axis=1)
        fractions[sname] = np.bincount(nearest, minlength=modes.size) / ends.size
        energy[sname] = _energy(sol.x, x_ref)
    fig.suptitle("1-D: 2 modes (+-3) -> 3 modes (-6, 0, 6): exact density and ODE paths")
    return {
        "mode_fractions_1d": fractions,
        "mode_weights_1d": np.asarray(p1.weights),
        "energy_1d": energy,
        "figure": plot.save(fig, out / "density_1d.png"),
    }


def _noise_level(c: JointGaussianMixture, cfg: GMMConfig, key) -> float:
    """Energy distance between two exact target samples: the noise floor of the energies."""
    k1, k2 = jax.random.split(key)
    return _energy(c.target().sample(k1, cfg.n_eval), c.target().sample(k2, cfg.n_eval))


def gmm_to_gmm(
    config: GMMConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/gmm_to_gmm",
    progress: bool = False,
) -> ExperimentResult:
    """Stochastic interpolants between Gaussian mixtures: exact fields, paths, learned error.

    Exact paths run over each schedule's valid interval (``schedule.interval``; the VP
    schedule's ends at 1 - 1e-3, where its coefficients are still finite).

    Metrics: ``nfe[coupling][schedule]`` (adaptive Tsit5, rtol = atol = 1e-5, exact field),
    ``energy_exact_ode[coupling][schedule]`` (exact-ODE samples vs exact target samples),
    ``velocity_error[coupling]`` (mean over t of the learned model's E|v - u|^2, linear
    schedule) and ``zero_field_error[coupling]`` (the same for v = 0), and for the 1-D problem
    ``mode_fractions_1d[schedule]`` (fraction of exact-ODE paths ending nearest each target
    mode; the weights are 0.3, 0.4, 0.3) and ``energy_1d[schedule]``.

    Args:
        config: the settings (a ``GMMConfig``); default: the quick or the full preset.
        quick: None: ``FMJAX_QUICK`` from the environment (``quick_from_env``); True:
            ``GMMConfig.quick()``; ignored when ``config`` is given.
        out: folder for ``results.json`` and the figures (PNG).
        progress: show a progress bar for each training and a status line per phase (stderr).

    Returns:
        an ``ExperimentResult(experiment, config, metrics, figures, wall_time_s)``; the same JSON
            values are written to ``out``/results.json.
    """
    cfg = _resolve(_FN, GMMConfig, config, quick)
    problems = gmm_problems()
    _check(cfg, problems)
    t0 = time.perf_counter()
    out = _outdir(out)
    scheds = {name: _SCHEDULES[name]() for name in cfg.schedules}
    linear = schedules.linear()
    k_paths, k_noise, k_learn, k_1d = jax.random.split(jax.random.key(cfg.seed), 4)

    figures = _field_figures(problems, linear, cfg, out)
    nfe, energy, figures["trajectories"] = _exact_paths(problems, scheds, cfg, k_paths, out)
    learned = _learned_errors(problems, linear, cfg, k_learn, progress, out)
    figures["velocity_error"] = learned.pop("figure")
    one_d = _one_d(scheds, cfg, k_1d, out)
    figures["density_1d"] = one_d.pop("figure")
    metrics_ = {
        "nfe": nfe,
        "energy_exact_ode": energy,
        "energy_between_target_samples": _noise_level(problems["joint"], cfg, k_noise),
        **learned,
        **one_d,
    }
    return _finish(_FN.split(".")[1], cfg, out, metrics_, figures, t0)
