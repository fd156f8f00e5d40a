"""Schedule change: a velocity of one affine schedule as the velocity of another.

Two noise-free schedules x_t = b_t x0 + a_t x1 and xbar_r = bbar_r x0 + abar_r x1 share their
endpoints' roles, and at times with equal signal-to-noise ratio a_t / b_t = abar_r / bbar_r
their interpolants are proportional: xbar_r = c_r x_t with c_r = bbar_r / b_t = abar_r / a_t.
Differentiating X̄_r = c_r X_{t(r)} and conditioning on X̄_r = x (i.e. X_t = x / c_r) gives

    ubar_r(x) = (dc/dr / c_r) x + c_r (dt/dr) u_t(x / c_r),

with dt/dr = Dbar_r / (c_r^2 D_t) (D = b da - a db, the derivative of a / b times b^2). This is
Meta's ``ScheduleTransformedModel``. Here t(r) inverts the source schedule's ratio a_t / b_t by
bisection on its valid interval (monotone for every built-in schedule), or by a given
``snr_inverse``; c_r is computed as (abar a + bbar b) / (a^2 + b^2), finite at both ends.
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

__all__ = ["ScheduleChanged", "change_schedule"]

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
