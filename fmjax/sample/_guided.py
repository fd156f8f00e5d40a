"""Classifier-free guidance: a conditional field v(t, x, y) made a velocity (t, x) -> (..., d).

ṽ_t(x) = v_t(x, ∅) + w (v_t(x, y) - v_t(x, ∅)), with ∅ the null class: w = 0 is the
unconditional field, w = 1 the conditional one, w > 1 extrapolates away from the unconditional
field (Ho & Salimans; Meta's ``flow_matching`` image examples). Both terms come from one call of
the field on the batch stacked twice.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from fmjax import _checks, _solve
from fmjax.schedules import Schedule

__all__ = ["GuidedVelocity", "guided"]


class GuidedVelocity(eqx.Module):
    """The guided field ṽ = v(·, ∅) + w (v(·, y) - v(·, ∅)) as a velocity ``(t, x)``.

    Made by ``guided``. A pytree (labels and weight are leaves), so a new weight or new labels
    of the same shape reuse a compiled solve.

    Attributes:
        field: the conditional field ``(t, x, y) -> (..., d)``.
        y: labels, broadcastable against the points' batch shape.
        weight: the guidance weight w (scalar).
        null: the null label.
        schedule: the field's schedule (samplers read its valid interval), or None.
    """

    field: Callable[..., Array]
    y: Int[Array, "..."]
    weight: Float[Array, ""]
    null: int = eqx.field(static=True)
    schedule: Schedule | None = eqx.field(static=True, default=None)

    def __call__(
        self, t: Float[ArrayLike, "..."], x: Float[ArrayLike, "... d"]
    ) -> Float[Array, "... d"]:
        """ṽ_t(x): x (..., d), t a scalar or of shape x.shape[:-1]."""
        x = jnp.asarray(x)
        batch, d = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, d)
        n = xf.shape[0]
        y = jnp.broadcast_to(self.y, batch).reshape(-1)
        t = jnp.asarray(t)
        tf = t if t.ndim == 0 else jnp.broadcast_to(t, batch).reshape(-1)
        tt = tf if t.ndim == 0 else jnp.concatenate([tf, tf])
        null = jnp.full((n,), self.null, y.dtype)
        out = self.field(tt, jnp.concatenate([xf, xf]), jnp.concatenate([y, null]))
        cond, uncond = out[:n], out[n:]
        w = self.weight.astype(out.dtype)
        return (uncond + w * (cond - uncond)).reshape(batch + (d,))


def guided(
    field: Callable[..., Array],
    y: Int[ArrayLike, "..."],
    weight: float | Float[ArrayLike, ""] = 1.0,
    *,
    null: int | None = None,
    schedule: Schedule | None = None,
) -> GuidedVelocity:
    """A conditional field with classifier-free guidance, as a velocity for ``ode`` / ``sde``.

    Args:
        field: ``(t, x, y) -> (..., d)``, e.g. ``conditional.velocity_field(coupling,
            schedule)`` or ``partial(model.apply, params)`` of a model with ``num_classes``.
        y: the labels to generate, one per point (or one for all), ints in 0..C-1.
        weight: the guidance weight w (1: the conditional field, 0: the unconditional one).
        null: the null label; default ``field.null`` (the exact conditional field has one).
        schedule: the field's schedule; default ``field.schedule`` if it has one.

    Returns:
        A ``GuidedVelocity`` ``(t, x) -> (..., d)``: ``sample.ode(guided(...), x0)``.

    Raises:
        TypeError: for a non-callable field or non-integer labels; ValueError without a null
            label.
    """
    fn = "sample.guided"
    _checks.check_callable(fn, "field", field, "a conditional field (t, x, y) -> (..., d)")
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        _checks.fail(fn, "y", "an integer array", f"dtype {y.dtype}", TypeError)
    if null is None:
        null = getattr(field, "null", None)
        if null is None:
            _checks.fail(fn, "null", "given for a field without a `null` attribute", None)
    null = _checks.check_int(fn, "null", null, 0)
    if schedule is None:
        found = getattr(field, "schedule", None)
        schedule = found if isinstance(found, Schedule) else None
    w = jnp.asarray(weight)
    if w.ndim != 0 or not jnp.issubdtype(w.dtype, jnp.number):
        _checks.fail(fn, "weight", "a real scalar", f"shape {w.shape}, dtype {w.dtype}")
    return GuidedVelocity(_solve.as_pytree(field), y, w, null, schedule)
