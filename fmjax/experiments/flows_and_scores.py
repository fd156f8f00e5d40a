"""Experiment 3: ODE vs SDE sampling and the predicted target x_hat_1 (R^3 GMM)."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import convert, losses, models, plot, sample, schedules
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
)
from fmjax.mixtures import GaussianMixture, independent_coupling, standard_normal


@dataclasses.dataclass(frozen=True)
class FlowsScoresConfig(_Config):
    """Settings of :func:`flows_and_scores`.

    Attributes:
        steps: CFM training steps.
        batch_size: pairs per training step.
        width: hidden layer size of the MLP.
        depth: number of hidden layers of the MLP.
        n_frequencies: Fourier time frequencies of the MLP's time embedding.
        max_frequency: largest initial Fourier time frequency, cycles per unit time.
        learning_rate: peak Adam learning rate (cosine decay).
        n_samples: source points sampled by each ODE and SDE (and exact target samples for the
            energy distances).
        n_steps: steps of the fixed-step RK4 ODE and of the Euler-Maruyama SDE.
        diffusion: constant SDE diffusion g (the score is derived from the velocity).
        settle_fraction: fraction of x_hat_1 within 3 std of a mode that defines
            ``settle_time``.
        seed: seed of the run's PRNG key.
    """

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
    """The 2-mode target in R^3: means (-1, -0.5, 1.5), (1, 1.5, 0.25), std (0.25, 0.25, 0.15).

    Returns:
        the ``GaussianMixture`` (2 components in R^3).
    """
    return _diag_gmm([0.5, 0.5], [[-1.0, -0.5, 1.5], [1.0, 1.5, 0.25]], [0.25, 0.25, 0.15])


@plot.styled
def _x1_histograms(runs: dict, pdf, path: Path, show_ts=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0)):
    """Rows: runs (name -> (ts, x_hat (T, N, d))); columns: times; first coordinate of x_hat."""
    fig, axes = plot.figure(len(runs), len(show_ts), size=2.3, extra_width=0.5)
    edges = np.linspace(-2.2, 2.2, 56)
    grid = np.linspace(-2.2, 2.2, 300)
    ref = pdf(grid)
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
    return plot.save(fig, path)


@plot.styled
def _settling_figure(fracs: dict, x_hats: dict, settle: dict, level: float, path: Path):
    fig, axes = plot.figure(1, 1, size=4.4)
    ax = axes[0, 0]
    styles = {"learned ODE": "-", "learned SDE": "-", "exact ODE": "--", "exact SDE": "--"}
    for name, frac in fracs.items():
        st = settle[name]
        label = f"{name} (settles at t = {st:.2f})" if st is not None else f"{name} (never)"
        ax.plot(x_hats[name][0], frac, styles[name], label=label)
    ax.axhline(level, color="0.5", linewidth=0.8, linestyle=":")
    ax.set_xlabel("t")
    ax.set_ylabel(r"fraction of $\hat x_1$ within 3 std of a mode")
    ax.set_title("When the predicted target settles on the modes")
    ax.legend(loc="lower right")
    return plot.save(fig, path)


def _settled(x_hat, means, stds):
    """Fraction (T,) of x_hat (T, N, d) within 3 std (every axis) of some mode."""
    z = jnp.abs(x_hat[:, :, None, :] - means[None, None]) / stds[None, None]
    return jnp.mean(jnp.any(jnp.all(z <= 3.0, axis=-1), axis=-1), axis=-1)


def _first_time(ts, frac, level) -> float | None:
    hit = np.nonzero(np.asarray(frac) > level)[0]
    return float(ts[hit[0]]) if hit.size else None


def _models(cfg: FlowsScoresConfig) -> dict[str, models.MLP]:
    """The networks this experiment trains, by label: a Fourier-time MLP on the 3-D problem."""
    kw = dict(n_frequencies=cfg.n_frequencies, max_frequency=cfg.max_frequency)
    return {"MLP": _mlp(3, cfg.width, cfg.depth, time_embedding="fourier", **kw)}


def _fields(coupling, s, cfg: FlowsScoresConfig, key, progress: bool) -> dict:
    """The learned velocity (Fourier-time MLP trained by CFM) and the exact one."""
    model = _models(cfg)["MLP"]
    loss_fn = losses.cfm(model.apply, coupling.sample, s, cfg.batch_size)
    fit = _train(model, loss_fn, key, cfg.steps, cfg.learning_rate, progress)
    return {
        "learned": functools.partial(model.apply, fit.params),
        "exact": _exact_field(coupling, s),
    }


def _paths(v, s, x0, cfg: FlowsScoresConfig, key) -> dict:
    """ODE (RK4) and SDE (Euler-Maruyama) runs of ``v``: name -> (ts, xs, final x, nfe)."""
    ts_ode = _times(s, cfg.n_steps + 1)
    ode = sample.ode(v, x0, schedule=s, solver="rk4", steps=cfg.n_steps, save_ts=ts_ode)
    sde = sample.sde(
        v, s, x0, key=key, diffusion=cfg.diffusion, steps=cfg.n_steps, save_trajectory=True
    )
    return {
        "ODE": (ts_ode, ode.xs, ode.x, ode.nfe),
        "SDE": (np.asarray(sde.ts), sde.xs, sde.x, sde.nfe),
    }


def flows_and_scores(
    config: FlowsScoresConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/flows_and_scores",
    progress: bool = False,
) -> ExperimentResult:
    """ODE (RK4) vs SDE (Euler-Maruyama, score from the velocity) on a 2-mode GMM in R^3.

    Along each path the predicted target x_hat_1 = E[X1 | x_t] = ``convert.velocity_to_x1``
    (for the linear schedule x_t + (1 - t) u_t(x_t)) is histogrammed; ``settle_time[name]`` is
    the first t at which more than ``settle_fraction`` of x_hat_1 lie within 3 std (every axis)
    of a mode, for the learned model and the exact field ("exact ODE", "exact SDE").
    ``energy[name]``: energy distance of the final samples to exact target samples.

    Args:
        config: the settings (a ``FlowsScoresConfig``); default: the quick or the full preset.
        quick: None: ``FMJAX_QUICK`` from the environment (``quick_from_env``); True:
            ``FlowsScoresConfig.quick()``; ignored when ``config`` is given.
        out: folder for ``results.json`` and the figures (PNG).
        progress: show a progress bar for each training and a status line per phase (stderr).

    Returns:
        an ``ExperimentResult(experiment, config, metrics, figures, wall_time_s)``; the same JSON
            values are written to ``out``/results.json.
    """
    cfg = _resolve("experiments.flows_and_scores", FlowsScoresConfig, config, quick)
    t0 = time.perf_counter()
    out = _outdir(out)
    k_train, k_x0, k_sde, k_ref, k_ref2 = jax.random.split(jax.random.key(cfg.seed), 5)
    target = flows_scores_target()
    coupling, s = independent_coupling(standard_normal(3), target), schedules.linear()
    x0 = sample.draw_source(k_x0, cfg.n_samples, 3)
    x_ref = target.sample(k_ref, cfg.n_samples)
    means, stds = target.means, jnp.sqrt(jnp.diagonal(target.covs, axis1=1, axis2=2))

    x_hats, fracs, settle, energy, nfes = {}, {}, {}, {}, {}
    for fname, v in _fields(coupling, s, cfg, k_train, progress).items():
        to_x1 = jax.vmap(lambda t, x, v=v: convert.velocity_to_x1(s, t, x, v(t, x)))
        for mname, (ts, xs, xend, n) in _paths(v, s, x0, cfg, k_sde).items():
            name = f"{fname} {mname}"
            xh = to_x1(jnp.asarray(ts, xs.dtype), xs)
            fracs[name] = np.asarray(_settled(xh, means, stds))
            x_hats[name] = (np.asarray(ts), np.asarray(xh))
            settle[name] = _first_time(ts, fracs[name], cfg.settle_fraction)
            energy[name], nfes[name] = _energy(xend, x_ref), int(n)
    figures = _figure_files(target, x_ref, x_hats, fracs, settle, cfg, out)
    metrics_ = {
        "settle_time": settle,
        "energy": energy,
        "energy_between_target_samples": _energy(target.sample(k_ref2, cfg.n_samples), x_ref),
        "nfe": nfes,
        "final_settled_fraction": {k: float(v[-1]) for k, v in fracs.items()},
    }
    return _finish("flows_and_scores", cfg, out, metrics_, figures, t0)


def _figure_files(target, x_ref, x_hats, fracs, settle, cfg: FlowsScoresConfig, out: Path):
    figures = {name: out / f"{name}.png" for name in ("x1_histograms", "settling", "samples")}
    pdf0 = GaussianMixture(target.weights, target.means[:, :1], target.covs[:, :1, :1])
    _x1_histograms(
        {"ODE (RK4)": x_hats["learned ODE"], "SDE (EM)": x_hats["learned SDE"]},
        lambda x: np.exp(np.asarray(pdf0.log_prob(jnp.asarray(x)[:, None]))),
        figures["x1_histograms"],
    )
    _settling_figure(fracs, x_hats, settle, cfg.settle_fraction, figures["settling"])
    plot.histograms(
        {"exact target": x_ref, "learned ODE (RK4)": x_hats["learned ODE"][1][-1],
         "learned SDE (EM)": x_hats["learned SDE"][1][-1]},
        ncols=3, bins=50, title="Final samples, per coordinate", path=figures["samples"],
    )  # fmt: skip
    return figures
