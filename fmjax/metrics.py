"""Sample-based distances and errors against exact answers.

Two-sample distances between point clouds ``x`` (n, d) and ``y`` (m, d):

* ``energy_distance``: 2 E|X - Y| - E|X - X'| - E|Y - Y'| (U- or V-statistic),
* ``mmd``: squared maximum mean discrepancy with a sum of RBF kernels (unbiased),
* ``sliced_wasserstein``: mean over random directions of the 1-D W_p^p (ott-jax),
* ``w2``: squared 2-Wasserstein distance, exact (Hungarian, via ott-jax / optax) or entropic
  (debiased Sinkhorn divergence, ott-jax),
* ``gaussian_w2``: closed-form W2^2 between two Gaussians (the reference for the above).

Errors of a learned model against the exact GMM answers:

* ``velocity_error``: E|v(t, X_t) - u_t(X_t)|^2 over X_t ~ p_t, as a curve over times,
* ``nll``: mean negative log-likelihood of samples under an exact density,
* ``nfe_to_accuracy``: fewest solver steps whose samples are within a tolerance.

Pairwise sums are computed in row blocks (``lax.map``) with one matrix product per block at
``precision="highest"`` (no TF32 on GPUs), so memory stays O(block * m) and no (n, m, d) array is
formed. Everything except ``nfe_to_accuracy`` (a Python loop over a few step counts, each one a
separate solve) is jit-compatible, with sizes and options static.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from fmjax import exact
from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule

__all__ = [
    "energy_distance",
    "mmd",
    "sliced_wasserstein",
    "w2",
    "gaussian_w2",
    "velocity_error",
    "nll",
    "nfe_to_accuracy",
    "NFEResult",
]

_HIGHEST = jax.lax.Precision.HIGHEST
# Elements of one (block, m, channels) intermediate in the pairwise sums: 2^22 (16 MiB float32).
_PAIR_BUDGET = 1 << 22

VelocityField = Callable[[Array, Array], Array]


# ----------------------------------------------------------------------------- validation


def _is_concrete(*xs) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in xs)


def _two_clouds(fn: str, x, y, min_points: int = 1):
    x, y = jnp.asarray(x), jnp.asarray(y)
    for name, a in (("x", x), ("y", y)):
        if a.ndim != 2:
            raise ValueError(f"{fn}: `{name}` must have shape (n, d), got {a.shape}")
        if a.shape[0] < min_points:
            raise ValueError(f"{fn}: `{name}` needs at least {min_points} points, got {a.shape[0]}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{fn}: `x` and `y` must have the same dimension d, got {x.shape} and {y.shape}"
        )
    dtype = jnp.result_type(x, y, float)
    return x.astype(dtype), y.astype(dtype)


# ----------------------------------------------------------------------------- pairwise sums


def _pair_sum(x, y, kernel: Callable[[Array], Array], channels: int, same: bool):
    """sum_{i, j} kernel(|x_i - y_j|^2) over row blocks; ``same`` drops the diagonal i = j.

    ``kernel`` maps squared distances (B, m) to (B, m). Points are shifted by the mean of ``y``
    before the |x|^2 + |y|^2 - 2 x.y expansion to limit cancellation; the diagonal of a
    within-sample sum (where that expansion leaves round-off instead of 0) is masked out.
    """
    n, d = x.shape
    m = y.shape[0]
    block = int(max(1, min(n, _PAIR_BUDGET // max(1, m * max(d, channels)))))
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    shift = jnp.mean(y, axis=0)
    xc, yc = x - shift[None], y - shift[None]
    yy = jnp.sum(yc * yc, axis=-1)
    xp = jnp.pad(xc, ((0, pad), (0, 0)))
    rows = jnp.arange(n_blocks * block)
    cols = jnp.arange(m)

    def one(args):
        xb, ib = args  # (B, d), (B,)
        xx = jnp.sum(xb * xb, axis=-1)
        d2 = xx[:, None] + yy[None, :] - 2.0 * jnp.matmul(xb, yc.T, precision=_HIGHEST)
        d2 = jnp.maximum(d2, 0.0)
        keep = (ib < n)[:, None]
        if same:
            keep = keep & (ib[:, None] != cols[None, :])
        return jnp.sum(jnp.where(keep, kernel(d2), 0.0))

    sums = jax.lax.map(one, (xp.reshape(n_blocks, block, d), rows.reshape(n_blocks, block)))
    return jnp.sum(sums)


def _safe_sqrt(d2):
    """sqrt with a zero (not NaN) gradient at 0."""
    pos = d2 > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, d2, 1.0)), 0.0)


def _two_sample(x, y, kernel, channels: int, k0: float, unbiased: bool):
    """(mean k(x, y), mean k(x, x'), mean k(y, y')) with U- or V-statistic within-sample means.

    ``k0`` is the kernel at distance 0, the exact value of each excluded/included diagonal term.
    """
    n, m = x.shape[0], y.shape[0]
    kxy = _pair_sum(x, y, kernel, channels, same=False) / (n * m)
    sxx = _pair_sum(x, x, kernel, channels, same=True)
    syy = _pair_sum(y, y, kernel, channels, same=True)
    if unbiased:
        kxx, kyy = sxx / (n * (n - 1)), syy / (m * (m - 1))
    else:
        kxx, kyy = (sxx + n * k0) / (n * n), (syy + m * k0) / (m * m)
    return kxy, kxx, kyy


def energy_distance(
    x: Float[ArrayLike, "n d"], y: Float[ArrayLike, "m d"], *, unbiased: bool = True
) -> Float[Array, ""]:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two samples.

    Zero iff the two laws are equal (for laws with finite first moments). It is the squared
    MMD of the kernel k(x, y) = |x| + |y| - |x - y|, yet its units are those of |x| (a length).

    Args:
        x: (n, d) sample of P.
        y: (m, d) sample of Q.
        unbiased: True for the U-statistic (within-sample means over i != j, divided by
            n (n - 1)): an unbiased estimator, which can be slightly negative. False for the
            V-statistic (all pairs, divided by n^2): >= 0, biased upward by
            E|X - X'| / n + E|Y - Y'| / m. Static.

    Returns:
        scalar estimate.
    """
    x, y = _two_clouds("energy_distance", x, y, min_points=2 if unbiased else 1)
    kxy, kxx, kyy = _two_sample(x, y, _safe_sqrt, 1, 0.0, unbiased)
    return 2.0 * kxy - kxx - kyy


