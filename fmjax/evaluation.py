"""Score any velocity field against a problem's exact answers: one report, JSON and figures.

``evaluate(velocity, problem, key=...)`` works for any callable ``(t, x) -> (..., d)`` (a model
from ``fmjax.fit``, one trained elsewhere, or the exact field itself) on any ``fmjax.problems``
problem (or a ``Problem`` built by hand), and measures

* the velocity error E|v_t(X_t) - u_t(X_t)|^2 over t against the exact u_t, with E|u_t|^2 (the
  error of the zero field) for scale;
* the excess loss: the CFM loss of v minus the exact loss floor (the CFM loss of the exact
  u_t, as ``fmjax.losses.loss_floor``) on the same draws of (t, x0, x1), an estimate of the
  time-averaged velocity error (0 for the exact field), with its standard error;
* the NLL of exact target samples under the flow (augmented ODE, ``fmjax.likelihood``), the
  exact NLL -log p1 of the same samples, and their gap, an estimate of KL(p1 || q) >= 0;
* the energy distance and the sliced 2-Wasserstein distance of ODE samples (adaptive Tsit5)
  to exact target samples, with the same statistics between two exact samples (noise level);
* two-sided checks of the ODE samples (``metrics.sample_checks``): their cross-entropy
  E_q[-log p1(X)] under the exact target against the target's entropy (estimated on exact
  samples, with its standard error), below it for a sampler that collapses modes, above for
  one that spreads them (the energy distance barely moves under collapse: it stays near its
  noise level), and per component of p1 the weight, mean and spread (trace of the covariance)
  of the samples by exact responsibilities against the truth, with the same on exact samples
  as the noise level; with ``sde=True`` the same checks of samples of ``fmjax.sample.sde``;
* the NFE a fixed-step solver (midpoint by default) needs for a given accuracy: the endpoint
  RMSE against the adaptive solve from the same source points, relative to the target's RMS
  spread sqrt(tr Cov p1), must be below ``tol``.

With ``guidance=w`` on a labelled problem (its coupling carries class labels) ``velocity`` is a
conditional field ``(t, x, y)``: the unconditional part scores the null-label field
v(t, x, ∅) against the unconditional exact answers, and ``report.conditional`` holds the
conditional report of the guided field at weight w (``fmjax.evaluate_conditional``: per class,
the velocity error against u_t(x | y), the accuracy of the samples under the exact Bayes
classifier, their cross-entropy under p1(x | y) against the class entropy).

``fmjax evaluate --model DIR --problem NAME`` runs it on a model written by ``fmjax train``,
``--exact`` on the exact field, and ``fmjax evaluate --all`` the leaderboard of the built-in
models (the command and the leaderboard live in ``fmjax.leaderboard``).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from fmjax import _checks, _solve, data, exact, likelihood, metrics, problems, sample
from fmjax._report import to_json, write_json
from fmjax._typing import Velocity
from fmjax.guidance import ConditionalReport, evaluate_conditional
from fmjax.mixtures import GaussianMixture

__all__ = ["EvaluationReport", "evaluate", "write_report"]

_FN = "evaluation.evaluate"
_SOLVERS = {"euler": 1, "midpoint": 2}
_STEP_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)
_sample_checks = jax.jit(metrics.sample_checks)  # one program (eagerly: dozens of op compiles)


class EvaluationReport(NamedTuple):
    """What ``evaluate`` measures (plain numbers and (T,) curves; ``to_dict`` for JSON).

    Attributes:
        problem: the problem's name.
        dim: its dimension d.
        n: samples per estimate.
        ts: (T,) times of the velocity-error curve.
        velocity_error: (T,) E|v_t(X_t) - u_t(X_t)|^2, X_t ~ p_t.
        velocity_scale: (T,) E|u_t(X_t)|^2, the error of the zero field.
        mean_velocity_error: mean of ``velocity_error`` over ``ts``.
        relative_velocity_error: mean_velocity_error / mean of ``velocity_scale``.
        loss: CFM loss of v on n draws of (t, x0, x1) (t uniform on the valid interval).
        loss_floor: the exact loss floor on the same draws.
        loss_floor_stderr: its Monte Carlo standard error.
        excess_loss: loss - loss_floor, an estimate of the time-averaged velocity error.
        excess_loss_stderr: its Monte Carlo standard error (the difference of the per-draw
            terms, so the shared noise of the draws cancels; 0 for the exact field).
        nll: -E log q(X1) of n exact target samples under the flow, nats.
        target_entropy: -E log p1(X1) of the same samples, the estimate of the target's
            entropy H(p1) (the reference of ``nll`` and of ``sample_cross_entropy``), nats.
        target_entropy_stderr: its standard error, std(-log p1(X1)) / sqrt(n).
        nll_gap: nll - target_entropy, an estimate of KL(p1 || q) (>= 0 up to noise), nats.
        bits_per_dim_gap: nll_gap / (d ln 2).
        energy: energy distance of n ODE samples (adaptive Tsit5) to n exact target samples.
        energy_noise: energy distance between two exact target samples of size n.
        sliced_w2: sliced 2-Wasserstein distance (not squared) of the ODE samples to the exact
            ones, or None with ``w2=False``.
        sliced_w2_noise: the same between two exact target samples, or None.
        sample_cross_entropy: -E log p1(X) of the n ODE samples X ~ q, nats: ``target_entropy``
            up to noise for q = p1, below it when q collapses modes, above when it spreads them.
        cross_entropy_z: (sample_cross_entropy - target_entropy) in standard errors of the
            difference (two independent samples): ~N(0, 1) for an exact sampler.
        component_weight_error: (K,) weight of each component of p1 among the ODE samples (mean
            exact responsibility) minus its true weight.
        component_mean_error: (K,) |responsibility-weighted mean - m_k| / sqrt(tr S_k).
        component_spread_ratio: (K,) trace of the responsibility-weighted covariance / tr S_k
            (1 exact, < 1 collapsed, > 1 spread out).
        worst_spread_ratio: the spread ratio farthest from 1 (in |log ratio|).
        max_weight_error: max over components of |component_weight_error|.
        max_mean_error: max over components of ``component_mean_error``.
        worst_spread_ratio_noise, max_weight_error_noise, max_mean_error_noise: the same
            statistics of the n exact target samples (their noise level at this n).
        sde_energy: energy distance of n SDE samples (``sample.sde`` with its defaults, from
            the same source points) to the exact target samples, or None without ``sde=True``.
        sde_nfe: velocity evaluations of the SDE solve, or None.
        sde_cross_entropy, sde_cross_entropy_z, sde_component_weight_error,
            sde_component_mean_error, sde_component_spread_ratio, sde_worst_spread_ratio,
            sde_max_weight_error, sde_max_mean_error: the checks above for the SDE samples, or
            None without ``sde=True``.
        nfe_adaptive: velocity evaluations of the adaptive solve.
        nfe_to_accuracy: fewest fixed-step evaluations with relative endpoint RMSE <= tol, or
            None if no tried step count reached it.
        nfe_solver: the fixed-step solver ("euler" or "midpoint").
        nfe_tol: the tolerance.
        nfe_step_counts: step counts tried.
        nfe_errors: relative endpoint RMSE of each.
        wall_time_s: seconds the evaluation took.
        conditional: with ``guidance=w``, the ``ConditionalReport`` of the guided field at
            weight w (per-class (C,) arrays and class means, ``fmjax.evaluate_conditional``);
            None without ``guidance``.
    """

    problem: str
    dim: int
    n: int
    ts: Float[Array, " T"]
    velocity_error: Float[Array, " T"]
    velocity_scale: Float[Array, " T"]
    mean_velocity_error: float
    relative_velocity_error: float
    loss: float
    loss_floor: float
    loss_floor_stderr: float
    excess_loss: float
    excess_loss_stderr: float
    nll: float
    target_entropy: float
    target_entropy_stderr: float
    nll_gap: float
    bits_per_dim_gap: float
    energy: float
    energy_noise: float
    sliced_w2: float | None
    sliced_w2_noise: float | None
    sample_cross_entropy: float
    cross_entropy_z: float
    component_weight_error: Float[np.ndarray, " K"]
    component_mean_error: Float[np.ndarray, " K"]
    component_spread_ratio: Float[np.ndarray, " K"]
    worst_spread_ratio: float
    max_weight_error: float
    max_mean_error: float
    worst_spread_ratio_noise: float
    max_weight_error_noise: float
    max_mean_error_noise: float
    sde_energy: float | None
    sde_nfe: int | None
    sde_cross_entropy: float | None
    sde_cross_entropy_z: float | None
    sde_component_weight_error: Float[np.ndarray, " K"] | None
    sde_component_mean_error: Float[np.ndarray, " K"] | None
    sde_component_spread_ratio: Float[np.ndarray, " K"] | None
    sde_worst_spread_ratio: float | None
    sde_max_weight_error: float | None
    sde_max_mean_error: float | None
    nfe_adaptive: int
    nfe_to_accuracy: int | None
    nfe_solver: str
    nfe_tol: float
    nfe_step_counts: tuple[int, ...]
    nfe_errors: tuple[float, ...]
    wall_time_s: float
    conditional: ConditionalReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON values."""
        return to_json(self)

    def summary(self) -> dict[str, Any]:
        """The scalar entries (no curves, no per-component arrays), as plain JSON values.

        With a conditional report, ``"conditional"`` holds its weight and class means (the
        per-class arrays are in ``to_dict``); without one the key is absent.
        """
        skip = ("ts", "velocity_error", "velocity_scale", "nfe_step_counts", "nfe_errors")
        out = {
            k: v
            for k, v in self.to_dict().items()
            if k not in skip and not k.startswith(("component_", "sde_component_"))
        }
        cond = out.pop("conditional")
        if cond is not None:
            out["conditional"] = {k: cond[k] for k in _CONDITIONAL_SUMMARY}
        return out


