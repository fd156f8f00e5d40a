"""The per-time Cholesky kernel of the exact engine and the online log-sum-exp shared by both.

For a joint mixture of (X0, X1) and a schedule, each component k makes (X_t, dX_t/dt) jointly
Gaussian with
    mu_t = b m0 + a m1,                    dmu_t = db m0 + da m1,
    S_t  = b^2 S00 + a b (S01 + S10) + a^2 S11 (+ gamma^2 I),
    C_t  = Cov(dX_t, X_t) = b db S00 + a db S01 + b da S10 + a da S11 (+ gamma dgamma I),
so v_t^k(x) = dmu_t + C_t S_t^{-1} (x - mu_t) and u_t(x) = sum_k alpha_t^k(x) v_t^k(x), with
alpha_t^k(x) proportional to pi_k N(x; mu_t, S_t) (the X_t block only).

Per time and component there is one Cholesky factor L (S_t = L L^T), W = L^{-1} (triangular
solve) and M = C_t L^{-T}; per point,
    z = W (x - mu_t),  v = dmu_t + M z,  score_k = -W^T z,  log N = -|z|^2 / 2 - log|L| - ...
Components are streamed in blocks with an online log-sum-exp (as flash attention does for
softmax), so memory stays O(N d + B d^2) for a block of B components. For many points z and v
are affine in x, so a block costs one (N, d) @ (d, B d) matrix product each (W, resp.
A = M W = C_t S_t^{-1}, stacked over the block); for few points (one time per point, vmapped)
the per-point matrix-vector form is used instead.

The divergence div u = sum_k alpha_k tr_k + sum_k alpha_k (s_k - s) . (v_k - u) is accumulated
centred (a weighted co-moment merged across blocks, ``_merge_div``), which stays accurate in
float32 far from the mass where the uncentred form cancels catastrophically.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule

# Elements of one (N, block, d) intermediate: 2^24 floats (64 MiB in float32).
_BLOCK_BUDGET = 1 << 24
# Shared-t point chunking on the CPU (``_plan``): above this d, chunks whose (n_c, B, d) terms
# hold at most _CACHE_ELEMS floats (4 MiB), of at least _MIN_CHUNK points.
_CHUNK_MIN_D = 8
_CACHE_ELEMS = 1 << 20
_MIN_CHUNK = 256
# Largest d for which one t per point on a general coupling uses ``_accumulate_points``.
_SMALL_D = 8


class _Factors(NamedTuple):
    """Per-component quantities at one time t (leading axis K)."""

    log_w: Float[Array, " K"]  # log pi_k - log|L_k| - d/2 log(2 pi)
    mu: Float[Array, "K d"]
    dmu: Float[Array, "K d"]
    w: Float[Array, "K d d"]  # L^{-1}
    m: Float[Array, "K d d"]  # C L^{-T}
    tr: Float[Array, " K"]  # tr(C S^{-1}) = div v^k


def _path_blocks(c: JointGaussianMixture, sched: Schedule, t):
    """Per-component mean, velocity mean, covariance and cross-covariance of (X_t, dX_t).

    Latent noise gamma_t z (z independent of the coupling) adds gamma^2 I to the covariance and
    gamma dgamma I to Cov(dX_t, X_t); only the product gamma dgamma is used (finite at the ends).
    """
    a, b, da, db = sched(t)
    m0, m1, s00, s01, s10, s11 = c.blocks()
    mu = b * m0 + a * m1
    dmu = db * m0 + da * m1
    cov = b * b * s00 + a * b * (s01 + s10) + a * a * s11
    cross = b * db * s00 + a * db * s01 + b * da * s10 + a * da * s11
    if sched.has_noise:
        g, _, g_dg = sched.gamma(t)
        eye = jnp.eye(mu.shape[-1], dtype=cov.dtype)[None]
        cov = cov + (g * g) * eye
        cross = cross + g_dg * eye
    return mu, dmu, cov, cross


def _factors(c: JointGaussianMixture, sched: Schedule, t, precision) -> _Factors:
    mu, dmu, cov, cross = _path_blocks(c, sched, t)
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
    log_w = jnp.log(c.weights) - half_logdet - 0.5 * d * math.log(2 * math.pi)
    return _Factors(log_w, mu, dmu, w, m, tr)


def _maps(f: _Factors, need_v: bool, precision):
    """The affine maps z = x @ gw + ow and v = x @ gv + ov of a block, stacked: gw, gv (d, B d),
    ow, ov (B, d) (gv, ov None unless need_v). Made once per block, reused by every chunk."""
    bsz, d = f.mu.shape

    def stack(g, off):  # columns (b, i): x @ g_b^T + off_b - g_b mu_b for every b
        return g.reshape(bsz * d, d).T, off - jnp.einsum("bij,bj->bi", g, f.mu, precision=precision)

    gw, ow = stack(f.w, 0.0)
    gv = ov = None
    if need_v:
        gv, ov = stack(jnp.einsum("bij,bjk->bik", f.m, f.w, precision=precision), f.dmu)
    return gw, ow, gv, ov


def _point_terms(f: _Factors, x, need_v: bool, need_s: bool, precision, maps=None):
    """For points x (N, d) and a block of B components: log pi N (N, B), v_k and s_k (N, B, d).

    z = W (x - mu) and v = dmu + M z are affine in x: z = W x - W mu, v = A x + (dmu - A mu) with
    A = C S^{-1} = M W. For many points, stacking W (and A) of all B components gives one large
    (N, d) @ (d, B d) product per quantity instead of B small batched ones, at the cost of B d^3
    extra flops per block (negligible for N >> d; ``maps`` passes them in when made once for
    several chunks of points). For few points (one time per point, vmapped) the per-point
    matrix-vector form is cheaper. The score s_k = -W^T z is taken from z (forming
    S^{-1} = W^T W would square its condition number).
    """
    n, d = x.shape
    bsz = f.mu.shape[0]
    many = n >= 4 * d or maps is not None
    if many:
        gw, ow, gv, ov = _maps(f, need_v, precision) if maps is None else maps
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
    return logp, v, s


def _block_size(n: int, k: int, d: int, arrays: int = 3) -> int:
    """Components per scan step: ``arrays`` (N, B, d) point terms (3 by default) and ~8
    (B, 2d, 2d) factor-sized arrays.

    The fewest blocks under the memory budget, balanced: K is then padded up to a multiple of B
    with zero-weight components (``_pad``), so a prime K costs no more scan steps than K + 1.
    """
    return _balanced(k, max(1, _BLOCK_BUDGET // max(1, arrays * n * d + 32 * d * d)))


def _balanced(k: int, limit: int) -> int:
    """Components per block: the fewest blocks of at most ``limit``, as equal as possible."""
    n_blocks = -(-k // min(limit, k))
    return -(-k // n_blocks)


def _pad(c: JointGaussianMixture, k_pad: int) -> JointGaussianMixture:
    """Append ``k_pad - K`` components of weight 0 (log-weight -inf: they add exactly nothing to
    the online log-sum-exp) with identity covariances, so their factorisations stay finite."""
    extra = k_pad - c.n_components
    if extra == 0:
        return c
    dd = c.means.shape[-1]
    w = jnp.concatenate([c.weights, jnp.zeros((extra,), c.weights.dtype)])
    m = jnp.concatenate([c.means, jnp.broadcast_to(c.means[:1], (extra, dd))])
    eye = jnp.broadcast_to(jnp.eye(dd, dtype=c.covs.dtype), (extra, dd, dd))
    return JointGaussianMixture._from_leaves(w, m, jnp.concatenate([c.covs, eye]))


def _lse_init(n: int, d: int, dtype):
    """Empty running sums of the online log-sum-exp: (max, total, sum v, sum s, sum div)."""
    zeros_n, zeros_nd = jnp.zeros((n,), dtype), jnp.zeros((n, d), dtype)
    return jnp.full((n,), -jnp.inf, dtype), zeros_n, zeros_nd, zeros_nd, zeros_n


def _lse_block(mx, logp, block_max=None):
    """One block of the online log-sum-exp over components (logp (N, B)).

    ``block_max`` is logp's max over the block when the caller has it (``_lowdim`` forms it as
    a tree of elementwise maxima); by default it is reduced here. Returns the new running max,
    the factor that rescales the running sums to it, and the block's weights
    p = exp(logp - max) (N, B); the new total is ``tot * scale + sum(p)``.
    """
    new_mx = jnp.maximum(mx, jnp.max(logp, axis=1) if block_max is None else block_max)
    # Zero weights give -inf everywhere: keep the shift finite so no inf - inf appears.
    shift = jnp.where(jnp.isfinite(new_mx), new_mx, 0.0)
    scale = jnp.exp(mx - shift)
    p = jnp.exp(logp - shift[:, None])
    return new_mx, scale, p


def _safe(w):
    return jnp.where(w > 0, w, 1.0)


def _merge_div(acc_div, scale, tot, acc_v, acc_s, wb, bv, bs, block):
    """Chan's merge of the weighted co-moment sum_k alpha_k (s_k - s) . (v_k - u).

    div u = sum_k alpha_k tr_k + sum_k alpha_k (s_k - s) . (v_k - u) (from grad alpha_k =
    alpha_k (s_k - s)) is computed centred: far from the mass s_k . v_k and s . u are huge and
    nearly equal, so the uncentred sum_k alpha_k s_k . v_k - s . u cancels catastrophically in
    float32. ``block`` holds sum_{k in block} p_k (tr_k + (s_k - s_b) . (v_k - u_b)), centred at
    the block's own means u_b = bv / wb, s_b = bs / wb; the running sums (weight ``tot``, before
    rescaling) merge with it through the difference of the two means, as in Welford's update.
    """
    wa = tot * scale
    w = wa + wb
    du = bv / _safe(wb)[:, None] - acc_v / _safe(tot)[:, None]
    ds = bs / _safe(wb)[:, None] - acc_s / _safe(tot)[:, None]
    cross = jnp.where(w > 0, wa * wb / _safe(w), 0.0) * jnp.sum(ds * du, axis=-1)
    return acc_div * scale + block + cross


def _add_block(carry, logp, v, sk, tr, want: frozenset):
    """Fold one block of components into the running sums of the online log-sum-exp.

    logp (N, B); the per-component velocities v and scores sk (N, B, d), each None when not
    needed; tr (B,) or (N, B), div v_k, used for the divergence only.
    """
    mx, tot, acc_v, acc_s, acc_div = carry
    new_mx, scale, p = _lse_block(mx, logp)
    wb = jnp.sum(p, axis=1)
    # Weighted sums over the block as multiply-and-reduce (fused), not as tiny dots.
    bv = jnp.sum(p[:, :, None] * v, axis=1) if v is not None else None
    bs = jnp.sum(p[:, :, None] * sk, axis=1) if sk is not None else None
    if "divergence" in want:
        mv = bv / _safe(wb)[:, None]
        ms = bs / _safe(wb)[:, None]
        cen = jnp.sum((sk - ms[:, None]) * (v - mv[:, None]), axis=-1)
        block = jnp.sum(p * (tr + cen), axis=1)
        acc_div = _merge_div(acc_div, scale, tot, acc_v, acc_s, wb, bv, bs, block)
    if bv is not None:
        acc_v = acc_v * scale[:, None] + bv
    if bs is not None:
        acc_s = acc_s * scale[:, None] + bs
    return new_mx, tot * scale + wb, acc_v, acc_s, acc_div


def _on_cpu() -> bool:
    """Whether the shared-t kernels chunk their points for the cache (the default backend is the
    CPU; a GPU wants the whole batch). A function, so tests can force either choice."""
    return jax.default_backend() == "cpu"


def _plan(n: int, k: int, d: int, arrays: int = 3) -> tuple[int, int]:
    """(components per scan step B, chunks of points) for the shared-t kernels.

    On the CPU, for d > ``_CHUNK_MIN_D``, points are taken in chunks whose (n_c, B, d) point
    terms stay in cache (``_CACHE_ELEMS`` per array): at d = 64, K = 64, N = 5e4 that is
    0.41-0.51 s against 0.9-0.96 s with the terms in memory (they are written and read once per
    product: at a contraction of only d the products are bound by memory otherwise). Elsewhere
    (and on a GPU, which wants the whole batch) one chunk with ``_block_size``'s blocks.
    """
    if _on_cpu() and d > _CHUNK_MIN_D:
        bsz = _balanced(k, max(1, _CACHE_ELEMS // (_MIN_CHUNK * d)))
        n_chunks = (n * bsz * d) // _CACHE_ELEMS
        if n_chunks > 1:
            return bsz, n_chunks
    return _block_size(n, k, d, arrays), 1


def _split(a, n_chunks: int):
    """(N, ...) -> (n_chunks, ceil(N / n_chunks), ...), the last chunk padded by repeating the
    last row (a real point, so the padding computes nothing non-finite; it is dropped)."""
    n = a.shape[0]
    per = -(-n // n_chunks)
    a = jnp.pad(a, [(0, per * n_chunks - n)] + [(0, 0)] * (a.ndim - 1), mode="edge")
    return a.reshape((n_chunks, per) + a.shape[1:])


def _stream(prep, fold, blocks, pts, n: int, d: int, dtype, n_chunks: int):
    """Scan the component blocks with an online log-sum-exp over all points.

    ``prep(block)`` makes a block's factors once; ``fold(carry, prepared, pts)`` folds the block
    into the running sums of the points ``pts`` (a pytree of (N, ...) arrays). With
    ``n_chunks > 1`` each block is folded into the points chunk by chunk (``lax.map``; chunks
    from ``_split``).
    """
    per = -(-n // n_chunks)
    total = per * n_chunks
    if n_chunks > 1:
        pts = jax.tree.map(lambda a: _split(a, n_chunks), pts)

    def step(carry, cb):
        pb = prep(cb)
        if n_chunks == 1:
            return fold(carry, pb, pts), None
        cc = jax.tree.map(lambda a: a.reshape((n_chunks, per) + a.shape[1:]), carry)
        new = jax.lax.map(lambda args: fold(args[0], pb, args[1]), (cc, pts))
        return jax.tree.map(lambda a: a.reshape((total,) + a.shape[2:]), new), None

    carry, _ = jax.lax.scan(step, _lse_init(total, d, dtype), blocks)
    return jax.tree.map(lambda a: a[:n], carry)


def _accumulate(c: JointGaussianMixture, sched: Schedule, t, x, want: frozenset, precision):
    """Stream over component blocks with an online log-sum-exp; x is (N, d), t a scalar.

    Each block's Cholesky factors are made inside its scan step, so memory is O(N d + B d^2).
    """
    n, d = x.shape
    k = c.n_components
    bsz, n_chunks = _plan(n, k, d)
    n_blocks = -(-k // bsz)
    blocks = jax.tree.map(
        lambda a: a.reshape((n_blocks, bsz) + a.shape[1:]), _pad(c, n_blocks * bsz)
    )
    need_v = bool(want & {"velocity", "divergence"})
    need_s = bool(want & {"score", "divergence"})

    def prep(cb):
        fb = _factors(cb, sched, t, precision)
        return fb, (_maps(fb, need_v, precision) if n_chunks > 1 else None)

    def fold(carry, pb, xc):
        fb, maps = pb
        logp, v, sk = _point_terms(fb, xc, need_v, need_s, precision, maps)
        return _add_block(carry, logp, v, sk, fb.tr[None], want)

    carry = _stream(prep, fold, blocks, x, n, d, x.dtype, n_chunks)
    return _finish(carry, want)


def _finish(carry, want: frozenset) -> dict:
    """Normalise the online log-sum-exp accumulators into the requested quantities."""
    mx, tot, acc_v, acc_s, acc_div = carry
    shift = jnp.where(jnp.isfinite(mx), mx, 0.0)
    out = {}
    u = acc_v / tot[:, None]
    s = acc_s / tot[:, None]
    if "velocity" in want:
        out["velocity"] = u
    if "score" in want:
        out["score"] = s
    if "log_prob" in want:
        out["log_prob"] = shift + jnp.log(tot)
    if "divergence" in want:  # centred, merged across blocks by ``_merge_div``
        out["divergence"] = acc_div / tot
    return out


def _responsibilities(c: JointGaussianMixture, sched: Schedule, t, x, precision):
    logp, _, _ = _point_terms(_factors(c, sched, t, precision), x, False, False, precision)
    return {"responsibilities": jax.nn.softmax(logp, axis=-1)}


# Compiled once per shapes and static options, so eager callers do not recompile the component
# scan on every call (an eager lax.scan is compiled anew per call); inlined under an outer jit.
_accumulate_jit = jax.jit(_accumulate, static_argnames=("want", "precision"))
_responsibilities_jit = jax.jit(_responsibilities, static_argnames=("precision",))


# One time per point on a general joint coupling: no time-free form exists, so every point needs
# its own K factorisations. Instead of vmapping the shared-t kernel (batched LAPACK calls on
# d x d matrices, one call per point and component), the factorisations are written as d
# right-looking steps over whole (N, B, d, d) arrays: elementwise work XLA fuses, no per-matrix
# call overhead. Cost per point and component: ~d^3 flops for the factor (and 2 d^3 more for
# the divergence's tr(S^{-1} C)), d^2 for each triangular solve.


def _chol(a):
    """Lower Cholesky factor of SPD a (..., d, d): d right-looking rank-one updates of the
    shrinking trailing block (~d^3 / 3 flops)."""
    d = a.shape[-1]
    cols = []
    for j in range(d):
        col = a[..., :, 0] / jnp.sqrt(a[..., 0, 0])[..., None]  # column j, rows j..d-1
        cols.append(jnp.concatenate([jnp.zeros(col.shape[:-1] + (j,), col.dtype), col], -1))
        a = a[..., 1:, 1:] - col[..., 1:, None] * col[..., None, 1:]
    return jnp.stack(cols, axis=-1)


def _solve_lower(lo, r):
    """L^{-1} r for lower-triangular L (..., d, d) and r (..., d) or (..., d, m) (columns)."""
    d = lo.shape[-1]
    vec = r.ndim == lo.ndim - 1
    r = r[..., None] if vec else r
    rows = []
    for j in range(d):
        zj = r[..., j, :] / lo[..., j, j][..., None]
        rows.append(zj)
        r = r - lo[..., :, j, None] * zj[..., None, :]
    out = jnp.stack(rows, axis=-2)
    return out[..., 0] if vec else out


def _solve_upper_t(lo, z):
    """L^{-T} z for lower-triangular L (..., d, d) and z (..., d)."""
    d = lo.shape[-1]
    out = [None] * d
    for j in reversed(range(d)):
        sj = z[..., j] / lo[..., j, j]
        out[j] = sj
        z = z - lo[..., j, :] * sj[..., None]
    return jnp.stack(out, axis=-1)


def _accumulate_points(c: JointGaussianMixture, sched: Schedule, t, x, want: frozenset, precision):
    """``_accumulate`` with one time per point, t (N,): per-point factors, vectorised."""
    n, d = x.shape
    k = c.n_components
    bsz = _block_size(n, k, d, 4 + 4 * d)  # (N, B, d, d) covariances, factors and cross terms
    n_blocks = -(-k // bsz)
    blocks = jax.tree.map(
        lambda a: a.reshape((n_blocks, bsz) + a.shape[1:]), _pad(c, n_blocks * bsz)
    )
    need_v = bool(want & {"velocity", "divergence"})
    need_s = bool(want & {"score", "divergence"})
    a, b, da, db = (jnp.reshape(u, (n, 1, 1)) for u in sched(t))
    if sched.has_noise:
        g, _, g_dg = sched.gamma(t)
        g2, g_dg = jnp.reshape(g * g, (n, 1, 1, 1)), jnp.reshape(g_dg, (n, 1, 1, 1))
    eye = jnp.eye(d, dtype=x.dtype)

    def step(carry, cb):
        m0, m1, s00, s01, s10, s11 = cb.blocks()
        mu = b * m0[None] + a * m1[None]  # (N, B, d)
        dmu = db * m0[None] + da * m1[None]
        a4, b4, da4, db4 = (u[..., None] for u in (a, b, da, db))
        cov = b4 * b4 * s00[None] + a4 * b4 * (s01 + s10)[None] + a4 * a4 * s11[None]
        cross = b4 * db4 * s00[None] + a4 * db4 * s01[None] + b4 * da4 * s10[None]
        cross = cross + a4 * da4 * s11[None]
        if sched.has_noise:
            cov = cov + g2 * eye[None, None]
            cross = cross + g_dg * eye[None, None]
        lo = _chol(cov)  # (N, B, d, d)
        z = _solve_lower(lo, x[:, None, :] - mu)
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(lo, axis1=-2, axis2=-1)), axis=-1)
        logp = (
            jnp.log(cb.weights)[None]
            - half_logdet
            - 0.5 * d * math.log(2 * math.pi)
            - 0.5 * jnp.sum(z * z, axis=-1)
        )
        v = sk = tr = None
        if need_v or need_s:
            sol = _solve_upper_t(lo, z)  # S^{-1} (x - mu)
        if need_v:
            v = dmu + jnp.einsum("nbij,nbj->nbi", cross, sol, precision=precision)
        if need_s:
            sk = -sol
        if "divergence" in want:
            w = _solve_lower(lo, jnp.broadcast_to(eye, lo.shape))  # L^{-1}
            y = _solve_lower(lo, cross)  # L^{-1} C
            tr = jnp.sum(y * w, axis=(-2, -1))  # tr(L^{-1} C L^{-T}) = tr(C S^{-1})
        return _add_block(carry, logp, v, sk, tr, want), None

    carry, _ = jax.lax.scan(step, _lse_init(n, d, x.dtype), blocks)
    return _finish(carry, want)


_accumulate_points_jit = jax.jit(_accumulate_points, static_argnames=("want", "precision"))