def mmd(
    x: Float[ArrayLike, "n d"],
    y: Float[ArrayLike, "m d"],
    bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
) -> Float[Array, ""]:
    """Unbiased squared MMD with the kernel k(x, y) = sum_h exp(-|x - y|^2 / (2 h^2)).

    MMD^2 = E k(X, X') + E k(Y, Y') - 2 E k(X, Y), estimated by the U-statistic (within-sample
    sums over i != j): unbiased, hence can be slightly negative when P = Q. Summing several
    bandwidths makes the test sensitive at several length scales; the kernel is not normalised,
    so values scale with the number of bandwidths (k(x, x) = len(bandwidths)).

    Args:
        x: (n, d) sample of P, n >= 2.
        y: (m, d) sample of Q, m >= 2.
        bandwidths: RBF length scales h > 0 (static), in the units of x.

    Returns:
        scalar estimate of MMD^2.
    """
    x, y = _two_clouds("mmd", x, y, min_points=2)
    bw = tuple(float(h) for h in bandwidths)
    if not bw or not all(h > 0 and math.isfinite(h) for h in bw):
        raise ValueError(
            f"mmd: `bandwidths` must be a non-empty sequence of finite numbers > 0, "
            f"got {bandwidths}"
        )
    inv = jnp.asarray([0.5 / (h * h) for h in bw], x.dtype)

    def kernel(d2):
        return jnp.sum(jnp.exp(-d2[..., None] * inv[None, None, :]), axis=-1)

    kxy, kxx, kyy = _two_sample(x, y, kernel, len(bw), float(len(bw)), unbiased=True)
    return kxx + kyy - 2.0 * kxy


