"""Experiment 2: conditional-OT path vs VP-diffusion path on 2-D toy data."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import jax
import matplotlib as mpl
import numpy as np

from fmjax import data, losses, plot, sample, schedules
from fmjax.experiments._common import (
    _Config,
    _energy,
    _exact_field,
    _finish,
    _mlp,
    _outdir,
    _resolve,
    _save,
    _standard_normal,
    _styled_figure,
    _train,
)
from fmjax.mixtures import independent_coupling


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


DATASETS: dict[str, Callable] = {
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
        if name not in DATASETS:
            raise ValueError(f"ot_vs_vp: unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    t0 = time.perf_counter()
    out = _outdir(out)
    key = jax.random.key(cfg.seed)
    paths = {"OT": schedules.linear(), "VP": schedules.vp()}
    source = data.gaussian_source(2)
    nfe, energy, figures = {}, {}, {}
    for di, dname in enumerate(cfg.datasets):
        sampler = DATASETS[dname]
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
