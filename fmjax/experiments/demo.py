"""The ``fmjax demo`` experiment: N(0, I) -> 5-component GMM in 2-D, learned vs exact.

A short CFM training on a problem with exact answers, then the learned model and the exact
field side by side: held-out loss against the loss floor, velocity error, ODE and SDE samples,
negative log-likelihood.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fmjax import losses, models, plot, problems, sample, schedules, train
from fmjax._report import format_table
from fmjax.experiments._common import (
    ExperimentResult,
    _Config,
    _energy,
    _exact_cfm_terms,
    _exact_field,
    _f,
    _finish,
    _mlp,
    _outdir,
    _phase,
    _resolve,
    _times,
    _train,
    _velocity_errors,
)
from fmjax.likelihood import log_likelihood
from fmjax.mixtures import (
    GaussianMixture,
    JointGaussianMixture,
    independent_coupling,
    standard_normal,
)


@dataclasses.dataclass(frozen=True)
class DemoConfig(_Config):
    """Settings of :func:`demo` (defaults: the ``fmjax demo`` run, ~25-35 s on 2 CPU cores).

    Attributes:
        steps: CFM training steps.
        batch_size: pairs per training step.
        width: hidden layer size of the MLP.
        depth: number of hidden layers of the MLP.
        learning_rate: peak Adam learning rate (cosine decay).
        n_eval: points of the held-out loss, the loss floor, the ODE/SDE samples, the exact
            target samples and the NLL.
        n_paths: exact ODE trajectories drawn in the trajectory figure.
        sde_steps: Euler-Maruyama steps of the SDE sampler.
        diffusion: constant SDE diffusion g, or None for ``sample.sde``'s default (g^2 -> 0 at
            the data end, for a score derived from the velocity).
        seed: seed of the run's PRNG key.
    """

    steps: int = 3000
    batch_size: int = 256
    width: int = 128
    depth: int = 3
    learning_rate: float = 3e-3
    n_eval: int = 2000
    n_paths: int = 300
    sde_steps: int = 200
    # None: sample.sde's default for a score derived from the velocity, g^2 -> 0 at the data end
    # (a constant g = 1 shrank the modes of a learned field, issue 21).
    diffusion: float | None = None
    seed: int = 0

    _QUICK = dict(steps=300, width=32, depth=2, n_eval=500, n_paths=100, sde_steps=50)


def demo_problem() -> tuple[JointGaussianMixture, schedules.Schedule]:
    """The demo problem: N(0, I_2) -> 5 anisotropic Gaussians on a ring of radius 4, linear path.

    The source is standard normal (a 1-component mixture) so that the SDE sampler can take the
    score from the velocity (``fmjax.sample.sde``).

    Returns:
        ``(coupling, schedule)``: the independent ``JointGaussianMixture`` and
            ``schedules.linear()``.
    """
    target = GaussianMixture(*problems._demo_2d_parts())
    return independent_coupling(standard_normal(2), target), schedules.linear()


#: Columns of the demo's table (``demo_table``), one row per velocity field.
COLUMNS = ("loss", "loss_floor", "velocity_error", "energy_ode", "energy_sde", "nll")


def demo_table(result: ExperimentResult) -> str:
    """The demo's table: rows "learned" and "exact", columns ``COLUMNS``.

    Args:
        result: what ``demo`` returned.

    Returns:
        the table as text.
    """
    rows = [{"model": name, **row} for name, row in result.metrics["rows"].items()]
    return format_table(rows, ("model", *COLUMNS))


class _Keys(NamedTuple):
    train: jax.Array
    eval: jax.Array
    x0: jax.Array
    ref: jax.Array
    ref2: jax.Array
    sde: jax.Array
    err: jax.Array


class _Trained(NamedTuple):
    model: models.MLP
    fit: train.FitResult
    floor: float


def _models(cfg: DemoConfig) -> dict[str, models.MLP]:
    """The networks this experiment trains, by label: an MLP on the 2-D demo problem."""
    return {"MLP": _mlp(2, cfg.width, cfg.depth)}


def _train_model(coupling, s, cfg: DemoConfig, keys: _Keys, progress: bool) -> _Trained:
    """CFM training; the loss floor is computed on the draw of the held-out loss (same key, n),
    so the exact row's held-out loss equals the floor up to float round-off."""
    model = _models(cfg)["MLP"]
    loss_fn = losses.cfm(model.apply, coupling.sample, s, cfg.batch_size)
    with _phase(f"exact CFM loss floor ({cfg.n_eval} points)", progress):
        floor = _f(losses.loss_floor(coupling, s, cfg.n_eval, key=keys.eval).mean)
    fit = _train(model, loss_fn, keys.train, cfg.steps, cfg.learning_rate, progress, floor)
    return _Trained(model, fit, floor)