# ----------------------------------------------------------------------------- Wasserstein


def sliced_wasserstein(
    key: PRNGKeyArray,
    x: Float[ArrayLike, "n d"],
    y: Float[ArrayLike, "m d"],
    n_projections: int = 128,
    p: float = 2.0,
) -> Float[Array, ""]:
    """Sliced Wasserstein SW_p^p = E_theta W_p^p(theta # P_n, theta # Q_m), theta ~ U(S^{d-1}).

    Monte Carlo over ``n_projections`` random directions; each 1-D problem is solved exactly by
    ott-jax (sorting for equal sizes, quantile functions otherwise). Returns the p-th power;
    take ``** (1 / p)`` for the distance.

    Args:
        key: PRNG key for the directions.
        x: (n, d) sample of P.
        y: (m, d) sample of Q.
        n_projections: number of directions (static).
        p: ground cost |x - y|^p, p >= 1 (static).

    Returns:
        scalar SW_p^p.
    """
    from ott.geometry import costs
    from ott.tools import sliced

    x, y = _two_clouds("sliced_wasserstein", x, y)
    if int(n_projections) < 1:
        raise ValueError(f"sliced_wasserstein: `n_projections` must be >= 1, got {n_projections}")
    if not float(p) >= 1:
        raise ValueError(f"sliced_wasserstein: `p` must be >= 1, got {p}")
    dirs = jax.random.normal(key, (int(n_projections), x.shape[1]), x.dtype)
    dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)

    def project(z):
        return jnp.matmul(z, dirs.T, precision=_HIGHEST)

    with jax.numpy_rank_promotion("allow"):  # ott relies on implicit rank promotion
        cost, _ = sliced.sliced_wasserstein(
            x, y, cost_fn=costs.EuclideanP(float(p)), proj_fn=project
        )
    return cost


