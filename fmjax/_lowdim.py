"""The shared-t exact kernel for low dimensions (d <= 8): velocity, log p_t and score.

At small d the general kernel (``_kernels._accumulate``) spends its time not in products but in
XLA:CPU's handling of its (N, B, d) point terms: a reduction over a short minor axis (the max
and the sums over the B components of a block) is lowered to a scalar loop. This kernel forms
no (N, B, d) array and no short reduction:
- the whitened coordinates z = W (x - mu) of all B components come from one (N, d) @ (d, d B)
  product with columns ordered (coordinate, component), so |z|^2 is a sum of d contiguous
  (N, B) slices (the d coordinates unrolled: d is static and at most ``MAX_D``);
- the block max of the online log-sum-exp is a tree of elementwise maxima of halves;
- the responsibility-weighted sums are one (N, B) @ (B, H) product (scores, softmax, weighted
  sum, as in attention): with x' = x - c, v_k(x) = A_k x' + o_k (A = C S^{-1},
  o = dmu - A (mu - c)) and s_k(x) = -P_k x' + P_k (mu - c) (P = S^{-1} = W^T W), so
  sum_k p_k v_k = (sum_k p_k A_k) x' + sum_k p_k o_k. The rows of the right factor are
  [vec A_k, o_k | -vec P_k, P_k (mu_k - c) | 1]; the last column is sum_k p_k.
Centring at c = sum_k pi_k mu_k (the mean of p_t) keeps the cancellation of these affine forms at
the scale of p_t's spread, not of |x|. The divergence (a centred co-moment across components)
and the responsibilities keep the general kernel. ``_accumulate_low_free`` does the same for the
time-free factors of an independent coupling (``_pencil``) with one t per point.

Measured on a 2-core CPU (velocity, one t): 3.6-4.8 ms against 13.7-14.9 ms for the general
kernel at d = 2, K = 8, N = 2e5; 6.5 against 10.4 ms at d = 8, K = 16, N = 5e4; 20 against 16 ms
at d = 16, where the weighted-sum factor's d^2 + d columns per component cost more than they
save (hence ``MAX_D``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax import _kernels, _pencil
from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule

MAX_D = 8  # largest d taken by this kernel (exact._run dispatches on it)
WANTS = frozenset({"velocity", "log_prob", "score"})  # the quantities it computes
_BLOCK = 16  # components per scan step (larger blocks measured slower at d = 4, 8, K = 64)
# On the CPU points are taken in chunks whose (n_c, d B) whitened coordinates fit in cache:
# 2^21 floats (8 MiB, a quarter of the measuring CPU's L3). At d = 8, K = 16, N = 2e5: 19-27 ms
# against 135 ms in one piece; 2^19 to 2^22 measured alike within noise.
_CACHE_ELEMS = 1 << 21
_MIN_CHUNK = 1024


def _max_last(a):
    """Max over the last axis as a tree of elementwise maxima of halves (fast on XLA:CPU)."""
    while a.shape[-1] > 1:
        h = a.shape[-1] // 2
        m = jnp.maximum(a[..., :h], a[..., h : 2 * h])
        a = jnp.concatenate([m, a[..., 2 * h :]], axis=-1) if a.shape[-1] % 2 else m
    return a[..., 0]


def _back(f: _kernels._Factors, mu, need_v: bool, need_s: bool, precision):
    """Right factor (B, H) of the weighted sums: rows [vec A, o | -vec P, P mu | 1] per component
    (mu already centred)."""
    bsz, d = mu.shape
    cols = []
    if need_v:
        a = jnp.einsum("bij,bjk->bik", f.m, f.w, precision=precision)  # C S^{-1}
        off = f.dmu - jnp.einsum("bij,bj->bi", a, mu, precision=precision)
        cols += [a.reshape(bsz, d * d), off]
    if need_s:
        p = jnp.einsum("bji,bjk->bik", f.w, f.w, precision=precision)  # S^{-1} = W^T W
        cols += [-p.reshape(bsz, d * d), jnp.einsum("bij,bj->bi", p, mu, precision=precision)]
    cols.append(jnp.ones((bsz, 1), mu.dtype))
    return jnp.concatenate(cols, axis=1)


def _affine(acc, xc, offset: int):
    """sum_j acc[:, offset + i d + j] x'_j + acc[:, offset + d^2 + i] for every i: (N, d)."""
    d = xc.shape[-1]
    rows = [  # unrolled: a sum over a short minor axis would be a scalar loop on XLA:CPU
        sum(acc[:, offset + i * d + j] * xc[:, j] for j in range(d)) + acc[:, offset + d * d + i]
        for i in range(d)
    ]
    return jnp.stack(rows, axis=-1)


