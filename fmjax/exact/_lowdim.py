"""The low-dimension layout (d <= 8) of the exact engine's terms: velocity, log p_t and score.

At small d the general layout spends its time not in products but in XLA:CPU's handling of its
(N, B, d) point terms: a reduction over a short minor axis (the max and the sums over the B
components of a block) is lowered to a scalar loop. This layout forms no (N, B, d) array and no
short reduction:
- the whitened coordinates of all B components come from one (N, d) @ (d, d B) product with
  columns ordered (coordinate, component), so |z|^2 is a sum of d contiguous (N, B) slices (the
  d coordinates unrolled: d is static and small);
- the block max of the online log-sum-exp is a tree of elementwise maxima of halves;
- the responsibility-weighted sums are one (N, B) @ (B, H) product (scores, softmax, weighted
  sum, as in attention): with x' = x - c, v_k(x) = A_k x' + o_k (A = C S^{-1},
  o = dmu - A (mu - c)) and s_k(x) = -P_k x' + P_k (mu - c) (P = S^{-1} = W^T W). The rows of
  the right factor are [vec A_k, o_k | -vec P_k, P_k (mu_k - c) | 1].
Centring at c = sum_k pi_k mu_k (the mean of p_t) keeps the cancellation of these affine forms at
the scale of p_t's spread, not of |x|. ``pencil_*`` lays out the time-free factors of an
independent coupling (``_pencil``) the same way, for one t per point. The divergence, the
Jacobian and the responsibilities take the other layouts (table: ``_plan``).
"""

from __future__ import annotations

import jax.numpy as jnp

from fmjax.exact import _cholesky, _pencil, _stream

BLOCK = 16  # components per block (larger blocks measured slower at d = 4, 8, K = 64)
CACHED = 1  # (n_c, d B) terms per chunk that should stay in cache (``_stream.sizes``)


def _max_last(a):
    """Max over the last axis as a tree of elementwise maxima of halves (fast on XLA:CPU)."""
    while a.shape[-1] > 1:
        h = a.shape[-1] // 2
        m = jnp.maximum(a[..., :h], a[..., h : 2 * h])
        a = jnp.concatenate([m, a[..., 2 * h :]], axis=-1) if a.shape[-1] % 2 else m
    return a[..., 0]


def _back(f: _cholesky.Factors, mu, need_v: bool, need_s: bool, precision):
    """Right factor (B, H) of the weighted sums: rows [vec A, o | -vec P, P mu | 1] per component
    (mu already centred)."""
    bsz, d = mu.shape
    cols = []
    if need_v:
        a = _cholesky.grad_v(f, precision)  # C S^{-1}
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


def _slices(a, d: int, bsz: int):
    """sum over the d coordinates of (N, d B) columns ordered (coordinate, component): (N, B)."""
    return sum(a[:, i * bsz : (i + 1) * bsz] for i in range(d))


def centre(c, sched, t, precision):
    """c = sum_k pi_k mu_k at one time t, the mean of p_t (the points are taken as x - c)."""
    d = c.dim
    a, b = sched(t)[:2]
    return jnp.matmul(c.weights, b * c.means[:, :d] + a * c.means[:, d:], precision=precision)


def cholesky_prep(cb: _cholesky.Comps, sched, t, ctr, want: frozenset, precision):
    """A block's factors at one t, laid out: (W columns (i, b), W mu, right factor, log w)."""
    f = _cholesky.factors(cb, sched, t, precision)
    bsz, d = f.mu.shape
    mu = f.mu - ctr[None]
    w_cols = jnp.transpose(f.w, (2, 1, 0)).reshape(d, d * bsz)
    w_mu = jnp.einsum("bij,bj->ib", f.w, mu, precision=precision).reshape(1, d * bsz)
    back = _back(f, mu, "velocity" in want, "score" in want, precision)
    return w_cols, w_mu, back, f.log_w


def cholesky_lift(d: int, want: frozenset):
    """``_stream.run``'s ``lift`` for ``cholesky_terms``: the raw sums p @ [vec A, o | -vec P,
    P mu | 1] (linear in p) are carried across the blocks, and their affine maps in x' applied
    once at the end."""
    need_v, need_s = "velocity" in want, "score" in want
    width = (d * d + d) * (int(need_v) + int(need_s)) + 1

    def fn(acc, xc):
        bv = _affine(acc, xc, 0) if need_v else None
        bs = _affine(acc, xc, (d * d + d) * int(need_v)) if need_s else None
        return bv, bs

    return width, fn


