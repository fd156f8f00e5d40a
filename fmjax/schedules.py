"""Affine interpolation schedules x_t = b_t x0 + a_t x1.

t = 0 is the source (a_0 = 0, b_0 = 1) and t = 1 the target (a_1 = 1, b_1 = 0), as in
Lipman et al. and Meta's ``flow_matching``. A schedule is called on ``t`` of any shape and
returns ``(a, b, da, db)`` of that shape, all elementwise.

Every schedule carries its valid interval ``[t_min, t_max]``: the closed set of times on which its
coefficients, and so the exact velocity and score, are finite. Most are valid on [0, 1]; ``vp`` is
singular at t = 1 (db_t -> -inf) and stops at 1 - eps. Sampling, likelihood, the time samplers of
the losses, metrics and the CLI take their default times from it, and the exact engine refuses
concrete times outside it instead of returning NaNs.

Schedules are immutable pytrees without array leaves: everything they hold is static, so
they pass through ``jax.jit`` as ordinary arguments; equal schedules hash equal (no retrace).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from fmjax import _checks

__all__ = [
    "Schedule",
    "Noise",
    "linear",
    "cosine",
    "vp",
    "polynomial",
    "custom",
    "sigma_min_schedule",
    "brownian",
    "bsquared",
    "sinesquared",
    "custom_noise",
    "trig",
]

_Coeffs = tuple[Float[Array, "..."], Float[Array, "..."], Float[Array, "..."], Float[Array, "..."]]
_NoiseCoeffs = tuple[Float[Array, "..."], Float[Array, "..."], Float[Array, "..."]]

# Slack when comparing a time with an interval end: float32(0.999) > 0.999 in float64.
_SLACK = 4 * float(np.finfo(np.float32).eps)
# A custom schedule with max(|a_t|, |b_t|) at or below this on its interval is refused.
_DEGENERATE = 1e-12


def _check_interval(fn: str, interval) -> tuple[float, float]:
    try:
        lo, hi = interval
    except (TypeError, ValueError):
        _checks.fail(fn, "interval", "a pair (t_min, t_max)", interval, TypeError)
    lo, hi = _checks.as_float(fn, "interval", lo), _checks.as_float(fn, "interval", hi)
    if not (0.0 <= lo < hi <= 1.0):
        _checks.fail(fn, "interval", "a pair 0 <= t_min < t_max <= 1", (lo, hi))
    return lo, hi


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Schedule:
    """An affine schedule: ``s(t) -> (a_t, b_t, da_t/dt, db_t/dt)``.

    Attributes:
        name: human-readable name ("linear", "cosine", ...).
        coeffs: module-level function ``(t, *params) -> (a, b, da, db)``, elementwise over ``t``.
        params: static parameters passed to ``coeffs``; equal schedules compare (and hash) equal,
            so jitted functions do not retrace for a schedule rebuilt with the same parameters.
        interval: ``(t_min, t_max)``, the closed interval of times where the coefficients and
            their derivatives are finite; defaults of sampling, likelihood, losses and metrics.
        noise: the latent-noise term gamma_t of a stochastic interpolant
            x_t = b_t x0 + a_t x1 + gamma_t z (``None``: gamma = 0, a deterministic interpolant).
            Add one with ``schedule.with_noise(noise)``.
    """

    name: str
    coeffs: Callable[..., _Coeffs] = dataclasses.field(repr=False)
    params: tuple = ()
    interval: tuple[float, float] = (0.0, 1.0)
    noise: Noise | None = None

    def __post_init__(self):
        object.__setattr__(self, "interval", _check_interval("schedules.Schedule", self.interval))
        if self.noise is not None and not isinstance(self.noise, Noise):
            _checks.fail(
                "schedules.Schedule", "noise", "None or a schedules.Noise", self.noise, TypeError
            )

    @property
    def has_noise(self) -> bool:
        """Whether the interpolant carries a latent-noise term gamma_t z (static)."""
        return self.noise is not None

    def with_noise(self, noise: Noise | None) -> Schedule:
        """This schedule with latent noise gamma_t z added (or removed, for ``None``).

        The name becomes ``"<schedule>+<noise>"``; equal schedules with equal noise hash equal.
        """
        if noise is not None and not isinstance(noise, Noise):
            _checks.fail("schedules.Schedule.with_noise", "noise", "a schedules.Noise", noise,
                         TypeError)  # fmt: skip
        base = self.name.split("+", 1)[0] if self.noise is not None else self.name
        name = base if noise is None else f"{base}+{noise.name}"
        return dataclasses.replace(self, name=name, noise=noise)

    def gamma(self, t: Float[ArrayLike, "..."]) -> _NoiseCoeffs:
        """Latent-noise coefficients at ``t``: ``(gamma, dgamma, gamma * dgamma)``, each shaped
        like ``t``; zeros without noise.

        The exact quantities use only gamma^2 and gamma * dgamma, which stay finite at t = 0, 1
        (for ``brownian``, dgamma itself is infinite there): use the product, never dgamma.
        """
        t = _checks.check_real_array("schedules.Schedule.gamma", "t", t, any_float=True)
        if self.noise is None:
            zero = jnp.zeros_like(t)
            return zero, zero, zero
        return self.noise(t)

    @property
    def t_min(self) -> float:
        """Start of the valid interval."""
        return self.interval[0]

    @property
    def t_max(self) -> float:
        """End of the valid interval."""
        return self.interval[1]

    def contains(self, t: ArrayLike) -> bool:
        """True when every (concrete) time in ``t`` lies in the valid interval (float32 slack)."""
        t = np.asarray(t, np.float64)
        return bool(np.all((t >= self.t_min - _SLACK) & (t <= self.t_max + _SLACK)))

    def check_times(self, fn: str, name: str, t: ArrayLike) -> None:
        """Raise ``ValueError`` naming ``fn`` and ``name`` if concrete ``t`` leaves the interval.

        Traced times are not checked (validation never runs under a trace).
        """
        if not _checks.is_concrete(t):
            return
        if not self.contains(t):
            arr = np.asarray(t, np.float64)
            got = float(arr.min() if arr.min() < self.t_min else arr.max())
            _checks.fail(
                fn,
                name,
                f"in [{self.t_min:g}, {self.t_max:g}], the valid interval of {self.name}",
                got,
            )
        self.check_coefficients(fn, name, t)

    def check_coefficients(self, fn: str, name: str, t: ArrayLike, what: str | None = None) -> None:
        """Raise ``ValueError`` naming ``name`` where, at the concrete times ``t``, a
        coefficient (a, b, their derivatives, gamma, gamma * dgamma) is not finite, or
        a_t = b_t = gamma_t = 0 (x_t collapses to a point).

        The grids that ``custom``, ``custom_noise`` and ``trig`` check at construction can miss a
        singular time between their points; this catches it where it is used (one evaluation of
        the coefficients at the times of an eager call). Traced times are not checked. ``what``
        replaces the "must be ..." text.
        """
        if not _checks.is_concrete(t):
            return
        t = np.asarray(t)
        t = t.astype(np.result_type(t.dtype, np.float32)) if t.dtype.kind != "f" else t
        coeffs, noise = self(t), self.gamma(t)
        if not _checks.is_concrete(coeffs, noise):  # concrete t inside an outer jit: staged
            return
        a, b, da, db = (np.asarray(v, np.float64) for v in coeffs)
        g, _, g_dg = (np.asarray(v, np.float64) for v in noise)
        finite = np.isfinite(a) & np.isfinite(b) & np.isfinite(da) & np.isfinite(db)
        finite &= np.isfinite(g) & np.isfinite(g_dg)
        collapsed = np.maximum(np.maximum(np.abs(a), np.abs(b)), np.abs(g)) <= _DEGENERATE
        bad = ~finite | collapsed
        if np.any(bad):
            flat = np.broadcast_to(t, bad.shape).ravel()
            at = float(flat[int(np.argmax(bad.ravel()))])
            why = "a non-finite coefficient" if not np.all(finite) else "a_t = b_t = gamma_t = 0"
            if what is None:
                what = (
                    f"a time where the coefficients of {self.name} are finite and a_t, b_t, "
                    "gamma_t not all zero"
                )
            _checks.fail(fn, name, what, f"t = {at:.9g} ({why} there)")

    def __call__(self, t: Float[ArrayLike, "..."]) -> _Coeffs:
        """Coefficients at time ``t`` (any shape): ``(a, b, da, db)``, each shaped like ``t``."""
        t = _checks.check_real_array("schedules.Schedule", "t", t, any_float=True)
        return self.coeffs(t, *self.params)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Noise:
    """Latent noise gamma_t of a stochastic interpolant: ``noise(t) -> (gamma, dgamma, g_dg)``.

    g_dg = gamma * dgamma; gamma_0 = gamma_1 = 0, gamma_t >= 0. Static, hashable like ``Schedule``.

    Attributes:
        name: human-readable name ("brownian(1)", ...).
        fn: module-level function ``(t, *params) -> (gamma, dgamma, gamma * dgamma)``,
            elementwise; the product is computed in a form that stays finite at the ends.
        params: static parameters passed to ``fn``.
    """

    name: str
    fn: Callable[..., _NoiseCoeffs] = dataclasses.field(repr=False)
    params: tuple = ()

    def __call__(self, t: Float[ArrayLike, "..."]) -> _NoiseCoeffs:
        """``(gamma, dgamma, gamma * dgamma)`` at ``t`` (any shape), each shaped like ``t``."""
        t = _checks.check_real_array("schedules.Noise", "t", t, any_float=True)
        return self.fn(t, *self.params)


def _brownian(t, sigma):
    u = t * (1.0 - t)
    g = sigma * jnp.sqrt(u)
    # dgamma = sigma (1 - 2t) / (2 sqrt(t (1 - t))) is infinite at the ends; the product is not.
    dg = sigma * (1.0 - 2.0 * t) / (2.0 * jnp.sqrt(u))
    return g, dg, 0.5 * sigma * sigma * (1.0 - 2.0 * t)


def brownian(sigma: float = 1.0) -> Noise:
    """Brownian-bridge noise gamma_t = sigma sqrt(t (1 - t)) (the Schrodinger-bridge interpolant).

    dgamma is infinite at t = 0 and 1; gamma * dgamma = sigma^2 (1 - 2t) / 2 is finite.

    Args:
        sigma: noise scale, > 0.

    Returns:
        the ``Noise``, for ``schedule.with_noise(...)`` or ``trig(...)``.
    """
    sigma = _checks.check_positive("schedules.brownian", "sigma", sigma)
    return Noise(f"brownian({sigma:g})", _brownian, (sigma,))


def _bsquared(t, scale):
    g = scale * t * (1.0 - t)
    dg = scale * (1.0 - 2.0 * t)
    return g, dg, g * dg


def bsquared(scale: float = 1.0) -> Noise:
    """Noise gamma_t = scale * t (1 - t) (smooth at the ends).

    Args:
        scale: noise scale, > 0.

    Returns:
        the ``Noise``, for ``schedule.with_noise(...)`` or ``trig(...)``.
    """
    scale = _checks.check_positive("schedules.bsquared", "scale", scale)
    return Noise(f"bsquared({scale:g})", _bsquared, (scale,))


def _sinesquared(t, scale):
    g = scale * jnp.sin(jnp.pi * t) ** 2
    dg = scale * jnp.pi * jnp.sin(2.0 * jnp.pi * t)
    return g, dg, g * dg


def sinesquared(scale: float = 1.0) -> Noise:
    """Noise gamma_t = scale * sin^2(pi t).

    Args:
        scale: noise scale, > 0.

    Returns:
        the ``Noise``, for ``schedule.with_noise(...)`` or ``trig(...)``.
    """
    scale = _checks.check_positive("schedules.sinesquared", "scale", scale)
    return Noise(f"sinesquared({scale:g})", _sinesquared, (scale,))


def _custom_noise(t, gamma):
    g, dg = jax.jvp(gamma, (t,), (jnp.ones_like(t),))
    return g, dg, g * dg


def custom_noise(gamma: Callable[[Array], Array], name: str = "custom_noise") -> Noise:
    """Noise from an elementwise, differentiable function gamma(t) with finite derivative.

    Checked now on a grid of [0, 1]: gamma_0 = gamma_1 = 0 (to 1e-6), gamma >= 0, and gamma and
    its derivative finite. (For a derivative infinite at the ends, as Brownian noise has, write
    a ``Noise`` whose function returns the finite product gamma * dgamma.)

    Args:
        gamma: ``t -> gamma_t``, elementwise and differentiable (jnp operations).
        name: label used in reprs and tables.

    Returns:
        the ``Noise``, for ``schedule.with_noise(...)`` or ``trig(...)``.

    Raises:
        TypeError: if ``gamma`` is not callable.
        ValueError: if one of the conditions above fails (the time is named).
    """
    _checks.check_callable("schedules.custom_noise", "gamma", gamma, "a callable t -> gamma_t")
    noise = Noise(name, _custom_noise, (gamma,))
    grid = np.unique(np.concatenate([np.linspace(0, 1, 1025), np.linspace(0, 1, 1001)]))
    g, dg, _ = (np.asarray(v, np.float64) for v in noise(grid))
    if g.shape != grid.shape:
        _checks.fail("schedules.custom_noise", "gamma", "elementwise (output shaped like t)",
                     g.shape)  # fmt: skip
    bad = ~(np.isfinite(g) & np.isfinite(dg))
    if np.any(bad):
        _checks.fail("schedules.custom_noise", "gamma", "finite with a finite derivative on [0, 1]",
                     f"not finite at t={grid[np.argmax(bad)]:g}")  # fmt: skip
    if abs(g[0]) > 1e-6 or abs(g[-1]) > 1e-6:
        _checks.fail("schedules.custom_noise", "gamma", "zero at t = 0 and t = 1",
                     f"gamma(0)={g[0]:g}, gamma(1)={g[-1]:g}")  # fmt: skip
    if np.any(g < -1e-12):
        _checks.fail("schedules.custom_noise", "gamma", "nonnegative",
                     f"gamma={g.min():g} at t={grid[np.argmin(g)]:g}")  # fmt: skip
    return noise


def _trig(t, noise):
    g, _, g_dg = noise(t)
    h = 0.5 * jnp.pi
    r = jnp.sqrt(1.0 - g * g)
    dr = -g_dg / r  # d/dt sqrt(1 - gamma^2), finite wherever gamma * dgamma is
    s, c = jnp.sin(h * t), jnp.cos(h * t)
    return r * s, r * c, dr * s + r * h * c, dr * c - r * h * s


def trig(noise: Noise) -> Schedule:
    """The "trig" stochastic interpolant of Albergo, Boffi & Vanden-Eijnden, with noise gamma_t z:
    a_t = sqrt(1 - gamma_t^2) sin(pi t / 2), b_t = sqrt(1 - gamma_t^2) cos(pi t / 2).

    Args:
        noise: the latent noise gamma_t, with gamma_t < 1 on [0, 1] (checked on a grid).

    Returns:
        the ``Schedule`` with ``noise``, valid on [0, 1].

    Raises:
        TypeError: if ``noise`` is not a ``schedules.Noise``.
        ValueError: if gamma_t >= 1 somewhere on [0, 1].
    """
    _checks.check_instance("schedules.trig", "noise", noise, Noise, "a schedules.Noise")
    grid = np.linspace(0.0, 1.0, 1025)
    g = np.asarray(noise(grid)[0], np.float64)
    if np.any(g >= 1.0):
        _checks.fail("schedules.trig", "noise", "gamma_t < 1 on [0, 1]",
                     f"gamma={g.max():g} at t={grid[np.argmax(g)]:g}")  # fmt: skip
    return Schedule(f"trig+{noise.name}", _trig, (noise,), noise=noise)


def _linear(t):
    one = jnp.ones_like(t)
    return t, 1.0 - t, one, -one


def linear() -> Schedule:
    """Conditional-OT path: a_t = t, b_t = 1 - t.

    Returns:
        the ``Schedule``, valid on [0, 1].

    Example:
        >>> s = linear()
        >>> [float(v) for v in s(0.25)]  # a_t, b_t, da_t, db_t
        [0.25, 0.75, 1.0, -1.0]
        >>> s.interval
        (0.0, 1.0)
    """
    return Schedule("linear", _linear)


def _cosine(t):
    h = 0.5 * jnp.pi
    return jnp.sin(h * t), jnp.cos(h * t), h * jnp.cos(h * t), -h * jnp.sin(h * t)


def cosine() -> Schedule:
    """Trigonometric path: a_t = sin(pi t / 2), b_t = cos(pi t / 2).

    Returns:
        the ``Schedule``, valid on [0, 1].
    """
    return Schedule("cosine", _cosine)


def _polynomial(t, n):
    a = t**n
    da = n * t ** (n - 1.0)  # 0**0 = 1 gives da_0 = 1 for n = 1
    return a, 1.0 - a, da, -da


def polynomial(n: float, *, eps: float = 1e-3) -> Schedule:
    """Polynomial convex path (Meta's ``PolynomialConvexScheduler``): a_t = t^n, b_t = 1 - t^n.

    Args:
        n: exponent, > 0. For n < 1 the derivative is infinite at t = 0, so the valid interval
            starts at ``eps``.
        eps: start of the valid interval when n < 1 (ignored for n >= 1), in (0, 1).

    Returns:
        the ``Schedule``, valid on [0, 1] (n >= 1) or [eps, 1] (n < 1).
    """
    n = _checks.check_positive("schedules.polynomial", "n", n)
    eps = _checks.check_positive("schedules.polynomial", "eps", eps)
    if eps >= 1:
        _checks.fail("schedules.polynomial", "eps", "in (0, 1)", eps)
    interval = (0.0, 1.0) if n >= 1 else (eps, 1.0)
    return Schedule(f"polynomial({n:g})", _polynomial, (n,), interval)


def _vp(t, beta_min, beta_max):
    s = 1.0 - t
    big_t = beta_min * s + 0.5 * (beta_max - beta_min) * s**2
    beta = beta_min + (beta_max - beta_min) * s
    a = jnp.exp(-0.5 * big_t)
    da = 0.5 * beta * a  # d/dt exp(-T(1-t)/2) = T'(1-t)/2 * a
    b = jnp.sqrt(-jnp.expm1(-big_t))  # sqrt(1 - a^2) without cancellation near t = 1
    db = -a * da / b
    return a, b, da, db


def vp(beta_min: float = 0.1, beta_max: float = 20.0, *, eps: float = 1e-3) -> Schedule:
    """Variance-preserving diffusion path of Lipman et al. (2023), in the t=0-source convention.

    a_t = alpha(1 - t), b_t = sqrt(1 - a_t^2), with alpha(s) = exp(-T(s)/2) and
    T(s) = beta_min s + (beta_max - beta_min) s^2 / 2.

    As in the paper, the path does not reach the source exactly: a_0 = exp(-T(1)/2) (about 6.6e-3
    for the defaults), and db_t -> -inf as t -> 1 (b_t ~ sqrt(beta_min (1 - t))), so velocities at
    t = 1 are infinite unless the source terms vanish: the valid interval is [0, 1 - eps].

    Args:
        beta_min: noise rate at the data end, > 0.
        beta_max: noise rate at the source end, >= beta_min.
        eps: distance of the interval's end from the singular t = 1, in (0, 1).

    Returns:
        the ``Schedule``, valid on [0, 1 - eps].
    """
    beta_min = _checks.check_positive("schedules.vp", "beta_min", beta_min)
    beta_max = _checks.check_positive("schedules.vp", "beta_max", beta_max)
    if beta_max < beta_min:
        _checks.fail("schedules.vp", "beta_max", f">= beta_min={beta_min:g}", beta_max)
    eps = _checks.check_positive("schedules.vp", "eps", eps)
    if eps >= 1:
        _checks.fail("schedules.vp", "eps", "in (0, 1)", eps)
    name = (
        f"vp({beta_min:g},{beta_max:g})"
        if eps == 1e-3
        else f"vp({beta_min:g},{beta_max:g},{eps:g})"
    )
    return Schedule(name, _vp, (beta_min, beta_max), (0.0, 1.0 - eps))


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
    interval: tuple[float, float] = (0.0, 1.0),
    check_endpoints: bool = True,
) -> Schedule:
    """A schedule from two elementwise functions a(t), b(t); derivatives by forward-mode autodiff.

    Args:
        a: ``t -> a_t``, elementwise and differentiable (jnp operations).
        b: ``t -> b_t``, elementwise and differentiable.
        name: label used in reprs and tables.
        interval: ``(t_min, t_max)`` where a, b and their derivatives are finite (a schedule
            singular at an end stops short of it); checked on a grid now.
        check_endpoints: verify a_0 = b_1 = 0 and a_1 = b_0 = 1 (to 1e-6) now.

    Returns:
        the ``Schedule`` named ``name``, valid on ``interval``.

    Raises:
        TypeError: if ``a`` or ``b`` is not callable.
        ValueError: if an endpoint condition fails, a(t), b(t) are not elementwise, the
            coefficients are not finite on ``interval``, or a_t = b_t = 0 at some t of it
            (checked on a grid of ~2000 times, endpoints included).
    """
    _checks.check_callable("schedules.custom", "a", a, "a callable t -> a_t")
    _checks.check_callable("schedules.custom", "b", b, "a callable t -> b_t")
    interval = _check_interval("schedules.custom", interval)
    sched = Schedule(name, _custom, (a, b), interval)
    probe = np.asarray([0.0, 1.0])
    vals = [np.asarray(v) for v in sched(probe)]
    if any(v.shape != probe.shape for v in vals):
        _checks.fail("schedules.custom", "a", "elementwise (output shaped like t)", vals[0].shape)
    # 1025 dyadic and 1001 decimal points: catches singular or degenerate times such as 0.5, 0.3.
    grid = np.unique(np.concatenate([np.linspace(*interval, 1025), np.linspace(*interval, 1001)]))
    coeffs = [np.asarray(v, np.float64) for v in sched(grid)]
    finite = np.all([np.isfinite(v) for v in coeffs], axis=0)
    for label, values in (("a", coeffs[0]), ("b", coeffs[1])):  # never finite: name the function
        if not np.any(np.isfinite(values)):
            _checks.fail("schedules.custom", label, f"a callable with finite {label}(t) on "
                         f"{interval}", "not finite anywhere on it")  # fmt: skip
    if not np.all(finite):
        _checks.fail(
            "schedules.custom",
            "interval",
            "a range where a, b and their derivatives are finite",
            f"{interval} (not finite at t={grid[np.argmin(finite)]:g})",
        )
    # a_t = b_t = 0 collapses x_t to a point: the path's density, velocity and score are NaN.
    degenerate = np.maximum(np.abs(coeffs[0]), np.abs(coeffs[1])) <= _DEGENERATE
    if np.any(degenerate):
        _checks.fail(
            "schedules.custom",
            "b",
            f"nonzero where a is zero (max(|a_t|, |b_t|) > {_DEGENERATE:g} on {interval})",
            f"a_t = b_t = 0 at t={grid[np.argmax(degenerate)]:g}",
        )
    if check_endpoints:
        got = {"a(0)": vals[0][0], "a(1)": vals[0][1], "b(0)": vals[1][0], "b(1)": vals[1][1]}
        want = {"a(0)": 0.0, "a(1)": 1.0, "b(0)": 1.0, "b(1)": 0.0}
        bad = {k: float(v) for k, v in got.items() if not abs(v - want[k]) <= 1e-6}
        if bad:
            raise ValueError(
                f"schedules.custom: endpoint conditions a(0)=b(1)=0, a(1)=b(0)=1 fail: {bad} "
                "(pass check_endpoints=False to allow)"
            )
    return sched


def _sigma_min_coeffs(t, sigma_min):
    one = jnp.ones_like(t)
    return t, 1.0 - (1.0 - sigma_min) * t, one, -(1.0 - sigma_min) * one


def sigma_min_schedule(sigma_min: float) -> Schedule:
    """Lipman et al.'s OT path with a floor: a_t = t, b_t = 1 - (1 - sigma_min) t (b_1 = sigma_min).

    The conditional velocity is x1 - (1 - sigma_min) x0. With a Gaussian source this is the
    path N(t x1, (1 - (1 - sigma_min) t)^2 I) of the paper; sigma_min = 0 is ``linear()``.

    Args:
        sigma_min: b_1, in [0, 1).

    Returns:
        the ``Schedule``, valid on [0, 1].
    """
    sigma_min = _checks.as_float("schedules.sigma_min_schedule", "sigma_min", sigma_min)
    if not 0.0 <= sigma_min < 1.0:
        _checks.fail("schedules.sigma_min_schedule", "sigma_min", "in [0, 1)", sigma_min)
    return Schedule(f"sigma_min({sigma_min:g})", _sigma_min_coeffs, (sigma_min,))