_CONDITIONAL_SUMMARY = (
    "weight",
    "n",
    "mean_velocity_error",
    "relative_velocity_error",
    "mean_accuracy",
    "mean_bayes_accuracy",
    "mean_cross_entropy_gap",
    "nfe",
)


class _NullLabel(eqx.Module):
    """A conditional field ``(t, x, y)`` called with the null label: the velocity v(t, x, ∅)."""

    field: Any
    null: int = eqx.field(static=True)

    def __call__(self, t: Float[ArrayLike, "..."], x: Float[ArrayLike, "... d"]) -> Array:
        """v(t, x, ∅), x (..., d), t a scalar or of shape x.shape[:-1]."""
        x = jnp.asarray(x)
        return self.field(t, x, jnp.full(x.shape[:-1], self.null, jnp.int32))


def _conditional_field(velocity, problem: problems.Problem, guidance, null, shape, dtype):
    """(the null-label field, the null label) of a conditional ``velocity`` for ``guidance``."""
    w = _checks.as_float(_FN, "guidance", guidance)
    if not math.isfinite(w):
        _checks.fail(_FN, "guidance", "a finite number", guidance)
    labels = problem.coupling.labels
    if labels is None:
        why = "its coupling has no class labels; build it with `labels=`"
        _checks.fail(_FN, "guidance", f"None for problem {problem.name!r} ({why})", guidance)
    n_classes = max(labels) + 1
    if null is None:
        null = getattr(velocity, "null", n_classes)
    null = _checks.check_int(_FN, "null", null, 0)
    uncond = _NullLabel(_solve.as_pytree(velocity), null)
    try:
        _solve.check_field(_FN, "velocity", uncond, jax.ShapeDtypeStruct(shape, dtype))
    except (TypeError, ValueError) as e:
        what = "a conditional field (t, x, y) -> (..., d) when `guidance` is given"
        raise _checks.named_error(
            _FN, "velocity", f"{_FN}: `velocity` must be {what} (called with y = {null}, the "
            f"null label): {str(e).split('got ', 1)[-1]}", type(e),
        ) from None  # fmt: skip
    return uncond, w, null