def cholesky_terms(pb, xc, want: frozenset, precision) -> _stream.Terms:
    """Terms of a block on centred points xc (N, d): raw sums (``cholesky_lift``)."""
    w_cols, w_mu, back, log_w = pb
    d, bsz = xc.shape[-1], log_w.shape[0]
    z = jnp.matmul(xc, w_cols, precision=precision) - w_mu
    logp = log_w[None] - 0.5 * _slices(jnp.square(z), d, bsz)

    def sums(p):
        acc = jnp.matmul(p, back, precision=precision)
        return acc[:, -1], acc, None

    return _stream.Terms(logp, sums=sums, block_max=_max_last(logp))


def pencil_prep(fb: _pencil.Pencil, want: frozenset):
    """A block of time-free factors laid out: columns (j, b) of V and of the diagonal scalings,
    the means, and the rows (j, b) of the weighted sums' right factors."""
    bsz, d = fb.m0.shape

    def cols(a):  # (B, d) -> (1, d B), column (j, b)
        return a.T.reshape(1, d * bsz)

    def rows(m):  # (B, d, d) -> (d B, d), row (j, b) = m_b[:, j]
        return jnp.transpose(m, (2, 0, 1)).reshape(d * bsz, d)

    means = jnp.concatenate([fb.m0, fb.m1, jnp.ones((bsz, 1), fb.m0.dtype)], 1)
    back = [rows(fb.s00v)] if "velocity" in want else []
    back += [rows(fb.v)] if "score" in want else []
    back = jnp.concatenate(back, axis=1) if back else None  # log p alone: no weighted sums
    return (
        rows(fb.v).T,
        cols(fb.p0),
        cols(fb.p1),
        cols(fb.lam),
        cols(fb.gram),
        fb.log_w,
        means,
        back,
    )


def pencil_coeffs(sched, t):
    """a, b, da, db (, gamma^2, gamma dgamma) shaped (N, 1), one t per point."""
    out = [jnp.reshape(u, (-1, 1)) for u in sched(t)]
    if sched.has_noise:
        g, _, g_dg = sched.gamma(t)
        out += [jnp.reshape(g * g, (-1, 1)), jnp.reshape(g_dg, (-1, 1))]
    return tuple(out)


def pencil_terms(pb, chunk, want: frozenset, precision) -> _stream.Terms:
    """Terms of a laid-out block of time-free factors on a chunk (x (N, d), pencil_coeffs)."""
    x, cf = chunk
    v_fwd, p0, p1, lam, gram, log_w, means, back = pb
    d, bsz = x.shape[-1], log_w.shape[0]
    a, b, da, db = cf[:4]
    noise = len(cf) > 4
    y = jnp.matmul(x, v_fwd, precision=precision) - (b * p0 + a * p1)
    den = b * b + a * a * lam
    if noise:
        den = den + cf[4] * gram
    inv = 1.0 / den
    logp = log_w[None] - 0.5 * _slices(y * y * inv + jnp.log(den), d, bsz)
    need_v, need_s = "velocity" in want, "score" in want

    def sums(p):
        pm = jnp.matmul(p, means, precision=precision)  # sum p m0, sum p m1, sum p
        pt = jnp.tile(p, (1, d))  # column (j, b) = p_b
        q = []
        if need_v:
            r = b * db + a * da * lam
            r = r + cf[5] * gram if noise else r
            q.append(pt * r * inv * y)
        if need_s:
            q.append(pt * y * inv)
        bv = bs = None
        if need_v and need_s:  # two weighted sums over the same rows: one product each
            bv = jnp.matmul(q[0], back[:, :d], precision=precision)
            bs = -jnp.matmul(q[1], back[:, d:], precision=precision)
        elif need_v:
            bv = jnp.matmul(q[0], back, precision=precision)
        elif need_s:
            bs = -jnp.matmul(q[0], back, precision=precision)
        if need_v:
            bv = bv + db * pm[:, :d] + da * pm[:, d : 2 * d]
        return pm[:, -1], bv, bs

    return _stream.Terms(logp, sums=sums, block_max=_max_last(logp))
