"""Conversions between velocity, x1-prediction, x0-prediction and score for affine schedules.

For x_t = b_t x0 + a_t x1 with velocity u = da x1 + db x0, the pair (x, u) determines the
posterior means x1_hat = E[X1 | X_t = x] and x0_hat = E[X0 | X_t = x] through the 2 x 2 system

    [a   b ] [x1_hat]   [x]
    [da  db] [x0_hat] = [u],     with determinant  -D_t,  D_t = b da - a db,

so
    x1_hat = (b u - db x) / D_t,        x0_hat = (da x - a u) / D_t,
    u      = (D_t x1_hat + db x) / b   = (da x - D_t x0_hat) / a.

When the source is Gaussian, X0 ~ N(0, sigma0^2 I), and independent of X1, Tweedie's formula gives
the score of p_t: s_t(x) = -x0_hat / (b sigma0^2), hence

    s = (a u - da x) / (b sigma0^2 D_t),        u = (da x + sigma0^2 b D_t s) / a.

Where each is singular (division by zero; the result is inf/NaN there, no guard is applied):

==========================  ==============  ==============================================
function                    singular where  standard schedules
==========================  ==============  ==============================================
velocity_to_x1 / _to_x0     D_t = 0         polynomial(n > 1) at t = 0 (u_0 = 0); VP at t = 1
x1_to_velocity, x1_to_x0    b_t = 0         t = 1 (linear, cosine, polynomial, VP)
x0_to_velocity, x0_to_x1    a_t = 0         t = 0 (linear, cosine, polynomial)
velocity_to_score           b_t D_t = 0     t = 1; also t = 0 for polynomial(n > 1)
score_to_velocity           a_t = 0         t = 0
==========================  ==============  ==============================================

D_t = 1 for linear, pi/2 for cosine, n t^(n-1) for polynomial(n), da/b for VP. Away from the
singular points the formulas are used as written, so the well-posed ends work: x1_to_velocity
and velocity_to_x0 at t = 0, x0_to_velocity and velocity_to_x1 at t = 1 (linear, cosine).

With latent noise (a stochastic interpolant x_t = b_t x0 + a_t x1 + gamma_t z, a schedule with
``schedule.noise``), the denoiser eta = E[z | X_t = x] and the score s = grad log p_t enter:

    x = b x0_hat + a x1_hat + gamma eta,      eta = -gamma s,
    u = db x0_hat + da x1_hat + dgamma eta = v - gamma dgamma s,

where u is the probability-flow velocity (``fmjax.exact.velocity``) and v = db x0_hat + da x1_hat
its "drift" part (the gamma = 0 part, what the velocity would be without the dgamma z term).
Only gamma^2 and the product gamma dgamma (finite at t = 0, 1 even for ``brownian`` noise, whose
dgamma is infinite there) appear, so every conversion here is written with the score:
x - gamma eta = x + gamma^2 s and u = v - gamma dgamma s. The posterior-mean conversions then
hold with (x, u) replaced by (x + gamma^2 s, u + gamma dgamma s) and take ``score=`` (required
with noise, ignored without). A learned denoiser eta gives the score s = -eta / gamma
(``denoiser_to_score``), which is 0/0 at the ends; a denoiser parametrised as eta = -gamma * net
(the ``"score"`` target of ``fmjax.losses``: net is the score) avoids that, and
``drift_to_velocity(v, score=net)`` is finite on all of [0, 1].

``velocity_to_score`` / ``score_to_velocity`` (Tweedie for a Gaussian source) hold for gamma = 0
only and refuse a schedule with noise.

``change_schedule(velocity, source, target)`` turns a velocity of one noise-free schedule into
the velocity of another with the same endpoints (time change through a_t / b_t plus a rescaling,
as Meta's ``ScheduleTransformedModel``; see the section at the end of this module).

All functions take ``(schedule, t, x, y)`` with x, y of shape (..., d) and t a scalar or an
array broadcastable against x.shape[:-1]; they return (..., d) (batch shape broadcast).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from fmjax import _checks
from fmjax.schedules import Schedule

__all__ = [
    "velocity_to_x1",
    "x1_to_velocity",
    "velocity_to_x0",
    "x0_to_velocity",
    "x1_to_x0",
    "x0_to_x1",
    "velocity_to_score",
    "score_to_velocity",
    "denoiser_to_score",
    "score_to_denoiser",
    "drift_to_velocity",
    "velocity_to_drift",
    "as_velocity",
    "from_velocity",
    "change_schedule",
    "ScheduleChanged",
    "TARGETS",
]

#: Names of the quantities a network can predict.
TARGETS = ("velocity", "x1", "x0", "score", "drift")

_Field = Callable[[Array, Array], Array]


def _coeffs(schedule: Schedule, t, x, y):
    """Schedule coefficients shaped (batch..., 1) and x, y broadcast to (batch..., d)."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(x.dtype, float))
    batch = jnp.broadcast_shapes(t.shape, x.shape[:-1], y.shape[:-1])
    d = x.shape[-1]
    x = jnp.broadcast_to(x, batch + (d,))
    y = jnp.broadcast_to(y, batch + (d,))
    a, b, da, db = (c[..., None] for c in schedule(jnp.broadcast_to(t, batch)))
    return a, b, da, db, x, y