def _row(v, loss: float, vel_err: float, coupling, s, cfg: DemoConfig, keys: _Keys, x0, x_ref,
         phase=None):  # fmt: skip
    """The table row of field ``v`` (``loss_floor`` left to the caller), its ODE solution and
    its ``n_eval`` SDE samples; ``phase(what)`` is a status-line context (or None)."""
    phase = phase or (lambda what: _phase(what, False))
    with phase(f"ODE sampling of {len(x0)} points (Tsit5, adaptive)"):
        ode_sol = jax.block_until_ready(sample.ode(v, x0, schedule=s, save_ts=_times(s, 41)))
    with phase(f"SDE sampling of {len(x0)} points ({cfg.sde_steps} Euler-Maruyama steps)"):
        sde_sol = jax.block_until_ready(sample.sde(
            v, s, x0, key=keys.sde, diffusion=cfg.diffusion, steps=cfg.sde_steps,
            brownian="unsafe",
        ))  # fmt: skip
    with phase(f"log-likelihood of {len(x_ref)} points (augmented ODE)"):
        ll = jax.block_until_ready(log_likelihood(v, x_ref, schedule=s))
    row = {
        "loss": loss,
        "loss_floor": None,  # filled by the caller
        "velocity_error": vel_err,
        "energy_ode": _energy(ode_sol.x[: cfg.n_eval], x_ref),
        "energy_sde": _energy(sde_sol.x[: cfg.n_eval], x_ref),
        "nll": -_f(jnp.mean(ll.log_prob)),
        "nfe_ode": int(ode_sol.nfe),
    }
    return row, ode_sol, sde_sol.x[: cfg.n_eval]


def _figures(coupling, s, cfg, out: Path, samples: dict, exact_paths, errors, ts, tr: _Trained):
    lim = (-6.0, 6.0)
    figures = {
        name: out / f"{name}.png"
        for name in ("exact_density_velocity", "exact_trajectories", "samples", "velocity_error",
                     "training_loss")
    }  # fmt: skip
    plot.density_and_velocity(
        coupling, s, (0.0, 0.25, 0.5, 0.75, 1.0), lim=lim, ncols=5,
        path=figures["exact_density_velocity"],
    )  # fmt: skip
    plot.trajectories(exact_paths[:, : cfg.n_paths], title="Exact ODE trajectories", lim=lim,
                      path=figures["exact_trajectories"])  # fmt: skip
    plot.samples_grid(samples, lim=lim, ncols=5, title="Samples: exact target, ODE and SDE",
                      path=figures["samples"])  # fmt: skip
    plot.error_curve(
        ts, {"learned model": errors["model"], "zero field": errors["zero"]},
        ylabel=r"$E\,|v_t - u_t|^2$", title="Velocity error against the exact field",
        path=figures["velocity_error"],
    )  # fmt: skip
    plot.training_loss(tr.fit.losses, floor=tr.floor, path=figures["training_loss"])
    return figures


