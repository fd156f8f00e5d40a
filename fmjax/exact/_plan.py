"""The dispatch table of the exact engine: which form and layout evaluate which quantities.

``plan`` is one pure function of static facts: the coupling's structure (pytree metadata, or a
``PreparedCoupling``'s flags), whether it was prepared, what is known of latent noise in the
time-free basis, the time pattern, d, the quantities and the backend. It never looks at numbers
and never at whether a value is concrete, so an eager call, a closure under ``jit`` and a ``jit``
argument take the same kernel. The tables below ARE the dispatch (``tests/test_exact_plan.py``
parses them and checks ``plan`` against them over every input, row by row); the first matching
row wins.

Form (table A). ``noise`` is "none" (no latent noise), "diagonal" / "full" (``prepare`` found
V^T V diagonal or not), or "unknown" (an unprepared independent coupling, or a prepared one that
was traced: checked on device, ``checked``):

| structure   | prepared | times     | noise          | form     |
|-------------|----------|-----------|----------------|----------|
| independent | yes      | any       | none,diagonal  | pencil   |
| independent | no       | per_point | none,diagonal  | pencil   |
| independent | yes      | any       | unknown        | checked  |
| independent | no       | per_point | unknown        | checked  |
| map         | yes      | any       | none           | otmap    |
| map         | no       | per_point | none           | otmap    |
| any         | any      | any       | any            | cholesky |

``checked`` is a ``lax.cond`` on device between the rows of table B for ``pencil`` (V^T V
diagonal: noise stays diagonal in the time-free basis) and for ``cholesky``.

Kernel (table B). ``low`` quantities are subsets of {velocity, log_prob, score}; ``other`` holds
a divergence or a Jacobian. ``chunks``: the points are taken in cache-sized chunks on the CPU
(``_stream.sizes``; a GPU wants the whole batch):

| quantities       | form     | times     | d    | kernel                | chunks  |
|------------------|----------|-----------|------|-----------------------|---------|
| responsibilities | pencil   | any       | any  | pencil_softmax        | never   |
| responsibilities | otmap    | any       | any  | otmap_softmax         | never   |
| responsibilities | cholesky | shared    | any  | cholesky_softmax      | never   |
| responsibilities | cholesky | per_point | any  | cholesky_softmax_vmap | never   |
| low              | any      | shared    | <=8  | lowd                  | cpu     |
| low              | pencil   | per_point | <=8  | lowd_pencil           | cpu     |
| any              | pencil   | any       | any  | pencil                | cpu, >8 |
| any              | otmap    | any       | any  | otmap                 | cpu, >8 |
| any              | cholesky | shared    | any  | cholesky              | cpu, >8 |
| any              | cholesky | per_point | <=8  | cholesky_points       | never   |
| any              | cholesky | per_point | >8   | cholesky_vmap         | never   |

The kernels: ``lowd`` is the low-d layout (``_lowdim``) of the per-time Cholesky factors (K
factorisations of size d per call cost less there than any other kernel's short reductions,
so prepared couplings take it too); ``lowd_pencil`` the same layout of the time-free factors;
``pencil`` / ``otmap`` the time-free forms (``_pencil``, ``_otmap``: no factorisation per time);
``cholesky`` the per-time Cholesky form (``_cholesky``), factored once per call;
``cholesky_points`` its per-point vectorised small-d factorisations; ``cholesky_vmap`` the
shared-t kernel vmapped over the points; ``*_softmax`` the responsibilities from a form's
log-terms over all K. Every kernel but the softmaxes streams through ``_stream`` (the one
accumulator).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax

from fmjax.exact import _cholesky, _lowdim, _otmap, _pencil, _stream

LOW_D = 8  # the largest d of the low-d layout and of the vectorised per-point factorisations
LOW = frozenset({"velocity", "log_prob", "score"})  # the quantities of the low-d layout


class Kernel(NamedTuple):
    """A row of table B: the kernel's name, whether it chunks the points, and for ``checked``
    the two kernels a device-side test of V^T V chooses between (diagonal, not diagonal)."""

    name: str
    chunked: bool = False
    branches: tuple | None = None


def plan(
    structure: str,
    *,
    prepared: bool,
    noise: str,
    times: str,
    d: int,
    quantities: frozenset,
    backend: str,
) -> Kernel:
    """The kernel for these static facts (tables A and B of the module docstring)."""
    form = "cholesky"
    if structure != "general" and (prepared or times == "per_point"):
        if structure == "independent" and noise in ("none", "diagonal"):
            form = "pencil"
        elif structure == "independent" and noise == "unknown":
            form = "checked"
        elif structure == "map" and noise == "none":
            form = "otmap"
    if form == "checked":
        args = dict(prepared=True, times=times, d=d, quantities=quantities, backend=backend)
        return Kernel(
            "checked",
            branches=(
                plan("independent", noise="diagonal", **args),
                plan("general", noise="full", **args),
            ),
        )
    cpu = backend == "cpu"
    if quantities == {"responsibilities"}:
        if form == "cholesky" and times == "per_point":
            return Kernel("cholesky_softmax_vmap")
        return Kernel(f"{form}_softmax")
    low = quantities <= LOW and d <= LOW_D
    if low and times == "shared":
        return Kernel("lowd", cpu)
    if low and form == "pencil":
        return Kernel("lowd_pencil", cpu)
    if form != "cholesky" or times == "shared":
        return Kernel(form, cpu and d > LOW_D)
    return Kernel("cholesky_points" if d <= LOW_D else "cholesky_vmap")


def backend() -> str:
    """The backend the kernels run on (a function, so tests can choose)."""
    return jax.default_backend()


# ----------------------------------------------------------------------------- the kernels
# Each: (coupling, time-free factors or None, schedule, t (scalar or (N,)), x (N, d)) -> dict of
# (N, ...) quantities; compiled once per shapes and static options (an eager lax.scan would be
# compiled anew per call), inlined under an outer jit.

_STATIC = ("want", "precision", "chunked")


def _jit(fn):
    return jax.jit(fn, static_argnames=_STATIC)


def _lowd(prep, terms, comps, pts, want, chunked, lift=None):
    """The low-d layout's stream: fixed blocks, chunks outside the component scan."""
    n, d = jax.tree.leaves(pts)[0].shape
    k = comps.log_w.shape[0]
    bsz, n_chunks = _stream.sizes(
        n, k, d, arrays=0, chunked=chunked, block=_lowdim.BLOCK, cached=_lowdim.CACHED
    )
    dtype = jax.tree.leaves(pts)[0].dtype
    return _stream.run(
        prep,
        terms,
        comps,
        pts,
        want,
        d=d,
        dtype=dtype,
        bsz=bsz,
        n_chunks=n_chunks,
        outer=True,
        lift=lift,
    )