def _check_fields(checks: metrics.SampleChecks, reference: metrics.SampleChecks) -> dict:
    """The report's fields of ``checks`` (generated samples) against ``reference`` (exact)."""
    return {
        "cross_entropy": _f(checks.cross_entropy),
        "cross_entropy_z": _f(checks.cross_entropy_z(reference)),
        "component_weight_error": np.asarray(checks.weight_error),
        "component_mean_error": np.asarray(checks.mean_error),
        "component_spread_ratio": np.asarray(checks.spread_ratio),
        "worst_spread_ratio": _f(checks.worst_spread_ratio),
        "max_weight_error": _f(checks.max_weight_error),
        "max_mean_error": _f(checks.max_mean_error),
    }


def _f(x) -> float:
    return float(np.asarray(x))


@functools.partial(jax.jit, static_argnames=("static", "solver"))
def _fixed_step(static, leaves, x0, n_steps, t0, t1, solver):
    """Euler / midpoint with a traced step count (one compile for every count)."""
    velocity = _join(static, leaves)
    h = (t1 - t0) / n_steps.astype(x0.dtype)

    def step(i, x):
        t = t0 + i.astype(x0.dtype) * h
        if solver == "euler":
            return x + h * velocity(t, x)
        return x + h * velocity(t + 0.5 * h, x + 0.5 * h * velocity(t, x))

    return jax.lax.fori_loop(0, n_steps, step, x0)


