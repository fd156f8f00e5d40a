"""The fast rows of the exact engine's table (``fmjax.exact._plan``): the low-d layout (``lowd``,
``lowd_pencil``, d <= 8) and the CPU's point chunks (``_stream.sizes``), each against the general
kernel in one piece, in float64 (round-off of well-conditioned d x d factors: 1e-10), with a
control that the comparison can fail and that the path under test was really taken."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import exact, schedules
from fmjax.exact import _lowdim, _plan, _stream
from fmjax.mixtures import random_joint_mixture
from tests.reference import reference
from tests.test_exact_float32 import TOL, _errors, _far_points
from tests.test_exact_maps import _map_coupling

_LOW = ("velocity", "log_prob", "score")
_ALL = ("velocity", "log_prob", "score", "divergence")
_SCHEDULES = {
    "linear": schedules.linear(),
    "cosine": schedules.cosine(),
    "vp": schedules.vp(),
    "polynomial": schedules.polynomial(2.0),
    "trig+noise": schedules.trig(schedules.brownian(0.5)),
}
_TIMES = (0.0, 1e-3, 0.5, 1.0)


@pytest.fixture
def fresh_kernels():
    """Clear the compiled kernels after a test that changed a budget or the backend choice."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))


def _kernel(name, c, sched, t, x, want=_LOW, chunked=False, f=None):
    """The kernel of table B's row ``name`` on points x (N, d)."""
    kernel = _plan.Kernel(name, chunked)
    return _plan.run(kernel, c, f, sched, jnp.asarray(t, x.dtype), x, frozenset(want), "highest")


def _low(c, sched, t, x, want=_LOW, chunked=False):
    return _kernel("lowd", c, sched, t, x, want, chunked)


def _general(c, sched, t, x, want=_LOW):
    return _kernel("cholesky", c, sched, t, x, want)


def _points(c, sched, t, n, seed=1):
    """Points of p_t and a few far ones (|x| ~ 30)."""
    x = exact.marginal(c, sched, t).sample(jax.random.key(seed), n)
    return jnp.concatenate([x, 30.0 * jax.random.normal(jax.random.key(seed + 1), (4, c.dim))])


@pytest.mark.parametrize(
    "d, names",
    [(1, ("linear", "trig+noise")), (3, tuple(_SCHEDULES)), (8, ("cosine", "vp"))],
    ids=["d1", "d3", "d8"],
)
def test_lowdim_kernel_matches_the_general_kernel(x64, d, names):
    """Every schedule (with and without latent noise; all at d = 3), t in {0, 1e-3, 0.5, 1}:
    velocity, log p and score of the low-d kernel equal the general kernel's to 1e-10. K = 19
    makes two blocks of 10, the last padded with a zero-weight component."""
    c = random_joint_mixture(jax.random.key(d), 19, d, mean_scale=2.0)
    for name in names:
        sched = _SCHEDULES[name]
        for t in _TIMES:
            t = min(max(t, sched.t_min), sched.t_max)
            x = _points(c, sched, t, 40)
            got, want = _low(c, sched, t, x), _general(c, sched, t, x)
            for q in _LOW:
                assert _rel(got[q], want[q]) < 1e-10, (name, t, q)
    # One quantity at a time takes the same kernel with a narrower weighted-sum factor.
    for q in _LOW:
        one = _low(c, schedules.cosine(), 0.3, x, (q,))
        assert set(one) == {q}
        assert _rel(one[q], _general(c, schedules.cosine(), 0.3, x, (q,))[q]) < 1e-10


