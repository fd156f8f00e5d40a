"""Errors of a learned model against exact answers: velocity error, NLL, NFE to an accuracy."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from fmjax import _checks, _solve, data, exact
from fmjax._typing import Velocity
from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule

__all__ = ["velocity_error", "nll", "nfe_to_accuracy", "NFEResult"]


def velocity_error(
    velocity: Velocity,
    coupling: JointGaussianMixture | exact.PreparedCoupling,
    schedule: Schedule,
    ts: Float[ArrayLike, " T"],
    n: int,
    *,
    key: PRNGKeyArray,
    reference: Velocity | None = None,
) -> Float[Array, " T"]:
    """Mean squared velocity error E_{X_t ~ p_t} |v(t, X_t) - u(t, X_t)|^2 at each time.

    X_t = b_t X0 + a_t X1 (+ gamma_t Z for a schedule with latent noise) is sampled exactly from
    coupled pairs (X0, X1) of ``coupling`` by ``fmjax.data.sample_path`` (fresh pairs and noise
    at each time, from ``split(key, T)``); all times are evaluated
    at once by ``vmap`` over t, each with a scalar t and an (n, d) batch, so the exact field
    factors its covariances once per time.
    Jit at the call site for speed, e.g.
    ``jax.jit(velocity_error, static_argnums=(0, 4), static_argnames="reference")`` for fixed
    fields, or inside a jitted function that takes the model parameters.

    Args:
        velocity: field ``(t, x) -> (..., d)`` to assess, e.g. ``partial(model.apply, params)``.
        coupling: joint mixture of (X0, X1) defining p_t, or its ``exact.prepare(...)`` (the
            exact reference then factors nothing per time).
        schedule: affine schedule.
        ts: (T,) times in ``schedule.interval`` (concrete times outside are a ``ValueError``).
        n: samples per time (static).
        key: PRNG key for the samples.
        reference: field to compare against; None (default) for the exact marginal velocity
            ``partial(fmjax.exact.velocity, coupling, schedule)``.

    Returns:
        (T,) mean over samples of the squared Euclidean norm of the difference.
    """
    fn = "metrics.velocity_error"
    _checks.check_callable(fn, "velocity", velocity, "a velocity field (t, x) -> (..., d)")
    _checks.check_instance(
        fn, "coupling", coupling, (JointGaussianMixture, exact.PreparedCoupling),
        "a JointGaussianMixture or an exact.prepare(...) of one",
    )  # fmt: skip
    joint = coupling.coupling if isinstance(coupling, exact.PreparedCoupling) else coupling
    _checks.check_instance(fn, "schedule", schedule, Schedule, "an fmjax Schedule")
    n = _checks.check_int(fn, "n", n)
    key = _checks.check_key(fn, "key", key)
    if reference is None:
        reference = functools.partial(exact.velocity, coupling, schedule)
    _checks.check_callable(fn, "reference", reference, "None or a velocity field (t, x)")
    ts = _times(fn, ts, schedule, joint.means.dtype)
    points = jax.ShapeDtypeStruct((n, joint.dim), joint.means.dtype)
    _solve.check_field(fn, "velocity", velocity, points)
    _solve.check_field(fn, "reference", reference, points)

    def at(k, t):
        xt = data.sample_path(k, joint, schedule, n, t=t).xt
        diff = velocity(t, xt) - reference(t, xt)
        return jnp.mean(jnp.sum(jnp.square(diff), axis=-1))

    keys = jax.random.split(key, ts.shape[0])
    return jax.vmap(at)(keys, ts)


def _times(fn: str, ts, schedule: Schedule, dtype) -> Array:
    """``ts`` as a floating (T,) array with T >= 1, inside the schedule's valid interval."""
    ts = _checks.check_real_array(fn, "ts", ts, dtype)
    if ts.ndim != 1 or ts.shape[0] == 0:
        _checks.fail(fn, "ts", "a non-empty array of shape (T,)", f"shape {ts.shape}")
    schedule.check_times(fn, "ts", ts)
    return ts