def _noisy(fn: str, schedule: Schedule, t, x, y, score):
    """Coefficients with (x, u-like y) shifted by the noise terms: x + gamma^2 s, and g_dg s.

    Returns (a, b, da, db, x', y, g_dg * s): x' = x - gamma eta; without noise x' = x, 0.
    """
    a, b, da, db, x, y = _coeffs(schedule, t, x, y)
    if not schedule.has_noise:
        return a, b, da, db, x, y, jnp.zeros((), x.dtype)
    if score is None:
        _checks.fail(
            f"convert.{fn}", "score",
            f"given for a schedule with noise ({schedule.name}): pass score=s(t, x)", None,
        )  # fmt: skip
    s = jnp.broadcast_to(jnp.asarray(score), x.shape)
    tb = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:-1])
    g, _, g_dg = (c[..., None] for c in schedule.gamma(tb))
    return a, b, da, db, x + g * g * s, y, g_dg * s


def _refuse_noise(fn: str, schedule: Schedule) -> None:
    if schedule.has_noise:
        _checks.fail(
            f"convert.{fn}", "schedule",
            "without noise (Tweedie's velocity <-> score map holds for gamma = 0 only; use "
            "drift_to_velocity / velocity_to_drift with the score)", schedule.name,
        )  # fmt: skip


def velocity_to_x1(
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    u: Float[ArrayLike, "... d"],
    *,
    score: Float[ArrayLike, "... d"] | None = None,
) -> Float[Array, "... d"]:
    """x1_hat = (b u - db x) / (b da - a db). Singular where b da = a db.

    With noise, x -> x + gamma^2 s and u -> u + gamma dgamma s (module docs).

    Args:
        schedule: affine schedule (with or without noise).
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        u: velocity at (t, x), (..., d).
        score: the score at (t, x), (..., d); required when the schedule has noise.

    Returns:
        the x1 (target / denoiser) prediction, (..., d).
    """
    a, b, da, db, x, u, gs = _noisy("velocity_to_x1", schedule, t, x, u, score)
    u = u + gs
    return (b * u - db * x) / (b * da - a * db)


def velocity_to_x0(schedule: Schedule, t, x, u, *, score=None) -> Float[Array, "... d"]:
    """x0_hat = (da x - a u) / (b da - a db). Singular where b da = a db.

    Args/Returns as ``velocity_to_x1``; returns the x0 (source / noise) prediction, (..., d).

    Args:
        schedule: affine schedule (with or without noise).
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        u: velocity at (t, x), (..., d).
        score: the score at (t, x), (..., d); required when the schedule has noise.

    Returns:
        the x0 (source / noise) prediction, (..., d).
    """
    a, b, da, db, x, u, gs = _noisy("velocity_to_x0", schedule, t, x, u, score)
    u = u + gs
    return (da * x - a * u) / (b * da - a * db)


