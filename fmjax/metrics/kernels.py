"""Kernel two-sample statistics between point clouds: energy distance and MMD.

Both are means of a kernel k(|x - y|^2) over pairs within and across two point clouds ``x``
(n, d) and ``y`` (m, d), summed in row blocks (``lax.map``) with one highest-precision matrix
product per block, so memory stays O(block * m) and no (n, m, d) array is formed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from fmjax import _checks
from fmjax.metrics._points import HIGHEST, two_clouds

__all__ = ["energy_distance", "mmd"]


# Elements of one (block, m, channels) intermediate in the pairwise sums: 2^22 (16 MiB float32).
_PAIR_BUDGET = 1 << 22


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
        d2 = xx[:, None] + yy[None, :] - 2.0 * jnp.matmul(xb, yc.T, precision=HIGHEST)
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
    fn = "metrics.energy_distance"
    unbiased = _checks.check_instance(fn, "unbiased", unbiased, bool, "a bool")
    x, y = two_clouds(fn, x, y, min_points=2 if unbiased else 1)
    kxy, kxx, kyy = _two_sample(x, y, _safe_sqrt, 1, 0.0, unbiased)
    return 2.0 * kxy - kxx - kyy


def _bandwidths(fn: str, bandwidths) -> tuple[float, ...]:
    what = "a non-empty sequence of finite numbers > 0"
    if isinstance(bandwidths, str) or not hasattr(bandwidths, "__iter__"):
        _checks.fail(fn, "bandwidths", what, bandwidths, TypeError)
    values = tuple(_checks.as_float(fn, "bandwidths", h) for h in bandwidths)
    if not values or not all(0 < h < float("inf") for h in values):
        _checks.fail(fn, "bandwidths", what, bandwidths)
    return values


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
    fn = "metrics.mmd"
    x, y = two_clouds(fn, x, y, min_points=2)
    bw = _bandwidths(fn, bandwidths)
    inv = jnp.asarray([0.5 / (h * h) for h in bw], x.dtype)

    def kernel(d2):
        return jnp.sum(jnp.exp(-d2[..., None] * inv[None, None, :]), axis=-1)

    kxy, kxx, kyy = _two_sample(x, y, kernel, len(bw), float(len(bw)), unbiased=True)
    return kxx + kyy - 2.0 * kxy
