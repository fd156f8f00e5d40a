"""Affine interpolation schedules x_t = b_t x0 + a_t x1.

t = 0 is the source (a_0 = 0, b_0 = 1) and t = 1 the target (a_1 = 1, b_1 = 0), as in
Lipman et al. and Meta's ``flow_matching``. A schedule is called on ``t`` of any shape and
returns ``(a, b, da, db)`` of that shape, all elementwise.

Schedules are immutable pytrees without array leaves: everything they hold is static, so
they pass through ``jax.jit`` as ordinary arguments and a new schedule retraces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

__all__ = ["Schedule", "linear", "cosine", "vp", "polynomial", "custom"]

_Coeffs = tuple[Float[Array, "..."], Float[Array, "..."], Float[Array, "..."], Float[Array, "..."]]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Schedule:
    """An affine schedule: ``s(t) -> (a_t, b_t, da_t/dt, db_t/dt)``.

    Attributes:
        name: human-readable name ("linear", "cosine", ...).
        coeffs: module-level function ``(t, *params) -> (a, b, da, db)``, elementwise over ``t``.
        params: static parameters passed to ``coeffs``; equal schedules compare (and hash) equal,
            so jitted functions do not retrace for a schedule rebuilt with the same parameters.
    """

    name: str
    coeffs: Callable[..., _Coeffs] = dataclasses.field(repr=False)
    params: tuple = ()

    def __call__(self, t: Float[ArrayLike, ...]) -> _Coeffs:
        """Coefficients at time ``t`` (any shape): ``(a, b, da, db)``, each shaped like ``t``."""
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.floating):
            t = t.astype(jnp.result_type(float))
        return self.coeffs(t, *self.params)


def _linear(t):
    one = jnp.ones_like(t)
    return t, 1.0 - t, one, -one


def linear() -> Schedule:
    """Conditional-OT path: a_t = t, b_t = 1 - t."""
    return Schedule("linear", _linear)


def _cosine(t):
    h = 0.5 * jnp.pi
    return jnp.sin(h * t), jnp.cos(h * t), h * jnp.cos(h * t), -h * jnp.sin(h * t)


def cosine() -> Schedule:
    """Trigonometric path: a_t = sin(pi t / 2), b_t = cos(pi t / 2)."""
    return Schedule("cosine", _cosine)


def _polynomial(t, n):
    a = t**n
    da = n * t ** (n - 1.0)  # 0**0 = 1 gives da_0 = 1 for n = 1
    return a, 1.0 - a, da, -da


def polynomial(n: float) -> Schedule:
    """Polynomial convex path (Meta's ``PolynomialConvexScheduler``): a_t = t^n, b_t = 1 - t^n.

    Args:
        n: exponent, > 0. For n < 1 the derivative is infinite at t = 0.
    """
    n = float(n)
    if not (np.isfinite(n) and n > 0):
        raise ValueError(f"polynomial: exponent `n` must be a finite number > 0, got {n}")
    return Schedule(f"polynomial({n:g})", _polynomial, (n,))


def _vp(t, beta_min, beta_max):
    s = 1.0 - t
    big_t = beta_min * s + 0.5 * (beta_max - beta_min) * s**2
    beta = beta_min + (beta_max - beta_min) * s
    a = jnp.exp(-0.5 * big_t)
    da = 0.5 * beta * a  # d/dt exp(-T(1-t)/2) = T'(1-t)/2 * a
    b = jnp.sqrt(-jnp.expm1(-big_t))  # sqrt(1 - a^2) without cancellation near t = 1
    db = -a * da / b
    return a, b, da, db


def vp(beta_min: float = 0.1, beta_max: float = 20.0) -> Schedule:
    """Variance-preserving diffusion path of Lipman et al. (2023), in the t=0-source convention.

    a_t = alpha(1 - t), b_t = sqrt(1 - a_t^2), with alpha(s) = exp(-T(s)/2) and
    T(s) = beta_min s + (beta_max - beta_min) s^2 / 2.

    As in the paper, the path does not reach the source exactly: a_0 = exp(-T(1)/2) (about 6.6e-3
    for the defaults), and db_t -> -inf as t -> 1 (b_t ~ sqrt(beta_min (1 - t))), so velocities at
    t = 1 are infinite unless the source terms vanish; evaluate on [0, 1 - eps].

    Args:
        beta_min: noise rate at the data end, > 0.
        beta_max: noise rate at the source end, >= beta_min.
    """
    beta_min, beta_max = float(beta_min), float(beta_max)
    if not (beta_min > 0 and beta_max >= beta_min and np.isfinite(beta_max)):
        raise ValueError(
            f"vp: need 0 < beta_min <= beta_max < inf, got beta_min={beta_min}, beta_max={beta_max}"
        )

    return Schedule(f"vp({beta_min:g},{beta_max:g})", _vp, (beta_min, beta_max))


def _custom(t, a, b):
    ones = jnp.ones_like(t)
    a_t, da = jax.jvp(a, (t,), (ones,))
    b_t, db = jax.jvp(b, (t,), (ones,))
    return a_t, b_t, da, db


def custom(
    a: Callable[[Array], Array],
    b: Callable[[Array], Array],
    name: str = "custom",
    *,
    check_endpoints: bool = True,
) -> Schedule:
    """A schedule from two elementwise functions a(t), b(t); derivatives by forward-mode autodiff.

    Args:
        a: ``t -> a_t``, elementwise and differentiable (jnp operations).
        b: ``t -> b_t``, elementwise and differentiable.
        name: label used in reprs and tables.
        check_endpoints: verify a_0 = b_1 = 0 and a_1 = b_0 = 1 (to 1e-6) now.

    Raises:
        ValueError: if an endpoint condition fails or a(t), b(t) are not elementwise.
    """
    if not (callable(a) and callable(b)):
        raise ValueError("custom: `a` and `b` must be callables t -> array")

    sched = Schedule(name, _custom, (a, b))
    probe = np.asarray([0.0, 1.0])
    vals = [np.asarray(v) for v in sched(probe)]
    if any(v.shape != probe.shape for v in vals):
        raise ValueError("custom: `a` and `b` must be elementwise (output shaped like t)")
    if check_endpoints:
        got = {"a(0)": vals[0][0], "a(1)": vals[0][1], "b(0)": vals[1][0], "b(1)": vals[1][1]}
        want = {"a(0)": 0.0, "a(1)": 1.0, "b(0)": 1.0, "b(1)": 0.0}
        bad = {k: float(v) for k, v in got.items() if not abs(v - want[k]) <= 1e-6}
        if bad:
            raise ValueError(
                f"custom: endpoint conditions a(0)=b(1)=0, a(1)=b(0)=1 fail: {bad} "
                "(pass check_endpoints=False to allow)"
            )
    return sched
