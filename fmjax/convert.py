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

All functions take ``(schedule, t, x, y)`` with x, y of shape (..., d) and t a scalar or an
array broadcastable against x.shape[:-1]; they return (..., d) (batch shape broadcast).
"""

from __future__ import annotations

from collections.abc import Callable

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
    "as_velocity",
    "from_velocity",
    "TARGETS",
]

#: Names of the quantities a network can predict.
TARGETS = ("velocity", "x1", "x0", "score")

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


def velocity_to_x1(
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    u: Float[ArrayLike, "... d"],
) -> Float[Array, "... d"]:
    """x1_hat = (b u - db x) / (b da - a db). Singular where b da = a db.

    Args:
        schedule: affine schedule.
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        u: velocity at (t, x), (..., d).

    Returns:
        the x1 (target / denoiser) prediction, (..., d).
    """
    a, b, da, db, x, u = _coeffs(schedule, t, x, u)
    return (b * u - db * x) / (b * da - a * db)


def velocity_to_x0(schedule: Schedule, t, x, u) -> Float[Array, "... d"]:
    """x0_hat = (da x - a u) / (b da - a db). Singular where b da = a db.

    Args/Returns as ``velocity_to_x1``; returns the x0 (source / noise) prediction, (..., d).
    """
    a, b, da, db, x, u = _coeffs(schedule, t, x, u)
    return (da * x - a * u) / (b * da - a * db)


def x1_to_velocity(schedule: Schedule, t, x, x1_hat) -> Float[Array, "... d"]:
    """u = (D x1_hat + db x) / b with D = b da - a db. Singular where b = 0 (t = 1).

    Args:
        schedule: affine schedule.
        t: time(s), scalar or broadcastable against x.shape[:-1].
        x: points x_t, (..., d).
        x1_hat: prediction of X1 at (t, x), (..., d).

    Returns:
        velocity, (..., d).
    """
    a, b, da, db, x, x1_hat = _coeffs(schedule, t, x, x1_hat)
    return ((b * da - a * db) * x1_hat + db * x) / b


def x0_to_velocity(schedule: Schedule, t, x, x0_hat) -> Float[Array, "... d"]:
    """u = (da x - D x0_hat) / a with D = b da - a db. Singular where a = 0 (t = 0).

    Args/Returns as ``x1_to_velocity`` with the prediction of X0 in place of X1.
    """
    a, b, da, db, x, x0_hat = _coeffs(schedule, t, x, x0_hat)
    return (da * x - (b * da - a * db) * x0_hat) / a


def x1_to_x0(schedule: Schedule, t, x, x1_hat) -> Float[Array, "... d"]:
    """x0_hat = (x - a x1_hat) / b. Singular where b = 0 (t = 1)."""
    a, b, _, _, x, x1_hat = _coeffs(schedule, t, x, x1_hat)
    return (x - a * x1_hat) / b


def x0_to_x1(schedule: Schedule, t, x, x0_hat) -> Float[Array, "... d"]:
    """x1_hat = (x - b x0_hat) / a. Singular where a = 0 (t = 0)."""
    a, b, _, _, x, x0_hat = _coeffs(schedule, t, x, x0_hat)
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
    """
    a, b, da, db, x, u = _coeffs(schedule, t, x, u)
    return (a * u - da * x) / (sigma0**2 * b * (b * da - a * db))


def score_to_velocity(
    schedule: Schedule, t, x, score, *, sigma0: float = 1.0
) -> Float[Array, "... d"]:
    """Velocity from the score, for a source N(0, sigma0^2 I) independent of X1.

    u = (da x + sigma0^2 b (b da - a db) s) / a. Singular where a = 0 (t = 0: the score of the
    source carries no information about X1).

    Args/Returns as ``velocity_to_score`` with the roles of velocity and score swapped.
    """
    a, b, da, db, x, s = _coeffs(schedule, t, x, score)
    return (da * x + sigma0**2 * b * (b * da - a * db) * s) / a


_TO_VELOCITY = {"x1": x1_to_velocity, "x0": x0_to_velocity, "score": score_to_velocity}
_FROM_VELOCITY = {"x1": velocity_to_x1, "x0": velocity_to_x0, "score": velocity_to_score}


def _check_target(fn: str, target: str) -> None:
    if target not in TARGETS:
        _checks.check_choice(f"convert.{fn}", "target", target, TARGETS)


def as_velocity(fn: _Field, schedule: Schedule, target: str = "x1", **kwargs) -> _Field:
    """Turn a predictor ``fn(t, x)`` of ``target`` into a velocity field ``(t, x) -> (..., d)``.

    Args:
        fn: callable (t, x) -> (..., d) predicting ``target`` (e.g. ``partial(model.apply, p)``).
        schedule: the affine schedule the predictor was trained with.
        target: "x1", "x0", "score" or "velocity" (identity).
        **kwargs: passed to the conversion (``sigma0`` for "score").

    Returns:
        the velocity field (t, x) -> (..., d); singular where the conversion is (module docs).
    """
    _check_target("as_velocity", target)
    if target == "velocity":
        return fn
    convert = _TO_VELOCITY[target]
    return lambda t, x: convert(schedule, t, x, fn(t, x), **kwargs)


def from_velocity(velocity: _Field, schedule: Schedule, target: str = "x1", **kwargs) -> _Field:
    """Turn a velocity field into a predictor ``(t, x) -> (..., d)`` of ``target``.

    Args:
        velocity: callable (t, x) -> (..., d), e.g. ``partial(fmjax.exact.velocity, c, s)``.
        schedule: the affine schedule of the velocity field.
        target: "x1", "x0", "score" or "velocity" (identity).
        **kwargs: passed to the conversion (``sigma0`` for "score").

    Returns:
        the predictor (t, x) -> (..., d).
    """
    _check_target("from_velocity", target)
    if target == "velocity":
        return velocity
    convert = _FROM_VELOCITY[target]
    return lambda t, x: convert(schedule, t, x, velocity(t, x), **kwargs)