class _Hashable:
    """A static argument of the compiled parts: a treedef compared by equality (so the same
    structure with new arrays reuses the compiled program), any other value by identity."""

    def __init__(self, value, by_identity: bool):
        self.value, self.by_identity = value, by_identity

    def __hash__(self):
        return id(self.value) if self.by_identity else hash(self.value)

    def __eq__(self, other):
        if not isinstance(other, _Hashable) or self.by_identity != other.by_identity:
            return False
        return self.value is other.value if self.by_identity else self.value == other.value


def _split(velocity) -> tuple[_Hashable, list]:
    """(static part, array leaves) of a field: a pytree field of arrays (``exact.VelocityField``,
    a ``jax.tree_util.Partial`` of a model's apply and its parameters; a ``functools.partial``
    of a hashable function binding arrays becomes one) enters the compiled parts as traced
    leaves, like the reference field; any other callable is a static value (its arrays become
    constants of the program)."""
    if type(velocity) is functools.partial:
        try:
            velocity = jax.tree_util.Partial(velocity.func, *velocity.args, **velocity.keywords)
            hash(velocity.func)
        except TypeError:
            pass
    leaves, treedef = jax.tree.flatten(velocity)
    if leaves and all(isinstance(leaf, jax.Array) for leaf in leaves):
        try:
            hash(treedef)
            return _Hashable(treedef, False), leaves
        except TypeError:
            return _Hashable(treedef, True), leaves
    return _Hashable(velocity, True), []


def _join(static: _Hashable, leaves: list):
    return jax.tree.unflatten(static.value, leaves) if leaves else static.value


def _nfe(velocity, x0, reference, problem, solver, tol, step_counts):
    """metrics.nfe_to_accuracy with the relative endpoint RMSE of fixed-step solves."""
    s = problem.schedule
    spread = math.sqrt(_f(jnp.trace(problem.target().covariance())))
    static, leaves = _split(velocity)
    t0, t1 = jnp.asarray(s.t_min, x0.dtype), jnp.asarray(s.t_max, x0.dtype)

    def solve(n_steps):
        return _fixed_step(static, leaves, x0, jnp.asarray(n_steps), t0, t1, solver)

    def rel_rmse(a, b):
        return jnp.sqrt(jnp.mean(jnp.sum(jnp.square(a - b), axis=-1))) / spread

    return metrics.nfe_to_accuracy(
        solve, reference, step_counts, tol, evals_per_step=_SOLVERS[solver], error=rel_rmse
    )


