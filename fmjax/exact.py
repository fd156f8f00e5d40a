"""Closed-form probability path of a Gaussian-mixture coupling: p_t, u_t, score, divergence.

For a joint mixture of (X0, X1) and a schedule, each component k makes (X_t, dX_t/dt) jointly
Gaussian with
    mu_t = b m0 + a m1,                    dmu_t = db m0 + da m1,
    S_t  = b^2 S00 + a b (S01 + S10) + a^2 S11,
    C_t  = Cov(dX_t, X_t) = b db S00 + a db S01 + b da S10 + a da S11,
so v_t^k(x) = dmu_t + C_t S_t^{-1} (x - mu_t) and u_t(x) = sum_k alpha_t^k(x) v_t^k(x), with
alpha_t^k(x) proportional to pi_k N(x; mu_t, S_t) (the X_t block only).

A schedule with latent noise (``schedule.noise``, the stochastic interpolant
x_t = b x0 + a x1 + gamma z with z ~ N(0, I) independent of the coupling) adds gamma^2 I to S_t
and gamma dgamma I to C_t (only the product, finite at t = 0, 1 where dgamma may not be), so
u_t is then the probability-flow drift E[dX_t | X_t = x], the dgamma z part included, and
``marginal`` includes the gamma^2 I.

Per time and component there is one Cholesky factor L (S_t = L L^T), W = L^{-1} (triangular
solve) and M = C_t L^{-T}; per point,
    z = W (x - mu_t),  v = dmu_t + M z,  score_k = -W^T z,  log N = -|z|^2 / 2 - log|L| - ...
Components are streamed in blocks with an online log-sum-exp (as flash attention does for
softmax), so memory stays O(N d + B d^2) for a block of B components. For many points z and v
are affine in x, so a block costs one (N, d) @ (d, B d) matrix product each (W, resp.
A = M W = C_t S_t^{-1}, stacked over the block); for few points (one time per point, vmapped)
the per-point matrix-vector form is used instead.

Public functions take ``(coupling, schedule, t, x)`` with ``x`` of shape (..., d) and ``t`` a
scalar or an array broadcastable against ``x.shape[:-1]``. They are pure and jit-compatible
(traced ``t`` and ``x``; ``precision`` is static), e.g. ``jax.jit(fmjax.exact.velocity)`` or
``functools.partial(fmjax.exact.velocity, coupling, schedule)`` as a velocity field ``(t, x)``.
With one scalar ``t`` the Cholesky factors are computed once for all points; with one ``t`` per
point they are computed per point (K d^3 work each), except for independent couplings (below).

Independent couplings (S01 = S10 = 0 in every component, e.g. every ``independent_coupling``)
have a time-free form: S_t = b^2 S00 + a^2 S11 is a pencil of two fixed SPD matrices. Once per
coupling, S00 = L L^T, L^{-1} S11 L^{-T} = U diag(lam) U^T and V = L^{-T} U (so V^T S00 V = I,
V^T S11 V = diag(lam), S00 V = L U). Then for any t, with den = b^2 + a^2 lam,
    y = V^T (x - mu_t),  log N = -sum(y^2 / den) / 2 + log|det V| - sum(log den) / 2 - ...,
    v = dmu_t + (S00 V) (r y),  r = (b db + a da lam) / den,  score = -V (y / den),
    div v = sum(r),
elementwise scalings between two time-free products per block of components: x @ [V_1..V_B]
and the responsibility-weighted r y @ the stacked (S00 V)^T. One t per point then costs about
what one shared t does. ``prepare(coupling)`` computes this factorisation once and returns a
``PreparedCoupling``, a pytree accepted by every function here in place of the coupling (also
under jit and vmap), so an ODE solve with ``velocity_field(prepare(c), s)`` factors nothing per
step. Without ``prepare``, a concrete (not traced) independent coupling evaluated with one t
per point is detected and factored at call time; a traced coupling, or one with any
cross-covariance, keeps the per-time Cholesky path.

Latent noise adds gamma^2 V^T V to V^T S_t V, which stays diagonal iff V^T V is diagonal. With
mu = diag(V^T V), den = b^2 + a^2 lam + gamma^2 mu and r = (b db + a da lam + gamma dgamma mu)
/ den, all of the above holds unchanged. V^T V is diagonal (checked per coupling by ``prepare``,
to max(1e-10, 1e3 eps) relative, flag ``PreparedCoupling.noise_diagonal``) when in every
component S00 is a multiple of I (V^T V = I / c: a standard normal or any isotropic source),
or S11 is a multiple of I (V^T V = diag(lam) / c: an isotropic target), or more generally S00
and S11 commute with distinct generalised eigenvalues. For other independent couplings a
schedule with noise takes the per-time Cholesky path (correct, K d^3 per distinct time); a
schedule without noise keeps the time-free path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from fmjax import _checks
from fmjax._typing import Precision
from fmjax.mixtures import GaussianMixture, JointGaussianMixture
from fmjax.schedules import Schedule

__all__ = [
    "Evaluation",
    "PreparedCoupling",
    "prepare",
    "VelocityField",
    "velocity",
    "velocity_field",
    "log_prob",
    "score",
    "responsibilities",
    "divergence",
    "evaluate",
    "marginal",
]

# Elements of one (N, block, d) intermediate: 2^24 floats (64 MiB in float32).
_BLOCK_BUDGET = 1 << 24
_QUANTITIES = ("velocity", "log_prob", "score", "divergence")


class Evaluation(NamedTuple):
    """Result of ``evaluate``: each requested quantity, ``None`` for those not requested.

    Attributes:
        velocity: u_t(x), (..., d).
        log_prob: log p_t(x), (...).
        score: grad_x log p_t(x), (..., d).
        divergence: div u_t(x), (...).
    """

    velocity: Float[Array, "... d"] | None = None
    log_prob: Float[Array, "..."] | None = None
    score: Float[Array, "... d"] | None = None
    divergence: Float[Array, "..."] | None = None


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
    # M^T = L^{-1} C^T, a triangular solve rather than a product with an inverse.
    m = jnp.swapaxes(
        jax.scipy.linalg.solve_triangular(chol, jnp.swapaxes(cross, -1, -2), lower=True), -1, -2
    )
    tr = jnp.einsum("kij,kji->k", m, w, precision=precision)
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_w = jnp.log(c.weights) - half_logdet - 0.5 * d * math.log(2 * math.pi)
    return _Factors(log_w, mu, dmu, w, m, tr)


def _point_terms(f: _Factors, x, need_v: bool, need_s: bool, precision):
    """For points x (N, d) and a block of B components: log pi N (N, B), v_k and s_k (N, B, d).

    z = W (x - mu) and v = dmu + M z are affine in x: z = W x - W mu, v = A x + (dmu - A mu) with
    A = C S^{-1} = M W. For many points, stacking W (and A) of all B components gives one large
    (N, d) @ (d, B d) product per quantity instead of B small batched ones, at the cost of B d^3
    extra flops per block (negligible for N >> d). For few points (one time per point, vmapped)
    the per-point matrix-vector form is cheaper. The score s_k = -W^T z is taken from z (forming
    S^{-1} = W^T W would square its condition number).
    """
    n, d = x.shape
    bsz = f.mu.shape[0]
    many = n >= 4 * d

    def affine(g, off):  # x @ g_b^T + off_b - g_b mu_b for every b: (N, B, d)
        y = jnp.matmul(x, g.reshape(bsz * d, d).T, precision=precision).reshape(n, bsz, d)
        return y + (off - jnp.einsum("bij,bj->bi", g, f.mu, precision=precision))[None]

    if many:
        z = affine(f.w, 0.0)
    else:
        z = jnp.einsum("bij,nbj->nbi", f.w, x[:, None, :] - f.mu[None], precision=precision)
    logp = f.log_w[None] - 0.5 * jnp.sum(z * z, axis=-1)
    v = s = None
    if need_v:
        if many:
            v = affine(jnp.einsum("bij,bjk->bik", f.m, f.w, precision=precision), f.dmu)
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
    limit = max(1, _BLOCK_BUDGET // max(1, arrays * n * d + 32 * d * d))
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


def _lse_block(mx, tot, logp):
    """One block of the online log-sum-exp over components (logp (N, B)).

    Returns the new running max, the factor that rescales the running sums to it, the block's
    weights p = exp(logp - max) (N, B), and the new total.
    """
    new_mx = jnp.maximum(mx, jnp.max(logp, axis=1))
    # Zero weights give -inf everywhere: keep the shift finite so no inf - inf appears.
    shift = jnp.where(jnp.isfinite(new_mx), new_mx, 0.0)
    scale = jnp.exp(mx - shift)
    p = jnp.exp(logp - shift[:, None])
    return new_mx, scale, p, tot * scale + jnp.sum(p, axis=1)


def _accumulate(c: JointGaussianMixture, sched: Schedule, t, x, want: frozenset, precision):
    """Stream over component blocks with an online log-sum-exp; x is (N, d), t a scalar.

    Each block's Cholesky factors are made inside its scan step, so memory is O(N d + B d^2).
    """
    n, d = x.shape
    k = c.n_components
    bsz = _block_size(n, k, d)
    n_blocks = -(-k // bsz)
    blocks = jax.tree.map(
        lambda a: a.reshape((n_blocks, bsz) + a.shape[1:]), _pad(c, n_blocks * bsz)
    )
    need_v = bool(want & {"velocity", "divergence"})
    need_s = bool(want & {"score", "divergence"})

    def step(carry, cb):
        mx, tot, acc_v, acc_s, acc_div = carry
        fb = _factors(cb, sched, t, precision)
        logp, v, sk = _point_terms(fb, x, need_v, need_s, precision)
        new_mx, scale, p, tot = _lse_block(mx, tot, logp)
        # Weighted sums over the block as multiply-and-reduce (fused), not as tiny dots.
        if need_v:
            acc_v = acc_v * scale[:, None] + jnp.sum(p[:, :, None] * v, axis=1)
        if need_s:
            acc_s = acc_s * scale[:, None] + jnp.sum(p[:, :, None] * sk, axis=1)
        if "divergence" in want:
            dk = fb.tr[None] + jnp.sum(sk * v, axis=-1)
            acc_div = acc_div * scale + jnp.sum(p * dk, axis=1)
        return (new_mx, tot, acc_v, acc_s, acc_div), None

    carry, _ = jax.lax.scan(step, _lse_init(n, d, x.dtype), blocks)
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
    if "divergence" in want:
        # div u = sum_k alpha_k (tr_k + s_k . v_k) - s . u, from grad alpha_k = alpha_k (s_k - s).
        out["divergence"] = acc_div / tot - jnp.sum(s * u, axis=-1)
    return out


def _responsibilities(c: JointGaussianMixture, sched: Schedule, t, x, precision):
    logp, _, _ = _point_terms(_factors(c, sched, t, precision), x, False, False, precision)
    return {"responsibilities": jax.nn.softmax(logp, axis=-1)}


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
    bsz = _block_size(n, k, d, 3 if jnp.ndim(t) == 0 else 6)
    n_blocks = -(-k // bsz)
    blocks = jax.tree.map(
        lambda a: a.reshape((n_blocks, bsz) + a.shape[1:]), _pad_pencil(f, n_blocks * bsz)
    )
    coeffs = _coeffs(sched, t)
    a, b, da, db, _, g_dg = coeffs
    need_v = bool(want & {"velocity", "divergence"})
    need_s = bool(want & {"score", "divergence"})

    def step(carry, fb):
        mx, tot, acc_v, acc_s, acc_div = carry
        y, inv, logp = _free_terms(fb, coeffs, x, precision)
        new_mx, scale, p, tot = _lse_block(mx, tot, logp)
        if need_v:
            rn = b * db + a * da * fb.lam[None]
            r = (rn if g_dg is None else rn + g_dg * fb.gram[None]) * inv
            q = (p[:, :, None] * r * y).reshape(n, bsz * d)
            back = jnp.swapaxes(fb.s00v, -1, -2).reshape(bsz * d, d)  # row (k, j) = (S00 V)_k[:, j]
            means = db[:, 0] * jnp.matmul(p, fb.m0, precision=precision) + da[:, 0] * jnp.matmul(
                p, fb.m1, precision=precision
            )
            vel = means + jnp.matmul(q, back, precision=precision)
            acc_v = acc_v * scale[:, None] + vel
        if need_s:
            w = y * inv
            qs = (p[:, :, None] * w).reshape(n, bsz * d)
            sc = -jnp.matmul(
                qs, jnp.swapaxes(fb.v, -1, -2).reshape(bsz * d, d), precision=precision
            )
            acc_s = acc_s * scale[:, None] + sc
        if "divergence" in want:
            # s_k . v_k = -w . V^T dmu - w . (r y), V^T dmu = db p0 + da p1; div v_k = sum r.
            vt_dmu = db * fb.p0[None] + da * fb.p1[None]
            dk = jnp.sum(r, -1) - jnp.sum(w * vt_dmu, -1) - jnp.sum(w * r * y, -1)
            acc_div = acc_div * scale + jnp.sum(p * dk, axis=1)
        return (new_mx, tot, acc_v, acc_s, acc_div), None

    carry, _ = jax.lax.scan(step, _lse_init(n, d, x.dtype), blocks)
    return _finish(carry, want)


def _responsibilities_free(f: _Pencil, sched: Schedule, t, x, precision):
    _, _, logp = _free_terms(f, _coeffs(sched, t), x, precision)
    return {"responsibilities": jax.nn.softmax(logp, axis=-1)}


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["coupling", "factors"],
    meta_fields=["independent", "noise_diagonal"],
)
@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, as the mixtures are
class PreparedCoupling:
    """A coupling with its time-free factorisation, made by ``prepare``.

    A pytree (the coupling's and the factors' arrays are leaves, the flags are static),
    accepted by every ``exact`` function in place of the coupling and passing through ``jit``
    and ``vmap``.

    Attributes:
        coupling: the joint mixture of (X0, X1).
        factors: the per-component time-free factors (private layout), ``None`` when the
            coupling is not independent.
        independent: whether the time-free path is taken (static).
        noise_diagonal: whether V^T V is diagonal in every component, so that schedules with
            latent noise keep the time-free path too (static; otherwise they take the
            per-time path).
    """

    coupling: JointGaussianMixture
    factors: _Pencil | None
    independent: bool
    noise_diagonal: bool = False

    @property
    def dim(self) -> int:
        """Dimension d of each of X0 and X1."""
        return self.coupling.dim

    @property
    def n_components(self) -> int:
        """Number of components K."""
        return self.coupling.n_components


def _is_independent(c: JointGaussianMixture) -> bool | None:
    """Whether every component has S01 = S10 = 0; ``None`` for a traced coupling."""
    if isinstance(c.covs, jax.core.Tracer):
        return None
    covs = np.asarray(c.covs)
    d = c.dim
    return bool(not np.any(covs[:, :d, d:]) and not np.any(covs[:, d:, :d]))


def prepare(
    coupling: JointGaussianMixture,
    *,
    independent: bool | None = None,
    noise_diagonal: bool | None = None,
) -> PreparedCoupling:
    """Factor a coupling once for all times: pass the result wherever a coupling is taken.

    For an independent coupling (S01 = S10 = 0 in every component) the factorisation is
    time-free (see the module docstring): any pattern of times, one shared or one per point,
    then costs two large matrix products per block of components and no factorisation. With a
    schedule that carries latent noise this holds when V^T V is diagonal (e.g. an isotropic
    source or target in every component); otherwise such schedules take the per-time path.
    Other couplings are wrapped as they are and keep the per-time Cholesky path.

    Args:
        coupling: the joint mixture of (X0, X1).
        independent: ``None`` (default) detects independence on a concrete coupling (a traced
            one is taken as not independent); ``True`` or ``False`` decides without looking,
            e.g. under ``jit``. ``True`` on a coupling with cross-covariance drops it (wrong
            answers).
        noise_diagonal: ``None`` (default) checks on concrete factors whether V^T V is
            diagonal (traced ones: taken as not); ``True`` or ``False`` decides without
            looking. ``True`` when it is not diagonal drops its off-diagonal part in schedules
            with noise (wrong answers).

    Returns:
        A ``PreparedCoupling``.

    Raises:
        TypeError: for a coupling of the wrong type or a non-bool flag.
    """
    _checks.check_instance(
        "exact.prepare", "coupling", coupling, JointGaussianMixture, "a JointGaussianMixture"
    )
    for name, flag in (("independent", independent), ("noise_diagonal", noise_diagonal)):
        if flag is not None and not isinstance(flag, bool):
            _checks.fail("exact.prepare", name, "None, True or False", flag, TypeError)
    if independent is None:
        independent = bool(_is_independent(coupling))
    factors = _pencil_jit(coupling) if independent else None
    if factors is None:
        noise_diagonal = False
    elif noise_diagonal is None:
        noise_diagonal = _gram_is_diagonal(factors)
    return PreparedCoupling(coupling, factors, independent, noise_diagonal)


# Compiled once per shapes and static options, so eager callers do not recompile the component
# scan on every call (an eager lax.scan is compiled anew per call); inlined under an outer jit.
_accumulate_jit = jax.jit(_accumulate, static_argnames=("want", "precision"))
_responsibilities_jit = jax.jit(_responsibilities, static_argnames=("precision",))
_accumulate_free_jit = jax.jit(_accumulate_free, static_argnames=("want", "precision"))
_responsibilities_free_jit = jax.jit(_responsibilities_free, static_argnames=("precision",))
_pencil_jit = jax.jit(_pencil)


def _check_inputs(fn: str, c, sched, t, x):
    fn = f"exact.{fn}"
    _checks.check_instance(fn, "schedule", sched, Schedule, "an fmjax Schedule")
    if x.ndim < 1 or x.shape[-1] != c.dim:
        _checks.fail(fn, "x", f"of shape (..., d={c.dim})", f"shape {x.shape}")
    try:
        jnp.broadcast_shapes(t.shape, x.shape[:-1])
    except ValueError:
        _checks.fail(
            fn, "t", f"broadcastable against x.shape[:-1] = {x.shape[:-1]}", f"shape {t.shape}"
        )
    sched.check_times(fn, "t", t)


def _unwrap(fn: str, c, sched: Schedule | None = None):
    """The coupling and its time-free factors (``None``: the per-time path, also for a schedule
    with noise when V^T V is not diagonal)."""
    _checks.check_instance(
        f"exact.{fn}", "coupling", c, (JointGaussianMixture, PreparedCoupling),
        "a JointGaussianMixture (fmjax.independent_coupling(p0, p1) joins two GaussianMixtures)"
        " or an exact.prepare(...) of one",
    )  # fmt: skip
    if isinstance(c, PreparedCoupling):
        if sched is not None and sched.has_noise and not c.noise_diagonal:
            return c.coupling, None
        return c.coupling, c.factors
    return c, None


def _run(fn, want: frozenset, c, sched, t, x, precision):
    """Validate, flatten the batch, and evaluate ``want`` on the points x (N, d).

    Paths: time-free factors (a ``PreparedCoupling`` of an independent coupling, or a concrete
    independent coupling with one t per point, factored here; with a noisy schedule only where
    V^T V is diagonal); else with one t the per-time Cholesky factors once for all points;
    else per point, vmapped.
    """
    prepared = isinstance(c, PreparedCoupling)
    c, factors = _unwrap(fn, c, sched if isinstance(sched, Schedule) else None)
    # Complex or half-precision points and times are refused (a cast would lose information).
    x = _checks.check_real_array(f"exact.{fn}", "x", x, c.means.dtype)
    t = _checks.check_real_array(f"exact.{fn}", "t", t, x.dtype)
    _check_inputs(fn, c, sched, t, x)
    d = c.dim
    batch = jnp.broadcast_shapes(t.shape, x.shape[:-1])
    xf = jnp.broadcast_to(x, batch + (d,)).reshape(-1, d)
    if not prepared and t.size > 1 and _is_independent(c):
        factors = _pencil_jit(c)
        if sched.has_noise and not _gram_is_diagonal(factors):
            factors = None  # noise not diagonal in the pencil basis: per-time path
    resp = want == {"responsibilities"}
    if factors is not None:  # time-free: any pattern of times in the same two products
        tf = t.reshape(()) if t.size == 1 else jnp.broadcast_to(t, batch).reshape(-1)
        if resp:
            out = _responsibilities_free_jit(factors, sched, tf, xf, precision=precision)
        else:
            out = _accumulate_free_jit(factors, sched, tf, xf, want=want, precision=precision)
    else:
        if resp:
            kernel = functools.partial(_responsibilities_jit, precision=precision)
        else:
            kernel = functools.partial(_accumulate_jit, want=want, precision=precision)
        if t.size == 1:  # one time for all points: factor once
            out = kernel(c, sched, t.reshape(()), xf)
        else:  # one time per point: factor per point, vmapped
            tf = jnp.broadcast_to(t, batch).reshape(-1)

            def one(ti, xi):
                return jax.tree.map(lambda a: a[0], kernel(c, sched, ti, xi[None]))

            out = jax.vmap(one)(tf, xf)
    return {k: v.reshape(batch + v.shape[1:]) for k, v in out.items()}


def evaluate(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    quantities: tuple[str, ...] = ("velocity", "log_prob"),
    *,
    precision: Precision = "highest",
) -> Evaluation:
    """Several exact quantities in one pass over the components.

    Args:
        coupling: the joint mixture of (X0, X1), K components on R^{2d}, or its
            ``prepare(coupling)``.
        schedule: affine schedule (a_t, b_t).
        t: time(s) in the schedule's valid interval (``schedule.interval``), scalar or
            broadcastable against ``x.shape[:-1]``.
        x: points, shape (..., d).
        quantities: any of "velocity" (..., d), "log_prob" (...), "score" (..., d),
            "divergence" (...). Static.
        precision: matmul precision (static); "highest" keeps float32 exact on GPUs (no TF32).

    Returns:
        ``Evaluation(velocity, log_prob, score, divergence)`` with ``None`` for the quantities
        not requested.

    Raises:
        TypeError: for a coupling or schedule of the wrong type.
        ValueError: for bad ``quantities``, shapes, or concrete times outside the interval.
    """
    if isinstance(quantities, str) or not all(isinstance(q, str) for q in quantities):
        _checks.fail(
            "exact.evaluate", "quantities", f"a tuple of names from {_QUANTITIES}", quantities,
            TypeError,
        )  # fmt: skip
    want = frozenset(quantities)
    if not want or not want <= set(_QUANTITIES):
        _checks.fail(
            "exact.evaluate", "quantities", f"a non-empty subset of {_QUANTITIES}", quantities
        )
    return Evaluation(**_run("evaluate", want, coupling, schedule, t, x, precision))


def _one(name: str, coupling, schedule, t, x, precision) -> Array:
    return _run(name, frozenset({name}), coupling, schedule, t, x, precision)[name]


def velocity(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... d"]:
    """Marginal velocity u_t(x) = E[dX_t/dt | X_t = x]: x (..., d) -> (..., d). See ``evaluate``."""
    return _one("velocity", coupling, schedule, t, x, precision)


def log_prob(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "..."]:
    """Log-density log p_t(x): x (..., d) -> (...). See ``evaluate``."""
    return _one("log_prob", coupling, schedule, t, x, precision)


def score(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... d"]:
    """Score grad_x log p_t(x): x (..., d) -> (..., d). See ``evaluate``."""
    return _one("score", coupling, schedule, t, x, precision)


def divergence(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "..."]:
    """Divergence of the marginal velocity, div u_t(x): x (..., d) -> (...). See ``evaluate``."""
    return _one("divergence", coupling, schedule, t, x, precision)


def responsibilities(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... K"]:
    """Posterior component probabilities P(K = k | X_t = x): x (..., d) -> (..., K)."""
    want = frozenset({"responsibilities"})
    return _run("responsibilities", want, coupling, schedule, t, x, precision)["responsibilities"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["coupling"],
    meta_fields=["schedule", "precision"],
)
@dataclasses.dataclass(frozen=True)
class VelocityField:
    """The exact velocity of a coupling and schedule as a field ``(t, x) -> (..., d)``.

    A pytree (the coupling's arrays are leaves; schedule and precision are static), so a new
    field of same-shaped mixtures passes through ``jit`` without recompiling. ``schedule``
    tells samplers and metrics the valid interval of times.

    Attributes:
        coupling: the joint mixture of (X0, X1).
        schedule: the affine schedule.
        precision: matmul precision of the engine.
    """

    coupling: JointGaussianMixture | PreparedCoupling
    schedule: Schedule
    precision: Precision = "highest"

    def __call__(
        self, t: Float[ArrayLike, "..."], x: Float[ArrayLike, "... d"]
    ) -> Float[Array, "... d"]:
        """u_t(x), as ``velocity(coupling, schedule, t, x)``."""
        return velocity(self.coupling, self.schedule, t, x, precision=self.precision)


def velocity_field(
    coupling: JointGaussianMixture | PreparedCoupling,
    schedule: Schedule,
    *,
    precision: Precision = "highest",
) -> VelocityField:
    """The exact velocity as a field ``(t, x) -> (..., d)`` that knows its schedule.

    ``coupling`` may be an ``exact.prepare(...)``: the field then factors nothing per call.

    Raises:
        TypeError: for a coupling or schedule of the wrong type.
    """
    _unwrap("velocity_field", coupling)
    _checks.check_instance(
        "exact.velocity_field", "schedule", schedule, Schedule, "an fmjax Schedule"
    )
    return VelocityField(coupling, schedule, precision)


def marginal(
    coupling: JointGaussianMixture, schedule: Schedule, t: Float[ArrayLike, ""]
) -> GaussianMixture:
    """The law p_t of X_t at one scalar time t, as a K-component GaussianMixture on R^d."""
    coupling, _ = _unwrap("marginal", coupling)
    t = _checks.check_real_array("exact.marginal", "t", t, coupling.means.dtype)
    if t.ndim != 0:
        _checks.fail("exact.marginal", "t", "a scalar", f"shape {t.shape}")
    _check_inputs("marginal", coupling, schedule, t, coupling.means[:1, : coupling.dim])
    mu, _, cov, _ = _path_blocks(coupling, schedule, t.astype(coupling.means.dtype))
    return GaussianMixture._from_leaves(coupling.weights, mu, cov)