def _chunks(n: int, width: int) -> int:
    """Number of point chunks on the CPU: each chunk's (n_c, width) products stay within
    ``_CACHE_ELEMS`` (in cache); one chunk elsewhere (a GPU wants the whole batch)."""
    if not _kernels._on_cpu():
        return 1
    per = max(_MIN_CHUNK, _CACHE_ELEMS // width)
    return -(-n // per)


def _in_chunks(fn, pts, n: int, width: int) -> dict:
    """``fn(pts)`` (a dict of (N, ...) arrays from a pytree of (N, ...) points) evaluated chunk
    by chunk (``lax.map``) when ``_chunks`` says so. ``_accumulate_low`` refactors the K
    components in each chunk (K LAPACK calls of size d: negligible beside its N K d^2)."""
    n_chunks = _chunks(n, width)
    if n_chunks == 1:
        return fn(pts)
    out = jax.lax.map(fn, jax.tree.map(lambda a: _kernels._split(a, n_chunks), pts))
    return {q: v.reshape((-1,) + v.shape[2:])[:n] for q, v in out.items()}


def _accumulate_low(c: JointGaussianMixture, sched: Schedule, t, x, want: frozenset, precision):
    """``_kernels._accumulate`` for d <= MAX_D and want <= WANTS; x (N, d), t a scalar."""
    n, d = x.shape
    k = c.n_components
    bsz = _kernels._balanced(k, _BLOCK)
    n_blocks = -(-k // bsz)
    need_v = "velocity" in want
    need_s = "score" in want
    a, b = sched(t)[:2]
    ctr = jnp.matmul(c.weights, b * c.means[:, :d] + a * c.means[:, d:], precision=precision)
    blocks = jax.tree.map(
        lambda v: v.reshape((n_blocks, bsz) + v.shape[1:]), _kernels._pad(c, n_blocks * bsz)
    )
    width = 1 + (d * d + d) * (int(need_v) + int(need_s))

    def chunk(xc):  # points (m, d), centred
        def step(carry, cb):
            mx, acc = carry
            f = _kernels._factors(cb, sched, t, precision)
            mu = f.mu - ctr[None]
            # z of the block in one (m, d) @ (d, d B) product, columns ordered (i, b): |z|^2 is
            # then a sum of d contiguous (m, B) slices rather than a short reduction.
            w_cols = jnp.transpose(f.w, (2, 1, 0)).reshape(d, d * bsz)
            w_mu = jnp.einsum("bij,bj->ib", f.w, mu, precision=precision).reshape(1, d * bsz)
            z = jnp.matmul(xc, w_cols, precision=precision) - w_mu
            sq = sum(jnp.square(z[:, i * bsz : (i + 1) * bsz]) for i in range(d))
            logp = f.log_w[None] - 0.5 * sq
            new_mx, scale, p = _kernels._lse_block(mx, logp, _max_last(logp))
            back = _back(f, mu, need_v, need_s, precision)
            acc = acc * scale[:, None] + jnp.matmul(p, back, precision=precision)
            return (new_mx, acc), None

        m = xc.shape[0]
        init = (jnp.full((m,), -jnp.inf, xc.dtype), jnp.zeros((m, width), xc.dtype))
        (mx, acc), _ = jax.lax.scan(step, init, blocks)
        tot = acc[:, -1]
        out = {}
        if need_v:
            out["velocity"] = _affine(acc, xc, 0) / tot[:, None]
        if need_s:
            out["score"] = _affine(acc, xc, (d * d + d) * int(need_v)) / tot[:, None]
        if "log_prob" in want:
            out["log_prob"] = jnp.where(jnp.isfinite(mx), mx, 0.0) + jnp.log(tot)
        return out

    return _in_chunks(chunk, x - ctr[None], n, d * bsz)


def _accumulate_low_free(f: _pencil._Pencil, sched: Schedule, t, x, want: frozenset, precision):
    """``_pencil._accumulate_free`` for d <= MAX_D and want <= WANTS; t (N,), one per point.

    The same algebra (module docstring of ``_pencil``) laid out as above: per block, y, den
    and r are (N, d B) with columns ordered (coordinate, component), the sums over coordinates
    are d contiguous slices, the block max a tree, and every weighted sum a product.
    """
    n, d = x.shape
    k = f.m0.shape[0]
    bsz = _kernels._balanced(k, _BLOCK)
    n_blocks = -(-k // bsz)
    kp = n_blocks * bsz
    f = _pencil._pad_pencil(f, kp)
    need_v = "velocity" in want
    need_s = "score" in want
    noise = sched.has_noise

    def cols(a):  # (K, d) -> (n_blocks, 1, d B), column (j, b)
        return jnp.swapaxes(a.reshape(n_blocks, bsz, d), 1, 2).reshape(n_blocks, 1, d * bsz)

    def rows(m):  # (K, d, d) -> (n_blocks, d B, d), row (j, b) = m_b[:, j]
        m = jnp.transpose(m.reshape(n_blocks, bsz, d, d), (0, 3, 1, 2))
        return m.reshape(n_blocks, d * bsz, d)

    blocks = (
        jnp.swapaxes(rows(f.v), 1, 2),  # x @ this: y before the offset, column (j, b)
        cols(f.p0),
        cols(f.p1),
        cols(f.lam),
        cols(f.gram),
        f.log_w.reshape(n_blocks, bsz),
        jnp.concatenate([f.m0, f.m1, jnp.ones((kp, 1), f.m0.dtype)], 1).reshape(
            n_blocks, bsz, 2 * d + 1
        ),
        rows(f.s00v),
        rows(f.v),
    )
    a, b, da, db = (jnp.reshape(u, (-1, 1)) for u in sched(t))
    coeffs = (a, b, da, db)
    if noise:
        g, _, g_dg = sched.gamma(t)
        coeffs += (jnp.reshape(g * g, (-1, 1)), jnp.reshape(g_dg, (-1, 1)))

    def chunk(args):
        xc, cf = args
        a, b, da, db = cf[:4]

        def step(carry, blk):
            mx, tot, acc_v, acc_s, acc_div = carry
            v_fwd, p0, p1, lam, gram, log_w, means, back_v, back_s = blk
            y = jnp.matmul(xc, v_fwd, precision=precision) - (b * p0 + a * p1)
            den = b * b + a * a * lam
            if noise:
                den = den + cf[4] * gram
            inv = 1.0 / den
            terms = y * y * inv + jnp.log(den)
            logp = log_w[None] - 0.5 * sum(terms[:, i * bsz : (i + 1) * bsz] for i in range(d))
            new_mx, scale, p = _kernels._lse_block(mx, logp, _max_last(logp))
            pm = jnp.matmul(p, means, precision=precision)  # sum p m0, sum p m1, sum p
            pt = jnp.tile(p, (1, d))  # column (j, b) = p_b
            if need_v:
                r = b * db + a * da * lam
                if noise:
                    r = r + cf[5] * gram
                bv = db * pm[:, :d] + da * pm[:, d : 2 * d]
                bv = bv + jnp.matmul(pt * r * inv * y, back_v, precision=precision)
                acc_v = acc_v * scale[:, None] + bv
            if need_s:
                bs = -jnp.matmul(pt * y * inv, back_s, precision=precision)
                acc_s = acc_s * scale[:, None] + bs
            return (new_mx, tot * scale + pm[:, -1], acc_v, acc_s, acc_div), None

        carry, _ = jax.lax.scan(step, _kernels._lse_init(xc.shape[0], d, xc.dtype), blocks)
        return _kernels._finish(carry, want)

    return _in_chunks(chunk, (x, coeffs), n, d * bsz)


_accumulate_low_jit = jax.jit(_accumulate_low, static_argnames=("want", "precision"))
_accumulate_low_free_jit = jax.jit(_accumulate_low_free, static_argnames=("want", "precision"))