def x1_to_velocity(schedule: Schedule, t, x, x1_hat, *, score=None) -> Float[Array, "... d"]:
    """u = (D x1_hat + db x) / b with D = b da - a db. Singular where b = 0 (t = 1).

    Args:
        schedule: affine schedule.
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        x1_hat: prediction of X1 at (t, x), (..., d).
        score: the score at (t, x), (..., d); required when the schedule has noise.

    Returns:
        velocity (the probability-flow velocity with noise), (..., d).
    """
    a, b, da, db, x, x1_hat, gs = _noisy("x1_to_velocity", schedule, t, x, x1_hat, score)
    return ((b * da - a * db) * x1_hat + db * x) / b - gs


def x0_to_velocity(schedule: Schedule, t, x, x0_hat, *, score=None) -> Float[Array, "... d"]:
    """u = (da x - D x0_hat) / a with D = b da - a db. Singular where a = 0 (t = 0).

    Args/Returns as ``x1_to_velocity`` with the prediction of X0 in place of X1.

    Args:
        schedule: affine schedule (with or without noise).
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        x0_hat: the x0 prediction at (t, x), (..., d).
        score: the score at (t, x), (..., d); required when the schedule has noise.

    Returns:
        the velocity u_t(x), (..., d).
    """
    a, b, da, db, x, x0_hat, gs = _noisy("x0_to_velocity", schedule, t, x, x0_hat, score)
    return (da * x - (b * da - a * db) * x0_hat) / a - gs


def x1_to_x0(schedule: Schedule, t, x, x1_hat, *, score=None) -> Float[Array, "... d"]:
    """x0_hat = (x - a x1_hat) / b (x + gamma^2 s for x with noise). Singular where b = 0.

    Args:
        schedule: affine schedule (with or without noise).
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        x1_hat: the x1 prediction at (t, x), (..., d).
        score: the score at (t, x), (..., d); required when the schedule has noise.

    Returns:
        the x0 prediction, (..., d).
    """
    a, b, _, _, x, x1_hat, _ = _noisy("x1_to_x0", schedule, t, x, x1_hat, score)
    return (x - a * x1_hat) / b


def x0_to_x1(schedule: Schedule, t, x, x0_hat, *, score=None) -> Float[Array, "... d"]:
    """x1_hat = (x - b x0_hat) / a (x + gamma^2 s for x with noise). Singular where a = 0.

    Args:
        schedule: affine schedule (with or without noise).
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        x0_hat: the x0 prediction at (t, x), (..., d).
        score: the score at (t, x), (..., d); required when the schedule has noise.

    Returns:
        the x1 prediction, (..., d).
    """
    a, b, _, _, x, x0_hat, _ = _noisy("x0_to_x1", schedule, t, x, x0_hat, score)
    return (x - b * x0_hat) / a


def velocity_to_score(schedule: Schedule, t, x, u, *, sigma0: float = 1.0) -> Float[Array, "... d"]:
    """Score of p_t from the velocity, for a source N(0, sigma0^2 I) independent of X1.

    s = -x0_hat / (b sigma0^2) = (a u - da x) / (b sigma0^2 (b da - a db)). Singular where
    b = 0 (t = 1) or b da = a db. Valid only for an independent Gaussian source (Tweedie).

    Args:
        schedule: affine schedule.
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        u: velocity at (t, x), (..., d).
        sigma0: standard deviation of the isotropic Gaussian source.

    Returns:
        grad_x log p_t(x), (..., d).

    Raises:
        ValueError: for a schedule with noise (no such map; see ``velocity_to_drift``).
    """
    _refuse_noise("velocity_to_score", schedule)
    a, b, da, db, x, u = _coeffs(schedule, t, x, u)
    return (a * u - da * x) / (sigma0**2 * b * (b * da - a * db))


