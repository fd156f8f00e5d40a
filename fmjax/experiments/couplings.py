"""Experiment 7: how straight is a coupling, and what does minibatch OT-CFM learn?

On four problems (2-D one Gaussian -> three, 1-D two modes -> three, eight Gaussians, and a
random d = 16 mixture), compares the independent coupling, the mixture-Wasserstein coupling
``couplings.mixture_ot`` and Schrodinger bridges (``couplings.schrodinger_bridge``) at two noise
levels: kinetic energy of the exact field against the coupling's transport cost, fixed-step
Euler / midpoint error against the number of function evaluations, and exact trajectories; and
trains minibatch OT-CFM (``losses.ot_pairs``) at several batch sizes, measuring its velocity
against the exact ``mixture_ot`` velocity.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _checks, couplings, data, exact, losses, metrics, models, plot, schedules
from fmjax.experiments._common import (
    ExperimentResult,
    _Config,
    _diag_gmm,
    _finish,
    _mlp,
    _outdir,
    _resolve,
    _train,
    _velocity_errors,
)
from fmjax.experiments.gmm_to_gmm import gmm_1d_problem, gmm_problems
from fmjax.mixtures import GaussianMixture, random_gaussian_mixture, standard_normal

_FN = "experiments.couplings"
_PROBLEMS = ("one_to_three", "1d", "eight_gaussians", "random_16d")


@dataclasses.dataclass(frozen=True)
class CouplingsConfig(_Config):
    """Settings of :func:`couplings`."""

    problems: tuple[str, ...] = _PROBLEMS
    sigmas: tuple[float, ...] = (0.5, 1.5)
    n_samples: int = 1000
    n_times: int = 16
    step_counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    learned_problems: tuple[str, ...] = ("eight_gaussians", "one_to_three")
    batch_sizes: tuple[int, ...] = (64, 256, 1024)
    n_large_batch: int = 2048
    steps: int = 2000
    width: int = 128
    depth: int = 3
    learning_rate: float = 3e-3
    n_paths: int = 150
    seed: int = 0

    _QUICK = dict(
        problems=("one_to_three",), sigmas=(1.0,), n_samples=400, n_times=8,
        step_counts=(1, 2, 4, 8, 16), learned_problems=("one_to_three",), batch_sizes=(32, 128),
        steps=100, width=32, depth=2, n_paths=60, n_large_batch=512,
    )  # fmt: skip


def coupling_problems(seed: int = 0) -> dict[str, tuple[GaussianMixture, GaussianMixture]]:
    """The problems (p0, p1): "one_to_three" (2-D N(0, I) to the 3-component target of
    ``gmm_problems``), "1d" (2 modes at +-3 to 3 modes at -6, 0, 6), "eight_gaussians"
    (N(0, I) to ``data.eight_gaussians_mixture()``) and "random_16d" (N(0, I) on R^16 to a
    random 4-component mixture, means of scale 2)."""
    target = gmm_problems()["joint"].target()
    ones = np.ones(1)
    return {
        "one_to_three": (_diag_gmm(ones, [[0.0, 0.0]], 1.0), target),
        "1d": gmm_1d_problem(),
        "eight_gaussians": (standard_normal(2), data.eight_gaussians_mixture()),
        "random_16d": (
            standard_normal(16),
            random_gaussian_mixture(jax.random.key(seed + 16), 4, 16, mean_scale=2.0),
        ),
    }


def _check(cfg: CouplingsConfig) -> None:
    for name in (*cfg.problems, *cfg.learned_problems):
        _checks.check_choice(_FN, "config.problems", name, _PROBLEMS)
    for name in cfg.learned_problems:
        if name not in cfg.problems:
            _checks.fail(_FN, "config.learned_problems", "a subset of config.problems", name)
    for s in cfg.sigmas:
        _checks.check_positive(_FN, "config.sigmas", s)


def _build(p0, p1, sigmas) -> dict:
    """coupling name -> (JointGaussianMixture, schedule, transport cost E|X1 - X0|^2)."""
    linear = schedules.linear()
    ind = couplings.independent_coupling(p0, p1)
    mot = couplings.mixture_ot(p0, p1)
    out = {
        "independent": (ind, linear, float(couplings.transport_cost(ind))),
        "mixture_ot": (mot.coupling, linear, float(mot.cost)),
    }
    for s in sigmas:
        c, sched = couplings.schrodinger_bridge(p0, p1, s)
        out[f"bridge({s:g})"] = (c, sched, float(couplings.transport_cost(c)))
    return out


@functools.partial(jax.jit, static_argnames=("n",))
def _kinetic(coupling, schedule, key, ts, n):
    """E|u_t(X_t)|^2 at each time of ``ts``, X_t = b x0 + a x1 + gamma z from coupled pairs."""

    def at(k, t):
        xt = data.sample_path(k, coupling, schedule, n, t=t).xt
        u = exact.velocity(coupling, schedule, t, xt)
        return jnp.mean(jnp.sum(u * u, axis=-1))

    return jax.vmap(at)(jax.random.split(key, ts.shape[0]), ts)


def _step_fn(coupling, schedule, h, midpoint):
    """One Euler (midpoint False) or midpoint step of the exact field; ``midpoint`` traced."""

    def step(i, x):
        t = i * h
        v = exact.velocity(coupling, schedule, t, x)
        return x + h * jax.lax.cond(
            midpoint,
            lambda: exact.velocity(coupling, schedule, t + 0.5 * h, x + 0.5 * h * v),
            lambda: v,
        )

    return step


@jax.jit
def _fixed_steps(coupling, schedule, x0, steps, midpoint):
    """Euler or midpoint from t = 0 to 1 with ``steps`` equal steps (both traced: one compile
    per coupling for every solver and step count)."""
    h = 1.0 / steps.astype(x0.dtype)
    return jax.lax.fori_loop(0, steps, _step_fn(coupling, schedule, h, midpoint), x0)


@functools.partial(jax.jit, static_argnames=("n_save", "sub"))
def _path(coupling, schedule, x0, n_save: int, sub: int):
    """Midpoint with n_save * sub steps, saving x every ``sub`` steps: (n_save + 1, N, d)."""
    h = 1.0 / (n_save * sub)
    step = _step_fn(coupling, schedule, h, jnp.asarray(True))

    def segment(x, j):
        x = jax.lax.fori_loop(j * sub, (j + 1) * sub, step, x)
        return x, x

    _, xs = jax.lax.scan(segment, x0, jnp.arange(n_save))
    return jnp.concatenate([x0[None], xs])


def _straightness(built: dict, cfg: CouplingsConfig, key) -> dict:
    """Kinetic energy (Gauss-Legendre in t, Monte Carlo in x) vs transport cost per coupling."""
    nodes, w = np.polynomial.legendre.leggauss(cfg.n_times)
    ts, w = jnp.asarray(0.5 * (nodes + 1.0)), 0.5 * w
    out = {}
    for name, (c, s, cost) in built.items():
        e = np.asarray(_kinetic(c, s, key, ts, cfg.n_samples))
        out[name] = {"kinetic_energy": float(np.sum(w * e)), "transport_cost": cost}
    return out


def _nfe_curves(built: dict, p0, cfg: CouplingsConfig, key) -> tuple[dict, dict]:
    """RMSE of Euler / midpoint end points against a 1024-step midpoint solve from the same x0
    (its own error is below 1e-5 here); and 41 points of that solve's trajectories."""
    x0 = p0.sample(key, cfg.n_samples)
    curves, paths = {}, {}
    for name, (c, s, _) in built.items():
        traj = _path(c, s, x0, 40, 32)
        ref = traj[-1]
        paths[name] = np.asarray(traj[:, : cfg.n_paths])
        for solver, mid in (("euler", False), ("midpoint", True)):
            errs = []
            for k in cfg.step_counts:
                x1 = _fixed_steps(c, s, x0, jnp.asarray(k), jnp.asarray(mid))
                errs.append(float(jnp.sqrt(jnp.mean(jnp.sum((x1 - ref) ** 2, axis=-1)))))
            nfe = [k * (2 if mid else 1) for k in cfg.step_counts]
            curves[f"{name}/{solver}"] = {"nfe": nfe, "rmse": errs}
    return curves, paths


