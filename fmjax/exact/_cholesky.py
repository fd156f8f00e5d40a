"""The per-time Cholesky form of the exact engine: per-block terms at one time per call or one
time per point, for any coupling.

For a joint mixture of (X0, X1) and a schedule, each component k makes (X_t, dX_t/dt) jointly
Gaussian with
    mu_t = b m0 + a m1,                    dmu_t = db m0 + da m1,
    S_t  = b^2 S00 + a b (S01 + S10) + a^2 S11 (+ gamma^2 I),
    C_t  = Cov(dX_t, X_t) = b db S00 + a db S01 + b da S10 + a da S11 (+ gamma dgamma I),
so v_k(x) = dmu_t + C_t S_t^{-1} (x - mu_t), grad v_k = C_t S_t^{-1}, and alpha_k(x) is
proportional to pi_k N(x; mu_t, S_t). Latent noise gamma_t z adds gamma^2 I and gamma dgamma I
(only the product is used: finite at the ends).

Per time and component: S_t = L L^T, W = L^{-1} and M = C_t L^{-T}; per point
z = W (x - mu_t), v = dmu_t + M z, s_k = -W^T z, log N = -|z|^2 / 2 - log|L| - ... For many
points z and v are affine in x: one (N, d) @ (d, B d) product each for the block. With one t
per point at d <= 8 the factorisations are written as d vectorised right-looking steps over
all (point, component) pairs (``points_terms``). The table of which runs: ``_plan``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fmjax.exact import _stream
from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule


class Comps(NamedTuple):
    """A coupling's per-component arrays (leading axis K), the stream's unit (its blocks are a
    reshape of the coupling's arrays, sliced into S00, S01, ... one block at a time)."""

    log_w: Float[Array, " K"]  # log pi_k
    means: Float[Array, "K 2d"]
    covs: Float[Array, "K 2d 2d"]

    def blocks(self):
        """(m0, m1, S00, S01, S10, S11), as ``JointGaussianMixture.blocks``."""
        d = self.means.shape[-1] // 2
        m, c = self.means, self.covs
        return (
            m[..., :d],
            m[..., d:],
            c[..., :d, :d],
            c[..., :d, d:],
            c[..., d:, :d],
            c[..., d:, d:],
        )


def comps(c: JointGaussianMixture) -> Comps:
    return Comps(jnp.log(c.weights), c.means, c.covs)


class Factors(NamedTuple):
    """Per-component quantities at one time t (leading axis B)."""

    log_w: Float[Array, " B"]  # log pi_k - log|L_k| - d/2 log(2 pi)
    mu: Float[Array, "B d"]
    dmu: Float[Array, "B d"]
    w: Float[Array, "B d d"]  # L^{-1}
    m: Float[Array, "B d d"]  # C L^{-T}
    tr: Float[Array, " B"]  # tr(C S^{-1}) = div v_k


def path_blocks(cb: Comps, sched: Schedule, t):
    """Per-component mean, velocity mean, covariance and cross-covariance of (X_t, dX_t); ``t``
    a scalar, or (N, 1) / (N, 1, 1)-shaped coefficients broadcast in front of the components."""
    a, b, da, db = sched(t)
    m0, m1, s00, s01, s10, s11 = cb.blocks()
    e2 = e3 = ()
    if jnp.ndim(t) > 0:  # one t per point: (N, 1, 1) before (B, d), (N, 1, 1, 1) before (B, d, d)
        e2, e3 = (-1, 1, 1), (-1, 1, 1, 1)
        m0, m1, s00, s01, s10, s11 = (u[None] for u in (m0, m1, s00, s01, s10, s11))
    a2, b2, da2, db2 = (jnp.reshape(u, e2) for u in (a, b, da, db))
    a3, b3, da3, db3 = (jnp.reshape(u, e3) for u in (a, b, da, db))
    mu = b2 * m0 + a2 * m1
    dmu = db2 * m0 + da2 * m1
    cov = b3 * b3 * s00 + a3 * b3 * (s01 + s10) + a3 * a3 * s11
    cross = b3 * db3 * s00 + a3 * db3 * s01 + b3 * da3 * s10 + a3 * da3 * s11
    if sched.has_noise:
        g, _, g_dg = sched.gamma(t)
        eye = jnp.eye(mu.shape[-1], dtype=cov.dtype).reshape((1,) * (cov.ndim - 2) + cov.shape[-2:])
        cov = cov + jnp.reshape(g * g, e3) * eye
        cross = cross + jnp.reshape(g_dg, e3) * eye
    return mu, dmu, cov, cross


def factors(cb: Comps, sched: Schedule, t, precision) -> Factors:
    """The factors of a block at one scalar time t."""
    mu, dmu, cov, cross = path_blocks(cb, sched, t)
    d = mu.shape[-1]
    chol = jnp.linalg.cholesky(cov)
    eye = jnp.broadcast_to(jnp.eye(d, dtype=cov.dtype), cov.shape)
    w = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    # The second solve waits for the first: two batched LAPACK calls running at once can
    # deadlock XLA's CPU thread pool (see ``mixtures._sampling_factor``).
    w, chol, cross = jax.lax.optimization_barrier((w, chol, cross))
    # M^T = L^{-1} C^T, a triangular solve rather than a product with an inverse.
    m = jnp.swapaxes(
        jax.scipy.linalg.solve_triangular(chol, jnp.swapaxes(cross, -1, -2), lower=True), -1, -2
    )
    tr = jnp.einsum("kij,kji->k", m, w, precision=precision)
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_w = cb.log_w - half_logdet - 0.5 * d * math.log(2 * math.pi)
    return Factors(log_w, mu, dmu, w, m, tr)


def grad_v(f: Factors, precision) -> Float[Array, "B d d"]:
    """grad v_k = C S^{-1} = M W per component."""
    return jnp.einsum("bij,bjk->bik", f.m, f.w, precision=precision)


def maps(f: Factors, need_v: bool, precision):
    """The affine maps z = x @ gw + ow and v = x @ gv + ov of a block, stacked: gw, gv (d, B d),
    ow, ov (B, d) (gv, ov None unless need_v). Made once per block, reused by every chunk."""
    bsz, d = f.mu.shape

    def stack(g, off):  # columns (b, i): x @ g_b^T + off_b - g_b mu_b for every b
        return g.reshape(bsz * d, d).T, off - jnp.einsum("bij,bj->bi", g, f.mu, precision=precision)

    gw, ow = stack(f.w, 0.0)
    gv = ov = None
    if need_v:
        gv, ov = stack(grad_v(f, precision), f.dmu)
    return gw, ow, gv, ov


def terms(pb, x, want: frozenset, precision) -> _stream.Terms:
    """A block's terms at one t on points x (N, d); ``pb`` = (factors, maps or None).

    z = W (x - mu) and v = dmu + M z are affine in x: for many points (or ``maps`` made once for
    several chunks) one large (N, d) @ (d, B d) product per quantity, at B d^3 extra flops per
    block; for few points (one t per point, vmapped) the per-point matrix-vector form. The score
    s_k = -W^T z is taken from z (forming S^{-1} = W^T W would square its condition number).
    """
    f, mp = pb
    n, d = x.shape
    bsz = f.mu.shape[0]
    need_v, need_s, _ = _stream.needs(want)
    many = n >= 4 * d or mp is not None
    if many:
        gw, ow, gv, ov = maps(f, need_v, precision) if mp is None else mp
        z = jnp.matmul(x, gw, precision=precision).reshape(n, bsz, d) + ow[None]
    else:
        z = jnp.einsum("bij,nbj->nbi", f.w, x[:, None, :] - f.mu[None], precision=precision)
    logp = f.log_w[None] - 0.5 * jnp.sum(z * z, axis=-1)
    v = s = None
    if need_v:
        if many:
            v = jnp.matmul(x, gv, precision=precision).reshape(n, bsz, d) + ov[None]
        else:
            v = f.dmu[None] + jnp.einsum("bij,nbj->nbi", f.m, z, precision=precision)
    if need_s:
        s = -jnp.einsum("bji,nbj->nbi", f.w, z, precision=precision)

    def jac_sum(p):
        return jnp.matmul(p, grad_v(f, precision).reshape(bsz, d * d)).reshape(n, d, d)

    return _stream.Terms(logp, lambda: (v, s, f.tr[None]), jac_sum=jac_sum)


# ----------------------------------------------------------------------------- one t per point
# No time-free form exists for a general joint coupling: every point needs its own K
# factorisations. Written as d right-looking steps over whole (N, B, d, d) arrays (elementwise
# work XLA fuses, no per-matrix call): about 8x faster than batched LAPACK at d = 2, K = 8,
# N = 2e4 on a 2-core CPU; above d = 8 the shared-t form is vmapped over the points instead.


def _chol(a):
    """Lower Cholesky factor of SPD a (..., d, d): d right-looking rank-one updates."""
    d = a.shape[-1]
    cols = []
    for j in range(d):
        col = a[..., :, 0] / jnp.sqrt(a[..., 0, 0])[..., None]  # column j, rows j..d-1
        cols.append(jnp.concatenate([jnp.zeros(col.shape[:-1] + (j,), col.dtype), col], -1))
        a = a[..., 1:, 1:] - col[..., 1:, None] * col[..., None, 1:]
    return jnp.stack(cols, axis=-1)


def _solve(lo, r, transpose: bool = False):
    """L^{-1} r (or L^{-T} r) for lower-triangular L (..., d, d), r (..., d) or (..., d, m)."""
    d = lo.shape[-1]
    vec = r.ndim == lo.ndim - 1
    r = r[..., None] if vec else r
    rows = [None] * d
    for j in reversed(range(d)) if transpose else range(d):
        rows[j] = r[..., j, :] / lo[..., j, j][..., None]
        col = lo[..., j, :, None] if transpose else lo[..., :, j, None]
        r = r - col * rows[j][..., None, :]
    out = jnp.stack(rows, axis=-2)
    return out[..., 0] if vec else out


def points_terms(cb: Comps, chunk, sched: Schedule, want: frozenset, precision):
    """A block's terms with one time per point: chunk = (x (N, d), t (N,))."""
    x, t = chunk
    d = x.shape[-1]
    need_v, need_s, _ = _stream.needs(want)
    mu, dmu, cov, cross = path_blocks(cb, sched, t)  # (N, B, d), (N, B, d, d)
    lo = _chol(cov)
    z = _solve(lo, x[:, None, :] - mu)
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(lo, axis1=-2, axis2=-1)), axis=-1)
    logp = cb.log_w[None] - half_logdet - 0.5 * d * math.log(2 * math.pi)
    logp = logp - 0.5 * jnp.sum(z * z, axis=-1)
    sol = _solve(lo, z, transpose=True) if need_v or need_s else None  # S^{-1} (x - mu)
    v = dmu + jnp.einsum("nbij,nbj->nbi", cross, sol, precision=precision) if need_v else None
    tr = None
    if "divergence" in want:
        w = _solve(lo, jnp.broadcast_to(jnp.eye(d, dtype=x.dtype), lo.shape))  # L^{-1}
        tr = jnp.sum(_solve(lo, cross) * w, axis=(-2, -1))  # tr(L^{-1} C L^{-T}) = tr(C S^{-1})

    def jac_sum(p):  # (grad v_k)^T = S^{-1} C^T = L^{-T} L^{-1} C^T
        a_t = _solve(lo, _solve(lo, jnp.swapaxes(cross, -1, -2)), transpose=True)
        return jnp.einsum("nb,nbji->nij", p, a_t, precision=precision)

    return _stream.Terms(logp, lambda: (v, None if sol is None else -sol, tr), jac_sum=jac_sum)
