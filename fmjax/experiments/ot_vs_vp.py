"""Experiment 2: conditional-OT path vs VP-diffusion path on 2-D toy data."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from fmjax import _checks, data, losses, models, plot, sample, schedules
from fmjax.experiments._common import (
    ExperimentResult,
    _Config,
    _energy,
    _exact_field,
    _finish,
    _mlp,
    _outdir,
    _resolve,
    _times,
    _train,
)
from fmjax.mixtures import independent_coupling, standard_normal

_FN = "experiments.ot_vs_vp"


@dataclasses.dataclass(frozen=True)
class OTvsVPConfig(_Config):
    """Settings of :func:`ot_vs_vp`.

    Attributes:
        datasets: 2-D toy datasets of ``fmjax.data`` (names of ``DATASETS``: "checkerboard",
            "moons", "eight_gaussians", "rings", "swiss_roll").
        steps: CFM training steps of each MLP (one per dataset and path).
        batch_size: pairs per training step.
        width: hidden layer size of the MLP.
        depth: number of hidden layers of the MLP.
        learning_rate: peak Adam learning rate (cosine decay).
        n_samples: source points of each ODE solve (and data samples for the energy distance).
        n_paths: trajectories drawn in each trajectory figure.
        tol: rtol = atol of the adaptive Tsit5 solves behind the NFE counts.
        seed: seed of the run's PRNG key.
    """

    datasets: tuple[str, ...] = ("checkerboard", "moons")
    steps: int = 5000
    batch_size: int = 512
    width: int = 128
    depth: int = 3
    learning_rate: float = 2e-3
    n_samples: int = 2000
    n_paths: int = 200
    tol: float = 1e-5
    seed: int = 0

    _QUICK = dict(steps=1000, batch_size=256, width=64, n_samples=500)


DATASETS: dict[str, Callable] = {
    "checkerboard": data.checkerboard,
    "moons": data.two_moons,
    "eight_gaussians": data.eight_gaussians,
    "rings": data.rings,
    "swiss_roll": data.swiss_roll,
}
_PANEL_TS = (0.1, 0.5, 0.7, 0.9, 0.95, 0.97, 1.0)


def _models(cfg: OTvsVPConfig) -> dict[str, models.MLP]:
    """The networks this experiment trains, by label: a raw-time 2-D MLP (one per path)."""
    return {"MLP": _mlp(2, cfg.width, cfg.depth, time_embedding="raw")}


def _train_path(sampler, s, cfg: OTvsVPConfig, key, progress: bool):
    """An MLP trained by CFM from N(0, I) to ``sampler`` on the path of schedule ``s``."""
    model = _models(cfg)["MLP"]
    pairs = data.independent_pairs(data.gaussian_source(2), sampler)
    loss_fn = losses.cfm(model.apply, pairs, s, cfg.batch_size)
    fit = _train(model, loss_fn, key, cfg.steps, cfg.learning_rate, progress)
    return functools.partial(model.apply, fit.params)


def _solve(v, s, x0, cfg: OTvsVPConfig):
    """One adaptive solve over the valid interval of ``s``; the panel times are clipped to it.

    Dense output at the saved times does not change the steps taken, so the same solve gives
    the panels, the paths and the NFE. Returns (solution, save_ts, panel_ts).
    """
    panel_ts = np.clip(_PANEL_TS, s.t_min, s.t_max)
    save_ts = np.union1d(_times(s, 41), panel_ts)
    sol = sample.ode(v, x0, schedule=s, save_ts=save_ts, rtol=cfg.tol, atol=cfg.tol)
    return sol, save_ts, panel_ts


def _dataset(dname: str, paths: dict, cfg: OTvsVPConfig, key, progress: bool, out: Path):
    """Both paths on one dataset: NFE, energy to data, samples and trajectory figures."""
    sampler = DATASETS[dname]
    k_train, k_x0, k_ref = jax.random.split(key, 3)
    x_ref = sampler(k_ref, cfg.n_samples)
    x0 = data.gaussian_source(2)(k_x0, cfg.n_samples)
    nfe, energy, panels, trajs = {}, {}, {}, {}
    for pname, s in paths.items():
        v = _train_path(sampler, s, cfg, k_train, progress)
        sol, save_ts, panel_ts = _solve(v, s, x0, cfg)
        xs = np.asarray(sol.xs)
        for tp in panel_ts:
            panels[f"{pname}, t = {tp:g}"] = xs[int(np.argmin(np.abs(save_ts - tp)))]
        trajs[pname] = xs[:, : cfg.n_paths]
        nfe[pname], energy[pname] = int(sol.nfe), _energy(sol.x, x_ref)
    figures = {
        f"samples_{dname}": out / f"samples_{dname}.png",
        f"trajectories_{dname}": out / f"trajectories_{dname}.png",
    }
    plot.samples_grid(
        panels, lim=(-5.0, 5.0), ncols=len(_PANEL_TS), max_points=cfg.n_samples,
        title=f"{dname}: samples x_t of the learned flow (top: OT path, bottom: VP path)",
        path=figures[f"samples_{dname}"],
    )  # fmt: skip
    fig, axes = plot.figure(1, len(trajs), size=4.0)
    for ax, (pname, tr) in zip(axes[0], trajs.items(), strict=True):
        title = f"{pname} path: NFE {nfe[pname]} (Tsit5, tol {cfg.tol:g})"
        plot.trajectories(tr, ax=ax, lim=(-5.0, 5.0), title=title)
    fig.suptitle(f"{dname}: {cfg.n_paths} trajectories")
    plot.save(fig, figures[f"trajectories_{dname}"])
    return nfe, energy, figures


def _exact_nfe(paths: dict, cfg: OTvsVPConfig, key) -> dict:
    """NFE of adaptive Tsit5 on the exact 8-Gaussians velocities (no training)."""
    gmm = independent_coupling(standard_normal(2), data.eight_gaussians_mixture())
    x0 = data.gaussian_source(2)(key, cfg.n_samples)
    return {
        pname: int(sample.ode(_exact_field(gmm, s), x0, rtol=cfg.tol, atol=cfg.tol).nfe)
        for pname, s in paths.items()
    }


def ot_vs_vp(
    config: OTvsVPConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/ot_vs_vp",
    progress: bool = False,
) -> ExperimentResult:
    """Conditional-OT (linear) vs VP-diffusion path on 2-D toy data (Lipman et al., 2023).

    For each dataset both paths train the same MLP by CFM from N(0, I) (times drawn over each
    schedule's valid interval; the VP schedule's ends at 1 - 1e-3); samples are shown at t in
    (0.1, 0.5, 0.7, 0.9, 0.95, 0.97, 1), clipped to the interval; ``nfe[dataset][path]`` is the
    number of velocity evaluations of adaptive Tsit5 with rtol = atol = ``tol`` on
    ``n_samples`` points (one batched solve: the step size is shared, the error measured by the
    max norm over all points); ``energy[dataset][path]`` the energy distance of the final
    samples to fresh data samples. ``nfe_exact_8gaussians`` is the same NFE for the exact
    velocities of the 8-Gaussians mixture (no training): the ground truth that the OT path is
    easier to integrate.

    The MLP takes [x, t] (``time_embedding="raw"``, as Meta's 2-D example): high Fourier
    time frequencies make a briefly trained field wiggly in t and inflate the NFE of both paths.

    Args:
        config: the settings (a ``OTvsVPConfig``); default: the quick or the full preset.
        quick: None: ``FMJAX_QUICK`` from the environment (``quick_from_env``); True:
            ``OTvsVPConfig.quick()``; ignored when ``config`` is given.
        out: folder for ``results.json`` and the figures (PNG).
        progress: show a progress bar for each training and a status line per phase (stderr).

    Returns:
        an ``ExperimentResult(experiment, config, metrics, figures, wall_time_s)``; the same JSON
            values are written to ``out``/results.json.
    """
    cfg = _resolve(_FN, OTvsVPConfig, config, quick)
    for name in cfg.datasets:
        _checks.check_choice(_FN, "config.datasets", name, sorted(DATASETS))
    t0 = time.perf_counter()
    out = _outdir(out)
    key = jax.random.key(cfg.seed)
    paths = {"OT": schedules.linear(), "VP": schedules.vp()}
    nfe, energy, figures = {}, {}, {}
    for di, dname in enumerate(cfg.datasets):
        nfe[dname], energy[dname], figs = _dataset(
            dname, paths, cfg, jax.random.fold_in(key, di), progress, out
        )
        figures.update(figs)
    metrics_ = {
        "nfe": nfe,
        "nfe_exact_8gaussians": _exact_nfe(paths, cfg, jax.random.fold_in(key, 99)),
        "energy": energy,
        "nfe_ratio_vp_over_ot": {d: nfe[d]["VP"] / nfe[d]["OT"] for d in nfe},
    }
    return _finish("ot_vs_vp", cfg, out, metrics_, figures, t0)
