"""The time-free form of an independent coupling: generalised eigenvectors of (S11, S00).

Independent couplings (S01 = S10 = 0 in every component) have S_t = b^2 S00 + a^2 S11, a pencil
of two fixed SPD matrices. Once per coupling, S00 = L L^T, L^{-1} S11 L^{-T} = U diag(lam) U^T
and V = L^{-T} U (so V^T S00 V = I, V^T S11 V = diag(lam), S00 V = L U = V^{-T}). Then for any
t, with den = b^2 + a^2 lam (+ gamma^2 g, g = diag(V^T V), below),
    y = V^T (x - mu_t),  log N = -sum(y^2 / den) / 2 + log|det V| - sum(log den) / 2 - ...,
    v_k = dmu_t + (S00 V) (r y),  r = (b db + a da lam (+ gamma dgamma g)) / den,
    s_k = -V (y / den),  grad v_k = (S00 V) diag(r) V^T,  div v_k = sum(r):
elementwise scalings between two time-free products per block, x @ [V_1..V_B] and the weighted
r y @ the stacked (S00 V)^T, so one t per point costs about what one shared t does.

Latent noise adds gamma^2 V^T V to V^T S_t V: diagonal iff V^T V is (``gram_is_diagonal``,
checked on device or once by ``exact.prepare``). The table of which runs: ``_plan``.
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


class Pencil(NamedTuple):
    """Time-free factors of an independent coupling (leading axis K)."""

    log_w: Float[Array, " K"]  # log pi_k + log|det V_k| - d/2 log(2 pi)
    m0: Float[Array, "K d"]
    m1: Float[Array, "K d"]
    p0: Float[Array, "K d"]  # V^T m0
    p1: Float[Array, "K d"]  # V^T m1
    v: Float[Array, "K d d"]  # V = L^{-T} U: V^T S00 V = I, V^T S11 V = diag(lam)
    s00v: Float[Array, "K d d"]  # S00 V = L U = V^{-T}
    lam: Float[Array, "K d"]
    gram: Float[Array, "K d"]  # diag(V^T V): the latent noise's gamma^2 I in this basis


@jax.jit
def factor(c: JointGaussianMixture) -> Pencil:
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
    return Pencil(log_w, m0, m1, p0, p1, v, s00v, lam, gram)


def gram_is_diagonal(f: Pencil) -> jax.Array:
    """Whether V^T V is diagonal in every component, to ``max(1e-10, 1e3 eps)`` relative (a
    boolean array: computed on device, traced or not)."""
    gram = jnp.einsum("kij,kil->kjl", f.v, f.v, precision="highest")
    norm = jnp.sqrt(jnp.diagonal(gram, axis1=-2, axis2=-1))
    eye = jnp.eye(f.v.shape[-1], dtype=f.v.dtype)[None]
    off = gram / (norm[:, :, None] * norm[:, None, :]) - eye
    tol = max(1e-10, 1e3 * float(jnp.finfo(f.v.dtype).eps))
    return jnp.max(jnp.abs(off), initial=0.0) <= tol


class Coeffs(NamedTuple):
    """Schedule coefficients shaped (1, 1, 1) for a scalar t or (N, 1, 1) for one t per point
    (g2 = gamma^2, g_dg = gamma dgamma: None without noise)."""

    a: Array
    b: Array
    da: Array
    db: Array
    g2: Array | None
    g_dg: Array | None


def coeffs(sched: Schedule, t) -> Coeffs:
    a, b, da, db = (jnp.reshape(u, (-1, 1, 1)) for u in sched(t))
    if not sched.has_noise:
        return Coeffs(a, b, da, db, None, None)
    g, _, g_dg = sched.gamma(t)
    return Coeffs(a, b, da, db, jnp.reshape(g * g, (-1, 1, 1)), jnp.reshape(g_dg, (-1, 1, 1)))


def stacked(m: Float[Array, "B d d"]) -> Float[Array, "d Bd"]:
    """Column (b, j) = m_b[:, j]: x @ this is m_b^T x for every b."""
    bsz, d, _ = m.shape
    return jnp.transpose(m, (1, 0, 2)).reshape(d, bsz * d)


def outer_rows(left, right) -> Float[Array, "Bd dd"]:
    """Row (b, j) = vec(left_b[:, j] right_b[:, j]^T): (p r) @ this is sum p r_j l_j r_j^T."""
    bsz, d, _ = left.shape
    return jnp.einsum("bij,bkj->bjik", left, right).reshape(bsz * d, d * d)


def terms(fb: Pencil, chunk, sched: Schedule, t, want: frozenset, precision) -> _stream.Terms:
    """A block's terms on a chunk: x (N, d), or (x, Coeffs) with one t per point."""
    x, c = chunk if isinstance(chunk, tuple) else (chunk, coeffs(sched, t))
    n, d = x.shape
    bsz = fb.m0.shape[0]
    need_v, need_s, _ = _stream.needs(want)
    y = jnp.matmul(x, stacked(fb.v), precision=precision).reshape(n, bsz, d)
    y = y - (c.b * fb.p0[None] + c.a * fb.p1[None])
    den = c.b * c.b + c.a * c.a * fb.lam[None]
    if c.g2 is not None:
        den = den + c.g2 * fb.gram[None]
    inv = 1.0 / den
    logp = fb.log_w[None] - 0.5 * (jnp.sum(y * y * inv, -1) + jnp.sum(jnp.log(den), -1))
    r = None
    if need_v:
        rn = c.b * c.db + c.a * c.da * fb.lam[None]
        r = (rn if c.g_dg is None else rn + c.g_dg * fb.gram[None]) * inv
    return diagonal_terms(logp, c, fb, fb.s00v, fb.v, y, r, y * inv, want, precision)


def diagonal_terms(logp, c: Coeffs, fb, back, fwd, y, r, sig, want, precision) -> _stream.Terms:
    """The terms of a time-free form, v_k = dmu_k + back_k (r y), s_k = -fwd_k sig and
    grad v_k = back_k diag(r) fwd_k^T (the pencil: S00 V and V; the OT map: Q and Q), on
    (N, B, d) coordinates y, scalings r and sig; ``fb`` has the block's means m0, m1."""
    n, bsz, d = y.shape
    need_v, need_s, _ = _stream.needs(want)

    def sums(p):
        bv = bs = None
        if need_v:
            q = (p[:, :, None] * r * y).reshape(n, bsz * d)
            bv = c.db[:, 0] * jnp.matmul(p, fb.m0, precision=precision)
            bv = bv + c.da[:, 0] * jnp.matmul(p, fb.m1, precision=precision)
            bv = bv + jnp.matmul(q, stacked(back).T, precision=precision)
        if need_s:
            qs = (p[:, :, None] * sig).reshape(n, bsz * d)
            bs = -jnp.matmul(qs, stacked(fwd).T, precision=precision)
        return jnp.sum(p, axis=1), bv, bs

    def explicit():  # in x space, so that the co-moments centre exactly (one-hot blocks)
        dmu = c.db * fb.m0[None] + c.da * fb.m1[None]
        v = dmu + jnp.einsum("bij,nbj->nbi", back, r * y, precision=precision)
        s = -jnp.einsum("bij,nbj->nbi", fwd, sig, precision=precision)
        return v, s, jnp.sum(r, -1)

    def jac_sum(p):
        q = (p[:, :, None] * r).reshape(n, bsz * d)
        return jnp.matmul(q, outer_rows(back, fwd), precision=precision).reshape(n, d, d)

    return _stream.Terms(logp, explicit, sums, jac_sum)