def _assignment_pairs(sample_pairs):
    """Exact minibatch OT pairs, as ``losses.ot_pairs(sample_pairs)`` (epsilon None) makes them,
    with the assignment solved on the host by ``scipy.optimize.linear_sum_assignment``: the
    same permutation (up to ties), but ~0.05 s instead of ~7 s per batch of 1024 on a CPU."""
    from scipy.optimize import linear_sum_assignment

    def assign(cost):
        return linear_sum_assignment(np.asarray(cost))[1].astype(np.int32)

    def sample(key, n):
        x0, x1 = sample_pairs(key, n)
        cost = jnp.sum((x0[:, None, :] - x1[None, :, :]) ** 2, axis=-1)
        j = jax.pure_callback(assign, jax.ShapeDtypeStruct((n,), jnp.int32), cost)
        return x0, x1[j]

    return jax.jit(sample, static_argnums=1)


def _minibatch_cost(p0, p1, batch_size: int, key, repeats: int = 4) -> float:
    """E|x1 - x0|^2 of minibatch-OT pairs (exact OT within each batch of independent pairs)."""
    ot = _assignment_pairs(couplings.independent_coupling(p0, p1).sample)
    costs = [
        float(jnp.mean(jnp.sum((x1 - x0) ** 2, -1)))
        for x0, x1 in (ot(k, batch_size) for k in jax.random.split(key, repeats))
    ]
    return float(np.mean(costs))