def test_lowdim_kernel_control_misaligned_weighted_sums_fail(x64, monkeypatch, fresh_kernels):
    """Control: the weighted-sum factor of the components in reverse order (the velocity of
    component K - 1 - k weighted by alpha_k) is caught by the same comparison."""
    c = random_joint_mixture(jax.random.key(4), 6, 2, mean_scale=2.0)
    sched = schedules.linear()
    x = _points(c, sched, 0.5, 40)
    want = _general(c, sched, 0.5, x)
    back = _lowdim._back
    monkeypatch.setattr(_lowdim, "_back", lambda *a: back(*a)[::-1])
    jax.clear_caches()  # retrace with the misaligned factor
    got = _low(c, sched, 0.5, x)
    assert _rel(got["velocity"], want["velocity"]) > 1e-3
    assert _rel(got["score"], want["score"]) > 1e-3


def test_lowdim_kernel_is_taken_for_shared_t_only(kernel_calls):
    """exact.* with one t at d <= 8 for velocity, log p and score goes through ``_lowdim``, for
    a prepared coupling too; the divergence, responsibilities, one t per point (time-free
    factors or not) and d = 9 do not."""
    calls = kernel_calls
    sched = schedules.linear()
    c = random_joint_mixture(jax.random.key(0), 4, 2)
    x = jnp.ones((5, 2))
    exact.velocity(c, sched, 0.5, x)
    exact.evaluate(c, sched, 0.5, x, _LOW)
    ind = exact.prepare(
        fmjax.independent_coupling(fmjax.standard_normal(2), fmjax.standard_normal(2))
    )
    exact.velocity(ind, sched, 0.5, x)  # prepared (time-free factors), one t: here too
    assert calls == ["lowd"] * 3
    exact.evaluate(c, sched, 0.5, x, _ALL)
    exact.responsibilities(c, sched, 0.5, x)
    exact.velocity(c, sched, jnp.full((5,), 0.5), x)
    exact.velocity(ind, sched, jnp.full((5,), 0.5), x)  # one t per point: the pencil kernel
    c9 = random_joint_mixture(jax.random.key(0), 4, 9)
    exact.velocity(c9, sched, 0.5, jnp.ones((5, 9)))
    assert calls.count("lowd") == 3


def test_lowdim_kernel_float32_far_from_the_mass():
    """float32 up to |x| = 1e4 at t in {0, 0.3, 0.5, 1} on a joint coupling: the same
    tolerances as the general kernel (``test_exact_float32.TOL``); its affine forms are centred
    at the mean of p_t."""
    c = random_joint_mixture(jax.random.key(6), 8, 3, mean_scale=2.0)
    x = _far_points()
    for sched in (schedules.linear(), schedules.trig(schedules.brownian())):
        for t in (0.0, 0.3, 0.5, 1.0):
            w = reference(c.weights, c.means, c.covs, sched, t, x)
            got = exact.evaluate(c, sched, t, x, _LOW)
            assert got.velocity.dtype == jnp.float32
            errs = _errors(got, w[:3], _LOW)
            for q in _LOW:
                assert errs[q] < TOL[q], (t, q, errs)


def test_lowdim_kernel_chunks_and_blocks(x64, monkeypatch, fresh_kernels):
    """Blocks of 2 components and chunks of 8 points (the last padded): the same answer as one
    block and one chunk to 1e-12; control: both really split, and a misplaced chunk (the rows
    rolled by 8) is caught."""
    c = random_joint_mixture(jax.random.key(2), 7, 3, mean_scale=2.0)
    sched = schedules.cosine()
    x = _points(c, sched, 0.4, 46)  # 50 points: 7 chunks of 8, the last with 6 padded rows
    whole = _low(c, sched, 0.4, x)
    monkeypatch.setattr(_lowdim, "BLOCK", 2)
    monkeypatch.setattr(_stream, "CACHE_ELEMS", 8 * 3 * 2)
    monkeypatch.setattr(_stream, "MIN_CHUNK", 1)
    jax.clear_caches()
    assert _stream.sizes(50, 7, 3, arrays=0, chunked=True, block=2, cached=_lowdim.CACHED) == (2, 7)
    split = _low(c, sched, 0.4, x, chunked=True)
    for q in _LOW:
        np.testing.assert_allclose(split[q], whole[q], rtol=1e-12, atol=1e-12)
    assert _rel(jnp.roll(split["velocity"], 8, axis=0), whole["velocity"]) > 1e-2


