"""Time-free kernels of the exact engine: independent couplings (generalised eigenvectors of
(S11, S00)) and deterministic OT-map couplings (eigenvectors of A); see ``_Map`` below.

Independent couplings (S01 = S10 = 0 in every component) have S_t = b^2 S00 + a^2 S11, a pencil
of two fixed SPD matrices. Once per coupling, S00 = L L^T, L^{-1} S11 L^{-T} = U diag(lam) U^T
and V = L^{-T} U (so V^T S00 V = I, V^T S11 V = diag(lam), S00 V = L U). Then for any t, with
den = b^2 + a^2 lam (+ gamma^2 mu, below),
    y = V^T (x - mu_t),  log N = -sum(y^2 / den) / 2 + log|det V| - sum(log den) / 2 - ...,
    v = dmu_t + (S00 V) (r y),  r = (b db + a da lam (+ gamma dgamma mu)) / den,
    score = -V (y / den),  div v = sum(r),
elementwise scalings between two time-free products per block of components: x @ [V_1..V_B]
and the responsibility-weighted r y @ the stacked (S00 V)^T. One t per point then costs about
what one shared t does.

Latent noise adds gamma^2 V^T V to V^T S_t V: diagonal iff V^T V is, with mu = diag(V^T V)
(``_gram_is_diagonal`` decides, once per coupling).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fmjax import _kernels
from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule


class _Pencil(NamedTuple):
    """Time-free factors of an independent coupling (leading axis K); see the module docstring."""

    log_w: Float[Array, " K"]  # log pi_k + log|det V_k| - d/2 log(2 pi)
    m0: Float[Array, "K d"]
    m1: Float[Array, "K d"]
    p0: Float[Array, "K d"]  # V^T m0
    p1: Float[Array, "K d"]  # V^T m1
    v: Float[Array, "K d d"]  # V = L^{-T} U: V^T S00 V = I, V^T S11 V = diag(lam)
    s00v: Float[Array, "K d d"]  # S00 V = L U = V^{-T}
    lam: Float[Array, "K d"]
    gram: Float[Array, "K d"]  # diag(V^T V): the latent noise's gamma^2 I in this basis


def _pencil(c: JointGaussianMixture) -> _Pencil:
    """Generalised eigendecomposition of (S11, S00) per component, O(K d^3) once per coupling."""
    m0, m1, s00, _, _, s11 = c.blocks()
    d = m0.shape[-1]
    chol = jnp.linalg.cholesky(s00)
    half = jax.scipy.linalg.solve_triangular(chol, s11, lower=True)  # L^{-1} S11
    whitened = jax.scipy.linalg.solve_triangular(chol, jnp.swapaxes(half, -1, -2), lower=True)
    lam, u = jnp.linalg.eigh(0.5 * (whitened + jnp.swapaxes(whitened, -1, -2)))
    v = jax.scipy.linalg.solve_triangular(jnp.swapaxes(chol, -1, -2), u, lower=False)
    s00v = jnp.matmul(chol, u, precision="highest")
    log_det_v = -jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_w = jnp.log(c.weights) + log_det_v - 0.5 * d * math.log(2 * math.pi)
    p0 = jnp.einsum("kij,ki->kj", v, m0, precision="highest")
    p1 = jnp.einsum("kij,ki->kj", v, m1, precision="highest")
    gram = jnp.sum(v * v, axis=-2)  # (V^T V)_jj, column norms squared
    return _Pencil(log_w, m0, m1, p0, p1, v, s00v, lam, gram)


def _gram_is_diagonal(f: _Pencil) -> bool:
    """Whether V^T V is diagonal in every component (to ``max(1e-10, 1e3 eps)`` relative), so
    that latent noise gamma^2 I stays diagonal in the pencil basis. ``False`` when traced."""
    if isinstance(f.v, jax.core.Tracer):
        return False
    v = np.asarray(f.v, np.float64)
    gram = np.einsum("kij,kil->kjl", v, v)
    norm = np.sqrt(np.einsum("kjj->kj", gram))
    off = gram / (norm[:, :, None] * norm[:, None, :]) - np.eye(v.shape[-1])
    tol = max(1e-10, 1e3 * float(np.finfo(f.v.dtype).eps))
    return bool(np.max(np.abs(off), initial=0.0) <= tol)


def _pad_pencil(f: _Pencil, k_pad: int) -> _Pencil:
    """Zero-weight padding components (log-weight -inf, identity factors), as ``_pad``."""
    k, d = f.m0.shape
    extra = k_pad - k
    if extra == 0:
        return f
    eye = jnp.broadcast_to(jnp.eye(d, dtype=f.v.dtype), (extra, d, d))
    zeros = jnp.zeros((extra, d), f.m0.dtype)
    cat = jnp.concatenate
    return _Pencil(
        cat([f.log_w, jnp.full((extra,), -jnp.inf, f.log_w.dtype)]),
        cat([f.m0, zeros]),
        cat([f.m1, zeros]),
        cat([f.p0, zeros]),
        cat([f.p1, zeros]),
        cat([f.v, eye]),
        cat([f.s00v, eye]),
        cat([f.lam, jnp.ones((extra, d), f.lam.dtype)]),
        cat([f.gram, jnp.ones((extra, d), f.gram.dtype)]),
    )


def _coeffs(sched: Schedule, t):
    """a, b, da, db, gamma^2, gamma dgamma shaped (1, 1, 1) for a scalar t or (N, 1, 1) for one
    t per point (the last two ``None`` without noise)."""
    a, b, da, db = (jnp.reshape(u, (-1, 1, 1)) for u in sched(t))
    if not sched.has_noise:
        return a, b, da, db, None, None
    g, _, g_dg = sched.gamma(t)
    return a, b, da, db, jnp.reshape(g * g, (-1, 1, 1)), jnp.reshape(g_dg, (-1, 1, 1))


def _free_terms(f: _Pencil, coeffs, x, precision):
    """Whitened coordinates y (N, B, d), 1 / den (N or 1, B, d) and log pi N (N, B)."""
    n, d = x.shape
    bsz = f.m0.shape[0]
    a, b, _, _, g2, _ = coeffs
    vs = jnp.transpose(f.v, (1, 0, 2)).reshape(d, bsz * d)  # column (k, j) = V_k[:, j]
    y = jnp.matmul(x, vs, precision=precision).reshape(n, bsz, d)
    y = y - (b * f.p0[None] + a * f.p1[None])
    den = b * b + a * a * f.lam[None]
    if g2 is not None:
        den = den + g2 * f.gram[None]
    inv = 1.0 / den
    logp = f.log_w[None] - 0.5 * (jnp.sum(y * y * inv, -1) + jnp.sum(jnp.log(den), -1))
    return y, inv, logp


def _accumulate_free(f: _Pencil, sched: Schedule, t, x, want: frozenset, precision):
    """``_accumulate`` on time-free factors; t a scalar or one time per point (N,)."""
    n, d = x.shape
    k = f.m0.shape[0]
    # One t per point makes the scalings (N, B, d) too (den, r): more live point terms.
    per_point = jnp.ndim(t) > 0
    bsz, n_chunks = _kernels._plan(n, k, d, 6 if per_point else 3)
    n_blocks = -(-k // bsz)
    blocks = jax.tree.map(
        lambda a: a.reshape((n_blocks, bsz) + a.shape[1:]), _pad_pencil(f, n_blocks * bsz)
    )
    need_v = bool(want & {"velocity", "divergence"})
    need_s = bool(want & {"score", "divergence"})
    # With one t per point the coefficients are (N, 1, 1) and travel with the points' chunks.
    pts = (x, _coeffs(sched, t)) if per_point else x

    def fold(carry, fb, chunk):
        x, coeffs = chunk if per_point else (chunk, _coeffs(sched, t))
        n = x.shape[0]
        a, b, da, db, _, g_dg = coeffs
        mx, tot, acc_v, acc_s, acc_div = carry
        y, inv, logp = _free_terms(fb, coeffs, x, precision)
        new_mx, scale, p = _kernels._lse_block(mx, logp)
        wb = jnp.sum(p, axis=1)
        bv = bs = None
        if need_v:
            rn = b * db + a * da * fb.lam[None]
            r = (rn if g_dg is None else rn + g_dg * fb.gram[None]) * inv
            q = (p[:, :, None] * r * y).reshape(n, bsz * d)
            back = jnp.swapaxes(fb.s00v, -1, -2).reshape(bsz * d, d)  # row (k, j) = (S00 V)_k[:, j]
            means = db[:, 0] * jnp.matmul(p, fb.m0, precision=precision) + da[:, 0] * jnp.matmul(
                p, fb.m1, precision=precision
            )
            bv = means + jnp.matmul(q, back, precision=precision)
        if need_s:
            w = y * inv
            qs = (p[:, :, None] * w).reshape(n, bsz * d)
            bs = -jnp.matmul(
                qs, jnp.swapaxes(fb.v, -1, -2).reshape(bsz * d, d), precision=precision
            )
        if "divergence" in want:
            # Centred at the block means u_b, s_b, in each component's whitened coordinates:
            # s_k - s_b = -V (w + V^{-1} s_b), v_k - u_b = V^{-T} (V^T (dmu_k - u_b) + r y), so
            # (s_k - s_b) . (v_k - u_b) = -(w + (S00 V)^T s_b) . (V^T dmu_k - V^T u_b + r y):
            # two more (N, d) @ (d, B d) products; div v_k = sum(r).
            mv = bv / _kernels._safe(wb)[:, None]
            ms = bs / _kernels._safe(wb)[:, None]
            fwd = jnp.transpose(fb.s00v, (1, 0, 2)).reshape(d, bsz * d)
            vinv_ms = jnp.matmul(ms, fwd, precision=precision).reshape(n, bsz, d)
            vs = jnp.transpose(fb.v, (1, 0, 2)).reshape(d, bsz * d)
            vt_mv = jnp.matmul(mv, vs, precision=precision).reshape(n, bsz, d)
            vt_dmu = db * fb.p0[None] + da * fb.p1[None]
            cen = -jnp.sum((w + vinv_ms) * (vt_dmu - vt_mv + r * y), axis=-1)
            block = jnp.sum(p * (jnp.sum(r, -1) + cen), axis=1)
            acc_div = _kernels._merge_div(acc_div, scale, tot, acc_v, acc_s, wb, bv, bs, block)
        if need_v:
            acc_v = acc_v * scale[:, None] + bv
        if need_s:
            acc_s = acc_s * scale[:, None] + bs
        return new_mx, tot * scale + wb, acc_v, acc_s, acc_div

    carry = _kernels._stream(lambda fb: fb, fold, blocks, pts, n, d, x.dtype, n_chunks)
    return _kernels._finish(carry, want)


def _responsibilities_free(f: _Pencil, sched: Schedule, t, x, precision):
    _, _, logp = _free_terms(f, _coeffs(sched, t), x, precision)
    return {"responsibilities": jax.nn.softmax(logp, axis=-1)}


_accumulate_free_jit = jax.jit(_accumulate_free, static_argnames=("want", "precision"))
_responsibilities_free_jit = jax.jit(_responsibilities_free, static_argnames=("precision",))
_pencil_jit = jax.jit(_pencil)


# Deterministic couplings x1 = m1 + A (x0 - m0), A symmetric positive-definite (the Gaussian OT
# map): the joint covariance is singular (S10 = A S00, S11 = A S00 A) and X_t - mu_t =
# (b I + a A)(x0 - m0). With A = Q diag(l) Q^T, h = b + a l and S00 = L L^T, G = L^{-1} Q:
#     y = Q^T (x - mu_t),  z = G (y / h),  log N = -|z|^2 / 2 - sum log h - log|L| - ...,
#     v = dmu_t + Q (r y),  r = (db + da l) / h,  score = -Q ((G^T z) / h),  div v = sum(r):
# x @ [Q_1..Q_B] once, a batched d x d product with the fixed G per component, and the weighted
# sums @ the stacked Q^T; no factorisation per time.


class _Map(NamedTuple):
    """Time-free factors of a deterministic coupling (leading axis K)."""

    log_w: Float[Array, " K"]  # log pi_k - log|L_k| - d/2 log(2 pi)
    m0: Float[Array, "K d"]
    m1: Float[Array, "K d"]
    q0: Float[Array, "K d"]  # Q^T m0
    q1: Float[Array, "K d"]  # Q^T m1
    q: Float[Array, "K d d"]  # eigenvectors of A
    g: Float[Array, "K d d"]  # L^{-1} Q
    l: Float[Array, "K d"]  # eigenvalues of A (> 0)


def _map(c: JointGaussianMixture) -> _Map:
    """A = S10 S00^{-1} (symmetrised) = Q diag(l) Q^T and L^{-1} Q per component, once."""
    m0, m1, s00, _, s10, _ = c.blocks()
    d = m0.shape[-1]
    chol = jnp.linalg.cholesky(s00)
    # A^T = S00^{-1} S10^T by two triangular solves.
    half = jax.scipy.linalg.solve_triangular(chol, jnp.swapaxes(s10, -1, -2), lower=True)
    a_t = jax.scipy.linalg.solve_triangular(jnp.swapaxes(chol, -1, -2), half, lower=False)
    lam, q = jnp.linalg.eigh(0.5 * (a_t + jnp.swapaxes(a_t, -1, -2)))
    g = jax.scipy.linalg.solve_triangular(chol, q, lower=True)
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_w = jnp.log(c.weights) - half_logdet - 0.5 * d * math.log(2 * math.pi)
    q0 = jnp.einsum("kij,ki->kj", q, m0, precision="highest")
    q1 = jnp.einsum("kij,ki->kj", q, m1, precision="highest")
    return _Map(log_w, m0, m1, q0, q1, q, g, lam)


def _pad_map(f: _Map, k_pad: int) -> _Map:
    """Zero-weight padding components (log-weight -inf, identity factors)."""
    k, d = f.m0.shape
    extra = k_pad - k
    if extra == 0:
        return f
    eye = jnp.broadcast_to(jnp.eye(d, dtype=f.q.dtype), (extra, d, d))
    zeros = jnp.zeros((extra, d), f.m0.dtype)
    cat = jnp.concatenate
    return _Map(
        cat([f.log_w, jnp.full((extra,), -jnp.inf, f.log_w.dtype)]),
        cat([f.m0, zeros]),
        cat([f.m1, zeros]),
        cat([f.q0, zeros]),
        cat([f.q1, zeros]),
        cat([f.q, eye]),
        cat([f.g, eye]),
        cat([f.l, jnp.ones((extra, d), f.l.dtype)]),
    )


def _map_terms(f: _Map, coeffs, x, precision):
    """y (N, B, d), 1 / h (N or 1, B, d), z (N, B, d) and log pi N (N, B)."""
    n, d = x.shape
    bsz = f.m0.shape[0]
    a, b = coeffs[0], coeffs[1]
    qs = jnp.transpose(f.q, (1, 0, 2)).reshape(d, bsz * d)  # column (k, j) = Q_k[:, j]
    y = jnp.matmul(x, qs, precision=precision).reshape(n, bsz, d)
    y = y - (b * f.q0[None] + a * f.q1[None])
    h = b + a * f.l[None]
    inv = 1.0 / h
    z = jnp.einsum("bij,nbj->nbi", f.g, y * inv, precision=precision)
    logp = f.log_w[None] - 0.5 * jnp.sum(z * z, -1) - jnp.sum(jnp.log(h), -1)
    return y, inv, z, logp


def _accumulate_map(f: _Map, sched: Schedule, t, x, want: frozenset, precision):
    """``_accumulate`` on the factors of a deterministic coupling; t scalar or (N,)."""
    n, d = x.shape
    k = f.m0.shape[0]
    per_point = jnp.ndim(t) > 0
    bsz, n_chunks = _kernels._plan(n, k, d, 6 if per_point else 4)
    n_blocks = -(-k // bsz)
    blocks = jax.tree.map(
        lambda a: a.reshape((n_blocks, bsz) + a.shape[1:]), _pad_map(f, n_blocks * bsz)
    )
    need_v = bool(want & {"velocity", "divergence"})
    need_s = bool(want & {"score", "divergence"})
    sched = sched.with_noise(None)
    pts = (x, _coeffs(sched, t)) if per_point else x  # per-point coefficients travel with x

    def fold(carry, fb, chunk):
        x, coeffs = chunk if per_point else (chunk, _coeffs(sched, t))
        n = x.shape[0]
        a, b, da, db = coeffs[:4]
        mx, tot, acc_v, acc_s, acc_div = carry
        y, inv, z, logp = _map_terms(fb, coeffs, x, precision)
        new_mx, scale, p = _kernels._lse_block(mx, logp)
        wb = jnp.sum(p, axis=1)
        back = jnp.swapaxes(fb.q, -1, -2).reshape(bsz * d, d)  # row (k, j) = Q_k[:, j]
        bv = bs = None
        if need_v:
            r = (db + da * fb.l[None]) * inv
            means = db[:, 0] * jnp.matmul(p, fb.m0, precision=precision) + da[:, 0] * jnp.matmul(
                p, fb.m1, precision=precision
            )
            q = (p[:, :, None] * r * y).reshape(n, bsz * d)
            bv = means + jnp.matmul(q, back, precision=precision)
        if need_s:
            sig = jnp.einsum("bji,nbj->nbi", fb.g, z, precision=precision) * inv  # s_k = -Q sig
            bs = -jnp.matmul((p[:, :, None] * sig).reshape(n, bsz * d), back, precision=precision)
        if "divergence" in want:
            # (s_k - s_b) . (v_k - u_b) = -(sig + Q^T s_b) . (Q^T dmu_k - Q^T u_b + r y).
            mv = bv / _kernels._safe(wb)[:, None]
            ms = bs / _kernels._safe(wb)[:, None]
            qs = jnp.transpose(fb.q, (1, 0, 2)).reshape(d, bsz * d)
            qt_ms = jnp.matmul(ms, qs, precision=precision).reshape(n, bsz, d)
            qt_mv = jnp.matmul(mv, qs, precision=precision).reshape(n, bsz, d)
            qt_dmu = db * fb.q0[None] + da * fb.q1[None]
            cen = -jnp.sum((sig + qt_ms) * (qt_dmu - qt_mv + r * y), axis=-1)
            block = jnp.sum(p * (jnp.sum(r, -1) + cen), axis=1)
            acc_div = _kernels._merge_div(acc_div, scale, tot, acc_v, acc_s, wb, bv, bs, block)
        if need_v:
            acc_v = acc_v * scale[:, None] + bv
        if need_s:
            acc_s = acc_s * scale[:, None] + bs
        return new_mx, tot * scale + wb, acc_v, acc_s, acc_div

    carry = _kernels._stream(lambda fb: fb, fold, blocks, pts, n, d, x.dtype, n_chunks)
    return _kernels._finish(carry, want)


def _responsibilities_map(f: _Map, sched: Schedule, t, x, precision):
    *_, logp = _map_terms(f, _coeffs(sched.with_noise(None), t), x, precision)
    return {"responsibilities": jax.nn.softmax(logp, axis=-1)}


_accumulate_map_jit = jax.jit(_accumulate_map, static_argnames=("want", "precision"))
_responsibilities_map_jit = jax.jit(_responsibilities_map, static_argnames=("precision",))
_map_jit = jax.jit(_map)