def _model(cfg: CouplingsConfig, dim: int) -> models.MLP:
    return _mlp(dim, cfg.width, cfg.depth)


def _models(cfg: CouplingsConfig) -> dict[str, models.MLP]:
    """The networks this experiment trains, by label: an MLP per problem in ``learned_problems``."""
    shapes = jax.eval_shape(coupling_problems, cfg.seed)  # only d is needed: no mixture fits
    return {f"MLP ({p})": _model(cfg, shapes[p][0].dim) for p in cfg.learned_problems}


def _learned(p0, p1, mot, cfg: CouplingsConfig, key, progress: bool) -> dict:
    """OT-CFM at each batch size: E|v - u_mot|^2 on mixture_ot's p_t (mean over t), the
    minibatch pair cost, and the independent exact field's distance to u_mot for scale."""
    linear = schedules.linear()
    ind = couplings.independent_coupling(p0, p1)
    ts = jnp.linspace(0.02, 0.98, 13)
    k_err, k_train, k_cost = jax.random.split(key, 3)
    err_fn = jax.jit(metrics.velocity_error, static_argnums=(0, 4))
    u_ind = exact.velocity_field(ind, linear)
    ot = _assignment_pairs(ind.sample)
    out = {
        "batch_sizes": list(cfg.batch_sizes),
        "mixture_ot_cost": float(mot.cost),
        "independent_cost": float(couplings.transport_cost(ind)),
        "independent_field_error": float(
            jnp.mean(err_fn(u_ind, mot.coupling, linear, ts, cfg.n_samples, key=k_err))
        ),  # fmt: skip
        "velocity_error": [],
        "pair_cost": [],
        "large_batch_pair_cost": _minibatch_cost(p0, p1, cfg.n_large_batch, k_cost, repeats=2),
    }
    for b in cfg.batch_sizes:
        model = _model(cfg, p0.dim)
        fit = _train(model, losses.cfm(model.apply, ot, linear, b), k_train, cfg.steps,
                     cfg.learning_rate, progress)  # fmt: skip
        err = _velocity_errors(model, fit.params, mot.coupling, linear, k_err, ts, cfg.n_samples)
        out["velocity_error"].append(float(jnp.mean(err["model"])))
        out["pair_cost"].append(_minibatch_cost(p0, p1, b, k_cost))
    # Control: the same network and budget trained on pairs of the mixture_ot coupling itself
    # (largest batch size): its error is what training alone leaves.
    model = _model(cfg, p0.dim)
    b = max(cfg.batch_sizes)
    fit = _train(model, losses.cfm(model.apply, mot.coupling.sample, linear, b), k_train,
                 cfg.steps, cfg.learning_rate, progress)  # fmt: skip
    err = _velocity_errors(model, fit.params, mot.coupling, linear, k_err, ts, cfg.n_samples)
    out["mixture_ot_pairs_error"] = float(jnp.mean(err["model"]))
    return out


def _trajectory_figure(paths: dict, problems: list[str], out: Path) -> Path:
    names = list(next(iter(paths.values())).keys())
    fig, axes = plot.figure(len(problems), len(names), size=3.0)
    for i, prob in enumerate(problems):
        for j, cname in enumerate(names):
            traj = paths[prob][cname]
            ax = axes[i, j]
            title = f"{prob}: {cname}"
            if traj.shape[-1] == 1:
                plot.trajectories_1d(np.linspace(0, 1, traj.shape[0]), traj[..., 0], ax=ax,
                                     title=title, color="black")  # fmt: skip
            else:
                plot.trajectories(traj[..., :2], ax=ax, title=title)
    fig.suptitle("Exact probability-flow trajectories per coupling (linear path)")
    return plot.save(fig, out / "trajectories.png")


def _nfe_figure(nfe: dict, out: Path) -> Path:
    fig, axes = plot.figure(1, len(nfe), size=3.6)
    for ax, (prob, curves) in zip(axes[0], nfe.items(), strict=True):
        for name, c in curves.items():
            style = "-" if name.endswith("euler") else "--"
            ax.loglog(c["nfe"], np.maximum(c["rmse"], 1e-16), style, marker="o", markersize=3,
                      label=name)  # fmt: skip
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMSE to the exact end point")
        ax.set_title(prob)
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("Fixed-step error vs function evaluations (solid Euler, dashed midpoint)")
    return plot.save(fig, out / "nfe.png")


