"""Closed-form probability path of a Gaussian-mixture coupling: p_t, u_t, score, divergence,
velocity Jacobian.

For a joint mixture of (X0, X1) and a schedule, each component k makes (X_t, dX_t/dt) jointly
Gaussian, so p_t is a K-component Gaussian mixture and u_t(x) = E[dX_t | X_t = x] is a
responsibility-weighted sum of affine fields, all in closed form. A schedule with latent noise
(``schedule.noise``: x_t = b x0 + a x1 + gamma z, z ~ N(0, I) independent of the coupling) adds
gamma^2 I to each component's covariance and gamma dgamma I to Cov(dX_t, X_t) (only the
product, finite at t = 0, 1 where dgamma may not be): u_t is then the probability-flow drift
E[dX_t | X_t = x], the dgamma z part included, and ``marginal`` includes the gamma^2 I.

Public functions take ``(coupling, schedule, t, x)`` with ``x`` of shape (..., d) and ``t`` a
scalar or an array broadcastable against ``x.shape[:-1]``. They are pure and jit-compatible
(traced ``t`` and ``x``; ``precision`` is static), e.g. ``jax.jit(fmjax.exact.velocity)`` or
``functools.partial(fmjax.exact.velocity, coupling, schedule)`` as a velocity field ``(t, x)``.
Components are streamed in blocks with an online log-sum-exp: memory O(N d + B d^2).

Which form and layout evaluate a call (per-time Cholesky, the time-free forms of independent and
OT-map couplings, the low-d layout, point chunks) is decided by one table: the docstring of
``fmjax.exact._plan``. ``prepare(coupling)`` computes the time-free factors once.
"""

from fmjax.exact._api import (
    Evaluation,
    VelocityField,
    divergence,
    evaluate,
    log_prob,
    marginal,
    responsibilities,
    score,
    velocity,
    velocity_field,
    velocity_jacobian,
)
from fmjax.exact._prepared import PreparedCoupling, prepare

__all__ = [
    "Evaluation",
    "PreparedCoupling",
    "prepare",
    "VelocityField",
    "velocity",
    "velocity_field",
    "log_prob",
    "score",
    "responsibilities",
    "divergence",
    "velocity_jacobian",
    "evaluate",
    "marginal",
]