def _merge_equal(p: GaussianMixture) -> GaussianMixture:
    """``p`` with equal components merged, in order of first appearance (the target of an
    independent coupling repeats each of its components once per source component)."""
    means, covs = np.asarray(p.means), np.asarray(p.covs)
    flat = np.concatenate([means, covs.reshape(len(means), -1)], axis=1)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    if len(first) == len(means):
        return p
    group = np.argsort(np.argsort(first))[inverse.reshape(-1)]  # rank of first appearance
    weights = np.bincount(group, weights=np.asarray(p.weights, np.float64))
    keep = np.sort(first)
    return GaussianMixture(jnp.asarray(weights, p.weights.dtype), p.means[keep], p.covs[keep])


def _standard_source(problem: problems.Problem) -> bool:
    """Whether the problem's source is an independent N(0, I) and its schedule has no latent
    noise, where ``sample.sde`` may derive the score from the velocity."""
    return not problem.schedule.has_noise and problem.coupling.is_standard_normal(0)


def _check_problem(problem) -> problems.Problem:
    if isinstance(problem, str):
        return problems.get(problem)
    return _checks.check_instance(
        _FN, "problem", problem, problems.Problem, "a problem name or an fmjax.problems.Problem"
    )


def evaluate(
    velocity: Velocity,
    problem: str | problems.Problem,
    *,
    key: PRNGKeyArray,
    n: int = 1000,
    n_times: int = 21,
    divergence: str = "auto",
    w2: bool = True,
    nfe_solver: str = "midpoint",
    nfe_tol: float = 0.01,
    nfe_step_counts: Sequence[int] = _STEP_COUNTS,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    likelihood_steps: int | None = None,
    sde: bool = False,
    sde_steps: int | None = None,
    guidance: float | None = None,
    null: int | None = None,
    out: str | os.PathLike | None = None,
) -> EvaluationReport:
    """Score ``velocity`` against the exact answers of ``problem`` (see the module docstring).

    Args:
        velocity: a field ``(t, x) -> (..., d)`` taking per-point times t (n,) and a batch x
            (n, d), and a scalar t with a batch (the samplers' call); both forms are checked at
            entry (``TypeError`` naming the form that fails). For the exact field pass
            ``exact.velocity_field(exact.prepare(problem.coupling), problem.schedule)`` (the
            prepared coupling factors once; unprepared, every call factors anew).
        problem: a name of ``fmjax.problems.names()`` or a ``Problem``.
        key: PRNG key (the same key gives the same draws for every velocity, so reports of two
            models differ by the models only).
        n: samples per estimate (each curve point, the loss, the NLL, the sample distances).
        n_times: points of the velocity-error curve over the valid interval.
        divergence: "exact" (d JVPs per step), "hutchinson" (one Rademacher probe) or "auto"
            (exact up to d = 16) for the likelihood.
        w2: also compute the sliced 2-Wasserstein distances (needs ott-jax, ``fmjax[ot]``).
        nfe_solver: "midpoint" (2 evaluations per step) or "euler" for the NFE measurement.
        nfe_tol: tolerance on the relative endpoint RMSE.
        nfe_step_counts: step counts to try, ascending; stops at the first within tolerance.
        rtol, atol: tolerances of the adaptive solves (sampling and likelihood).
        likelihood_steps: None (adaptive Tsit5 at rtol, atol) or a number of fixed midpoint
            steps for the likelihood (cheaper, with a discretisation error in the NLL).
        sde: also sample by ``fmjax.sample.sde`` (its default diffusion and solver, the score
            derived from the velocity) from the ODE's source points and check those samples
            (the ``sde_*`` fields). The derivation needs a problem whose source is an
            independent N(0, I) and a schedule without latent noise (not ``gmm_1d`` or
            ``gmm_2d_joint``).
        sde_steps: steps of the SDE solve, or None for ``sample.sde``'s default.
        guidance: None (an unconditional field), or the guidance weight w for a conditional
            field ``velocity(t, x, y)`` on a labelled problem (``problem.coupling.labels``;
            a ``Problem`` built by hand around a labelled coupling). The unconditional fields of
            the report then score the null-label field v(t, x, ∅) against the unconditional
            exact answers, and ``report.conditional`` is ``fmjax.evaluate_conditional`` of the
            field at weight w with n points and samples per class (4 n exact samples per class
            for the Bayes accuracy and the entropy), its draws from ``fold_in(key, 0xC0D)``.
        null: the null label with ``guidance`` (default ``velocity.null`` if it has one, else
            the problem's number of classes C, as the conditional models' null class).
        out: folder for ``report.json`` and the figures ``velocity_error.png``,
            ``nfe.png`` and ``samples.png``, or None for none.

    Returns:
        an ``EvaluationReport``.
    """
    t_start = time.perf_counter()
    _checks.check_callable(_FN, "velocity", velocity, "a velocity field (t, x) -> (..., d)")
    problem = _check_problem(problem)
    key = _checks.check_key(_FN, "key", key)
    n = _checks.check_int(_FN, "n", n, 2)
    n_times = _checks.check_int(_FN, "n_times", n_times, 2)
    divergence = _checks.check_choice(
        _FN, "divergence", divergence, ("auto", "exact", "hutchinson")
    )
    nfe_solver = _checks.check_choice(_FN, "nfe_solver", nfe_solver, _SOLVERS)
    nfe_tol = _checks.check_positive(_FN, "nfe_tol", nfe_tol)
    _checks.check_instance(_FN, "sde", sde, bool, "True or False")
    sde_kw = {}
    if sde_steps is not None:
        sde_kw["steps"] = _checks.check_int(_FN, "sde_steps", sde_steps, 1)
    if sde and not _standard_source(problem):
        why = "the SDE derives the score from the velocity, which needs an N(0, I) source"
        _checks.fail(_FN, "sde", f"False for problem {problem.name!r} ({why})", sde)
    fixed = {}
    if likelihood_steps is not None:
        steps = _checks.check_int(_FN, "likelihood_steps", likelihood_steps, 1)
        fixed = {"solver": "midpoint", "steps": steps}
    if divergence == "auto":
        divergence = "exact" if problem.dim <= 16 else "hutchinson"
    c, s = problem.coupling, problem.schedule
    dtype = c.means.dtype
    field = None
    if guidance is not None:  # score the null-label field here, the guided one below
        field = velocity
        velocity, guidance, null = _conditional_field(
            field, problem, guidance, null, (n, c.dim), dtype
        )
    elif null is not None:
        _checks.fail(_FN, "null", "None without `guidance`", null)
    _solve.check_field(_FN, "velocity", velocity, jax.ShapeDtypeStruct((n, c.dim), dtype))
    keys = jax.random.split(key, 8)

    prepared = exact.prepare(c)  # time-free factors for an independent coupling
    ts = jnp.asarray(np.linspace(s.t_min, s.t_max, n_times), dtype)
    static, leaves = _split(velocity)
    err, scale = _velocity_errors(static, leaves, c, prepared, s, ts, n, keys[0])
    finite = np.isfinite(np.asarray(err))
    if not finite.all():  # before the solves, which would only fail on it later
        at = f"non-finite at t = {float(ts[int(np.argmin(finite))]):.4g}"
        _checks.fail(_FN, "velocity", "finite on the path's samples", at)
    lv, lu = _loss_terms(static, leaves, c, prepared, s, n, keys[1])
    lv, lu = np.asarray(lv, np.float64), np.asarray(lu, np.float64)
    excess_terms = lv - lu

    x1 = c.target().sample(keys[2], n)
    ll = likelihood.log_likelihood(
        velocity, x1, schedule=s, source_log_prob=c.source(), method=divergence,
        key=keys[3] if divergence == "hutchinson" else None, rtol=rtol, atol=atol, **fixed,
    )  # fmt: skip
    nll = -_f(jnp.mean(ll.log_prob))
    p1 = _merge_equal(c.target())
    exact_checks = _sample_checks(x1, p1)  # the target's entropy and the noise levels
    target_entropy = _f(exact_checks.cross_entropy)

    x0 = c.source().sample(keys[4], n)
    sol = sample.ode(velocity, x0, schedule=s, rtol=rtol, atol=atol)
    x_ref2 = c.target().sample(keys[5], n)
    energy = _f(metrics.energy_distance(sol.x, x1))
    energy_noise = _f(metrics.energy_distance(x_ref2, x1))
    ode_fields = _check_fields(_sample_checks(sol.x, p1), exact_checks)
    sde_fields = {f"sde_{k}": None for k in (*ode_fields, "energy", "nfe")}
    ode_fields["sample_cross_entropy"] = ode_fields.pop("cross_entropy")
    if sde:
        sde_sol = sample.sde(velocity, s, x0, key=keys[7], **sde_kw)
        sde_checks = _sample_checks(sde_sol.x, p1)
        sde_fields = {f"sde_{k}": v for k, v in _check_fields(sde_checks, exact_checks).items()}
        sde_fields["sde_energy"] = _f(metrics.energy_distance(sde_sol.x, x1))
        sde_fields["sde_nfe"] = int(sde_sol.nfe)
    sw = sw_noise = None
    if w2:
        sw = math.sqrt(max(0.0, _f(metrics.sliced_wasserstein(sol.x, x1, key=keys[6]))))
        sw_noise = math.sqrt(max(0.0, _f(metrics.sliced_wasserstein(x_ref2, x1, key=keys[6]))))
    nfe = _nfe(velocity, x0, sol.x, problem, nfe_solver, nfe_tol, tuple(nfe_step_counts))

    mean_err, mean_scale = _f(jnp.mean(err)), _f(jnp.mean(scale))
    gap = nll - target_entropy
    report = EvaluationReport(
        problem=problem.name,
        dim=problem.dim,
        n=n,
        ts=ts,
        velocity_error=err,
        velocity_scale=scale,
        mean_velocity_error=mean_err,
        relative_velocity_error=mean_err / mean_scale if mean_scale > 0 else math.nan,
        loss=float(lv.mean()),
        loss_floor=float(lu.mean()),
        loss_floor_stderr=float(lu.std(ddof=1) / math.sqrt(n)),
        excess_loss=float(excess_terms.mean()),
        excess_loss_stderr=float(excess_terms.std(ddof=1) / math.sqrt(n)),
        nll=nll,
        target_entropy=target_entropy,
        target_entropy_stderr=_f(exact_checks.cross_entropy_stderr),
        nll_gap=gap,
        bits_per_dim_gap=gap / (problem.dim * math.log(2)),
        energy=energy,
        energy_noise=energy_noise,
        sliced_w2=sw,
        sliced_w2_noise=sw_noise,
        **ode_fields,
        worst_spread_ratio_noise=_f(exact_checks.worst_spread_ratio),
        max_weight_error_noise=_f(exact_checks.max_weight_error),
        max_mean_error_noise=_f(exact_checks.max_mean_error),
        **sde_fields,
        nfe_adaptive=int(sol.nfe),
        nfe_to_accuracy=nfe.nfe,
        nfe_solver=nfe_solver,
        nfe_tol=nfe_tol,
        nfe_step_counts=nfe.step_counts,
        nfe_errors=nfe.errors,
        wall_time_s=0.0,
    )
    if field is not None:
        cond = evaluate_conditional(
            field, c, s, key=jax.random.fold_in(key, 0xC0D), weight=guidance, n=n, null=null,
            rtol=rtol, atol=atol,
        )  # fmt: skip
        report = report._replace(conditional=cond)
    report = report._replace(wall_time_s=round(time.perf_counter() - t_start, 2))
    if out is not None:
        write_report(report, problem, out, samples=np.asarray(sol.x), reference=np.asarray(x1))
    return report