def score_to_velocity(
    schedule: Schedule, t, x, score, *, sigma0: float = 1.0
) -> Float[Array, "... d"]:
    """Velocity from the score, for a source N(0, sigma0^2 I) independent of X1.

    u = (da x + sigma0^2 b (b da - a db) s) / a. Singular where a = 0 (t = 0: the score of the
    source carries no information about X1).

    Args/Returns as ``velocity_to_score`` with the roles of velocity and score swapped.

    Args:
        schedule: affine schedule without noise.
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        score: the score grad_x log p_t(x), (..., d).
        sigma0: standard deviation of the Gaussian source.

    Returns:
        the velocity u_t(x), (..., d).
    """
    _refuse_noise("score_to_velocity", schedule)
    a, b, da, db, x, s = _coeffs(schedule, t, x, score)
    return (da * x + sigma0**2 * b * (b * da - a * db) * s) / a


def denoiser_to_score(schedule: Schedule, t, x, eta) -> Float[Array, "... d"]:
    """s = -eta / gamma from the denoiser eta = E[z | X_t = x]. Singular where gamma = 0 (ends).

    Args:
        schedule: a schedule with noise.
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d) (only their shape is used).
        eta: the denoiser at (t, x), (..., d).

    Returns:
        the score grad_x log p_t(x), (..., d).
    """
    _require_noise("denoiser_to_score", schedule)
    g = _gamma(schedule, t, x, eta)[0]
    return -jnp.broadcast_to(jnp.asarray(eta), g.shape[:-1] + (jnp.shape(x)[-1],)) / g


def score_to_denoiser(schedule: Schedule, t, x, score) -> Float[Array, "... d"]:
    """eta = -gamma s: the denoiser E[z | X_t = x] from the score (0 at the ends).

    Args/Returns as ``denoiser_to_score`` with the roles swapped.

    Args:
        schedule: a schedule with noise.
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d) (only their shape is used).
        score: the score at (t, x), (..., d).

    Returns:
        the denoiser eta = E[z | X_t = x], (..., d).
    """
    _require_noise("score_to_denoiser", schedule)
    g = _gamma(schedule, t, x, score)[0]
    return -g * jnp.broadcast_to(jnp.asarray(score), g.shape[:-1] + (jnp.shape(x)[-1],))


def drift_to_velocity(schedule: Schedule, t, x, v, *, score=None) -> Float[Array, "... d"]:
    """u = v - gamma dgamma s: probability-flow velocity from the drift v and the score.

    v = E[db x0 + da x1 | X_t = x] is the gamma = 0 part of the velocity (the ``"drift"`` target
    of ``fmjax.losses``); u = v + dgamma eta = v - gamma dgamma s. Only the product gamma dgamma
    enters, so u is finite at t = 0, 1 wherever v and s are. Without noise u = v.

    Args:
        schedule: affine schedule (with or without noise).
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        v: the drift at (t, x), (..., d).
        score: the score at (t, x), (..., d); required when the schedule has noise.

    Returns:
        the velocity u, (..., d).
    """
    _, _, _, _, _, v, gs = _noisy("drift_to_velocity", schedule, t, x, v, score)
    return v - gs


def velocity_to_drift(schedule: Schedule, t, x, u, *, score=None) -> Float[Array, "... d"]:
    """v = u + gamma dgamma s: the drift (gamma = 0 part) from the velocity and the score.

    Args/Returns as ``drift_to_velocity`` with the roles of u and v swapped.

    Args:
        schedule: a schedule (with noise; without, v = u).
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        u: the probability-flow velocity at (t, x), (..., d).
        score: the score at (t, x), (..., d); required when the schedule has noise.

    Returns:
        the drift v (the gamma = 0 part of the velocity), (..., d).
    """
    _, _, _, _, _, u, gs = _noisy("velocity_to_drift", schedule, t, x, u, score)
    return u + gs


