"""The ``fmjax demo`` experiment: N(0, I) -> 5-component GMM in 2-D, learned vs exact."""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import losses, plot, sample, schedules
from fmjax.experiments._common import (
    _Config,
    _energy,
    _exact_cfm_terms,
    _exact_field,
    _f,
    _finish,
    _loss_figure,
    _mlp,
    _outdir,
    _resolve,
    _standard_normal,
    _Timer,
    _train,
    _velocity_errors,
    format_table,
)
from fmjax.likelihood import log_likelihood
from fmjax.mixtures import GaussianMixture, JointGaussianMixture, independent_coupling


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