def demo(
    config: DemoConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/demo",
    progress: bool = False,
) -> ExperimentResult:
    """2-D GMM -> GMM: exact fields, a short CFM training, ODE/SDE sampling, learned vs exact.

    Metrics (rows "learned" and "exact"): ``loss`` (CFM loss on one held-out batch of
    ``n_eval``, the same draw for both), ``loss_floor`` (irreducible CFM loss, Monte Carlo),
    ``velocity_error`` (E|v - u|^2 averaged over 21 times in [0, 1]), ``energy_ode`` /
    ``energy_sde`` (energy distance of ``n_eval`` ODE (Tsit5) / SDE (Euler-Maruyama) samples to
    exact target samples), ``nll`` (mean -log p(x) of exact target samples under the flow,
    augmented ODE). With ``progress``, a bar for training and a status line on stderr for every
    other phase. ``reference`` holds the energy distance between two exact target samples
    (the noise level) and the exact target entropy estimate -E log p1(X1). ``demo_table``
    formats the rows.

    Args:
        config: the settings (a ``DemoConfig``); default: the quick or the full preset.
        quick: None: ``FMJAX_QUICK`` from the environment (``quick_from_env``); True:
            ``DemoConfig.quick()``; ignored when ``config`` is given.
        out: folder for ``results.json`` and the figures (PNG).
        progress: show a progress bar for each training and a status line per phase (stderr).

    Returns:
        an ``ExperimentResult(experiment, config, metrics, figures, wall_time_s)``; the same JSON
            values are written to ``out``/results.json.
    """
    cfg = _resolve("experiments.demo", DemoConfig, config, quick)
    t0 = time.perf_counter()
    out = _outdir(out)
    coupling, s = demo_problem()
    keys = _Keys(*jax.random.split(jax.random.key(cfg.seed), 7))
    tr = _train_model(coupling, s, cfg, keys, progress)
    ts = _times(s, 21)
    with _phase("velocity error against the exact field (21 times x 1000 points)", progress):
        errors = jax.block_until_ready(
            _velocity_errors(tr.model, tr.fit.params, coupling, s, keys.err, jnp.asarray(ts), 1000)
        )

    x_ref = coupling.target().sample(keys.ref, cfg.n_eval)
    x0 = sample.draw_source(keys.x0, max(cfg.n_eval, cfg.n_paths), 2)
    with _phase(f"held-out CFM loss ({cfg.n_eval} pairs)", progress):
        held_out = jax.jit(losses.cfm(tr.model.apply, coupling.sample, s, cfg.n_eval))
        fields = {
            "learned": (functools.partial(tr.model.apply, tr.fit.params),
                        _f(held_out(tr.fit.params, keys.eval)), float(jnp.mean(errors["model"]))),
            "exact": (_exact_field(coupling, s),
                      _f(_exact_cfm_terms(coupling, s, keys.eval, cfg.n_eval)), 0.0),
        }  # fmt: skip
    rows, samples, paths = {}, {"exact target samples": x_ref}, {}
    for name, (v, loss, err) in fields.items():
        phase = lambda what, name=name: _phase(f"{name} field: {what}", progress)  # noqa: E731
        rows[name], ode_sol, samples[f"{name} SDE"] = _row(
            v, loss, err, coupling, s, cfg, keys, x0, x_ref, phase
        )
        rows[name]["loss_floor"] = tr.floor
        samples[f"{name} ODE"], paths[name] = ode_sol.x[: cfg.n_eval], ode_sol.xs
    with _phase(f"figures (5 PNG files in {out})", progress):
        figures = _figures(coupling, s, cfg, out, samples, paths["exact"], errors, ts, tr)
    metrics_ = {
        "rows": rows,
        "reference": _reference(coupling, cfg, keys, x_ref, errors),
        "train": {
            "steps": tr.fit.step,
            "wall_time_s": tr.fit.wall_time,
            "compile_time_s": tr.fit.compile_time,
            "steps_per_second": tr.fit.steps_per_second,
        },
    }
    return _finish("demo", cfg, out, metrics_, figures, t0)


def _reference(coupling, cfg: DemoConfig, keys: _Keys, x_ref, errors) -> dict:
    target = coupling.target()
    return {
        "energy_between_target_samples": _energy(target.sample(keys.ref2, cfg.n_eval), x_ref),
        "target_entropy": -_f(jnp.mean(target.log_prob(x_ref))),
        "zero_field_velocity_error": float(jnp.mean(errors["zero"])),
    }