def _gamma(schedule: Schedule, t, x, y):
    """(gamma, dgamma, g_dg), each shaped (batch..., 1)."""
    x, y, t = jnp.asarray(x), jnp.asarray(y), jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(x.dtype, float))
    batch = jnp.broadcast_shapes(t.shape, x.shape[:-1], y.shape[:-1])
    return tuple(c[..., None] for c in schedule.gamma(jnp.broadcast_to(t, batch)))


def _require_noise(fn: str, schedule: Schedule) -> None:
    if not schedule.has_noise:
        _checks.fail(
            f"convert.{fn}", "schedule", "a schedule with noise (schedule.with_noise(...))",
            schedule.name,
        )  # fmt: skip


_TO_VELOCITY = {
    "x1": x1_to_velocity,
    "x0": x0_to_velocity,
    "score": score_to_velocity,
    "drift": drift_to_velocity,
}
_FROM_VELOCITY = {
    "x1": velocity_to_x1,
    "x0": velocity_to_x0,
    "score": velocity_to_score,
    "drift": velocity_to_drift,
}
_NEEDS_SCORE = ("x1", "x0", "drift")


def _check_target(fn: str, target: str, schedule: Schedule, score) -> None:
    if target == "denoiser":
        _checks.fail(
            f"convert.{fn}", "target",
            "not 'denoiser' (a denoiser alone does not give the velocity: turn it into a score "
            "field with denoiser_to_score and pass target='drift' with score=)", target,
        )  # fmt: skip
    if target not in TARGETS:
        _checks.check_choice(f"convert.{fn}", "target", target, TARGETS)
    if score is not None:
        _checks.check_callable(f"convert.{fn}", "score", score, "a callable (t, x) -> (..., d)")
    if schedule.has_noise and target in _NEEDS_SCORE and score is None:
        _checks.fail(
            f"convert.{fn}", "score",
            f"a score field (t, x) -> (..., d) for target {target!r} with noise "
            f"({schedule.name})", None,
        )  # fmt: skip
    if target == "score":
        _refuse_noise(fn, schedule)


def _with_score(convert, schedule, fn, score, kwargs):
    if score is None:
        return lambda t, x: convert(schedule, t, x, fn(t, x), **kwargs)
    return lambda t, x: convert(schedule, t, x, fn(t, x), score=score(t, x), **kwargs)


def as_velocity(
    fn: _Field, schedule: Schedule, target: str = "x1", *, score: _Field | None = None, **kwargs
) -> _Field:
    """Turn a predictor ``fn(t, x)`` of ``target`` into a velocity field ``(t, x) -> (..., d)``.

    Args:
        fn: callable (t, x) -> (..., d) predicting ``target`` (e.g. ``partial(model.apply, p)``).
        schedule: the affine schedule the predictor was trained with.
        target: "x1", "x0", "score" (gamma = 0, Gaussian source), "drift" or "velocity"
            (identity).
        score: a score field (t, x) -> (..., d); required with noise for "x1", "x0", "drift"
            (e.g. a learned one, or ``partial(fmjax.exact.score, coupling, schedule)``).
        **kwargs: passed to the conversion (``sigma0`` for "score").

    Returns:
        the velocity field (t, x) -> (..., d); singular where the conversion is (module docs).
    """
    _check_target("as_velocity", target, schedule, score)
    if target == "velocity":
        return fn
    return _with_score(_TO_VELOCITY[target], schedule, fn, score, kwargs)