@_jit
def lowd(c, f, sched, t, x, *, want, precision, chunked):
    ctr = _lowdim.centre(c, sched, t, precision)
    return _lowd(
        lambda cb: _lowdim.cholesky_prep(cb, sched, t, ctr, want, precision),
        lambda pb, xc: _lowdim.cholesky_terms(pb, xc, want, precision),
        _cholesky.comps(c),
        x - ctr[None],
        want,
        chunked,
        _lowdim.cholesky_lift(x.shape[-1], want),
    )


@_jit
def lowd_pencil(c, f, sched, t, x, *, want, precision, chunked):
    return _lowd(
        lambda fb: _lowdim.pencil_prep(fb, want),
        lambda pb, chunk: _lowdim.pencil_terms(pb, chunk, want, precision),
        f,
        (x, _lowdim.pencil_coeffs(sched, t)),
        want,
        chunked,
    )


def _time_free(form, arrays, c, f, sched, t, x, want, precision, chunked):
    n, d = x.shape
    per_point = t.ndim > 0
    # One t per point makes the scalings (N, B, d) too: more live point terms.
    arrays = 6 if per_point else arrays
    if "jacobian" in want:
        arrays += 2 * d
    bsz, n_chunks = _stream.sizes(n, f.m0.shape[0], d, arrays=arrays, chunked=chunked)
    pts = (x, _pencil.coeffs(sched, t)) if per_point else x
    return _stream.run(
        lambda fb: fb,
        lambda fb, chunk: form.terms(fb, chunk, sched, t, want, precision),
        f,
        pts,
        want,
        d=d,
        dtype=x.dtype,
        bsz=bsz,
        n_chunks=n_chunks,
    )


