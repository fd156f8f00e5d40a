"""Log-likelihood of a flow by the augmented ODE (instantaneous change of variables).

Along a trajectory of dx/dt = u_t(x), d/dt log p_t(x_t) = -div u_t(x_t). So for data x at time t,

    log p_t(x) = log p_0(x_0) - int_0^t div u_s(x_s) ds,

where x_0 is x carried back to the source. ``log_likelihood`` integrates the state and
l(s) = int_t^s div u dr backwards from t to 0 in one diffrax solve, so that
log p_t(x) = log p_0(x_0) + l(0);
``sample_and_log_prob`` integrates forwards from source samples and returns the samples with their
log-density in one pass. The divergence is exact (d forward-mode Jacobian-vector products along the
basis vectors; fine for small d) or Hutchinson's unbiased estimate E[e^T J e] with Rademacher or
Gaussian probes e drawn once per solve from an explicit key (FFJORD); the trajectory does not depend
on the probes, so the log-likelihood estimate is unbiased too. Reverse-mode gradients through the
solve (e.g. with respect to model parameters closed over by the velocity) work through diffrax's
``RecursiveCheckpointAdjoint``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from fmjax._ode import _integrate
from fmjax._sample_common import Velocity, _as_pytree, _check_time, _check_x
from fmjax.mixtures import GaussianMixture

__all__ = [
    "LikelihoodResult",
    "divergence",
    "log_likelihood",
    "sample_and_log_prob",
    "standard_normal_log_prob",
]

_METHODS = ("exact", "hutchinson")
_PROBES = ("rademacher", "gaussian")


class LikelihoodResult(NamedTuple):
    """Result of ``log_likelihood`` and ``sample_and_log_prob``.

    Attributes:
        x: the data points (``log_likelihood``: as given; ``sample_and_log_prob``: the samples).
        log_prob: log-density of ``x`` under the flow, shape (...).
        x0: the matching source points, (..., d).
        nfe: number of (batched) augmented-field evaluations, int scalar.
        num_steps: solver steps, int scalar.
    """

    x: Float[Array, "... d"]
    log_prob: Float[Array, ...]
    x0: Float[Array, "... d"]
    nfe: Int[Array, ""]
    num_steps: Int[Array, ""]


def standard_normal_log_prob(x: Float[ArrayLike, "... d"]) -> Float[Array, ...]:
    """log N(x; 0, I) for x (..., d)."""
    x = jnp.asarray(x)
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


def divergence(
    velocity: Velocity,
    t: Float[ArrayLike, ""],
    x: Float[ArrayLike, "... d"],
    *,
    method: str = "exact",
    key: PRNGKeyArray | None = None,
    probe: str = "rademacher",
    n_probes: int = 1,
) -> Float[Array, ...]:
    """Divergence of a velocity field at one time: exact (Jacobian trace) or Hutchinson.

    Args:
        velocity: ``(t, x) -> (..., d)``.
        t: scalar time.
        x: points (..., d).
        method: "exact" or "hutchinson".
        key: PRNG key of the probes (Hutchinson only).
        probe: "rademacher" or "gaussian".
        n_probes: probes per point, averaged.

    Returns:
        div u_t(x), shape (...).
    """
    x = _check_x("divergence", x, "x")
    probes = _probes("divergence", method, key, probe, n_probes, x)
    return _velocity_and_divergence(velocity, jnp.asarray(t, x.dtype), x, probes)[1]


def _probes(fn: str, method, key, probe, n_probes, x):
    if method not in _METHODS:
        raise ValueError(f"{fn}: `method` must be one of {_METHODS}, got {method!r}")
    if method == "exact":
        return None
    if key is None:
        raise ValueError(f"{fn}: `key` is required for method='hutchinson'")
    if probe not in _PROBES:
        raise ValueError(f"{fn}: `probe` must be one of {_PROBES}, got {probe!r}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"{fn}: `n_probes` must be a positive int, got {n_probes!r}")
    shape = (n_probes,) + x.shape
    if probe == "rademacher":
        return jax.random.rademacher(key, shape, x.dtype)
    return jax.random.normal(key, shape, x.dtype)


def _source_log_prob(fn: str, source) -> Callable[[Array], Array]:
    if source is None:
        return standard_normal_log_prob
    if isinstance(source, GaussianMixture):
        return source.log_prob
    if callable(source):
        return source
    raise ValueError(
        f"{fn}: `source_log_prob` must be None (N(0, I)), a GaussianMixture or a callable "
        f"x (..., d) -> (...), got {source!r}"
    )


class _AugArgs(NamedTuple):
    velocity: Velocity
    probes: Array | None


def _augmented_field(t, y, args: _AugArgs):
    x, _ = y
    u, div = _velocity_and_divergence(args.velocity, t, x, args.probes)
    return u, div


def _solve(fn, velocity, x, t_from, t_to, method, key, probe, n_probes, solve_kw):
    x = _check_x(fn, x, "x")
    if not callable(velocity):
        raise ValueError(f"{fn}: `velocity` must be a callable (t, x) -> x-shaped")
    probes = _probes(fn, method, key, probe, n_probes, x)
    y0 = (x, jnp.zeros(x.shape[:-1], x.dtype))
    (x_end, l_end), _, _, nfe, num_steps = _integrate(
        fn,
        _augmented_field,
        y0,
        _AugArgs(_as_pytree(velocity), probes),
        t0=t_from,
        t1=t_to,
        save_ts=None,
        **solve_kw,
    )
    return x_end, l_end, nfe, num_steps


def log_likelihood(
    velocity: Velocity,
    x: Float[ArrayLike, "... d"],
    *,
    t: float = 1.0,
    method: str = "exact",
    key: PRNGKeyArray | None = None,
    probe: str = "rademacher",
    n_probes: int = 1,
    source_log_prob: GaussianMixture | Callable[[Array], Array] | None = None,
    solver: str = "tsit5",
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
) -> LikelihoodResult:
    """log p_t(x) under the flow of ``velocity``, by one backward solve of the augmented ODE.

    Args:
        velocity: ``(t, x) -> (..., d)``.
        x: data points (..., d) at time ``t``.
        t: time of the data (default 1, the target).
        method: "exact" divergence (d JVPs, for small d) or "hutchinson" (one JVP per probe).
        key: PRNG key of the Hutchinson probes (drawn once per solve, per point).
        probe: "rademacher" or "gaussian".
        n_probes: Hutchinson probes per point, averaged at each evaluation.
        source_log_prob: log p_0: None for N(0, I), a GaussianMixture, or ``x -> (...)``.
        solver, steps, rtol, atol, max_steps, adjoint: as in ``fmjax.sample.ode`` (adaptive
            Tsit5 by default; the error control covers the log-density too).

    Returns:
        ``LikelihoodResult(x, log_prob, x0, nfe, num_steps)``.

    Raises:
        ValueError: naming the argument, for bad method, probes, key, solver or shapes.
    """
    fn = "log_likelihood"
    t = _check_time(fn, "t", t)
    log_p0 = _source_log_prob(fn, source_log_prob)
    x = _check_x(fn, x, "x")
    solve_kw = dict(
        solver=solver, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps, adjoint=adjoint
    )
    x0, l0, nfe, num_steps = _solve(fn, velocity, x, t, 0.0, method, key, probe, n_probes, solve_kw)
    # l(0) = int_t^0 div = -int_0^t div, so log p_t(x) = log p_0(x_0) + l(0).
    return LikelihoodResult(x, log_p0(x0) + l0, x0, nfe, num_steps)


def sample_and_log_prob(
    velocity: Velocity,
    x0: Float[ArrayLike, "... d"],
    *,
    t: float = 1.0,
    method: str = "exact",
    key: PRNGKeyArray | None = None,
    probe: str = "rademacher",
    n_probes: int = 1,
    source_log_prob: GaussianMixture | Callable[[Array], Array] | None = None,
    solver: str = "tsit5",
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
) -> LikelihoodResult:
    """Push source samples forward to time ``t`` and return them with their log p_t, in one solve.

    Args:
        velocity: ``(t, x) -> (..., d)``.
        x0: source samples (..., d), e.g. from ``fmjax.sample.draw_source``.
        t: end time (default 1).
        Others: as in ``log_likelihood``.

    Returns:
        ``LikelihoodResult(x, log_prob, x0, nfe, num_steps)`` with ``x`` the samples at ``t``.
    """
    fn = "sample_and_log_prob"
    t = _check_time(fn, "t", t)
    log_p0 = _source_log_prob(fn, source_log_prob)
    x0 = _check_x(fn, x0, "x0")
    solve_kw = dict(
        solver=solver, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps, adjoint=adjoint
    )
    x1, l1, nfe, num_steps = _solve(
        fn, velocity, x0, 0.0, t, method, key, probe, n_probes, solve_kw
    )
    # l(t) = int_0^t div, so log p_t(x_t) = log p_0(x_0) - l(t).
    return LikelihoodResult(x1, log_p0(x0) - l1, x0, nfe, num_steps)