def from_velocity(
    velocity: _Field,
    schedule: Schedule,
    target: str = "x1",
    *,
    score: _Field | None = None,
    **kwargs,
) -> _Field:
    """Turn a velocity field into a predictor ``(t, x) -> (..., d)`` of ``target``.

    Args:
        velocity: callable (t, x) -> (..., d), e.g. ``partial(fmjax.exact.velocity, c, s)``.
        schedule: the affine schedule of the velocity field.
        target: "x1", "x0", "score" (gamma = 0, Gaussian source), "drift" or "velocity"
            (identity).
        score: a score field; required with noise for "x1", "x0", "drift".
        **kwargs: passed to the conversion (``sigma0`` for "score").

    Returns:
        the predictor (t, x) -> (..., d).
    """
    _check_target("from_velocity", target, schedule, score)
    if target == "velocity":
        return velocity
    return _with_score(_FROM_VELOCITY[target], schedule, velocity, score, kwargs)


# ----------------------------------------------------------------------------- schedule change
# Schedule change: a velocity of one affine schedule as the velocity of another.
#
# Two noise-free schedules x_t = b_t x0 + a_t x1 and xbar_r = bbar_r x0 + abar_r x1 share their
# endpoints' roles, and at times with equal signal-to-noise ratio a_t / b_t = abar_r / bbar_r
# their interpolants are proportional: xbar_r = c_r x_t with c_r = bbar_r / b_t = abar_r / a_t.
# Differentiating X̄_r = c_r X_{t(r)} and conditioning on X̄_r = x (i.e. X_t = x / c_r) gives
#
#     ubar_r(x) = (dc/dr / c_r) x + c_r (dt/dr) u_t(x / c_r),
#
# with dt/dr = Dbar_r / (c_r^2 D_t) (D = b da - a db, the derivative of a / b times b^2). This is
# Meta's ``ScheduleTransformedModel``. Here t(r) inverts the source schedule's ratio a_t / b_t by
# bisection on its valid interval (monotone for every built-in schedule), or by a given
# ``snr_inverse``; c_r is computed as (abar a + bbar b) / (a^2 + b^2), finite at both ends.

_BISECTIONS = 64  # halvings of the source interval: below float64 spacing of [0, 1]


@functools.partial(jax.jit, static_argnums=0)  # one program per schedule, reused by every call
def _ratio_inverse(source: Schedule, abar, bbar) -> Array:
    """t in source.interval with a_t / b_t = abar / bbar (clamped to the interval's ends), by
    bisection on the sign of a_t bbar - abar b_t (no division: finite at both ends)."""
    lo = jnp.full(abar.shape, source.t_min, abar.dtype)
    hi = jnp.full(abar.shape, source.t_max, abar.dtype)

    def step(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        a, b, _, _ = source(mid)
        below = a * bbar < abar * b  # source ratio below the target's: go right
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTIONS, step, (lo, hi))
    return 0.5 * (lo + hi)


def _overlap(source: Schedule, target: Schedule) -> tuple[float, float]:
    """The sub-interval of ``target.interval`` whose ratios a/b the source reaches on its own
    (an end of the target's interval is kept whole when the source reaches its ratio)."""
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    a, b, _, _ = source(jnp.asarray(source.interval, dtype))
    at, bt, _, _ = target(jnp.asarray(target.interval, dtype))
    r = _ratio_inverse(target, a, b)
    lo = target.t_min if a[0] * bt[0] <= at[0] * b[0] else float(r[0])
    hi = target.t_max if a[1] * bt[1] >= at[1] * b[1] else float(r[1])
    return (lo, hi)


