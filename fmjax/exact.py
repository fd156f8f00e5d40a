"""Closed-form probability path of a Gaussian-mixture coupling: p_t, u_t, score, divergence.

For a joint mixture of (X0, X1) and a schedule, each component k makes (X_t, dX_t/dt) jointly
Gaussian with
    mu_t = b m0 + a m1,                    dmu_t = db m0 + da m1,
    S_t  = b^2 S00 + a b (S01 + S10) + a^2 S11,
    C_t  = Cov(dX_t, X_t) = b db S00 + a db S01 + b da S10 + a da S11,
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

Public functions take ``(coupling, schedule, t, x)`` with ``x`` of shape (..., d) and ``t`` a
scalar or an array broadcastable against ``x.shape[:-1]``. They are pure and jit-compatible
(traced ``t`` and ``x``; ``precision`` is static), e.g. ``jax.jit(fmjax.exact.velocity)`` or
``functools.partial(fmjax.exact.velocity, coupling, schedule)`` as a velocity field ``(t, x)``.
With one scalar ``t`` the Cholesky factors are computed once for all points; with one ``t`` per
point they are computed per point (K d^3 work each).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from fmjax import _checks
from fmjax._typing import Precision
from fmjax.mixtures import GaussianMixture, JointGaussianMixture
from fmjax.schedules import Schedule

__all__ = [
    "Evaluation",
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
    """Per-component mean, velocity mean, covariance and cross-covariance of (X_t, dX_t)."""
    a, b, da, db = sched(t)
    m0, m1, s00, s01, s10, s11 = c.blocks()
    mu = b * m0 + a * m1
    dmu = db * m0 + da * m1
    cov = b * b * s00 + a * b * (s01 + s10) + a * a * s11
    cross = b * db * s00 + a * db * s01 + b * da * s10 + a * da * s11
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


def _block_size(n: int, k: int, d: int) -> int:
    """Components per scan step: (N, B, 3d) point terms and ~8 (B, 2d, 2d) factor-sized arrays.

    The fewest blocks under the memory budget, balanced: K is then padded up to a multiple of B
    with zero-weight components (``_pad``), so a prime K costs no more scan steps than K + 1.
    """
    limit = max(1, _BLOCK_BUDGET // max(1, 3 * n * d + 32 * d * d))
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
    zero_vec = jnp.zeros((n, d), x.dtype)

    def step(carry, cb):
        mx, tot, acc_v, acc_s, acc_div = carry
        fb = _factors(cb, sched, t, precision)
        logp, v, sk = _point_terms(fb, x, need_v, need_s, precision)
        new_mx = jnp.maximum(mx, jnp.max(logp, axis=1))
        # Zero weights give -inf everywhere: keep the shift finite so no inf - inf appears.
        shift = jnp.where(jnp.isfinite(new_mx), new_mx, 0.0)
        scale = jnp.exp(mx - shift)
        p = jnp.exp(logp - shift[:, None])  # (N, B)
        tot = tot * scale + jnp.sum(p, axis=1)
        # Weighted sums over the block as multiply-and-reduce (fused), not as tiny dots.
        if need_v:
            acc_v = acc_v * scale[:, None] + jnp.sum(p[:, :, None] * v, axis=1)
        if need_s:
            acc_s = acc_s * scale[:, None] + jnp.sum(p[:, :, None] * sk, axis=1)
        if "divergence" in want:
            dk = fb.tr[None] + jnp.sum(sk * v, axis=-1)
            acc_div = acc_div * scale + jnp.sum(p * dk, axis=1)
        return (new_mx, tot, acc_v, acc_s, acc_div), None

    init = (
        jnp.full((n,), -jnp.inf, x.dtype),
        jnp.zeros((n,), x.dtype),
        zero_vec,
        zero_vec,
        jnp.zeros((n,), x.dtype),
    )
    (mx, tot, acc_v, acc_s, acc_div), _ = jax.lax.scan(step, init, blocks)
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


# Compiled once per shapes and static options, so eager callers do not recompile the component
# scan on every call (an eager lax.scan is compiled anew per call); inlined under an outer jit.
_accumulate_jit = jax.jit(_accumulate, static_argnames=("want", "precision"))
_responsibilities_jit = jax.jit(_responsibilities, static_argnames=("precision",))


def _check_inputs(fn: str, c, sched, t, x):
    fn = f"exact.{fn}"
    _checks.check_instance(
        fn, "coupling", c, JointGaussianMixture,
        "a JointGaussianMixture (fmjax.independent_coupling(p0, p1) joins two GaussianMixtures)",
    )  # fmt: skip
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


def _run(fn, kernel, c, sched, t, x):
    """Validate, flatten the batch, and apply ``kernel(c, sched, t, x (N, d)) -> dict``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(c.means.dtype)
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(x.dtype)
    _check_inputs(fn, c, sched, t, x)
    d = c.dim
    batch = jnp.broadcast_shapes(t.shape, x.shape[:-1])
    xf = jnp.broadcast_to(x, batch + (d,)).reshape(-1, d)
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
        coupling: the joint mixture of (X0, X1), K components on R^{2d}.
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
    return Evaluation(
        **_run(
            "evaluate",
            functools.partial(_accumulate_jit, want=want, precision=precision),
            coupling,
            schedule,
            t,
            x,
        )
    )


def _one(name: str, coupling, schedule, t, x, precision) -> Array:
    kernel = functools.partial(_accumulate_jit, want=frozenset({name}), precision=precision)
    return _run(name, kernel, coupling, schedule, t, x)[name]


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
    kernel = functools.partial(_responsibilities_jit, precision=precision)
    return _run("responsibilities", kernel, coupling, schedule, t, x)["responsibilities"]


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

    coupling: JointGaussianMixture
    schedule: Schedule
    precision: Precision = "highest"

    def __call__(
        self, t: Float[ArrayLike, "..."], x: Float[ArrayLike, "... d"]
    ) -> Float[Array, "... d"]:
        """u_t(x), as ``velocity(coupling, schedule, t, x)``."""
        return velocity(self.coupling, self.schedule, t, x, precision=self.precision)


def velocity_field(
    coupling: JointGaussianMixture, schedule: Schedule, *, precision: Precision = "highest"
) -> VelocityField:
    """The exact velocity as a field ``(t, x) -> (..., d)`` that knows its schedule.

    Raises:
        TypeError: for a coupling or schedule of the wrong type.
    """
    _checks.check_instance(
        "exact.velocity_field", "coupling", coupling, JointGaussianMixture,
        "a JointGaussianMixture",
    )  # fmt: skip
    _checks.check_instance(
        "exact.velocity_field", "schedule", schedule, Schedule, "an fmjax Schedule"
    )
    return VelocityField(coupling, schedule, precision)


def marginal(
    coupling: JointGaussianMixture, schedule: Schedule, t: Float[ArrayLike, ""]
) -> GaussianMixture:
    """The law p_t of X_t at one scalar time t, as a K-component GaussianMixture on R^d."""
    t = jnp.asarray(t)
    if t.ndim != 0:
        _checks.fail("exact.marginal", "t", "a scalar", f"shape {t.shape}")
    _check_inputs("marginal", coupling, schedule, t, coupling.means[:1, : coupling.dim])
    mu, _, cov, _ = _path_blocks(coupling, schedule, t.astype(coupling.means.dtype))
    return GaussianMixture._from_leaves(coupling.weights, mu, cov)