def _chunk_budget(monkeypatch, n_per_chunk, k, d, min_chunk=1):
    """Force the CPU's chunking at d > 8: chunks of about n_per_chunk points and blocks of at
    most k components (for min_chunk = n_per_chunk; with min_chunk = 1 blocks of up to
    n_per_chunk k)."""
    monkeypatch.setattr(_plan, "backend", lambda: "cpu")
    monkeypatch.setattr(_stream, "MIN_CHUNK", min_chunk)
    monkeypatch.setattr(_stream, "CACHE_ELEMS", 2 * n_per_chunk * k * d)  # 2 cached terms
    jax.clear_caches()


def test_general_kernels_in_chunks_match_one_piece(x64, monkeypatch, fresh_kernels):
    """d = 10 (above _plan.LOW_D): the per-time kernel (joint coupling, one t), the time-free
    kernel (prepared independent coupling, one t and one t per point, with latent noise) and the
    deterministic-map kernel, every quantity, in chunks of ~10 points against one piece: 1e-12.
    Control: ``_stream.sizes`` really splits, and the one-piece answers match the reference."""
    d, k, n = 10, 4, 37
    sched = schedules.trig(schedules.brownian(0.5))
    joint = random_joint_mixture(jax.random.key(0), k, d, mean_scale=2.0)
    ind = fmjax.independent_coupling(
        fmjax.standard_normal(d), fmjax.random_gaussian_mixture(jax.random.key(1), k, d)
    )
    det, _ = _map_coupling(k=k, d=d, seed=2)
    x = 1.5 * jax.random.normal(jax.random.key(3), (n, d))
    ts = jax.random.uniform(jax.random.key(4), (n,), minval=0.05, maxval=0.95)
    cases = [
        ("joint", joint, sched, 0.4),
        ("prepared", exact.prepare(ind), sched, 0.4),
        ("prepared, t per point", exact.prepare(ind), sched, ts),
        ("map", exact.prepare(det), schedules.cosine(), 0.4),
        ("map, t per point", exact.prepare(det), schedules.cosine(), ts),
    ]
    monkeypatch.setattr(_plan, "backend", lambda: "gpu")
    assert _stream.sizes(n, k, d, arrays=3, chunked=False)[1] == 1
    whole = [exact.evaluate(c, s, t, x, _ALL) for _, c, s, t in cases]
    ref = reference(joint.weights, joint.means, joint.covs, sched, 0.4, x, divergence=True)
    np.testing.assert_allclose(whole[0].velocity, ref[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(whole[0].divergence, ref[4], rtol=1e-10, atol=1e-10)
    _chunk_budget(monkeypatch, 8, k, d)
    assert _stream.sizes(n, k, d, arrays=3, chunked=True) == (k, 4)  # 10 points, the last 7
    for (name, c, s, t), w in zip(cases, whole, strict=True):
        got = exact.evaluate(c, s, t, x, _ALL)
        for q in _ALL:
            np.testing.assert_allclose(
                getattr(got, q), getattr(w, q), rtol=1e-12, atol=1e-12, err_msg=f"{name} {q}"
            )
    rolled = jnp.roll(got.velocity, 10, axis=0)
    assert _rel(rolled, whole[-1].velocity) > 1e-2


def test_chunked_kernel_memory_does_not_grow_with_components(monkeypatch, fresh_kernels):
    """With chunks of 16 points and blocks of 4 components forced, the compiled temporaries are
    the same for K = 4 and K = 64 (blocks streamed, chunks folded in place). Control: with
    blocks as large as K (min_chunk = 1) they grow with K."""
    d, n = 12, 64
    sched = schedules.linear()
    field = jax.jit(lambda c, t, x: exact.velocity(c, sched, t, x))
    x = jnp.ones((n, d))

    def temps(min_chunk):
        _chunk_budget(monkeypatch, 16, 4, d, min_chunk)
        out = {}
        for k in (4, 64):
            c = random_joint_mixture(jax.random.key(k), k, d)
            assert _stream.sizes(n, k, d, arrays=3, chunked=True)[1] > 1
            out[k] = field.lower(c, 0.5, x).compile().memory_analysis().temp_size_in_bytes
        return out

    flat = temps(16)
    assert flat[64] < 1.5 * flat[4], flat
    grown = temps(1)
    assert grown[64] > 4 * grown[4], grown


def _independent(d, k0=3, k1=6, normal_source=True):
    """N(0, I) x k1 components (K = k1), or a k0-component source (K = k0 k1)."""
    if normal_source:
        p0 = fmjax.standard_normal(d)
    else:
        p0 = fmjax.random_gaussian_mixture(jax.random.key(10 + d), k0, d, mean_scale=2.0)
    p1 = fmjax.random_gaussian_mixture(jax.random.key(20 + d), k1, d, mean_scale=2.0)
    return fmjax.independent_coupling(p0, p1)


def _times(n):
    """One t per point, the ends and 1e-3 included."""
    ts = jax.random.uniform(jax.random.key(7), (n,))
    return ts.at[:3].set(jnp.array([0.0, 1e-3, 1.0]))


@pytest.mark.parametrize(
    "d, sources, names",
    [
        (1, (True,), ("trig+noise",)),
        (3, (True, False), ("linear", "vp", "trig+noise")),
        (8, (False,), ("linear",)),
    ],
    ids=["d1", "d3", "d8"],
)
def test_lowdim_time_free_kernel_matches_the_pencil_kernel(x64, d, sources, names):
    """One t per point on a prepared independent coupling: the low-d layout of the time-free
    kernel equals the ``pencil`` row's to 1e-10 on velocity, log p and score, with and
    without latent noise (standard normal source: noise diagonal), K = 6 and K = 3 x 6 = 18 (two
    blocks of 9) with a mixture source; every combination at d = 3."""
    for normal_source in sources:
        c = _independent(d, normal_source=normal_source)
        prepared = exact.prepare(c)
        f = prepared.factors
        for name in names:
            sched = _SCHEDULES[name]
            if sched.has_noise and not prepared.noise_diagonal:
                continue
            x = _points(c, sched, 0.5, 36)
            ts = jnp.clip(_times(x.shape[0]), sched.t_min, sched.t_max)
            got = _kernel("lowd_pencil", None, sched, ts, x, f=f)
            want = _pencil_free(f, sched, ts, x)
            for q in _LOW:
                assert _rel(got[q], want[q]) < 1e-10, (normal_source, name, q)
            ref = reference(c.weights, c.means, c.covs, sched, float(ts[5]), x[5:6])
            np.testing.assert_allclose(got["velocity"][5], ref[0][0], rtol=1e-10, atol=1e-10)


def _pencil_free(f, sched, ts, x, want=_LOW):
    return _kernel("pencil", None, sched, ts, x, want, f=f)


def test_lowdim_time_free_kernel_is_taken_and_chunks(x64, monkeypatch, fresh_kernels, kernel_calls):
    """exact.* with one t per point on a prepared independent coupling at d <= 8 takes it (not
    for the divergence); chunks of 8 points give the same answer to 1e-12. Controls: the kernel
    is called, the chunks really split, and the wrong times (reversed) are caught."""
    c = _independent(2)
    prepared = exact.prepare(c)
    sched = schedules.linear()
    x = _points(c, sched, 0.5, 46)
    ts = _times(x.shape[0])
    calls = kernel_calls
    monkeypatch.setattr(_plan, "backend", lambda: "gpu")
    whole = exact.evaluate(prepared, sched, ts, x, _LOW)
    assert calls == ["lowd_pencil"]
    full = exact.evaluate(prepared, sched, ts, x, _ALL)  # the divergence: the pencil kernel
    assert calls == ["lowd_pencil", "pencil"]
    for q in _LOW:
        assert _rel(getattr(whole, q), getattr(full, q)) < 1e-10
    assert _rel(exact.velocity(prepared, sched, ts[::-1], x), whole.velocity) > 1e-2
    monkeypatch.setattr(_plan, "backend", lambda: "cpu")
    monkeypatch.setattr(_stream, "CACHE_ELEMS", 8 * 2 * 6)
    monkeypatch.setattr(_stream, "MIN_CHUNK", 1)
    jax.clear_caches()
    sizes = _stream.sizes(50, 6, 2, arrays=0, chunked=True, block=_lowdim.BLOCK, cached=1)
    assert sizes == (6, 7)
    split = exact.evaluate(prepared, sched, ts, x, _LOW)
    for q in _LOW:
        np.testing.assert_allclose(getattr(split, q), getattr(whole, q), rtol=1e-12, atol=1e-12)


def test_lowdim_time_free_kernel_float32_far_from_the_mass():
    """float32 up to |x| = 1e4, one t per point (0.3 and 0.5, as for the pencil kernel in
    ``test_exact_float32``), prepared independent coupling: the same tolerances."""
    c = fmjax.independent_coupling(
        fmjax.random_gaussian_mixture(jax.random.key(1), 3, 3),
        fmjax.random_gaussian_mixture(jax.random.key(2), 3, 3),
    )
    prepared = exact.prepare(c)
    x = _far_points()
    for sched in (schedules.linear(), schedules.trig(schedules.brownian())):
        for t in (0.3, 0.5):
            w = reference(c.weights, c.means, c.covs, sched, t, x)
            got = exact.evaluate(prepared, sched, jnp.full((x.shape[0],), t, jnp.float32), x, _LOW)
            errs = _errors(got, w[:3], _LOW)
            for q in _LOW:
                assert errs[q] < TOL[q], (t, q, errs)


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("d", [2, 16])
@pytest.mark.parametrize("structure", ["independent", "map", "general"])
def test_structure_picks_one_kernel_however_the_coupling_is_passed(d, structure, kernel_calls):
    """Issue 22: the structure is static pytree metadata, so an eager call, jit with the coupling
    closed over and jit with it as an argument take the same kernel (one t per point). It once
    took the per-point Cholesky path as a jit argument (46-53x slower). Control: the same
    numbers declared "general" take another kernel than "independent" / "map"."""
    p = fmjax.random_gaussian_mixture(jax.random.key(2), 3, d, mean_scale=2.0)
    if structure == "map":
        c = fmjax.couplings.mixture_ot(fmjax.standard_normal(d), p).coupling
    else:
        c = fmjax.independent_coupling(fmjax.standard_normal(d), p)
        if structure == "general":
            c = fmjax.JointGaussianMixture._from_leaves(c.weights, c.means, c.covs)
    assert c.structure == structure
    sched = schedules.cosine()
    t = jnp.linspace(0.1, 0.9, 24)
    x = jax.random.normal(jax.random.key(3), (24, d))
    calls = kernel_calls
    kernels = []
    for run in (
        lambda: exact.velocity(c, sched, t, x),
        lambda: jax.jit(lambda t, x: exact.velocity(c, sched, t, x))(t, x),
        lambda: jax.jit(lambda c, t, x: exact.velocity(c, sched, t, x))(c, t, x),
    ):
        calls.clear()
        jax.eval_shape(run)
        kernels.append(tuple(calls))
    assert len(set(kernels)) == 1, kernels
    time_free = {"pencil", "otmap", "lowd_pencil"}
    assert bool(time_free & set(kernels[0])) == (structure != "general"), kernels[0]
    # the mark survives flatten / unflatten and stacking (fit_many's batch of mixtures)
    leaves, treedef = jax.tree.flatten(c)
    assert jax.tree.unflatten(treedef, leaves).structure == structure
    assert jax.tree.map(lambda *a: jnp.stack(a), c, c).structure == structure
