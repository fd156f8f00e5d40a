"""Wasserstein distances: sliced, between empirical measures (ott-jax), and between Gaussians.

``sliced_wasserstein`` averages exact 1-D problems along random directions, ``w2`` solves the
transport problem between two samples (exactly by the Hungarian algorithm, or as a debiased
Sinkhorn divergence), and ``gaussian_w2`` is the closed form between two Gaussians, the reference
the sample estimates are tested against. The sample distances need ott-jax (``fmjax[ot]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from fmjax import _checks
from fmjax.metrics._points import HIGHEST, pairwise_sq, two_clouds

__all__ = ["sliced_wasserstein", "w2", "gaussian_w2"]


def sliced_wasserstein(
    x: Float[ArrayLike, "n d"],
    y: Float[ArrayLike, "m d"],
    *,
    key: PRNGKeyArray,
    n_projections: int = 128,
    p: float = 2.0,
) -> Float[Array, ""]:
    """Sliced Wasserstein SW_p^p = E_theta W_p^p(theta # P_n, theta # Q_m), theta ~ U(S^{d-1}).

    Monte Carlo over ``n_projections`` random directions; each 1-D problem is solved exactly by
    ott-jax (sorting for equal sizes, quantile functions otherwise). Returns the p-th power;
    take ``** (1 / p)`` for the distance.

    Args:
        x: (n, d) sample of P.
        y: (m, d) sample of Q.
        key: PRNG key for the directions.
        n_projections: number of directions (static).
        p: ground cost |x - y|^p, p >= 1 (static).

    Returns:
        scalar SW_p^p.
    """
    fn = "metrics.sliced_wasserstein"
    _checks.require("ott", fn)
    from ott.geometry import costs
    from ott.tools import sliced

    x, y = two_clouds(fn, x, y)
    key = _checks.check_key(fn, "key", key)
    n_projections = _checks.check_int(fn, "n_projections", n_projections)
    p = _checks.check_positive(fn, "p", p)
    if p < 1:
        _checks.fail(fn, "p", "a number >= 1", p)
    dirs = jax.random.normal(key, (n_projections, x.shape[1]), x.dtype)
    dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)

    def project(z):
        return jnp.matmul(z, dirs.T, precision=HIGHEST)

    with jax.numpy_rank_promotion("allow"):  # ott relies on implicit rank promotion
        cost, _ = sliced.sliced_wasserstein(x, y, cost_fn=costs.EuclideanP(p), proj_fn=project)
    return cost


def w2(
    x: Float[ArrayLike, "n d"],
    y: Float[ArrayLike, "m d"],
    *,
    epsilon: float | None = None,
    squared: bool = True,
    threshold: float = 1e-4,
    max_iterations: int = 10_000,
) -> Float[Array, ""]:
    """2-Wasserstein distance between the empirical measures of two samples (uniform weights).

    * ``epsilon=None`` ("exact"): the exact discrete optimal transport cost
      min over permutations s of (1/n) sum_i |x_i - y_s(i)|^2 -- for equal sizes and uniform
      weights an optimal plan is a permutation (Birkhoff), found by the Hungarian algorithm
      (``ott.tools.unreg.hungarian``, optax's JAX implementation; O(n^3), use n <~ 2000).
      Exact up to float round-off of the cost matrix (one highest-precision matmul).
      Requires n == m. This is W2 of the *empirical* measures: as an estimate of W2(P, Q) it is
      biased upward (by O(n^{-1/2}) in general, O(log n / n) for smooth laws in d = 2).
    * ``epsilon > 0``: the debiased Sinkhorn divergence
      S = OT_eps(x, y) - (OT_eps(x, x) + OT_eps(y, y)) / 2 with entropic cost OT_eps
      (ott-jax Sinkhorn, absolute ``epsilon`` in units of squared distance). S -> W2^2 of the
      empirical measures as epsilon -> 0; the debiasing removes the O(epsilon log(1/epsilon))
      entropic bias to leading order. Any n, m; cost O(n m) per iteration.

    Args:
        x: (n, d) sample of P.
        y: (m, d) sample of Q.
        epsilon: None for exact, or the entropic regularisation > 0 (static).
        squared: return W2^2 (default) or W2 = sqrt(max(W2^2, 0)) (static).
        threshold: Sinkhorn marginal-error tolerance > 0 (entropic only).
        max_iterations: Sinkhorn iteration cap (entropic only).

    Returns:
        scalar W2^2 (or W2).
    """
    fn = "metrics.w2"
    _checks.require("ott", fn)
    x, y = two_clouds(fn, x, y)
    squared = _checks.check_instance(fn, "squared", squared, bool, "a bool")
    if epsilon is None:
        cost = _hungarian_cost(fn, x, y)
    else:
        epsilon = _checks.check_positive(fn, "epsilon", epsilon)
        threshold = _checks.check_positive(fn, "threshold", threshold)
        max_iterations = _checks.check_int(fn, "max_iterations", max_iterations)

        def ot(a, b):
            return _sinkhorn_cost(pairwise_sq(a, b), epsilon, threshold, max_iterations)

        cost = ot(x, y) - 0.5 * (ot(x, x) + ot(y, y))
    return cost if squared else jnp.sqrt(jnp.maximum(cost, 0.0))


def _hungarian_cost(fn: str, x, y):
    """Exact discrete OT cost between equal-size uniform empirical measures."""
    from ott.geometry import geometry
    from ott.tools import unreg

    if x.shape[0] != y.shape[0]:
        _checks.fail(
            fn,
            "y",
            f"the same number of points as `x` ({x.shape[0]}) for exact OT (epsilon=None); "
            "pass epsilon > 0 for samples of different sizes",
            f"{y.shape[0]} points",
        )
    with jax.numpy_rank_promotion("allow"):  # ott relies on implicit rank promotion
        cost, _ = unreg.hungarian(geometry.Geometry(cost_matrix=pairwise_sq(x, y)))
    return cost


def _sinkhorn_cost(cost_matrix, epsilon: float, threshold: float, max_iterations: int):
    from ott.geometry import geometry
    from ott.solvers import linear

    geom = geometry.Geometry(cost_matrix=cost_matrix, epsilon=epsilon)
    with jax.numpy_rank_promotion("allow"):  # as in _hungarian_cost
        out = linear.solve(geom, threshold=threshold, max_iterations=max_iterations)
    return out.reg_ot_cost


def _sqrtm_psd(a):
    w, v = jnp.linalg.eigh(a)
    return jnp.einsum(
        "...ij,...j,...kj->...ik", v, jnp.sqrt(jnp.maximum(w, 0.0)), v, precision=HIGHEST
    )


def _check_psd(fn: str, name: str, cov) -> None:
    """A concrete covariance must be symmetric positive semi-definite (to round-off)."""
    if not _checks.is_concrete(cov):
        return
    c = np.asarray(cov, np.float64)
    scale = max(float(np.max(np.abs(c))), np.finfo(np.float64).tiny)
    eps = np.finfo(cov.dtype).eps if np.issubdtype(cov.dtype, np.floating) else 1e-16
    tol = 1e3 * float(eps) * scale
    if not np.allclose(c, c.T, rtol=0.0, atol=tol):
        _checks.fail(fn, name, "symmetric", "an asymmetric matrix")
    low = float(np.linalg.eigvalsh(0.5 * (c + c.T))[0])
    if low < -tol:
        _checks.fail(fn, name, "positive semi-definite", f"smallest eigenvalue {low:.3g}")


def gaussian_w2(
    mean1: Float[ArrayLike, " d"],
    cov1: Float[ArrayLike, "d d"],
    mean2: Float[ArrayLike, " d"],
    cov2: Float[ArrayLike, "d d"],
) -> Float[Array, ""]:
    """Closed-form W2^2(N(m1, S1), N(m2, S2)) = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½).

    Args:
        mean1, mean2: (d,) means.
        cov1, cov2: (d, d) symmetric positive semi-definite covariances.

    Returns:
        scalar W2^2 (the second term is the squared Bures distance).
    """
    m1, m2 = jnp.asarray(mean1), jnp.asarray(mean2)
    s1, s2 = jnp.asarray(cov1), jnp.asarray(cov2)
    d = m1.shape[-1] if m1.ndim == 1 else -1
    for name, a, shape in (
        ("mean1", m1, (d,)),
        ("mean2", m2, (d,)),
        ("cov1", s1, (d, d)),
        ("cov2", s2, (d, d)),
    ):
        if d < 0 or a.shape != shape:
            what = "an array of shape (d,)" if d < 0 else f"an array of shape {shape}"
            _checks.fail("metrics.gaussian_w2", name, what, f"shape {a.shape}")
    for name, cov in (("cov1", s1), ("cov2", s2)):
        _check_psd("metrics.gaussian_w2", name, cov)
    r1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(jnp.matmul(jnp.matmul(r1, s2, precision=HIGHEST), r1, precision=HIGHEST))
    bures = jnp.trace(s1) + jnp.trace(s2) - 2.0 * jnp.trace(cross)
    return jnp.sum(jnp.square(m1 - m2)) + jnp.maximum(bures, 0.0)