def _energy_figure(straight: dict, out: Path) -> Path:
    fig, axes = plot.figure(1, len(straight), size=3.6)
    for ax, (prob, per) in zip(axes[0], straight.items(), strict=True):
        names = list(per)
        x = np.arange(len(names))
        ax.bar(x - 0.2, [per[n]["transport_cost"] for n in names], 0.4, label="E|X1 - X0|^2")
        ax.bar(x + 0.2, [per[n]["kinetic_energy"] for n in names], 0.4, label="kinetic energy")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set_title(prob)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Transport cost of the coupling vs kinetic energy of its exact field")
    return plot.save(fig, out / "kinetic_energy.png")


def _learned_figure(learned: dict, out: Path) -> Path:
    fig, axes = plot.figure(1, 2, size=3.8)
    for prob, r in learned.items():
        b = r["batch_sizes"]
        axes[0, 0].loglog(b, r["velocity_error"], marker="o", label=f"{prob}: OT-CFM")
        axes[0, 0].axhline(r["independent_field_error"], linestyle=":", color="gray")
        axes[0, 0].axhline(r["mixture_ot_pairs_error"], linestyle="--", color="black")
        axes[0, 1].semilogx(b, r["pair_cost"], marker="o", label=f"{prob}: minibatch OT pairs")
        axes[0, 1].axhline(r["mixture_ot_cost"], linestyle="--", color="black")
        axes[0, 1].axhline(r["large_batch_pair_cost"], linestyle=":", color="gray")
    axes[0, 0].set_xlabel("batch size")
    axes[0, 0].set_ylabel(r"$E|v_t - u^{MW2}_t|^2$ (mean over t)")
    axes[0, 0].set_title(
        "learned OT-CFM vs exact mixture_ot field\n(dotted: exact independent field, "
        "dashed: CFM on mixture_ot pairs)",
        fontsize=8,
    )
    axes[0, 1].set_xlabel("batch size")
    axes[0, 1].set_ylabel(r"$E|x_1 - x_0|^2$")
    axes[0, 1].set_title("minibatch-OT pair cost\n(dashed: MW2^2, dotted: large-batch OT)")
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return plot.save(fig, out / "ot_cfm.png")


def couplings_experiment(
    config: CouplingsConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/couplings",
    progress: bool = False,
) -> ExperimentResult:
    """How straight is a coupling, and what does minibatch OT-CFM learn?

    Metrics, per problem: ``straightness[problem][coupling]`` with ``kinetic_energy``
    (int_0^1 E|u_t(X_t)|^2 dt of the exact field: Gauss-Legendre in t, ``n_samples`` Monte
    Carlo points per time) and ``transport_cost`` (E|X1 - X0|^2 of the coupling, closed form;
    for the mixture_ot coupling the MW2^2); ``nfe[problem][coupling/solver]`` with ``nfe`` and
    ``rmse`` (fixed-step Euler / midpoint end points against an adaptive solve at rtol 1e-8 from
    the same x0); ``ot_cfm[problem]`` with, per batch size, ``velocity_error`` (learned OT-CFM
    against the exact mixture_ot velocity on mixture_ot's p_t, mean over 13 times) and
    ``pair_cost`` (E|x1 - x0|^2 of minibatch-OT pairs), ``large_batch_pair_cost`` (the same
    at ``n_large_batch`` points: an estimate of W2^2 between the mixtures), and ``mixture_ot_cost``,
    ``independent_cost``, ``independent_field_error`` (the exact independent field against the
    mixture_ot one) for scale, and ``mixture_ot_pairs_error``, the control: the same network and
    budget trained by CFM on pairs of the mixture_ot coupling (largest batch size).
    """
    cfg = _resolve(_FN, CouplingsConfig, config, quick)
    _check(cfg)
    t0 = time.perf_counter()
    out = _outdir(out)
    problems = coupling_problems(cfg.seed)
    key = jax.random.key(cfg.seed)
    straight, nfe, paths, learned = {}, {}, {}, {}
    for i, prob in enumerate(cfg.problems):
        p0, p1 = problems[prob]
        k_ke, k_nfe, k_learn = jax.random.split(jax.random.fold_in(key, i), 3)
        built = _build(p0, p1, cfg.sigmas)
        straight[prob] = _straightness(built, cfg, k_ke)
        nfe[prob], paths[prob] = _nfe_curves(built, p0, cfg, k_nfe)
        if prob in cfg.learned_problems:
            mot = couplings.mixture_ot(p0, p1)
            learned[prob] = _learned(p0, p1, mot, cfg, k_learn, progress)
    figures = {
        "kinetic_energy": _energy_figure(straight, out),
        "nfe": _nfe_figure(nfe, out),
        "trajectories": _trajectory_figure(
            paths, [p for p in cfg.problems if problems[p][0].dim <= 2], out
        ),
    }
    if learned:
        figures["ot_cfm"] = _learned_figure(learned, out)
    metrics_ = {"straightness": straight, "nfe": nfe, "ot_cfm": learned}
    return _finish(_FN.split(".")[1], cfg, out, metrics_, figures, t0)
