"""Experiment: stochastic interpolants between Gaussian mixtures, sampled by ODE and SDE."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _checks, convert, data, exact, losses, models, plot, sample, schedules, train
from fmjax.experiments._common import (
    ExperimentResult,
    _Config,
    _diag_gmm,
    _energy,
    _f,
    _finish,
    _mlp,
    _outdir,
    _resolve,
)
from fmjax.experiments.gmm_to_gmm import gmm_1d_problem
from fmjax.mixtures import GaussianMixture, JointGaussianMixture, independent_coupling

_FN = "experiments.stochastic_interpolants"

#: Interpolant name -> schedule: linear and trig, with gamma = 0 and gamma = brownian(1).
#: (trig with gamma = 0 is the cosine schedule: a = sin(pi t / 2), b = cos(pi t / 2).)
INTERPOLANTS = {
    "linear": schedules.linear(),
    "linear+brownian": schedules.linear().with_noise(schedules.brownian(1.0)),
    "trig": schedules.cosine(),
    "trig+brownian": schedules.trig(schedules.brownian(1.0)),
}


@dataclasses.dataclass(frozen=True)
class SIConfig(_Config):
    """Settings of :func:`stochastic_interpolants`.

    Attributes:
        interpolants: names of ``INTERPOLANTS`` sampled with the exact velocity and score.
        learned: interpolants (with noise) for which a drift and a score MLP are trained; only
            those also in ``interpolants`` run.
        sde_eps: the eps of dX = [u + eps s] dt + sqrt(2 eps) dW (diffusion g = sqrt(2 eps)),
            one SDE sampler each.
        n_samples: source points per sampler (and the size of each exact target sample).
        ode_steps: fixed RK4 steps of the ODE sampler.
        sde_steps: steps of each SDE sampler.
        train_steps: training steps of each drift + score pair (trained together).
        batch_size: pairs per training step.
        width: hidden layer size of the MLPs.
        depth: number of hidden layers of the MLPs.
        learning_rate: peak Adam learning rate (cosine decay).
        n_error: points per time of the learned velocity and score errors.
        n_error_times: times in [0.01, 0.99] of the error curves.
        seed: seed of the run's PRNG key.
    """

    interpolants: tuple[str, ...] = ("linear", "linear+brownian", "trig", "trig+brownian")
    learned: tuple[str, ...] = ("linear+brownian", "trig+brownian")
    sde_eps: tuple[float, ...] = (0.5, 2.0)
    n_samples: int = 4000
    ode_steps: int = 100
    sde_steps: int = 400
    train_steps: int = 4000
    batch_size: int = 512
    width: int = 128
    depth: int = 3
    learning_rate: float = 2e-3
    n_error: int = 2048
    n_error_times: int = 21
    seed: int = 0

    _QUICK = dict(
        interpolants=("linear+brownian",),
        learned=("linear+brownian",),
        sde_eps=(2.0,),
        n_samples=600,
        ode_steps=16,
        sde_steps=50,
        train_steps=300,
        batch_size=256,
        width=32,
        depth=2,
        n_error=256,
        n_error_times=6,
    )


def si_problems() -> dict[str, JointGaussianMixture]:
    """The two upstream problems as independent couplings.

    "2d": N(0, I) -> three components N(m_k, 0.5^2 I) at radius 4 (weights 0.3, 0.4, 0.3).
    "1d": modes at +-3 -> modes at -6, 0, 6 (``gmm_1d_problem``, std 0.5).

    Returns:
        ``{"2d": coupling, "1d": coupling}``, independent ``JointGaussianMixture``s.
    """
    ang = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
    p1 = _diag_gmm([0.3, 0.4, 0.3], 4.0 * np.stack([np.cos(ang), np.sin(ang)], 1), 0.5)
    p0 = _diag_gmm([1.0], [[0.0, 0.0]], 1.0)
    return {"2d": independent_coupling(p0, p1), "1d": independent_coupling(*gmm_1d_problem())}


def _check(cfg: SIConfig) -> None:
    for name in cfg.interpolants:
        _checks.check_choice(_FN, "config.interpolants", name, INTERPOLANTS)
    for name in cfg.learned:
        _checks.check_choice(_FN, "config.learned", name, INTERPOLANTS)
        if not INTERPOLANTS[name].has_noise:
            _checks.fail(_FN, "config.learned", "interpolants with noise (a score to learn)", name)


# ----------------------------------------------------------------------------- sampling


def _samplers(c, s, score, velocity, x0, cfg: SIConfig, key) -> dict:
    """ODE (RK4) and SDE (one per eps) samples at t = 1 from the source points x0."""
    out = {"ODE rk4": sample.ode(velocity, x0, solver="rk4", steps=cfg.ode_steps).x}
    for i, eps in enumerate(cfg.sde_eps):
        out[f"SDE eps={eps:g}"] = sample.sde(
            velocity, s, x0, key=jax.random.fold_in(key, i), diffusion=float(np.sqrt(2 * eps)),
            steps=cfg.sde_steps, score=score, brownian="unsafe",
        ).x  # fmt: skip
    return out


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["drift", "score"], meta_fields=["schedule"]
)
@dataclasses.dataclass(frozen=True)
class _Learned:
    """A learned drift v and score s as fields; velocity u = v - gamma dgamma s (finite)."""

    drift: Callable
    score: Callable
    schedule: schedules.Schedule

    def __call__(self, t, x):
        return convert.drift_to_velocity(
            self.schedule, t, x, self.drift(t, x), score=self.score(t, x)
        )


def _model(cfg: SIConfig, dim: int) -> models.MLP:
    return _mlp(dim, cfg.width, cfg.depth)


def _models(cfg: SIConfig) -> dict[str, models.MLP]:
    """The networks this experiment trains, by label: the drift / score MLP of each problem."""
    return {f"MLP ({name})": _model(cfg, c.dim) for name, c in si_problems().items()}


def _train_pair(c, s, cfg: SIConfig, key, progress: bool) -> tuple[_Learned, dict]:
    """Drift and score MLPs trained together (one compiled loop): the sum of the two losses."""
    model = _model(cfg, c.dim)
    kw = dict(time_sampler=losses.uniform_eps_time(1e-3))
    parts = {
        t: losses.cfm(model.apply, c.sample, s, cfg.batch_size, target=t, **kw)
        for t in ("drift", "score")
    }

    def loss(params, k):
        return parts["drift"](params["drift"], k) + parts["score"](params["score"], k)

    params = {t: models.init(model, key=jax.random.fold_in(key, i)) for i, t in enumerate(parts)}
    fit = train.fit(
        loss, params, key=jax.random.fold_in(key, 2), steps=cfg.train_steps,
        learning_rate=cfg.learning_rate, lr_schedule="cosine",
        steps_per_call=max(1, min(cfg.train_steps, 1000)), progress=progress,
    )  # fmt: skip
    p = fit.params
    k_eval = jax.random.fold_in(key, 3)
    final = {t: _f(jax.jit(fn)(p[t], k_eval)) for t, fn in parts.items()}
    drift, score = (jax.tree_util.Partial(model.apply, p[k]) for k in ("drift", "score"))
    return _Learned(drift, score, s), final


@functools.partial(jax.jit, static_argnames=("schedule", "n"))
def _field_errors(field, coupling, schedule, key, ts, n):
    """E|u_hat - u|^2 and E|s_hat - s|^2 over x ~ p_t at each t (fresh pairs and noise)."""

    def one(t, k):
        tt, _, _, _, x, _ = data.sample_path(k, coupling, schedule, n, t=t)
        ev = exact.evaluate(coupling, schedule, tt, x, ("velocity", "score"))
        eu = jnp.sum((field(tt, x) - ev.velocity) ** 2, -1).mean()
        es = jnp.sum((field.score(tt, x) - ev.score) ** 2, -1).mean()
        return eu, es

    return jax.vmap(one)(ts, jax.random.split(key, ts.shape[0]))


# ----------------------------------------------------------------------------- figures


@plot.styled
def _density_figure(c, cfg: SIConfig, path: Path) -> Path:
    names = list(dict.fromkeys(("linear", "linear+brownian", *cfg.interpolants)))
    fig, axes = plot.figure(1, len(names), size=3.4, extra_width=1.0)
    xs = np.linspace(-8.0, 8.0, 161)
    ts = np.linspace(0.0, 1.0, 81)
    for ax, name in zip(axes[0], names, strict=True):
        plot.density_over_time(c, INTERPOLANTS[name], xs, ts, ax=ax, title=name)
    fig.suptitle("1-D: exact density p_t(x), modes +-3 -> -6, 0, 6")
    return plot.save(fig, path)


def _p1_pdf(p1: GaussianMixture):
    return lambda x: np.exp(np.asarray(p1.log_prob(jnp.asarray(x)[:, None])))


@plot.styled
def _samples_figure(pname, c, samples: dict, path: Path) -> Path:
    """Rows: interpolants; columns: samplers; the exact p_1 as reference."""
    rows = list(samples)
    cols = sorted({k for r in rows for k in samples[r]}, key=_sampler_order)
    fig, axes = plot.figure(len(rows), len(cols), size=2.4)
    p1 = c.target()
    for i, r in enumerate(rows):
        for j, name in enumerate(cols):
            ax = axes[i, j]
            x = samples[r].get(name)
            if x is None:
                ax.axis("off")
                continue
            x = np.asarray(x)
            if c.dim == 1:
                grid = np.linspace(-9, 9, 400)
                ax.hist(x[:, 0], bins=60, range=(-9, 9), density=True, color="tab:blue", alpha=0.6)
                ax.plot(grid, _p1_pdf(p1)(grid), color="k", linewidth=1.0)
            else:
                ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, rasterized=True)
                m = np.asarray(p1.means)
                ax.scatter(m[:, 0], m[:, 1], marker="x", color="k", s=30)
                ax.set_xlim(-7, 7), ax.set_ylim(-7, 7)
            ax.set_title(f"{r}\n{name}", fontsize=7)
    fig.suptitle(f"{pname}: samples at t = 1 against the exact p_1 (black)")
    return plot.save(fig, path)


def _sampler_order(name: str):
    return (name.startswith("learned"), name)


# ----------------------------------------------------------------------------- experiment


def stochastic_interpolants(
    config: SIConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/stochastic_interpolants",
    progress: bool = False,
) -> ExperimentResult:
    """Stochastic interpolants x_t = b x0 + a x1 + gamma z between Gaussian mixtures.

    Two problems (``si_problems``: 2-D N(0, I) -> 3 components; 1-D +-3 -> -6, 0, 6), the
    linear and trig interpolants with gamma = 0 and gamma = brownian(1). For each: samples at
    t = 1 by the RK4 ODE and by the SDE dX = [u + eps s] dt + sqrt(2 eps) dW (``sde_eps``) with
    the exact velocity and score (any source: the score is given, not derived); for the
    interpolants in ``learned``, a drift MLP (target "drift") and a score MLP (target "score",
    the denoiser eta = -gamma * net) combined by ``convert.drift_to_velocity``, sampled the
    same way. Metrics: energy distance of every sampler to an exact target sample
    (``energy[problem][interpolant][sampler]``, with ``energy_reference`` the distance between
    two exact samples of the same size: the Monte Carlo floor, and ``energy_source`` that of the
    source samples: no transport at all), the learned models' velocity
    and score errors over t, and the final training losses. Figures: the exact 1-D density
    p_t(x) over (t, x) for each interpolant, samples per problem, error curves.

    Args:
        config: the settings (a ``SIConfig``); default: the quick or the full preset.
        quick: None: ``FMJAX_QUICK`` from the environment (``quick_from_env``); True:
            ``SIConfig.quick()``; ignored when ``config`` is given.
        out: folder for ``results.json`` and the figures (PNG).
        progress: show a progress bar for each training and a status line per phase (stderr).

    Returns:
        an ``ExperimentResult(experiment, config, metrics, figures, wall_time_s)``; the same JSON
            values are written to ``out``/results.json.
    """
    cfg = _resolve(_FN, SIConfig, config, quick)
    _check(cfg)
    t0 = time.perf_counter()
    out = _outdir(out)
    key = jax.random.key(cfg.seed)
    problems = si_problems()
    figures = {"density_1d": _density_figure(problems["1d"], cfg, out / "density_1d.png")}
    energy, reference, source, errors, train_loss, rows = {}, {}, {}, {}, {}, []
    ts_err = np.linspace(0.01, 0.99, cfg.n_error_times)
    for pi, (pname, c) in enumerate(problems.items()):
        kp = jax.random.fold_in(key, pi)
        x0 = c.source().sample(jax.random.fold_in(kp, 0), cfg.n_samples)
        ref = c.target().sample(jax.random.fold_in(kp, 1), cfg.n_samples)
        ref2 = c.target().sample(jax.random.fold_in(kp, 2), cfg.n_samples)
        reference[pname] = _energy(ref2, ref)
        source[pname] = _energy(x0, ref)
        energy[pname], samples = {}, {}
        for ii, iname in enumerate(cfg.interpolants):
            s = INTERPOLANTS[iname]
            ki = jax.random.fold_in(kp, 10 + ii)
            u = exact.velocity_field(c, s)
            score = functools.partial(exact.score, c, s)
            got = {f"exact {k}": v for k, v in _samplers(c, s, score, u, x0, cfg, ki).items()}
            if iname in cfg.learned:
                field, final = _train_pair(c, s, cfg, jax.random.fold_in(ki, 1), progress)
                learned = _samplers(c, s, field.score, field, x0, cfg, jax.random.fold_in(ki, 2))
                got |= {f"learned {k}": v for k, v in learned.items()}
                eu, es = _field_errors(field, c, s, jax.random.fold_in(ki, 3),
                                       jnp.asarray(ts_err, x0.dtype), cfg.n_error)  # fmt: skip
                errors[f"{pname} {iname}"] = {
                    "velocity": np.asarray(eu).tolist(), "score": np.asarray(es).tolist()
                }  # fmt: skip
                train_loss[f"{pname} {iname}"] = final
            energy[pname][iname] = {k: _energy(v, ref) for k, v in got.items()}
            rows += [(pname, iname, k, e) for k, e in energy[pname][iname].items()]
            samples[iname] = got
        figures[f"samples_{pname}"] = _samples_figure(
            pname, c, samples, out / f"samples_{pname}.png"
        )
    if errors:
        curves = {f"{k}: {q}": v[q] for k, v in errors.items() for q in ("velocity", "score")}
        plot.error_curve(
            ts_err, curves, ylabel="E|learned - exact|^2", title="Learned fields vs exact",
            path=out / "errors.png",
        )  # fmt: skip
        figures["errors"] = out / "errors.png"
    metrics_ = {
        "energy": energy,
        "energy_reference": reference,
        "energy_source": source,
        "table": [
            {"problem": p, "interpolant": i, "sampler": k, "energy_distance": e}
            for p, i, k, e in rows
        ],
        "error_times": ts_err.tolist(),
        "errors": errors,
        "train_loss": train_loss,
    }
    return _finish("stochastic_interpolants", cfg, out, metrics_, figures, t0)


def si_table(result: ExperimentResult) -> str:
    """The energy-distance table of a result as Markdown (one row per problem and interpolant).

    Args:
        result: what ``stochastic_interpolants`` returned.

    Returns:
        the Markdown table.
    """
    table = result.metrics["table"]
    cols = sorted({r["sampler"] for r in table}, key=_sampler_order)
    keys = list(dict.fromkeys((r["problem"], r["interpolant"]) for r in table))
    val = {(r["problem"], r["interpolant"], r["sampler"]): r["energy_distance"] for r in table}
    lines = ["| problem | interpolant | " + " | ".join(cols) + " |"]
    lines.append("|" + "---|" * (len(cols) + 2))
    for p, i in keys:
        cells = [f"{val[(p, i, k)]:.4f}" if (p, i, k) in val else "" for k in cols]
        lines.append(f"| {p} | {i} | " + " | ".join(cells) + " |")
    ref = result.metrics["energy_reference"]
    lines.append("")
    lines.append("Monte Carlo floor (two exact samples): "
                 + ", ".join(f"{p} {v:.4f}" for p, v in ref.items()))  # fmt: skip
    src = result.metrics["energy_source"]
    lines.append("No transport (source samples): "
                 + ", ".join(f"{p} {v:.4f}" for p, v in src.items()))  # fmt: skip
    return "\n".join(lines)
