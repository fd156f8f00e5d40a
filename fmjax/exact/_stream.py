"""The one accumulator of the exact engine: components in blocks, points in chunks, online
log-sum-exp over the components, one memory budget.

A form (``_cholesky``, ``_pencil``, ``_otmap``, ``_lowdim``) turns a block of B components and
a chunk of points into ``Terms``: the log-weights log pi_k N(x; mu_k, S_k) (N, B) and the
block's weighted sums, or the per-component velocities and scores explicitly. ``fold`` is the
one rule that merges a block into the running sums (``Carry``); ``finish`` normalises them. The
co-moments (divergence and velocity Jacobian) are folded centred, so float32 stays accurate far
from the mass:
    div u  = sum_k alpha_k tr(grad v_k) + sum_k alpha_k (s_k - s) . (v_k - u),
    grad u = sum_k alpha_k grad v_k     + sum_k alpha_k (v_k - u) (s_k - s)^T,
from grad alpha_k = alpha_k (s_k - s)^T, each block centred at its own means and merged across
blocks through the difference of the means (Chan's update). Which form and layout run is
decided by ``fmjax.exact._plan``; its docstring is the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# The memory budget, in array elements (float32: 4 bytes each).
# One (N, B, d) point term held in memory: 2^24 elements (64 MiB in float32).
BLOCK_BUDGET = 1 << 24
# A chunk's live point terms that should stay in cache (on the CPU): 2^21 elements (8 MiB in
# float32, a quarter of the measuring CPU's L3; 2^19 to 2^22 measured alike within noise).
CACHE_ELEMS = 1 << 21
# The fewest points in a chunk.
MIN_CHUNK = 256


class Carry(NamedTuple):
    """Running sums of the online log-sum-exp over the components, per point (None: not asked).

    Each sum is scaled by exp(-mx): tot = sum_k p_k, v = sum_k p_k v_k, s = sum_k p_k s_k, and the
    centred co-moments div (N,) and jac (N, d, d).
    """

    mx: Float[Array, " N"]
    tot: Float[Array, " N"]
    v: Float[Array, "N d"] | None
    s: Float[Array, "N d"] | None
    div: Float[Array, " N"] | None
    jac: Float[Array, "N d d"] | None


class Terms(NamedTuple):
    """What a form supplies for one block of B components and a chunk of N points.

    Attributes:
        logp: log pi_k N(x; mu_k, S_k), (N, B).
        explicit: ``() -> (v_k, s_k, tr_k)``: (N, B, d), (N, B, d) and div v_k (N or 1, B); each
            None when not asked.
        sums: ``p -> (sum_k p_k, sum_k p_k v_k, sum_k p_k s_k)`` when the form has a faster way
            than through ``explicit`` (None: through ``explicit``).
        jac_sum: ``p -> sum_k p_k grad v_k`` (N, d, d), for the Jacobian.
        block_max: logp's max over the block when the form has it (else reduced here).
    """

    logp: Float[Array, "N B"]
    explicit: Callable | None = None
    sums: Callable | None = None
    jac_sum: Callable | None = None
    block_max: Float[Array, " N"] | None = None


def needs(want: frozenset) -> tuple[bool, bool, bool]:
    """(velocity terms, score terms, co-moments) that the quantities ``want`` need."""
    co = bool(want & {"divergence", "jacobian"})
    return co or "velocity" in want, co or "score" in want, co


def init(n: int, d: int, dtype, want: frozenset, raw: int | None = None) -> Carry:
    """Empty running sums for n points; ``raw``: the width of a form's raw sums, carried in
    ``v`` in place of the velocity and score sums (see ``run``'s ``lift``)."""
    need_v, need_s, _ = needs(want)
    zeros_nd = jnp.zeros((n, d), dtype)
    if raw is not None:
        need_v, need_s, zeros_nd = True, False, jnp.zeros((n, raw), dtype)
    return Carry(
        jnp.full((n,), -jnp.inf, dtype),
        jnp.zeros((n,), dtype),
        zeros_nd if need_v else None,
        zeros_nd if need_s else None,
        jnp.zeros((n,), dtype) if "divergence" in want else None,
        jnp.zeros((n, d, d), dtype) if "jacobian" in want else None,
    )


def _safe(w):
    return jnp.where(w > 0, w, 1.0)


def _merge(acc, scale, carry: Carry, wb, bv, bs, block, outer: bool):
    """Chan's merge of a centred co-moment: ``block`` is centred at the block's means
    u_b = bv / wb, s_b = bs / wb, the running one (weight tot, before rescaling) at its own;
    they merge through the difference of the two means (outer product for the Jacobian)."""
    wa = carry.tot * scale
    w = wa + wb
    du = bv / _safe(wb)[:, None] - carry.v / _safe(carry.tot)[:, None]
    ds = bs / _safe(wb)[:, None] - carry.s / _safe(carry.tot)[:, None]
    coef = jnp.where(w > 0, wa * wb / _safe(w), 0.0)
    cross = du[:, :, None] * ds[:, None, :] if outer else jnp.sum(ds * du, axis=-1)
    scale = scale[:, None, None] if outer else scale
    return acc * scale + block + (coef[:, None, None] if outer else coef) * cross


def fold(carry: Carry, terms: Terms, want: frozenset) -> Carry:
    """Merge one block of components into the running sums: the one fold rule."""
    _, _, co = needs(want)
    logp = terms.logp
    bmax = jnp.max(logp, axis=1) if terms.block_max is None else terms.block_max
    new_mx = jnp.maximum(carry.mx, bmax)
    # Zero weights give -inf everywhere: keep the shift finite so no inf - inf appears.
    shift = jnp.where(jnp.isfinite(new_mx), new_mx, 0.0)
    scale = jnp.exp(carry.mx - shift)
    p = jnp.exp(logp - shift[:, None])
    if co or terms.sums is None:
        v, s, tr = terms.explicit()
        wb = jnp.sum(p, axis=1)
        # Weighted sums as multiply-and-reduce (fused), not as tiny dots; from the same v_k, s_k
        # as the co-moments, so a one-hot block centres exactly.
        bv = None if carry.v is None else jnp.sum(p[:, :, None] * v, axis=1)
        bs = None if carry.s is None else jnp.sum(p[:, :, None] * s, axis=1)
    else:
        wb, bv, bs = terms.sums(p)
    div, jac = carry.div, carry.jac
    if co:
        dv = v - (bv / _safe(wb)[:, None])[:, None]
        ds = s - (bs / _safe(wb)[:, None])[:, None]
        if "divergence" in want:
            block = jnp.sum(p * (tr + jnp.sum(ds * dv, axis=-1)), axis=1)
            div = _merge(div, scale, carry, wb, bv, bs, block, outer=False)
        if "jacobian" in want:
            block = terms.jac_sum(p) + jnp.einsum("nb,nbi,nbj->nij", p, dv, ds)
            jac = _merge(jac, scale, carry, wb, bv, bs, block, outer=True)
    return Carry(
        new_mx,
        carry.tot * scale + wb,
        None if carry.v is None else carry.v * scale[:, None] + bv,
        None if carry.s is None else carry.s * scale[:, None] + bs,
        div,
        jac,
    )


def finish(carry: Carry, want: frozenset) -> dict:
    """Normalise the running sums into the requested quantities."""
    tot = carry.tot
    out = {}
    if "velocity" in want:
        out["velocity"] = carry.v / tot[:, None]
    if "score" in want:
        out["score"] = carry.s / tot[:, None]
    if "log_prob" in want:
        out["log_prob"] = jnp.where(jnp.isfinite(carry.mx), carry.mx, 0.0) + jnp.log(tot)
    if "divergence" in want:
        out["divergence"] = carry.div / tot
    if "jacobian" in want:
        out["jacobian"] = carry.jac / tot[:, None, None]
    return out


# ----------------------------------------------------------------------------- sizes


def balanced(k: int, limit: int) -> int:
    """Components per block: the fewest blocks of at most ``limit``, as equal as possible
    (K is padded up to a multiple, so a prime K costs no more scan steps than K + 1)."""
    n_blocks = -(-k // min(limit, k))
    return -(-k // n_blocks)


def block_size(n: int, k: int, d: int, arrays: int = 3) -> int:
    """Components per block under ``BLOCK_BUDGET``: ``arrays`` (N, B, d) point terms and ~8
    (B, 2d, 2d) factor-sized arrays."""
    return balanced(k, max(1, BLOCK_BUDGET // max(1, arrays * n * d + 32 * d * d)))


def chunk_count(n: int, width: int) -> int:
    """Point chunks whose (n_c, width) terms hold at most ``CACHE_ELEMS`` (>= ``MIN_CHUNK``
    points each)."""
    return -(-n // max(MIN_CHUNK, CACHE_ELEMS // max(1, width)))


def sizes(n: int, k: int, d: int, *, arrays: int, chunked: bool, block=None, cached: int = 2):
    """(components per block B, point chunks).

    ``block``: a layout with a fixed block (``_lowdim``). Otherwise, chunked: blocks small enough
    for ``MIN_CHUNK`` points to keep their ``cached`` (n_c, B, d) terms in cache (at a
    contraction of only d the products are bound by memory otherwise: 2x to 4x at d = 64,
    K = 64, N = 5e4 on a CPU), or one chunk with ``block_size``'s blocks where that gives one.
    """
    if block is not None:
        bsz = balanced(k, block)
        return bsz, chunk_count(n, cached * d * bsz) if chunked else 1
    if chunked:
        bsz = balanced(k, max(1, CACHE_ELEMS // (cached * MIN_CHUNK * d)))
        # Rounded down: a chunk holds 1x to 2x CACHE_ELEMS, so a batch that only just exceeds
        # the budget stays whole (cut in two, (16, 16, 5000) measured 1.2x slower on a CPU).
        n_chunks = (n * cached * bsz * d) // CACHE_ELEMS
        if n_chunks > 1:
            return bsz, n_chunks
    return block_size(n, k, d, arrays), 1


# ----------------------------------------------------------------------------- the stream


def to_blocks(comps: Any, bsz: int):
    """Per-component arrays (a NamedTuple with ``log_w``, leading axis K) padded to a multiple of
    ``bsz`` and reshaped (n_blocks, bsz, ...). Padding components copy component 0 (finite
    factors) with log-weight -inf: they add exactly nothing to the online log-sum-exp."""
    k = comps.log_w.shape[0]
    n_blocks = -(-k // bsz)
    extra = n_blocks * bsz - k
    if extra:
        comps = jax.tree.map(
            lambda a: jnp.concatenate([a, jnp.broadcast_to(a[:1], (extra,) + a.shape[1:])]), comps
        )
        comps = comps._replace(log_w=comps.log_w.at[k:].set(-jnp.inf))
    return jax.tree.map(lambda a: a.reshape((n_blocks, bsz) + a.shape[1:]), comps)


def split(a, n_chunks: int):
    """(N, ...) -> (n_chunks, ceil(N / n_chunks), ...), the last chunk padded by repeating the
    last row (a real point, so the padding computes nothing non-finite; it is dropped)."""
    n = a.shape[0]
    per = -(-n // n_chunks)
    a = jnp.pad(a, [(0, per * n_chunks - n)] + [(0, 0)] * (a.ndim - 1), mode="edge")
    return a.reshape((n_chunks, per) + a.shape[1:])


def run(
    prep, terms, comps, pts, want: frozenset, *, d, dtype, bsz, n_chunks, outer=False, lift=None
):
    """Stream the component blocks over the points with the online log-sum-exp; the quantities.

    ``prep(block)`` makes a block's factors (once per block; once per block and chunk with
    ``outer``, for layouts whose carry should stay in cache across the blocks);
    ``terms(prepared, chunk)`` gives the block's ``Terms`` on a chunk of the points ``pts`` (a
    pytree of (N, ...) arrays). Memory: O(N d + B d^2) besides the chunk's terms.

    ``lift = (width, fn)``: the form's ``sums`` return raw sums (N, width) in place of the
    velocity and score sums, linear in the weights, and ``fn(raw, pts) -> (v sums, s sums)``
    maps them once at the end (the low-d layout's affine maps: once, not once per block).
    """
    n = jax.tree.leaves(pts)[0].shape[0]
    raw = None if lift is None else lift[0]
    whole = pts
    blocks = to_blocks(comps, bsz)
    per = -(-n // n_chunks)
    if n_chunks > 1:
        pts = jax.tree.map(lambda a: split(a, n_chunks), pts)

    def scan(carry, chunk, pb=None):
        def step(c, cb):
            return fold(c, terms(prep(cb) if pb is None else pb, chunk), want), None

        return jax.lax.scan(step, carry, blocks)[0]

    if n_chunks == 1:
        carry = scan(init(n, d, dtype, want, raw), pts)
    elif outer:
        carry = jax.lax.map(lambda c: scan(init(per, d, dtype, want, raw), c), pts)
    else:

        def step(carry, cb):
            pb = prep(cb)
            new = jax.lax.map(lambda a: fold(a[0], terms(pb, a[1]), want), (carry, pts))
            return new, None

        start = jax.tree.map(lambda a: split(a, n_chunks), init(n, d, dtype, want, raw))
        carry = jax.lax.scan(step, start, blocks)[0]
    if n_chunks > 1:
        carry = jax.tree.map(lambda a: a.reshape((n_chunks * per,) + a.shape[2:])[:n], carry)
    if lift is not None:
        bv, bs = lift[1](carry.v, whole)
        carry = carry._replace(v=bv, s=bs)
    return finish(carry, want)


def softmax(logp: Float[Array, "N K"]) -> dict:
    """The responsibilities P(K = k | X_t = x) from all K log-weights (no stream)."""
    return {"responsibilities": jax.nn.softmax(logp, axis=-1)}
