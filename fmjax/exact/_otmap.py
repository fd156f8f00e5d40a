"""The time-free form of a deterministic coupling x1 = m1 + A (x0 - m0), A symmetric
positive-definite in every component (Gaussian OT maps; the joint covariance is singular).

X_t - mu_t = (b I + a A)(x0 - m0). With A = Q diag(l) Q^T, h = b + a l and S00 = L L^T,
G = L^{-1} Q:
    y = Q^T (x - mu_t),  z = G (y / h),  log N = -|z|^2 / 2 - sum log h - log|L| - ...,
    v_k = dmu_t + Q (r y),  r = (db + da l) / h,  s_k = -Q ((G^T z) / h),
    grad v_k = Q diag(r) Q^T,  div v_k = sum(r):
x @ [Q_1..Q_B] once, a batched d x d product with the fixed G per component, and the weighted
sums @ the stacked Q^T; no factorisation per time. Schedules with latent noise take the
per-time form. The table of which runs: ``_plan``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fmjax.exact import _pencil, _stream
from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule


class Map(NamedTuple):
    """Time-free factors of a deterministic coupling (leading axis K)."""

    log_w: Float[Array, " K"]  # log pi_k - log|L_k| - d/2 log(2 pi)
    m0: Float[Array, "K d"]
    m1: Float[Array, "K d"]
    q0: Float[Array, "K d"]  # Q^T m0
    q1: Float[Array, "K d"]  # Q^T m1
    q: Float[Array, "K d d"]  # eigenvectors of A
    g: Float[Array, "K d d"]  # L^{-1} Q
    l: Float[Array, "K d"]  # eigenvalues of A (> 0)


@jax.jit
def factor(c: JointGaussianMixture) -> Map:
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
    return Map(log_w, m0, m1, q0, q1, q, g, lam)


def terms(fb: Map, chunk, sched: Schedule, t, want: frozenset, precision) -> _stream.Terms:
    """A block's terms on a chunk: x (N, d), or (x, Coeffs) with one t per point."""
    sched = sched.with_noise(None)
    x, c = chunk if isinstance(chunk, tuple) else (chunk, _pencil.coeffs(sched, t))
    n, d = x.shape
    bsz = fb.m0.shape[0]
    need_v, need_s, _ = _stream.needs(want)
    y = jnp.matmul(x, _pencil.stacked(fb.q), precision=precision).reshape(n, bsz, d)
    y = y - (c.b * fb.q0[None] + c.a * fb.q1[None])
    h = c.b + c.a * fb.l[None]
    inv = 1.0 / h
    z = jnp.einsum("bij,nbj->nbi", fb.g, y * inv, precision=precision)
    logp = fb.log_w[None] - 0.5 * jnp.sum(z * z, -1) - jnp.sum(jnp.log(h), -1)
    r = (c.db + c.da * fb.l[None]) * inv if need_v else None
    sig = None
    if need_s:  # s_k = -Q sig
        sig = jnp.einsum("bji,nbj->nbi", fb.g, z, precision=precision) * inv

    return _pencil.diagonal_terms(logp, c, fb, fb.q, fb.q, y, r, sig, want, precision)