@functools.partial(jax.jit, static_argnames=("static", "schedule", "n"))
def _velocity_errors(static, leaves, coupling, prepared, schedule, ts, n, key):
    """(E|v - u|^2, E|u|^2) over ts, on the same draws, in one compiled call."""
    velocity = _join(static, leaves)
    exact_u = exact.velocity_field(prepared, schedule)
    zero = lambda t, x: jnp.zeros_like(x)  # noqa: E731
    err = metrics.velocity_error(velocity, coupling, schedule, ts, n, key=key, reference=exact_u)
    scale = metrics.velocity_error(zero, coupling, schedule, ts, n, key=key, reference=exact_u)
    return err, scale


@functools.partial(jax.jit, static_argnames=("static", "schedule", "n"))
def _loss_terms(static, leaves, coupling, prepared, schedule, n, key):
    """Per-draw CFM terms |v(t, x_t) - y|^2 and |u(t, x_t) - y|^2, y the conditional velocity, on
    n draws of ``data.sample_path`` with t uniform on the valid interval (the losses' own draws:
    their means are the CFM loss and the loss floor)."""
    velocity = _join(static, leaves)
    t, _, _, _, xt, y = data.sample_path(key, coupling, schedule, n)

    def chunk(args):
        tc, xc, yc = args
        lv = jnp.sum(jnp.square(velocity(tc, xc) - yc), axis=-1)
        lu = jnp.sum(jnp.square(exact.velocity(prepared, schedule, tc, xc) - yc), axis=-1)
        return lv, lu

    size = min(n, 256)
    pad = -n % size
    tp, xp, yp = (jnp.pad(z, [(0, pad)] + [(0, 0)] * (z.ndim - 1)) for z in (t, xt, y))
    shape = lambda z: z.reshape((-1, size) + z.shape[1:])  # noqa: E731
    lv, lu = jax.lax.map(chunk, (shape(tp), shape(xp), shape(yp)))
    return lv.reshape(-1)[:n], lu.reshape(-1)[:n]