@dataclasses.dataclass(frozen=True)
class ScheduleChanged:
    """A velocity of ``source`` made the velocity of ``schedule``: ``(t, x, *args) -> (..., d)``.

    Made by ``change_schedule``. Extra arguments (a class label ``y``) are passed to the wrapped
    field unchanged.

    Attributes:
        velocity: the field of the source schedule.
        source: the schedule it was trained (or is exact) under.
        schedule: the target schedule, its interval narrowed to the times whose ratio a/b the
            source reaches (samplers and metrics read it as the valid interval).
        snr_inverse: ``None`` (bisection) or the given inverse of the source's a/b.
    """

    velocity: Callable[..., Array]
    source: Schedule
    schedule: Schedule
    snr_inverse: Callable[[Array], Array] | None = None

    def __call__(
        self, t: Float[ArrayLike, "..."], x: Float[ArrayLike, "... d"], *args: Any
    ) -> Float[Array, "... d"]:
        """ubar_t(x) of the target schedule at t (scalar or x.shape[:-1])."""
        x = jnp.asarray(x)
        r = jnp.asarray(t, x.dtype)
        abar, bbar, dabar, dbbar = self.schedule(r)
        if self.snr_inverse is None:
            ts = _ratio_inverse(self.source, abar, bbar)
        else:
            ts = jnp.asarray(self.snr_inverse(abar / bbar), x.dtype)
        a, b, da, db = self.source(ts)
        c = (abar * a + bbar * b) / (a * a + b * b)
        dt_dr = (bbar * dabar - abar * dbbar) / (c * c * (b * da - a * db))
        dc = ((dabar - c * da * dt_dr) * a + (dbbar - c * db * dt_dr) * b) / (a * a + b * b)
        u = self.velocity(ts, x / c[..., None], *args)
        return (dc / c)[..., None] * x + (c * dt_dr)[..., None] * u


jax.tree_util.register_dataclass(
    ScheduleChanged, data_fields=["velocity"], meta_fields=["source", "schedule", "snr_inverse"]
)


def change_schedule(
    velocity: Callable[..., Array],
    source: Schedule,
    target: Schedule,
    *,
    snr_inverse: Callable[[Array], Array] | None = None,
) -> ScheduleChanged:
    """The velocity of ``target`` from a velocity of ``source`` (same endpoints, no noise).

    ``ubar_r(x) = (dc/dr / c_r) x + c_r (dt/dr) u_t(x / c_r)`` with t(r) the source time of
    equal signal-to-noise ratio a/b (module docstring). Exact wherever the target's ratio at r
    is one the source takes on its valid interval: the returned field's ``schedule`` is
    ``target`` with its interval narrowed to those times (e.g. from ``vp()``, whose a_0 > 0 and
    whose interval stops at 1 - eps, to ``linear()``: r in about [6.5e-3, 0.99] for the
    defaults). Outside it t(r) is clamped to the source's interval and the answer is not the
    target's velocity.

    Args:
        velocity: a field ``(t, x, *args) -> (..., d)`` of the source schedule (exact or
            learned; a conditional field ``(t, x, y)`` works too).
        source: the schedule the velocity belongs to.
        target: the schedule to sample under.
        snr_inverse: optional closed form of the inverse of the source's ratio, rho -> t with
            a_t / b_t = rho (default: bisection to float precision on the source's interval).

    Returns:
        A ``ScheduleChanged`` field ``(t, x, *args) -> (..., d)``.

    Raises:
        TypeError: for a non-callable velocity or non-Schedule schedules.
        ValueError: for a schedule with latent noise (the interpolants are then not
            proportional), or when the two ratio ranges do not overlap.
    """
    fn = "convert.change_schedule"
    _checks.check_callable(fn, "velocity", velocity, "a field (t, x) -> (..., d)")
    for name, s in (("source", source), ("target", target)):
        _checks.check_instance(fn, name, s, Schedule, "an fmjax Schedule")
        if s.has_noise:
            _checks.fail(fn, name, "a schedule without latent noise", s.name)
    if snr_inverse is not None:
        _checks.check_callable(fn, "snr_inverse", snr_inverse, "a function rho -> t")
    lo, hi = _overlap(source, target)
    if not lo < hi:
        _checks.fail(
            fn, "target", f"a schedule whose ratios a/b overlap {source.name}'s", target.name
        )
    narrowed = dataclasses.replace(target, interval=(lo, hi))
    return ScheduleChanged(velocity, source, narrowed, snr_inverse)