pencil = _jit(functools.partial(_time_free, _pencil, 3))
otmap = _jit(functools.partial(_time_free, _otmap, 4))


@_jit
def cholesky(c, f, sched, t, x, *, want, precision, chunked):
    n, d = x.shape
    arrays = 3 + (2 * d if "jacobian" in want else 0)
    bsz, n_chunks = _stream.sizes(n, c.n_components, d, arrays=arrays, chunked=chunked)
    need_v = _stream.needs(want)[0]

    def prep(cb):
        fb = _cholesky.factors(cb, sched, t, precision)
        return fb, (_cholesky.maps(fb, need_v, precision) if n_chunks > 1 else None)

    return _stream.run(
        prep,
        lambda pb, xc: _cholesky.terms(pb, xc, want, precision),
        _cholesky.comps(c),
        x,
        want,
        d=d,
        dtype=x.dtype,
        bsz=bsz,
        n_chunks=n_chunks,
    )


@_jit
def cholesky_points(c, f, sched, t, x, *, want, precision, chunked):
    n, d = x.shape
    # (N, B, d, d) covariances, factors and cross terms
    bsz = _stream.block_size(n, c.n_components, d, 4 + 4 * d)
    return _stream.run(
        lambda cb: cb,
        lambda cb, chunk: _cholesky.points_terms(cb, chunk, sched, want, precision),
        _cholesky.comps(c),
        (x, t),
        want,
        d=d,
        dtype=x.dtype,
        bsz=bsz,
        n_chunks=1,
    )


def _vmapped(kernel):
    """One t per point by the shared-t kernel on one point each, vmapped."""

    def run(c, f, sched, t, x, *, want, precision, chunked):
        def one(ti, xi):
            out = kernel(c, f, sched, ti, xi[None], want=want, precision=precision, chunked=False)
            return jax.tree.map(lambda a: a[0], out)

        return jax.vmap(one)(t, x)

    return _jit(run)


cholesky_vmap = _vmapped(cholesky)


@_jit
def cholesky_softmax(c, f, sched, t, x, *, want, precision, chunked):
    fb = _cholesky.factors(_cholesky.comps(c), sched, t, precision)
    return _stream.softmax(_cholesky.terms((fb, None), x, frozenset(), precision).logp)


cholesky_softmax_vmap = _vmapped(cholesky_softmax)


@_jit
def pencil_softmax(c, f, sched, t, x, *, want, precision, chunked):
    return _stream.softmax(_pencil.terms(f, x, sched, t, frozenset(), precision).logp)


@_jit
def otmap_softmax(c, f, sched, t, x, *, want, precision, chunked):
    return _stream.softmax(_otmap.terms(f, x, sched, t, frozenset(), precision).logp)


FACTOR = {"pencil": _pencil.factor, "otmap": _otmap.factor}  # time-free factors, once


def run(kernel: Kernel, c, f, sched, t, x, want: frozenset, precision) -> dict:
    """Evaluate ``kernel`` (from ``plan``); ``f``: a ``PreparedCoupling``'s factors or None (the
    time-free kernels then factor the coupling here)."""
    if kernel.name == "checked":
        f = _pencil.factor(c) if f is None else f
        yes, no = (
            functools.partial(run, k, c, f, sched, t, x, want, precision) for k in kernel.branches
        )
        return jax.lax.cond(_pencil.gram_is_diagonal(f), yes, no)
    form = kernel.name.removeprefix("lowd_").removesuffix("_softmax")
    if f is None and form in FACTOR:
        f = FACTOR[form](c)
    return KERNELS[kernel.name](
        c, f, sched, t, x, want=want, precision=precision, chunked=kernel.chunked
    )


KERNELS = {
    "lowd": lowd,
    "lowd_pencil": lowd_pencil,
    "pencil": pencil,
    "otmap": otmap,
    "cholesky": cholesky,
    "cholesky_points": cholesky_points,
    "cholesky_vmap": cholesky_vmap,
    "cholesky_softmax": cholesky_softmax,
    "cholesky_softmax_vmap": cholesky_softmax_vmap,
    "pencil_softmax": pencil_softmax,
    "otmap_softmax": otmap_softmax,
}