def nll(
    target_log_prob: Callable[[Float[Array, "n d"]], Float[Array, " n"]],
    samples: Float[ArrayLike, "n d"],
) -> Float[Array, ""]:
    """Mean negative log-likelihood -(1/n) sum_i log p(x_i) of samples under a density.

    With ``samples`` from a model and ``target_log_prob`` the exact target (e.g.
    ``GaussianMixture.log_prob``) this is the cross-entropy H(q_model, p) >= H(q_model); compare
    with the target's own entropy, estimated by ``nll(p.log_prob, p.sample(key, n))``.

    Args:
        target_log_prob: ``x (n, d) -> (n,)`` log-density.
        samples: (n, d) points.

    Returns:
        scalar mean NLL (nats).
    """
    fn = "metrics.nll"
    _checks.check_callable(fn, "target_log_prob", target_log_prob)
    samples = _checks.check_real_array(fn, "samples", samples, any_float=True)
    if samples.ndim != 2:
        _checks.fail(fn, "samples", "an array of shape (n, d)", f"shape {samples.shape}")
    lp = target_log_prob(samples)
    if lp.shape != samples.shape[:1]:
        _checks.fail(fn, "target_log_prob", "a map from (n, d) to (n,)", f"shape {lp.shape}")
    return -jnp.mean(lp)


class NFEResult(NamedTuple):
    """Outcome of ``nfe_to_accuracy``.

    Attributes:
        nfe: fewest function evaluations reaching the tolerance, or None if none did.
        n_steps: the step count achieving it, or None.
        step_counts: the step counts tried, ascending.
        errors: error of each tried step count (same order), as floats.
    """

    nfe: int | None
    n_steps: int | None
    step_counts: tuple[int, ...]
    errors: tuple[float, ...]


def _rmse(a: Array, b: Array) -> Array:
    return jnp.sqrt(jnp.mean(jnp.sum(jnp.square(a - b), axis=-1)))


def nfe_to_accuracy(
    solve: Callable[[int], Float[Array, "n d"]],
    reference: Float[ArrayLike, "n d"],
    step_counts: Sequence[int],
    tol: float,
    *,
    evals_per_step: int = 1,
    error: Callable[[Array, Array], Float[Array, ""]] | None = None,
    stop_early: bool = True,
) -> NFEResult:
    """Fewest fixed-step function evaluations whose samples are within ``tol`` of a reference.

    ``solve(n_steps)`` runs a fixed-step solver (e.g. Euler, midpoint) with ``n_steps`` steps
    and returns samples (n, d); ``reference`` is an accurate solution (e.g. an adaptive solve at
    a tight tolerance, or the exact transport map). The default ``error`` is the root mean
    squared distance sqrt(mean_i |x_i - r_i|^2), meaningful when ``solve`` and the reference
    start from the same initial points; pass e.g. ``energy_distance`` to compare laws instead.
    Step counts are tried in ascending order (a Python loop over a few separate solves).

    Args:
        solve: ``n_steps -> (n, d)`` samples.
        reference: (n, d) reference samples.
        step_counts: candidate step counts (positive ints).
        tol: accuracy threshold on ``error``, > 0.
        evals_per_step: velocity evaluations per step (Euler 1, midpoint / Heun 2, RK4 4).
        error: ``(samples, reference) -> scalar``; default RMSE as above.
        stop_early: stop at the first count within ``tol`` (the rest are not run).

    Returns:
        NFEResult with nfe = n_steps * evals_per_step of the smallest count within ``tol``.
    """
    fn = "metrics.nfe_to_accuracy"
    _checks.check_callable(fn, "solve", solve)
    counts = _step_counts(fn, step_counts)
    tol = _checks.check_positive(fn, "tol", tol)
    evals_per_step = _checks.check_int(fn, "evals_per_step", evals_per_step)
    err_fn = _rmse if error is None else _checks.check_callable(fn, "error", error)
    reference = jnp.asarray(reference)
    tried, errs, best = [], [], None
    for c in counts:
        e = float(err_fn(jnp.asarray(solve(c)), reference))
        tried.append(c)
        errs.append(e)
        if best is None and e <= tol:
            best = c
            if stop_early:
                break
    nfe = None if best is None else best * evals_per_step
    return NFEResult(nfe, best, tuple(tried), tuple(errs))


def _step_counts(fn: str, step_counts) -> list[int]:
    """Distinct positive step counts, ascending."""
    if isinstance(step_counts, str) or not hasattr(step_counts, "__iter__"):
        _checks.fail(fn, "step_counts", "a sequence of ints >= 1", step_counts, TypeError)
    counts = sorted({_checks.check_int(fn, "step_counts", c) for c in step_counts})
    if not counts:
        _checks.fail(fn, "step_counts", "a non-empty sequence of ints >= 1", step_counts)
    return counts
