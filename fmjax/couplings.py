"""Couplings of two Gaussian mixtures with closed-form exact quantities: independent, optimal
transport (Gaussian and mixture-Wasserstein), entropic optimal transport and Schrodinger bridges.

Each constructor returns a ``JointGaussianMixture`` (inside a NamedTuple with what else it
knows: the plan between components, the cost), so every quantity of ``fmjax.exact`` (velocity,
score, log p_t, divergence) is available for it. Deterministic couplings x1 = T(x0) have a
singular (rank d) joint covariance; ``JointGaussianMixture`` accepts them, and ``check_path``
tells whether the path covariance S_t stays positive definite on a schedule's interval.

Labels: built from a labelled target (``p1.labels``), a coupling is labelled too: each of its
components pairs a source component with a target component j and carries j's class, as
``independent_coupling`` does, so ``fmjax.conditional`` applies to every coupling here (the
class-y target marginal is the target's class-y sub-mixture).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fmjax import _checks
from fmjax import schedules as _schedules
from fmjax.mixtures import GaussianMixture, JointGaussianMixture, independent_coupling

__all__ = [
    "OTCoupling",
    "SchrodingerBridge",
    "independent_coupling",
    "gaussian_w2",
    "gaussian_ot",
    "mixture_ot",
    "gaussian_entropic_ot",
    "schrodinger_bridge",
    "transport_cost",
    "check_path",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class OTCoupling(NamedTuple):
    """A coupling with its plan between components and its transport cost.

    Attributes:
        coupling: the joint mixture; component k pairs source component i_k with target
            component j_k, the nonzero entries of ``plan`` in row-major order (labelled with
            the class of j_k when the target is labelled).
        plan: (K0, K1) mass moved from source component i to target component j (rows sum to
            the source weights, columns to the target weights).
        cost: E|X1 - X0|^2 under the coupling (for optimal transport: W2^2, resp. MW2^2).
    """

    coupling: JointGaussianMixture
    plan: Float[Array, "K0 K1"]
    cost: Float[Array, ""]


class SchrodingerBridge(NamedTuple):
    """The static coupling and the interpolant of a Schrodinger bridge.

    Attributes:
        coupling: the entropic-OT coupling of the end points (a joint mixture).
        schedule: ``schedules.linear().with_noise(schedules.brownian(sigma))``, i.e.
            x_t = (1 - t) x0 + t x1 + sigma sqrt(t (1 - t)) z; with ``coupling`` it gives the
            bridge's marginals p_t, its probability-flow velocity and its score via
            ``fmjax.exact``.
    """

    coupling: JointGaussianMixture
    schedule: _schedules.Schedule


# ----------------------------------------------------------------------------- Gaussian algebra


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _t(a):
    return jnp.swapaxes(a, -1, -2)


def _sym(a):
    return 0.5 * (a + _t(a))


@jax.jit
def _pair_terms(s0, s1, sigma):
    """For SPD s0, s1 (..., d, d): the cross-covariance Cov(X0, X1) of the (entropic) optimal
    coupling and tr (s0^{1/2} s1 s0^{1/2})^{1/2}.

    With M = s0^{1/2} s1 s0^{1/2} = U diag(mu) U^T, the entropic cross-covariance of Janati et al.
    (2020), C = 1/2 s0^{1/2} (4 M + sigma^4 I)^{1/2} s0^{-1/2} - sigma^2 / 2 I, is written as
    C = s0^{1/2} U diag(2 mu / (sqrt(4 mu + sigma^4) + sigma^2)) U^T s0^{-1/2}: no cancellation
    for large sigma, and sigma = 0 gives s0^{1/2} M^{1/2} s0^{-1/2} = s0 A with A the Bures map.
    """
    lam, v = jnp.linalg.eigh(s0)
    lam = jnp.maximum(lam, jnp.finfo(lam.dtype).tiny)
    r = _mm(v * jnp.sqrt(lam)[..., None, :], _t(v))  # s0^{1/2}
    ri = _mm(v / jnp.sqrt(lam)[..., None, :], _t(v))  # s0^{-1/2}
    mu, u = jnp.linalg.eigh(_sym(_mm(_mm(r, s1), r)))
    mu = jnp.maximum(mu, 0.0)
    s4 = sigma**4
    f = 2.0 * mu / (jnp.sqrt(4.0 * mu + s4) + sigma**2)
    f = jnp.where(mu > 0, f, 0.0)
    inner = _mm(u * f[..., None, :], _t(u))
    cross = _mm(_mm(r, inner), ri)
    return cross, jnp.sum(jnp.sqrt(mu), axis=-1)


@jax.jit
def _bures(m0, s0, m1, s1):
    """W2^2 between N(m0, s0) and N(m1, s1) (broadcast over leading axes) and the OT
    cross-covariance s0 A (A the symmetric Bures map)."""
    cross, tr_root = _pair_terms(s0, s1, jnp.zeros((), s0.dtype))
    w2 = (
        jnp.sum((m0 - m1) ** 2, axis=-1)
        + jnp.trace(s0, axis1=-2, axis2=-1)
        + jnp.trace(s1, axis1=-2, axis2=-1)
        - 2.0 * tr_root
    )
    return jnp.maximum(w2, 0.0), cross


@functools.partial(jax.jit, static_argnames="exact_ot")
def _joint(weights, m0, s0, m1, s1, cross, exact_ot: bool) -> JointGaussianMixture:
    """Joint mixture with blocks [[s0, cross], [cross^T, s1]] per component."""
    if exact_ot:
        # S01 = S0 A with A symmetric: rebuild it from A = S0^{-1} S01 symmetrised so that the
        # joint's rank-d structure holds to rounding, S10 = A S0 = S01^T.
        a = _sym(jnp.linalg.solve(s0, cross))
        cross = _mm(s0, a)
    top = jnp.concatenate([s0, cross], axis=-1)
    bottom = jnp.concatenate([_t(cross), s1], axis=-1)
    covs = jnp.concatenate([top, bottom], axis=-2)
    means = jnp.concatenate([m0, m1], axis=-1)
    structure = "map" if exact_ot else "general"  # each component x1 = m1 + A (x0 - m0)
    return JointGaussianMixture._from_leaves(weights, means, covs, structure=structure)


def _with_labels(c: JointGaussianMixture, labels) -> JointGaussianMixture:
    """``c`` with the class labels ``labels`` (K,) as static metadata (``c`` as is for None)."""
    if labels is None:
        return c
    return JointGaussianMixture._from_leaves(
        c.weights, c.means, c.covs, structure=c.structure, labels=labels
    )


def _labelled(c: JointGaussianMixture, p1: GaussianMixture, target_index) -> JointGaussianMixture:
    """``c`` labelled with the classes of its target components ``target_index`` (K,) in ``p1``
    (``c`` as is when ``p1`` is unlabelled)."""
    if p1.labels is None:
        return c
    labels = tuple(int(v) for v in np.asarray(p1.labels)[np.asarray(target_index)])
    return _with_labels(c, labels)


# ----------------------------------------------------------------------------- checks


def _check_pair(fn: str, p0, p1, single: bool):
    for name, p in (("p0", p0), ("p1", p1)):
        _checks.check_instance(fn, name, p, GaussianMixture, "a GaussianMixture")
        if single and p.n_components != 1:
            _checks.fail(
                fn,
                name,
                "a one-component GaussianMixture (for mixtures use couplings.mixture_ot or "
                "couplings.schrodinger_bridge)",
                f"{p.n_components} components",
            )
    if p0.dim != p1.dim:
        _checks.fail(fn, "p1", f"of the dimension of `p0` ({p0.dim})", f"dim {p1.dim}")
    return jnp.result_type(p0.weights, p0.means, p0.covs, p1.weights, p1.means, p1.covs)


def _check_sigma(fn: str, sigma) -> float:
    return _checks.check_positive(fn, "sigma", sigma)


# ----------------------------------------------------------------------------- public


def gaussian_w2(p0: GaussianMixture, p1: GaussianMixture) -> Float[Array, ""]:
    """Squared 2-Wasserstein distance between two Gaussians (the Bures-Wasserstein formula).

    W2^2 = |m0 - m1|^2 + tr S0 + tr S1 - 2 tr (S0^{1/2} S1 S0^{1/2})^{1/2}.

    Args:
        p0, p1: one-component ``GaussianMixture``s of the same dimension.

    Returns:
        W2^2, a scalar.
    """
    _check_pair("couplings.gaussian_w2", p0, p1, single=True)
    w2, _ = _bures(p0.means[0], p0.covs[0], p1.means[0], p1.covs[0])
    return w2


def gaussian_ot(p0: GaussianMixture, p1: GaussianMixture) -> OTCoupling:
    """The W2-optimal coupling of two Gaussians: x1 = m1 + A (x0 - m0).

    A = S0^{-1/2} (S0^{1/2} S1 S0^{1/2})^{1/2} S0^{-1/2} is symmetric positive definite (the
    Bures map; Knott & Smith 1984, Dowson & Landau 1982), and the joint covariance
    [[S0, S0 A], [A S0, S1]] (S1 = A S0 A) is singular, of rank d. On the linear path
    x_t = (1 - t) x0 + t x1 every particle moves on a straight line at constant speed:
    x_t = x0 + t (T(x0) - x0), so one Euler step of the exact velocity from t = 0 to 1 lands on
    T(x0). For any schedule, S_t = (b I + a A) S0 (b I + a A) is positive definite where
    b + a l > 0 for every eigenvalue l > 0 of A (always when a, b >= 0, a + b > 0).

    Args:
        p0, p1: one-component ``GaussianMixture``s of the same dimension.

    Returns:
        ``OTCoupling(coupling, plan=[[1]], cost=W2^2)``.
    """
    dtype = _check_pair("couplings.gaussian_ot", p0, p1, single=True)
    m0, s0 = p0.means.astype(dtype), p0.covs.astype(dtype)
    m1, s1 = p1.means.astype(dtype), p1.covs.astype(dtype)
    w2, cross = _bures(m0, s0, m1, s1)
    c = _joint(jnp.ones((1,), dtype), m0, s0, m1, s1, cross, exact_ot=True)
    return OTCoupling(_labelled(c, p1, [0]), jnp.ones((1, 1), dtype), w2[0])


def _discrete_ot(cost: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact discrete OT plan (a linear program, HiGHS via ``scipy.optimize.linprog``).

    The basic solution's values are then recomputed on its support from the marginal
    constraints (a least-squares solve of a consistent system, exact to rounding), so that the
    plan's marginals hold to ~1e-16 rather than to the solver's feasibility tolerance.
    """
    from scipy.optimize import linprog

    k0, k1 = cost.shape
    rows = np.kron(np.eye(k0), np.ones((1, k1)))
    cols = np.kron(np.ones((1, k0)), np.eye(k1))
    a_eq, b_eq = np.concatenate([rows, cols]), np.concatenate([a, b])
    res = linprog(cost.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:  # pragma: no cover - a transport LP with valid marginals is feasible
        raise RuntimeError(f"couplings.mixture_ot: the discrete OT solve failed ({res.message})")
    x = np.maximum(res.x, 0.0)
    support = x > 1e-12
    refined = np.linalg.lstsq(a_eq[:, support], b_eq, rcond=None)[0]
    if np.all(refined >= 0) and np.allclose(refined, x[support], atol=1e-6):
        x = np.zeros_like(x)
        x[support] = refined
    return x.reshape(k0, k1)


def mixture_ot(p0: GaussianMixture, p1: GaussianMixture) -> OTCoupling:
    """The mixture-Wasserstein (MW2) coupling of two Gaussian mixtures (Delon & Desolneux 2020).

    Among couplings that are themselves Gaussian mixtures, the one of least E|X1 - X0|^2: a
    discrete optimal-transport plan P between components, with cost W2^2(N_i, N_j) between the
    component Gaussians and marginals the mixture weights, and each pair (i, j) with P_ij > 0
    joined by its Gaussian OT map (``gaussian_ot``). MW2^2 = sum_ij P_ij W2^2(N_i, N_j) >= W2^2
    between the mixtures; it is not the OT between the mixtures (which is not a mixture of
    Gaussian maps in general), but it is the exact, closed-form coupling that minibatch OT-CFM
    is often described as approximating.

    The discrete problem is solved exactly as a linear program on the host (HiGHS, through
    ``scipy.optimize.linprog``; ott-jax only offers exact OT between uniform point clouds of
    equal size, and Sinkhorn otherwise), so the inputs must be concrete (not traced). The plan is
    a vertex of the transport polytope: at most K0 + K1 - 1 nonzero entries, one joint
    component each.

    Args:
        p0, p1: ``GaussianMixture``s of the same dimension.

    Returns:
        ``OTCoupling(coupling, plan (K0, K1), cost=MW2^2)``.
    """
    fn = "couplings.mixture_ot"
    dtype = _check_pair(fn, p0, p1, single=False)
    if not _checks.is_concrete(p0.weights, p0.covs, p1.weights, p1.covs):
        _checks.fail(fn, "p0", "concrete (not traced): the plan is solved on the host", "a tracer")
    k0, k1 = p0.n_components, p1.n_components
    m0 = jnp.repeat(p0.means.astype(dtype), k1, axis=0)
    s0 = jnp.repeat(p0.covs.astype(dtype), k1, axis=0)
    m1 = jnp.tile(p1.means.astype(dtype), (k0, 1))
    s1 = jnp.tile(p1.covs.astype(dtype), (k0, 1, 1))
    w2, cross = _bures(m0, s0, m1, s1)
    cost = np.asarray(w2, np.float64).reshape(k0, k1)
    a = np.asarray(p0.weights, np.float64)
    b = np.asarray(p1.weights, np.float64)
    plan = _discrete_ot(cost, a / a.sum(), b / b.sum())
    keep = np.flatnonzero(plan.ravel() > 0)
    w = jnp.asarray(plan.ravel()[keep] / plan.sum(), dtype)
    c = _joint(w, m0[keep], s0[keep], m1[keep], s1[keep], cross[keep], exact_ot=True)
    c = _labelled(c, p1, keep % k1)  # component (i, j) carries target component j's class
    return OTCoupling(c, jnp.asarray(plan, dtype), jnp.asarray(np.sum(plan * cost), dtype))


def gaussian_entropic_ot(p0: GaussianMixture, p1: GaussianMixture, sigma: float) -> OTCoupling:
    """The entropic optimal-transport coupling of two Gaussians, in closed form.

    The minimiser of E|X0 - X1|^2 + 2 sigma^2 KL(pi | p0 x p1) over couplings pi is Gaussian
    with cross-covariance (Janati et al. 2020; Mallasto et al. 2021)
        C = 1/2 S0^{1/2} D S0^{-1/2} - sigma^2 / 2 I,
        D = (4 S0^{1/2} S1 S0^{1/2} + sigma^4 I)^{1/2}.
    It is the static (end-point) coupling of the Schrodinger bridge with Brownian reference of
    variance sigma^2 per unit time (Bunne et al. 2023): see ``schrodinger_bridge``. Its joint
    precision has off-diagonal block -I / sigma^2. sigma -> 0 gives ``gaussian_ot``;
    sigma -> inf the independent coupling (C ~ S0 S1 / sigma^2 -> 0).

    Args:
        p0, p1: one-component ``GaussianMixture``s of the same dimension.
        sigma: > 0, the reference's noise scale (regularisation 2 sigma^2).

    Returns:
        ``OTCoupling(coupling, plan=[[1]], cost=E|X1 - X0|^2)`` (the transport part of the
        objective, without the entropy term).
    """
    fn = "couplings.gaussian_entropic_ot"
    dtype = _check_pair(fn, p0, p1, single=True)
    sigma = _check_sigma(fn, sigma)
    c = _entropic_pairs(jnp.ones((1,), dtype), p0.means, p0.covs, p1.means, p1.covs, sigma, dtype)
    return OTCoupling(_labelled(c, p1, [0]), jnp.ones((1, 1), dtype), transport_cost(c))


def _entropic_pairs(w, m0, s0, m1, s1, sigma, dtype) -> JointGaussianMixture:
    m0, s0, m1, s1 = (x.astype(dtype) for x in (m0, s0, m1, s1))
    cross, _ = _pair_terms(s0, s1, jnp.asarray(sigma, dtype))
    return _joint(w.astype(dtype), m0, s0, m1, s1, cross, exact_ot=False)


def schrodinger_bridge(p0: GaussianMixture, p1: GaussianMixture, sigma: float) -> SchrodingerBridge:
    """The Schrodinger bridge between two Gaussians with Brownian reference sigma W_t (closed
    form, Bunne et al. 2023), as a coupling and a stochastic-interpolant schedule.

    The bridge's law is the entropic-OT coupling (``gaussian_entropic_ot``) of its end points
    joined by Brownian bridges: x_t = (1 - t) x0 + t x1 + sigma sqrt(t (1 - t)) z, with marginal
    covariance S_t = (1 - t)^2 S0 + t^2 S1 + t (1 - t) (C + C^T + sigma^2 I). ``fmjax.exact``
    with the returned ``(coupling, schedule)`` gives its marginal p_t, score and
    probability-flow velocity.

    For mixtures (K0 or K1 > 1) this returns the mixture analogue in the spirit of
    ``mixture_ot``: the MW2 plan between components, each pair joined by its Gaussian bridge.
    Its marginals are p0 and p1 and its path is a mixture of Gaussian Schrodinger bridges, but it
    is not the Schrodinger bridge between the mixtures (which has no closed form); as sigma -> 0
    it tends to ``mixture_ot``.

    Args:
        p0, p1: ``GaussianMixture``s of the same dimension (concrete when K0 or K1 > 1).
        sigma: > 0, the Brownian reference's scale.

    Returns:
        ``SchrodingerBridge(coupling, schedule)``.
    """
    fn = "couplings.schrodinger_bridge"
    dtype = _check_pair(fn, p0, p1, single=False)
    sigma = _check_sigma(fn, sigma)
    schedule = _schedules.linear().with_noise(_schedules.brownian(sigma))
    if p0.n_components == 1 and p1.n_components == 1:
        w, m0, s0, m1, s1 = jnp.ones((1,), dtype), p0.means, p0.covs, p1.means, p1.covs
        labels = p1.labels
    else:
        mw = mixture_ot(p0, p1).coupling
        w, (m0, m1, s0, _, _, s1) = mw.weights, mw.blocks()
        labels = mw.labels  # each pair keeps its target component's class
    c = _with_labels(_entropic_pairs(w, m0, s0, m1, s1, sigma, dtype), labels)
    return SchrodingerBridge(c, schedule)


def transport_cost(coupling: JointGaussianMixture) -> Float[Array, ""]:
    """E|X1 - X0|^2 under a joint mixture, in closed form.

    sum_k w_k (|m1_k - m0_k|^2 + tr(S00_k + S11_k - S01_k - S10_k)).

    Args:
        coupling: the joint mixture of (X0, X1).

    Returns:
        E|X1 - X0|^2, a scalar.

    Example:
        >>> import fmjax
        >>> p1 = fmjax.GaussianMixture([0.5, 0.5], [[-2.0], [2.0]], [[[0.25]], [[0.25]]])
        >>> c = fmjax.independent_coupling(fmjax.standard_normal(1), p1)
        >>> float(transport_cost(c))  # |m1|^2 + var0 + var1 = 4 + 1 + 0.25
        5.25
    """
    _checks.check_instance(
        "couplings.transport_cost", "coupling", coupling, JointGaussianMixture,
        "a JointGaussianMixture",
    )  # fmt: skip
    m0, m1, s00, s01, s10, s11 = coupling.blocks()
    per = jnp.sum((m1 - m0) ** 2, axis=-1) + jnp.trace(s00 + s11 - s01 - s10, axis1=-2, axis2=-1)
    return jnp.sum(coupling.weights * per)


def check_path(
    coupling: JointGaussianMixture, schedule: _schedules.Schedule, *, n_times: int = 257
) -> float:
    """Check that every component's path covariance is positive definite on the schedule's
    interval, where ``fmjax.exact`` needs it: S_t = b^2 S00 + a b (S01 + S10) + a^2 S11 +
    gamma^2 I, on ``n_times`` equally spaced times of [t_min, t_max].

    A singular joint (a deterministic coupling x1 = m1 + A (x0 - m0)) gives
    S_t = (b I + a A) S00 (b I + a A)^T, positive definite exactly where b I + a A is invertible:
    always for optimal-transport maps (A symmetric positive definite) and nonnegative a, b, but
    not, e.g., for x1 = -x0 at t = 1/2 on the linear path, where every particle meets.

    Args:
        coupling: a concrete joint mixture.
        schedule: the interpolant.
        n_times: grid size (>= 2).

    Returns:
        The smallest eigenvalue of S_t relative to max(|S00|, |S11|) over the grid and the
        components (diagnostic: small values mean an ill-conditioned path).

    Raises:
        ValueError: naming the component and the time where S_t is not positive definite
            (relative smallest eigenvalue <= 100 eps of the coupling's dtype).
    """
    fn = "couplings.check_path"
    _checks.check_instance(fn, "coupling", coupling, JointGaussianMixture, "a JointGaussianMixture")
    _checks.check_instance(fn, "schedule", schedule, _schedules.Schedule, "a schedules.Schedule")
    n_times = _checks.check_int(fn, "n_times", n_times, 2)
    if not _checks.is_concrete(coupling.covs):
        _checks.fail(fn, "coupling", "concrete (not traced)", "a tracer")
    t = np.linspace(schedule.t_min, schedule.t_max, n_times)
    a, b, _, _ = (np.asarray(x, np.float64) for x in schedule(jnp.asarray(t)))
    g = np.asarray(schedule.gamma(jnp.asarray(t))[0], np.float64)
    _, _, s00, s01, s10, s11 = (np.asarray(x, np.float64) for x in coupling.blocks())
    d = s00.shape[-1]
    scale = np.maximum(np.abs(s00).max(axis=(1, 2)), np.abs(s11).max(axis=(1, 2)))  # (K,)
    cov = (
        (b * b)[:, None, None, None] * s00[None]
        + (a * b)[:, None, None, None] * (s01 + s10)[None]
        + (a * a)[:, None, None, None] * s11[None]
        + (g * g)[:, None, None, None] * np.eye(d)
    )  # (T, K, d, d)
    rel = np.linalg.eigvalsh(cov)[..., 0] / scale[None]  # (T, K)
    weights = np.asarray(coupling.weights)
    rel = np.where(weights[None] > 0, rel, np.inf)
    i, k = np.unravel_index(np.argmin(rel), rel.shape)
    eps = float(np.finfo(np.dtype(coupling.covs.dtype)).eps)
    # Particles meet where S_t is far more singular than the ends' own covariances: an
    # ill-conditioned but valid coupling (ends already near 100 eps) is not refused for them.
    ends = min(np.linalg.eigvalsh(s00[k])[0], np.linalg.eigvalsh(s11[k])[0]) / scale[k]
    if rel[i, k] <= min(100 * eps, 0.1 * ends):
        raise _checks.named_error(
            fn,
            "coupling",
            f"{fn}: the path covariance S_t of component {k} must be positive definite on the "
            f"schedule's interval for fmjax.exact, got relative smallest eigenvalue "
            f"{rel[i, k]:.3g} at t = {t[i]:.4g} (particles of this coupling meet there: "
            "b I + a A is singular)",
        )
    return float(rel[i, k])
