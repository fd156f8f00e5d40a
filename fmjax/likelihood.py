"""Log-likelihood of a flow by the augmented ODE (instantaneous change of variables).

Along a trajectory of dx/dt = u_t(x), d/dt log p_t(x_t) = -div u_t(x_t), so for data x at time t

    log p_t(x) = log p_{t_min}(x_{t_min}) - int_{t_min}^t div u_s(x_s) ds,

with x_{t_min} the point x carried back to the start of the valid interval (0 unless the schedule
starts later); the source law is taken as p_{t_min}, exact when t_min = 0. ``log_likelihood``
integrates the state and the divergence integral backwards in one diffrax solve;
``sample_and_log_prob`` integrates forwards from source samples. The divergence is exact (d
forward-mode JVPs; fine for small d) or Hutchinson's unbiased estimate E[e^T J e] with Rademacher
or Gaussian probes drawn once per solve from an explicit key (FFJORD); the trajectory does not
depend on the probes, so the log-likelihood estimate is unbiased too. Reverse-mode gradients
through the solve work through diffrax's ``RecursiveCheckpointAdjoint``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from fmjax import _checks, _solve
from fmjax._typing import Velocity
from fmjax.mixtures import GaussianMixture
from fmjax.schedules import Schedule

__all__ = [
    "LikelihoodResult",
    "autodiff_divergence",
    "log_likelihood",
    "sample_and_log_prob",
    "standard_normal_log_prob",
]

_METHODS = ("exact", "hutchinson")
_PROBES = ("rademacher", "gaussian")

SourceLogProb = GaussianMixture | Callable[[Float[Array, "... d"]], Float[Array, "..."]] | None


class LikelihoodResult(NamedTuple):
    """Result of ``log_likelihood`` and ``sample_and_log_prob``.

    Attributes:
        x: the data points (``log_likelihood``: as given; ``sample_and_log_prob``: the samples).
        log_prob: log-density of ``x`` under the flow, shape (...).
        x0: the matching source points (at the start of the valid interval), (..., d).
        nfe: number of (batched) augmented-field evaluations, int scalar.
        num_steps: solver steps, int scalar.
    """

    x: Float[Array, "... d"]
    log_prob: Float[Array, "..."]
    x0: Float[Array, "... d"]
    nfe: Int[Array, ""]
    num_steps: Int[Array, ""]


def standard_normal_log_prob(x: Float[ArrayLike, "... d"]) -> Float[Array, "..."]:
    """log N(x; 0, I) for x (..., d), in closed form.

    Args:
        x: points, (..., d).

    Returns:
        log N(x; 0, I), (...).
    """
    x = _checks.check_real_array("likelihood.standard_normal_log_prob", "x", x)
    if x.ndim < 1:
        _checks.fail("likelihood.standard_normal_log_prob", "x", "of shape (..., d)", "a scalar")
    return -0.5 * jnp.sum(x * x, axis=-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def _velocity_and_divergence(velocity: Velocity, t, x, probes):
    """u_t(x) (..., d) and div u_t(x) (...): exact if ``probes`` is None, else Hutchinson."""
    f = lambda y: velocity(t, y)  # noqa: E731
    if probes is None:
        d = x.shape[-1]
        eye = jnp.eye(d, dtype=x.dtype).reshape((d,) + (1,) * (x.ndim - 1) + (d,))
        basis = jnp.broadcast_to(eye, (d,) + x.shape)
        u, jv = jax.vmap(lambda e: jax.jvp(f, (x,), (e,)), out_axes=(None, 0))(basis)
        # jv[i] = J e_i; the trace is sum_i (J e_i)_i.
        return u, jnp.sum(jnp.diagonal(jv, axis1=0, axis2=-1), axis=-1)
    u, jv = jax.vmap(lambda e: jax.jvp(f, (x,), (e,)), out_axes=(None, 0))(probes)
    return u, jnp.mean(jnp.sum(probes * jv, axis=-1), axis=0)


def _probes(fn: str, method, key, probe, n_probes, x):
    """None for the exact divergence, else (n_probes, ..., d) Hutchinson probes from ``key``."""
    _checks.check_choice(fn, "method", method, _METHODS)
    if method == "exact":
        return None
    if key is None:
        _checks.fail(fn, "key", "a PRNG key for method='hutchinson'", key, TypeError)
    key = _checks.check_key(fn, "key", key)
    _checks.check_choice(fn, "probe", probe, _PROBES)
    shape = (_checks.check_int(fn, "n_probes", n_probes),) + x.shape
    if probe == "rademacher":
        return jax.random.rademacher(key, shape, x.dtype)
    return jax.random.normal(key, shape, x.dtype)


def autodiff_divergence(
    velocity: Velocity,
    t: Float[ArrayLike, ""],
    x: Float[ArrayLike, "... d"],
    *,
    method: str = "exact",
    key: PRNGKeyArray | None = None,
    probe: str = "rademacher",
    n_probes: int = 1,
) -> Float[Array, "..."]:
    """Divergence of any velocity field at one time by autodiff: Jacobian trace or Hutchinson.

    Unlike ``fmjax.exact.divergence`` (the closed form of the exact mixture field), this works
    for any differentiable callable, e.g. a learned model.

    Args:
        velocity: ``(t, x) -> (..., d)``.
        t: scalar time.
        x: points (..., d).
        method: "exact" (d forward-mode JVPs) or "hutchinson".
        key: PRNG key of the probes (Hutchinson only; keyword-only).
        probe: "rademacher" or "gaussian".
        n_probes: probes per point, averaged.

    Returns:
        div u_t(x), shape (...).
    """
    fn = "likelihood.autodiff_divergence"
    x = _solve.check_x(fn, x, "x")
    _solve.check_field(fn, "velocity", velocity, x)
    probes = _probes(fn, method, key, probe, n_probes, x)
    return _velocity_and_divergence(velocity, jnp.asarray(t, x.dtype), x, probes)[1]


def _source_log_prob(fn: str, source, x: Array) -> Callable[[Array], Array]:
    """log p_{t_min} as a callable, checked to map points shaped like ``x`` to ``x.shape[:-1]``."""
    d = x.shape[-1]
    if source is None:
        return standard_normal_log_prob
    if isinstance(source, GaussianMixture):
        if source.dim != d:
            _checks.fail(
                fn, "source_log_prob", f"a GaussianMixture of the data's dimension d={d}",
                f"dim {source.dim}",
            )  # fmt: skip
        return source.log_prob
    what = "None (N(0, I)), a GaussianMixture or a callable x (..., d) -> (...)"
    source = _checks.check_callable(fn, "source_log_prob", source, what)
    # Shapes only (no computation): a callable for another d fails here, not in a reshape later.
    want = x.shape[:-1]
    try:
        out = jax.eval_shape(source, jax.ShapeDtypeStruct(x.shape, x.dtype))
    except Exception as e:  # noqa: BLE001 - report any failure of a user callable
        _checks.fail(
            fn, "source_log_prob", f"a callable x {x.shape} -> {want}",
            f"{type(e).__name__}: {e}",
        )  # fmt: skip
    shape = getattr(out, "shape", None)
    if shape != want:
        _checks.fail(fn, "source_log_prob", f"a callable x {x.shape} -> {want}", f"shape {shape}")
    return source


class _AugArgs(NamedTuple):
    velocity: Velocity
    probes: Array | None


def _augmented_field(t, y, args: _AugArgs):
    x, _ = y
    return _velocity_and_divergence(args.velocity, t, x, args.probes)


def _augmented_solve(fn, velocity, x, t_from, t_to, schedule, probe_kw, solve_kw):
    """One solve of (x, int_{t_from}^s div u) from t_from to t_to; returns (x_end, l_end, out)."""
    probes = _probes(fn, x=x, **probe_kw)
    y0 = (x, jnp.zeros(x.shape[:-1], x.dtype))
    out = _solve.solve(
        fn,
        _augmented_field,
        y0,
        _AugArgs(_solve.as_pytree(velocity), probes),
        t0=t_from,
        t1=t_to,
        save_ts=None,
        schedule=schedule,
        **solve_kw,
    )
    x_end, l_end = out.y1
    return x_end, l_end, out


def _prepare(fn, velocity, x, name, t, schedule, source_log_prob):
    """Checked inputs: (x, schedule, t_min, t, log p_{t_min})."""
    x = _solve.promote_to_clock(_solve.check_x(fn, x, name))
    _solve.check_field(fn, "velocity", velocity, x)
    schedule = _solve.resolve_schedule(fn, schedule, velocity)
    t_min, t_max = (0.0, 1.0) if schedule is None else schedule.interval
    t = t_max if t is None else _solve.check_time(fn, "t", t, schedule)
    if t == t_min:
        _checks.fail(fn, "t", f"after the start of the valid interval, {t_min:g}", t)
    _solve.check_distinct_times(fn, "t", t, t_min, x.dtype)
    return x, schedule, t_min, t, _source_log_prob(fn, source_log_prob, x)


def log_likelihood(
    velocity: Velocity,
    x: Float[ArrayLike, "... d"],
    *,
    t: float | None = None,
    key: PRNGKeyArray | None = None,
    schedule: Schedule | None = None,
    method: str = "exact",
    probe: str = "rademacher",
    n_probes: int = 1,
    source_log_prob: SourceLogProb = None,
    solver: str | diffrax.AbstractSolver = "tsit5",
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
) -> LikelihoodResult:
    """log p_t(x) under the flow of ``velocity``, by one backward solve of the augmented ODE.

    The solve runs from ``t`` back to t_min, the start of the valid interval, and takes
    ``source_log_prob`` as the law p_{t_min} there (exact when t_min = 0).

    Args:
        velocity: ``(t, x) -> (..., d)``.
        x: data points (..., d) at time ``t``.
        t: time of the data (default: the end of the valid interval, 1 without a schedule).
        key: PRNG key of the Hutchinson probes (drawn once per solve, per point; keyword-only).
        schedule: the velocity's schedule (default ``velocity.schedule`` if it has one): its
            valid interval bounds ``t`` and gives t_min and the default ``t``.
        method: "exact" divergence (d JVPs, for small d) or "hutchinson" (one JVP per probe).
        probe: "rademacher" or "gaussian".
        n_probes: Hutchinson probes per point, averaged at each evaluation.
        source_log_prob: log p_{t_min}: None for N(0, I), a GaussianMixture, or ``x -> (...)``.
        solver, stepsize_controller, steps, rtol, atol, max_steps, adjoint: as in
            ``fmjax.sample.ode`` (adaptive Tsit5 by default; the error control covers the
            log-density too).

    Returns:
        ``LikelihoodResult(x, log_prob, x0, nfe, num_steps)``.

    Raises:
        TypeError: for a velocity, key, solver, controller or source of the wrong type.
        ValueError: naming the argument, for bad method, probes, times, solver options or shapes.
    """
    fn = "likelihood.log_likelihood"
    x, schedule, t_min, t, log_p0 = _prepare(fn, velocity, x, "x", t, schedule, source_log_prob)
    probe_kw = dict(method=method, key=key, probe=probe, n_probes=n_probes)
    solve_kw = dict(
        solver=solver,
        stepsize_controller=stepsize_controller,
        steps=steps,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        adjoint=adjoint,
    )
    clean, bad = _solve.finite_rows(fn, "x", x, "log_prob")
    x0, l0, out = _augmented_solve(fn, velocity, clean, t, t_min, schedule, probe_kw, solve_kw)
    # l(t_min) = int_t^{t_min} div = -int_{t_min}^t div, so log p_t(x) = log p(x0) + l(t_min).
    log_prob = _solve.mask_rows(bad, log_p0(x0) + l0, axis_d=False)
    return LikelihoodResult(x, log_prob, _solve.mask_rows(bad, x0), out.nfe, out.num_steps)


def sample_and_log_prob(
    velocity: Velocity,
    x0: Float[ArrayLike, "... d"],
    *,
    t: float | None = None,
    key: PRNGKeyArray | None = None,
    schedule: Schedule | None = None,
    method: str = "exact",
    probe: str = "rademacher",
    n_probes: int = 1,
    source_log_prob: SourceLogProb = None,
    solver: str | diffrax.AbstractSolver = "tsit5",
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
) -> LikelihoodResult:
    """Push source samples from t_min forward to ``t``; return them with their log p_t.

    Args:
        velocity: ``(t, x) -> (..., d)``.
        x0: source samples (..., d) at t_min, e.g. from ``fmjax.sample.draw_source``.
        t: end time (default: the end of the valid interval, 1 without a schedule).
        Others: as in ``log_likelihood``.

    Returns:
        ``LikelihoodResult(x, log_prob, x0, nfe, num_steps)`` with ``x`` the samples at ``t``.
    """
    fn = "likelihood.sample_and_log_prob"
    x0, schedule, t_min, t, log_p0 = _prepare(fn, velocity, x0, "x0", t, schedule, source_log_prob)
    probe_kw = dict(method=method, key=key, probe=probe, n_probes=n_probes)
    solve_kw = dict(
        solver=solver,
        stepsize_controller=stepsize_controller,
        steps=steps,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        adjoint=adjoint,
    )
    clean, bad = _solve.finite_rows(fn, "x0", x0, "sample and log_prob")
    x1, l1, out = _augmented_solve(fn, velocity, clean, t_min, t, schedule, probe_kw, solve_kw)
    # l(t) = int_{t_min}^t div, so log p_t(x_t) = log p(x0) - l(t).
    log_prob = _solve.mask_rows(bad, log_p0(clean) - l1, axis_d=False)
    return LikelihoodResult(_solve.mask_rows(bad, x1), log_prob, x0, out.nfe, out.num_steps)