def write_report(
    report: EvaluationReport,
    problem: problems.Problem,
    out: str | os.PathLike,
    *,
    samples: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write ``report.json`` and the figures into ``out``; returns figure name -> path."""
    from fmjax import plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"velocity_error": out / "velocity_error.png", "nfe": out / "nfe.png"}
    plot.error_curve(
        report.ts, {"model": report.velocity_error, "zero field": report.velocity_scale},
        ylabel=r"$E\,|v_t - u_t|^2$", title=f"Velocity error, {problem.name}",
        path=figures["velocity_error"],
    )  # fmt: skip
    evals = _SOLVERS[report.nfe_solver]
    nfes = [c * evals for c in report.nfe_step_counts]
    fig = plot.error_curve(
        nfes, {f"{report.nfe_solver} vs adaptive": report.nfe_errors}, xlabel="NFE",
        ylabel="relative endpoint RMSE", title=f"Fixed-step error, {problem.name}",
    )  # fmt: skip
    ax = fig.axes[0]
    ax.set_xscale("log", base=2)
    ax.axhline(report.nfe_tol, color="black", ls="--", lw=1.0)
    plot.save(fig, figures["nfe"])
    if samples is not None and reference is not None:
        figures["samples"] = out / "samples.png"
        if problem.image_shape is not None:
            plot.image_rows({"exact": reference[:10], "ODE": samples[:10]}, problem.image_shape,
                            title=f"Samples, {problem.name}", path=figures["samples"])  # fmt: skip
        else:
            pad = lambda x: np.pad(x[:, :2], ((0, 0), (0, max(0, 2 - x.shape[1]))))  # noqa: E731
            plot.samples_grid({"exact target": pad(reference), "ODE samples": pad(samples)},
                              title=f"Samples, {problem.name} (first two coordinates)",
                              path=figures["samples"])  # fmt: skip
    write_json(out / "report.json", {**report.to_dict(), "figures": figures})
    return figures