def _sinkhorn_cost(cost_matrix, epsilon, threshold, max_iterations):
    from ott.geometry import geometry
    from ott.solvers import linear

    geom = geometry.Geometry(cost_matrix=cost_matrix, epsilon=epsilon)
    # ott relies on implicit rank promotion internally; allow it for the solver only.
    with jax.numpy_rank_promotion("allow"):
        out = linear.solve(geom, threshold=threshold, max_iterations=max_iterations)
    return out.reg_ot_cost


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
        threshold: Sinkhorn marginal-error tolerance (entropic only).
        max_iterations: Sinkhorn iteration cap (entropic only).

    Returns:
        scalar W2^2 (or W2).
    """
    x, y = _two_clouds("w2", x, y)
    if epsilon is None:
        from ott.geometry import geometry
        from ott.tools import unreg

        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"w2: exact OT (epsilon=None) needs equal sample sizes, got {x.shape[0]} and "
                f"{y.shape[0]}; pass epsilon > 0 for the entropic estimate"
            )
        with jax.numpy_rank_promotion("allow"):  # as in _sinkhorn_cost
            cost, _ = unreg.hungarian(geometry.Geometry(cost_matrix=_pairwise_sq(x, y)))
    else:
        if not (float(epsilon) > 0 and math.isfinite(float(epsilon))):
            raise ValueError(f"w2: `epsilon` must be None or a finite number > 0, got {epsilon}")

        def ot(a, b):
            c = _pairwise_sq(a, b)
            return _sinkhorn_cost(c, float(epsilon), threshold, int(max_iterations))

        cost = ot(x, y) - 0.5 * (ot(x, x) + ot(y, y))
    return cost if squared else jnp.sqrt(jnp.maximum(cost, 0.0))


def _pairwise_sq(x, y):
    """(n, m) squared distances by one highest-precision matmul, after a common shift."""
    shift = jnp.mean(y, axis=0)
    xc, yc = x - shift[None], y - shift[None]
    d2 = (
        jnp.sum(xc * xc, axis=-1)[:, None]
        + jnp.sum(yc * yc, axis=-1)[None, :]
        - 2.0 * jnp.matmul(xc, yc.T, precision=_HIGHEST)
    )
    return jnp.maximum(d2, 0.0)


def _sqrtm_psd(a):
    w, v = jnp.linalg.eigh(a)
    return jnp.einsum(
        "...ij,...j,...kj->...ik", v, jnp.sqrt(jnp.maximum(w, 0.0)), v, precision=_HIGHEST
    )


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
            raise ValueError(
                f"gaussian_w2: `{name}` must have shape {shape} (d from `mean1`), got {a.shape}"
            )
    r1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(jnp.matmul(jnp.matmul(r1, s2, precision=_HIGHEST), r1, precision=_HIGHEST))
    bures = jnp.trace(s1) + jnp.trace(s2) - 2.0 * jnp.trace(cross)
    return jnp.sum(jnp.square(m1 - m2)) + jnp.maximum(bures, 0.0)


# ----------------------------------------------------------------------------- model errors


def velocity_error(
    velocity: VelocityField,
    reference_velocity: VelocityField | None,
    coupling: JointGaussianMixture,
    schedule: Schedule,
    key: PRNGKeyArray,
    ts: Float[ArrayLike, " T"],
    n: int,
) -> Float[Array, " T"]:
    """Mean squared velocity error E_{X_t ~ p_t} |v(t, X_t) - u(t, X_t)|^2 at each time.

    X_t = b_t X0 + a_t X1 is sampled exactly from coupled pairs (X0, X1) of ``coupling``
    (fresh pairs at each time); all times are evaluated at once by ``vmap`` over t, each with a
    scalar t and an (n, d) batch, so the exact field factors its covariances once per time.
    Jit at the call site for speed, e.g. ``jax.jit(velocity_error, static_argnums=(0, 1, 6))``
    for fixed fields, or inside a jitted function that takes the model parameters.

    Args:
        velocity: field ``(t, x) -> (..., d)`` to assess, e.g. ``partial(model.apply, params)``.
        reference_velocity: field to compare against; None for the exact marginal velocity
            ``partial(fmjax.exact.velocity, coupling, schedule)``.
        coupling: joint mixture of (X0, X1) defining p_t.
        schedule: affine schedule.
        key: PRNG key for the samples.
        ts: (T,) times in [0, 1].
        n: samples per time (static).

    Returns:
        (T,) mean over samples of the squared Euclidean norm of the difference.
    """
    if not isinstance(coupling, JointGaussianMixture):
        raise ValueError(
            f"velocity_error: `coupling` must be a JointGaussianMixture, got {type(coupling)}"
        )
    if not isinstance(schedule, Schedule):
        raise ValueError(
            f"velocity_error: `schedule` must be an fmjax Schedule, got {type(schedule)}"
        )
    ts = jnp.asarray(ts)
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(coupling.means.dtype)
    if ts.ndim != 1:
        raise ValueError(f"velocity_error: `ts` must have shape (T,), got {ts.shape}")
    if _is_concrete(ts) and not np.all((np.asarray(ts) >= 0) & (np.asarray(ts) <= 1)):
        raise ValueError("velocity_error: `ts` must lie in [0, 1]")
    if int(n) < 1:
        raise ValueError(f"velocity_error: `n` must be >= 1, got {n}")
    if reference_velocity is None:
        reference_velocity = functools.partial(exact.velocity, coupling, schedule)

    def at(k, t):
        x0, x1 = coupling.sample(k, int(n))
        a, b, _, _ = schedule(t)
        xt = b * x0 + a * x1
        diff = velocity(t, xt) - reference_velocity(t, xt)
        return jnp.mean(jnp.sum(jnp.square(diff), axis=-1))

    keys = jax.random.split(key, ts.shape[0])
    return jax.vmap(at)(keys, ts)


def nll(
    target_log_prob: Callable[[Array], Array], samples: Float[ArrayLike, "n d"]
) -> Float[Array, ""]:
    """Mean negative log-likelihood -(1/n) sum_i log p(x_i) of samples under a density.

    With ``samples`` from a model and ``target_log_prob`` the exact target (e.g.
    ``GaussianMixture.log_prob``) this is the cross-entropy H(q_model, p) >= H(q_model); compare
    with the target's own entropy, estimated by ``nll(p.log_prob, p.sample(key, n))``.

    Args:
        target_log_prob: ``x (n, d) -> (n,)`` log-density.
        samples: (n, d) points.

    Returns:
        scalar mean NLL (nats).
    """
    samples = jnp.asarray(samples)
    if samples.ndim != 2:
        raise ValueError(f"nll: `samples` must have shape (n, d), got {samples.shape}")
    lp = target_log_prob(samples)
    if lp.shape != samples.shape[:1]:
        raise ValueError(f"nll: `target_log_prob` must map (n, d) to (n,), got {lp.shape}")
    return -jnp.mean(lp)


class NFEResult(NamedTuple):
    """Outcome of ``nfe_to_accuracy``.

    Attributes:
        nfe: fewest function evaluations reaching the tolerance, or None if none did.
        n_steps: the step count achieving it, or None.
        step_counts: the step counts tried, ascending.
        errors: error of each tried step count (same order), as floats.
    """

    nfe: int | None
    n_steps: int | None
    step_counts: tuple[int, ...]
    errors: tuple[float, ...]


def _rmse(a, b):
    return jnp.sqrt(jnp.mean(jnp.sum(jnp.square(a - b), axis=-1)))


def nfe_to_accuracy(
    solve: Callable[[int], Array],
    reference: Float[ArrayLike, "n d"],
    step_counts: Sequence[int],
    tol: float,
    *,
    evals_per_step: int = 1,
    error: Callable[[Array, Array], Array] | None = None,
    stop_early: bool = True,
) -> NFEResult:
    """Fewest fixed-step function evaluations whose samples are within ``tol`` of a reference.

    ``solve(n_steps)`` runs a fixed-step solver (e.g. Euler, midpoint) with ``n_steps`` steps
    and returns samples (n, d); ``reference`` is an accurate solution (e.g. an adaptive solve at
    a tight tolerance, or the exact transport map). The default ``error`` is the root mean
    squared distance sqrt(mean_i |x_i - r_i|^2), meaningful when ``solve`` and the reference
    start from the same initial points; pass e.g. ``energy_distance`` to compare laws instead.
    Step counts are tried in ascending order (a Python loop over a few separate solves).

    Args:
        solve: ``n_steps -> (n, d)`` samples.
        reference: (n, d) reference samples.
        step_counts: candidate step counts (positive ints).
        tol: accuracy threshold on ``error``.
        evals_per_step: velocity evaluations per step (Euler 1, midpoint / Heun 2, RK4 4).
        error: ``(samples, reference) -> scalar``; default RMSE as above.
        stop_early: stop at the first count within ``tol`` (the rest are not run).

    Returns:
        NFEResult with nfe = n_steps * evals_per_step of the smallest count within ``tol``.
    """
    counts = sorted({int(c) for c in step_counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"nfe_to_accuracy: `step_counts` must be positive ints, got {step_counts}")
    if not float(tol) > 0:
        raise ValueError(f"nfe_to_accuracy: `tol` must be > 0, got {tol}")
    if int(evals_per_step) < 1:
        raise ValueError(f"nfe_to_accuracy: `evals_per_step` must be >= 1, got {evals_per_step}")
    err_fn = _rmse if error is None else error
    reference = jnp.asarray(reference)
    tried, errs, best = [], [], None
    for c in counts:
        e = float(err_fn(jnp.asarray(solve(c)), reference))
        tried.append(c)
        errs.append(e)
        if best is None and e <= tol:
            best = c
            if stop_early:
                break
    nfe = None if best is None else best * int(evals_per_step)
    return NFEResult(nfe, best, tuple(tried), tuple(errs))
