"""The exact engine against an independent reference, identities, and Monte Carlo."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import exact, schedules
from fmjax.exact import _cholesky, _prepared, _stream
from fmjax.mixtures import random_joint_mixture
from tests.reference import reference

SCHEDULES = {
    "linear": schedules.linear(),
    "cosine": schedules.cosine(),
    "polynomial3": schedules.polynomial(3.0),
    "vp": schedules.vp(),
    "custom": schedules.custom(lambda t: t**2 * (3 - 2 * t), lambda t: 1 - t**2 * (3 - 2 * t)),
}


def _points(c, sched, t, key, n=40):
    """Points where p_t has mass (so responsibilities are mixed) plus a few far away."""
    near = exact.marginal(c, sched, t).sample(key, n)
    far = 6.0 * jax.random.normal(jax.random.fold_in(key, 1), (4, c.dim), near.dtype)
    return jnp.concatenate([near, far])


@pytest.fixture
def fresh_kernels():
    """Clear the compiled kernels after a test that changed the block budget."""
    yield
    jax.clear_caches()


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


@pytest.mark.parametrize("dim,k", [(1, 1), (2, 3), (3, 5)])
@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.5, 1.0])
def test_matches_numpy_reference(x64, dim, k, name, t):
    sched = SCHEDULES[name]
    c = random_joint_mixture(jax.random.key(dim * 10 + k), k, dim, mean_scale=2.0)
    if not sched.contains(t):  # vp is singular at t = 1: refused, not NaN
        with pytest.raises(ValueError, match="valid interval of vp"):
            exact.evaluate(c, sched, t, jnp.zeros((2, dim)))
        return
    x = _points(c, sched, t, jax.random.key(7))
    got = exact.evaluate(c, sched, t, x, ("velocity", "log_prob", "score"))
    resp = exact.responsibilities(c, sched, t, x)
    want_v, want_lp, want_s, want_r = reference(c.weights, c.means, c.covs, sched, t, x)
    # float64 round-off through a d x d solve of a matrix with condition number < ~1e3: 1e-10.
    assert got.divergence is None  # not requested
    assert _rel(got.velocity, want_v) < 1e-10
    assert _rel(got.score, want_s) < 1e-10
    np.testing.assert_allclose(got.log_prob, want_lp, rtol=1e-10)
    np.testing.assert_allclose(resp, want_r, rtol=1e-10, atol=1e-14)
    chex.assert_shape(resp, (x.shape[0], k))
    np.testing.assert_allclose(resp.sum(-1), 1.0, rtol=1e-12)


def test_streaming_blocks_match_single_block(x64, monkeypatch, fresh_kernels):
    """Force one component per scan step: the online log-sum-exp must give the same answer."""
    c = random_joint_mixture(jax.random.key(3), 6, 2)
    sched = schedules.linear()
    x = _points(c, sched, 0.4, jax.random.key(1))
    qs = ("velocity", "log_prob", "score", "divergence")
    whole = exact.evaluate(c, sched, 0.4, x, qs)
    monkeypatch.setattr(_stream, "BLOCK_BUDGET", 1)
    jax.clear_caches()  # the compiled kernels baked the old budget in
    assert _stream.block_size(x.shape[0], 6, 2) == 1
    streamed = exact.evaluate(c, sched, 0.4, x, qs)
    for q in qs:
        np.testing.assert_allclose(getattr(streamed, q), getattr(whole, q), rtol=1e-12, atol=1e-12)


def test_prime_component_count_is_padded_not_split_into_blocks_of_one(
    x64, monkeypatch, fresh_kernels
):
    """K = 7 with room for 3 components per step: 3 padded blocks of 3, not 7 blocks of 1, and
    the zero-weight padding changes nothing (checked against one unpadded block)."""
    c = random_joint_mixture(jax.random.key(4), 7, 2)
    sched = schedules.cosine()
    x = _points(c, sched, 0.6, jax.random.key(1))
    qs = ("velocity", "log_prob", "score", "divergence")
    whole = exact.evaluate(c, sched, 0.6, x, qs)
    n, d = x.shape
    monkeypatch.setattr(_stream, "BLOCK_BUDGET", 3 * (3 * n * d + 32 * d * d))
    jax.clear_caches()  # the compiled kernels baked the old budget in
    assert _stream.block_size(n, 7, d) == 3  # ceil(7 / 3) = 3 steps of 3, the last padded
    assert _stream.block_size(n, 6, d) == 3
    padded = exact.evaluate(c, sched, 0.6, x, qs)
    for q in qs:
        np.testing.assert_allclose(getattr(padded, q), getattr(whole, q), rtol=1e-12, atol=1e-12)
    # Control: padding with a non-zero weight would change the answer.
    blocks = _stream.to_blocks(_cholesky.comps(c), 3)  # (3, 3, ...): component 0 copied twice
    padded = jax.tree.map(lambda a: a.reshape((9,) + a.shape[2:]), blocks)
    assert np.all(np.isneginf(padded.log_w[7:])) and np.all(padded.covs[7:] == c.covs[:1])
    w = jnp.exp(padded.log_w).at[7].set(0.5) / 1.5
    bad = type(c)._from_leaves(w, padded.means, padded.covs)
    assert _rel(exact.velocity(bad, sched, 0.6, x), whole.velocity) > 1e-3


def test_block_count_of_prime_k():
    """K = 257 under a budget of 64 components per step takes 5 scan steps, like K = 256 + 1."""
    limit_n = 1000
    d = 2
    budget = 64 * (3 * limit_n * d + 32 * d * d)
    import math as _m

    def steps(k):
        b = min(k, max(1, budget // (3 * limit_n * d + 32 * d * d)))
        return _m.ceil(k / b)

    exact_budget = _stream.BLOCK_BUDGET
    try:
        _stream.BLOCK_BUDGET = budget
        for k in (256, 257):
            bsz = _stream.block_size(limit_n, k, d)
            assert bsz <= 64
            assert -(-k // bsz) == steps(k)
        assert -(-257 // _stream.block_size(limit_n, 257, d)) == 5
    finally:
        _stream.BLOCK_BUDGET = exact_budget


def test_many_point_and_per_point_kernels_agree(x64):
    """Scalar t on many points takes the large-product kernel; one t per point the per-point one.

    The two are different algebra (x @ [W; M W] vs W (x - mu) then M z): float64 round-off
    through d x d triangular factors of condition < ~1e3 keeps them within 1e-10.
    """
    c = random_joint_mixture(jax.random.key(5), 6, 4, mean_scale=2.0)
    sched = schedules.cosine()
    x = _points(c, sched, 0.3, jax.random.key(2))
    qs = ("velocity", "log_prob", "score", "divergence")
    many = exact.evaluate(c, sched, 0.3, x, qs)
    per_point = exact.evaluate(c, sched, jnp.full(x.shape[:1], 0.3), x, qs)
    for q in qs:
        assert _rel(getattr(many, q), getattr(per_point, q)) < 1e-10, q


@pytest.mark.parametrize(
    "quantities", [("velocity",), ("velocity", "log_prob", "score", "divergence")]
)
def test_memory_does_not_grow_with_components(quantities):
    """Streaming keeps compiled temporaries O(N d + B d^2): 8x more components, same temp bytes."""
    sched = schedules.linear()
    n, d = 20_000, 8
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    temp = {}
    for k in (64, 512):
        c = random_joint_mixture(jax.random.key(0), k, d)
        f = jax.jit(lambda c, x: exact.evaluate(c, sched, 0.5, x, quantities))
        analysis = f.lower(c, x).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        temp[k] = analysis.temp_size_in_bytes
    naive = 4 * n * 512 * d  # one (N, K, d) float32 intermediate
    assert temp[512] <= 1.1 * temp[64], temp
    assert temp[512] < naive / 4, (temp, naive)


@pytest.mark.parametrize("name", ["linear", "cosine", "vp"])
def test_continuity_equation(x64, name):
    """d/dt log p_t + div u_t + u_t . grad log p_t = 0, all terms by autodiff of the engine."""
    sched = SCHEDULES[name]
    c = random_joint_mixture(jax.random.key(11), 4, 3, mean_scale=2.0)
    t = 0.37
    x = _points(c, sched, t, jax.random.key(2), n=20)
    dlogp_dt = jax.vmap(jax.grad(lambda t, x: exact.log_prob(c, sched, t, x)), (None, 0))(t, x)
    u = exact.velocity(c, sched, t, x)
    grad_logp = jax.vmap(jax.grad(lambda x: exact.log_prob(c, sched, t, x)))(x)
    jac = jax.vmap(jax.jacfwd(lambda x: exact.velocity(c, sched, t, x)))(x)
    div_ad = jnp.trace(jac, axis1=-2, axis2=-1)
    residual = dlogp_dt + div_ad + jnp.sum(u * grad_logp, -1)
    scale = jnp.abs(dlogp_dt) + jnp.abs(div_ad) + jnp.abs(jnp.sum(u * grad_logp, -1))
    assert jnp.max(jnp.abs(residual) / scale) < 1e-9  # pure round-off in float64
    # The closed-form divergence and score agree with autodiff.
    np.testing.assert_allclose(exact.divergence(c, sched, t, x), div_ad, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(exact.score(c, sched, t, x), grad_logp, rtol=1e-9, atol=1e-9)


def test_monte_carlo_conditional_expectation(x64):
    """E[(dX_t - u_t(X_t)) h(X_t)] = 0 for test functions h: u_t is the conditional mean."""
    sched = schedules.cosine()
    c = random_joint_mixture(jax.random.key(5), 1, 2, mean_scale=1.0)  # a single Gaussian
    n, t = 200_000, 0.6
    x0, x1 = c.sample(jax.random.key(0), n)
    a, b, da, db = sched(t)
    xt, dxt = b * x0 + a * x1, db * x0 + da * x1
    resid = dxt - exact.velocity(c, sched, t, xt)  # (n, d)
    feats = jnp.concatenate([jnp.ones((n, 1)), xt, jnp.sin(xt)], axis=1)  # h(x): (n, 5)
    prod = resid[:, :, None] * feats[:, None, :]  # (n, d, 5)
    z = prod.mean(0) / (prod.std(0) / np.sqrt(n))
    # 10 z-scores of a true zero: |z| < 5 fails with probability ~6e-6.
    assert jnp.max(jnp.abs(z)) < 5.0
    # A wrong velocity (the same field at another time) is detected by the same statistic.
    wrong = dxt - exact.velocity(c, sched, 0.5, xt)
    prod_w = wrong[:, :, None] * feats[:, None, :]
    assert jnp.max(jnp.abs(prod_w.mean(0) / (prod_w.std(0) / np.sqrt(n)))) > 10.0


def test_monte_carlo_mixture(x64):
    """Same orthogonality for a 3 x 2 independent GMM coupling (responsibilities matter)."""
    sched = schedules.linear()
    key = jax.random.key(9)
    p0 = fmjax.random_gaussian_mixture(key, 3, 2, mean_scale=2.0)
    p1 = fmjax.random_gaussian_mixture(jax.random.fold_in(key, 1), 2, 2, mean_scale=2.0)
    c = fmjax.independent_coupling(p0, p1)
    n, t = 200_000, 0.5
    x0, x1 = c.sample(jax.random.key(1), n)
    xt, dxt = 0.5 * x0 + 0.5 * x1, x1 - x0
    resid = dxt - exact.velocity(c, sched, t, xt)
    feats = jnp.concatenate([jnp.ones((n, 1)), xt, jnp.tanh(xt)], axis=1)
    prod = resid[:, :, None] * feats[:, None, :]
    z = prod.mean(0) / (prod.std(0) / np.sqrt(n))
    assert jnp.max(jnp.abs(z)) < 5.0


def test_single_gaussian_closed_form(x64):
    """N(0, I) -> N(m, s^2 I), linear path.

    u_t(x) = m + (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2) (x - t m).
    """
    d, s2 = 3, 0.3
    m = jnp.array([1.0, -2.0, 0.5])
    p0 = fmjax.GaussianMixture(jnp.ones(1), jnp.zeros((1, d)), jnp.eye(d)[None])
    p1 = fmjax.GaussianMixture(jnp.ones(1), m[None], s2 * jnp.eye(d)[None])
    c = fmjax.independent_coupling(p0, p1)
    x = jax.random.normal(jax.random.key(0), (7, d))
    for t in (0.0, 0.25, 0.8, 1.0):
        coef = (t * s2 - (1 - t)) / ((1 - t) ** 2 + t**2 * s2)
        want = m[None] + coef * (x - t * m[None])
        np.testing.assert_allclose(exact.velocity(c, schedules.linear(), t, x), want, rtol=1e-12)


def test_endpoint_marginals(x64):
    """p_0 is the source and p_1 the target: log p_t matches their own log-densities."""
    key = jax.random.key(4)
    p0 = fmjax.random_gaussian_mixture(key, 2, 3)
    p1 = fmjax.random_gaussian_mixture(jax.random.fold_in(key, 1), 4, 3)
    c = fmjax.independent_coupling(p0, p1)
    x = jax.random.normal(key, (10, 3)) * 3
    for sched in (schedules.linear(), schedules.cosine()):
        np.testing.assert_allclose(exact.log_prob(c, sched, 0.0, x), p0.log_prob(x), rtol=1e-12)
        np.testing.assert_allclose(exact.log_prob(c, sched, 1.0, x), p1.log_prob(x), rtol=1e-12)
        for t in (0.0, 1.0):
            assert jnp.all(jnp.isfinite(exact.velocity(c, sched, t, x)))


def test_independent_coupling_is_explicit_product(x64):
    key = jax.random.key(2)
    p0 = fmjax.random_gaussian_mixture(key, 2, 2)
    p1 = fmjax.random_gaussian_mixture(jax.random.fold_in(key, 1), 3, 2)
    c = fmjax.independent_coupling(p0, p1)
    w, m, s = [], [], []
    for i in range(2):
        for j in range(3):
            w.append(p0.weights[i] * p1.weights[j])
            m.append(np.concatenate([p0.means[i], p1.means[j]]))
            blk = np.zeros((4, 4))
            blk[:2, :2], blk[2:, 2:] = p0.covs[i], p1.covs[j]
            s.append(blk)
    explicit = fmjax.JointGaussianMixture(np.array(w), np.array(m), np.array(s))
    for got, want in zip(jax.tree.leaves(c), jax.tree.leaves(explicit), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-15)
    x0, x1 = jax.random.normal(key, (2, 5, 2))
    np.testing.assert_allclose(c.log_prob(x0, x1), p0.log_prob(x0) + p1.log_prob(x1), rtol=1e-12)


def test_gradients_wrt_mixture_parameters(x64):
    """jvp through the engine equals central finite differences along a random direction."""
    c = random_joint_mixture(jax.random.key(8), 3, 2)
    sched = schedules.cosine()
    x = _points(c, sched, 0.3, jax.random.key(0), n=8)

    def f(c):
        q = exact.evaluate(c, sched, 0.3, x, ("velocity", "log_prob"))
        return jnp.sum(q.log_prob) + jnp.sum(jnp.sin(q.velocity))

    grads = jax.grad(f)(c)
    assert all(jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads))
    kw, km, kc = jax.random.split(jax.random.key(1), 3)
    dw = jax.random.normal(kw, c.weights.shape)
    dw = dw - dw.mean()  # stay on the simplex
    dc = jax.random.normal(kc, c.covs.shape)
    dc = dc + jnp.swapaxes(dc, -1, -2)  # stay symmetric
    tangent = type(c)._from_leaves(dw, jax.random.normal(km, c.means.shape), dc)
    h = 1e-5
    plus = jax.tree.map(lambda p, v: p + h * v, c, tangent)
    minus = jax.tree.map(lambda p, v: p - h * v, c, tangent)
    fd = (f(plus) - f(minus)) / (2 * h)
    _, jvp = jax.jvp(f, (c,), (tangent,))
    # Central differences: O(h^2) ~ 1e-10 truncation, round-off ~ eps/h ~ 1e-11, times |f| ~ 1e2.
    np.testing.assert_allclose(jvp, fd, rtol=1e-7)
    gdot = sum(
        jnp.vdot(g, v)
        for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(tangent), strict=True)
    )
    np.testing.assert_allclose(gdot, jvp, rtol=1e-10)


def test_float32_close_to_float64():
    """float32 with highest matmul precision stays within 1e-4 relative of float64."""
    c32 = random_joint_mixture(jax.random.key(6), 8, 4, mean_scale=2.0)
    sched = schedules.linear()
    x32 = _points(c32, sched, 0.5, jax.random.key(3), n=200)
    v32 = exact.velocity(c32, sched, 0.5, x32)
    lp32 = exact.log_prob(c32, sched, 0.5, x32)
    assert v32.dtype == jnp.float32
    want_v, want_lp, _, _ = reference(c32.weights, c32.means, c32.covs, sched, 0.5, x32)
    # eps32 = 1.2e-7 times condition numbers up to ~1e2 and responsibility sensitivity: 1e-4.
    assert _rel(v32, want_v) < 1e-4
    np.testing.assert_allclose(lp32, want_lp, rtol=1e-4, atol=1e-4)


def test_float64_dtype_survives(x64):
    c = random_joint_mixture(jax.random.key(6), 2, 2)
    x = jnp.zeros((3, 2))
    got = exact.evaluate(c, schedules.linear(), 0.5, x, ("velocity", "log_prob"))
    for q in (got.velocity, got.log_prob):
        assert q.dtype == jnp.float64


def test_time_broadcasting_and_per_point_times(x64):
    c = random_joint_mixture(jax.random.key(1), 3, 2)
    sched = schedules.cosine()
    x = jax.random.normal(jax.random.key(2), (4, 5, 2))
    ts = jnp.linspace(0.0, 1.0, 4)[:, None]  # (4, 1) against batch (4, 5)
    got = exact.velocity(c, sched, ts, x)
    chex.assert_shape(got, (4, 5, 2))
    for i in range(4):
        np.testing.assert_allclose(got[i], exact.velocity(c, sched, ts[i, 0], x[i]), rtol=1e-12)
    chex.assert_shape(exact.log_prob(c, sched, 0.5, x[0, 0]), ())
    chex.assert_shape(exact.responsibilities(c, sched, ts, x), (4, 5, 3))


def test_jit_traced_time_no_recompile(x64):
    c = random_joint_mixture(jax.random.key(1), 3, 2)
    sched = schedules.linear()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def field(c, t, x):
        return exact.velocity(c, sched, t, x)

    x = jax.random.normal(jax.random.key(0), (16, 2))
    for t in (0.1, 0.5, 0.9):
        got = field(c, jnp.asarray(t), x)
        np.testing.assert_allclose(got, exact.velocity(c, sched, t, x), rtol=1e-12)
    # A rebuilt schedule with equal parameters is the same static value: still no retrace.
    field2 = jax.jit(functools.partial(exact.velocity, c))
    field2(schedules.polynomial(2), 0.3, x)
    field2(schedules.polynomial(2), 0.3, x)
    assert field2._cache_size() == 1


@pytest.mark.parametrize(
    "t,x,match",
    [
        (1.5, np.zeros((3, 2)), "exact.velocity: `t` must be in \\[0, 1\\]"),
        (-0.1, np.zeros((3, 2)), "`t` must be in"),
        (np.nan, np.zeros((3, 2)), "`t` must be in"),
        (0.5, np.zeros((3, 3)), "`x` must be of shape"),
        (np.full((4,), 0.5), np.zeros((3, 2)), "`t` must be broadcastable"),
    ],
)
def test_bad_arguments(t, x, match):
    c = random_joint_mixture(jax.random.key(1), 2, 2)
    with pytest.raises(ValueError, match=match):
        exact.velocity(c, schedules.linear(), t, x)


def test_bad_coupling_type():
    p = fmjax.random_gaussian_mixture(jax.random.key(0), 2, 2)
    with pytest.raises(TypeError, match="exact.velocity: `coupling` must be a JointGaussianMix"):
        exact.velocity(p, schedules.linear(), 0.5, jnp.zeros((1, 2)))
    c = random_joint_mixture(jax.random.key(1), 2, 2)
    with pytest.raises(TypeError, match="`schedule` must be an fmjax Schedule"):
        exact.velocity(c, "linear", 0.5, jnp.zeros((1, 2)))
    with pytest.raises(TypeError, match="`quantities` must be a tuple"):
        exact.evaluate(c, schedules.linear(), 0.5, jnp.zeros((1, 2)), "velocity")
    with pytest.raises(ValueError, match="`quantities` must be a non-empty subset"):
        exact.evaluate(c, schedules.linear(), 0.5, jnp.zeros((1, 2)), ("speed",))


def test_vp_refuses_times_past_its_interval():
    """vp's velocity is infinite at t = 1: a clear error, not NaNs; traced times are not checked."""
    c = random_joint_mixture(jax.random.key(1), 2, 2)
    sched = schedules.vp()
    x = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match=r"exact.velocity: `t` must be in \[0, 0.999\]"):
        exact.velocity(c, sched, 1.0, x)
    assert np.all(np.isfinite(exact.velocity(c, sched, sched.t_max, x)))
    assert np.all(np.isfinite(exact.velocity(c, sched, jnp.float32(sched.t_max), x)))


def test_velocity_field_is_a_pytree_field_that_knows_its_schedule(x64):
    sched = schedules.cosine()
    c1, c2 = (random_joint_mixture(jax.random.key(s), 3, 2) for s in (1, 2))
    x = jax.random.normal(jax.random.key(0), (8, 2))
    field = exact.velocity_field(c1, sched)
    assert field.schedule == sched
    np.testing.assert_allclose(field(0.4, x), exact.velocity(c1, sched, 0.4, x), rtol=1e-12)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(f, t, x):
        return f(t, x)

    for c in (c1, c2):  # a new coupling of the same shapes: no retrace
        np.testing.assert_allclose(
            apply(exact.velocity_field(c, sched), 0.4, x),
            exact.velocity(c, sched, 0.4, x),
            rtol=1e-12,
        )
    with pytest.raises(TypeError, match="exact.velocity_field: `schedule`"):
        exact.velocity_field(c1, None)


def _independent(key, k, d, dtype=None):
    """A random joint mixture with its cross-covariances S01 = S10 set to zero."""
    kw = {} if dtype is None else {"dtype": dtype}
    c = random_joint_mixture(key, k, d, mean_scale=2.0, **kw)
    m0, m1, s00, s01, s10, s11 = c.blocks()
    z = jnp.zeros_like(s01)
    covs = jnp.concatenate([jnp.concatenate([s00, z], -1), jnp.concatenate([z, s11], -1)], -2)
    return fmjax.JointGaussianMixture(c.weights, c.means, covs, structure="independent")


_QS = ("velocity", "log_prob", "score", "divergence")
TIME_FREE_SCHEDULES = ["linear", "cosine", "vp", "polynomial3"]


@pytest.mark.parametrize("name", TIME_FREE_SCHEDULES)
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.5, "t_max"])
def test_time_free_path_matches_per_time_path(x64, name, t):
    """prepare(c) of an independent coupling (generalised eigenvectors, no factor per time)
    against the per-time Cholesky path: two different algebras, float64 round-off through d x d
    factors of condition < ~1e3: 1e-10 on every quantity."""
    sched = SCHEDULES[name]
    t = sched.t_max if t == "t_max" else t
    c = _independent(jax.random.key(12), 5, 3)
    prepared = exact.prepare(c)
    assert prepared.independent and prepared.factors is not None
    x = _points(c, sched, t, jax.random.key(3))
    got = exact.evaluate(prepared, sched, t, x, _QS)
    want = exact.evaluate(c, sched, t, x, _QS)  # one shared t on a raw coupling: per-time path
    for q in _QS:
        assert _rel(getattr(got, q), getattr(want, q)) < 1e-10, q
    np.testing.assert_allclose(
        exact.responsibilities(prepared, sched, t, x),
        exact.responsibilities(c, sched, t, x),
        rtol=1e-10,
        atol=1e-14,
    )


@pytest.mark.parametrize("name", TIME_FREE_SCHEDULES)
def test_time_free_path_with_one_time_per_point(x64, name, kernel_calls):
    """One t per point: a concrete independent coupling takes the time-free path by itself, and
    agrees with the vmapped per-point Cholesky path (``prepare(c, independent=False)``)."""
    sched = SCHEDULES[name]
    c = _independent(jax.random.key(13), 6, 4)
    n = 48
    ts = jnp.concatenate(
        [jnp.array([0.0, 1e-3, 0.5, sched.t_max]), jax.random.uniform(jax.random.key(1), (n - 4,))]
    ) * (sched.t_max / 1.0)
    x = 3.0 * jax.random.normal(jax.random.key(2), (n, 4))
    calls = kernel_calls
    got = exact.evaluate(c, sched, ts, x, _QS)
    assert "pencil" in calls  # the time-free path was taken
    via_prepare = exact.evaluate(exact.prepare(c), sched, ts, x, _QS)
    calls.clear()
    want = exact.evaluate(exact.prepare(c, independent=False), sched, ts, x, _QS)
    assert "pencil" not in calls  # ... and not here
    for q in _QS:
        assert _rel(getattr(got, q), getattr(want, q)) < 1e-10, q
        np.testing.assert_array_equal(getattr(got, q), getattr(via_prepare, q))
    for i in (0, 3, 17):  # one point at a time against the shared-t path
        one = exact.evaluate(c, sched, ts[i], x[i : i + 1], _QS)
        for q in _QS:
            scale = np.max(np.abs(getattr(got, q)))  # relative to the whole batch: a
            err = np.max(np.abs(getattr(got, q)[i] - getattr(one, q)[0]))  # value may be ~0
            assert err < 1e-10 * scale, q
    np.testing.assert_allclose(
        exact.responsibilities(c, sched, ts, x),
        exact.responsibilities(exact.prepare(c, independent=False), sched, ts, x),
        rtol=1e-10,
        atol=1e-14,
    )


def test_cross_covariance_keeps_the_per_time_path(x64):
    """Control: a small cross-covariance is detected (no time-free path), and forcing the
    time-free path on it (``independent=True`` drops S01) gives a visibly wrong answer."""
    sched = schedules.linear()
    ind = _independent(jax.random.key(14), 4, 3)
    d = 3
    cross = (
        jnp.zeros_like(ind.covs)
        .at[:, :d, d:]
        .set(0.05 * jnp.eye(d))
        .at[:, d:, :d]
        .set(0.05 * jnp.eye(d))
    )
    c = fmjax.JointGaussianMixture(ind.weights, ind.means, ind.covs + cross)
    assert ind.structure == "independent" and _prepared._structure(c) == "general"
    assert not exact.prepare(c).independent and exact.prepare(c).factors is None
    ts = jax.random.uniform(jax.random.key(0), (30,))
    x = jax.random.normal(jax.random.key(1), (30, d))
    per_time = jax.vmap(lambda t, x: exact.velocity(c, sched, t, x))(ts, x)
    np.testing.assert_allclose(exact.velocity(c, sched, ts, x), per_time, rtol=1e-12)
    np.testing.assert_allclose(exact.velocity(exact.prepare(c), sched, ts, x), per_time, rtol=1e-12)
    forced = exact.velocity(exact.prepare(c, independent=True), sched, ts, x)
    assert _rel(forced, per_time) > 1e-3


def test_time_free_float32_close_to_float64():
    """float32 time-free path within the tolerance of the per-time path (1e-4 of float64)."""
    c32 = _independent(jax.random.key(6), 8, 4, dtype=jnp.float32)
    sched = schedules.linear()
    x32 = _points(c32, sched, 0.5, jax.random.key(3), n=200)
    prepared = exact.prepare(c32)
    v32 = exact.velocity(prepared, sched, 0.5, x32)
    lp32 = exact.log_prob(prepared, sched, 0.5, x32)
    assert v32.dtype == jnp.float32
    want_v, want_lp, _, _ = reference(c32.weights, c32.means, c32.covs, sched, 0.5, x32)
    assert _rel(v32, want_v) < 1e-4
    np.testing.assert_allclose(lp32, want_lp, rtol=1e-4, atol=1e-4)
    ts = jnp.full((x32.shape[0],), 0.5, jnp.float32)
    assert _rel(exact.velocity(c32, sched, ts, x32), want_v) < 1e-4


def test_prepared_coupling_through_jit_new_times_no_retrace(x64):
    c = _independent(jax.random.key(1), 3, 2)
    sched = schedules.cosine()
    prepared = exact.prepare(c)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def field(p, t, x):
        return exact.velocity(p, sched, t, x)

    x = jax.random.normal(jax.random.key(0), (16, 2))
    for seed in range(3):
        ts = jax.random.uniform(jax.random.key(seed), (16,))
        np.testing.assert_allclose(
            field(prepared, ts, x), exact.velocity(c, sched, ts, x), rtol=1e-12
        )
    # prepare under jit (independence declared: a traced coupling cannot be inspected).
    p2 = jax.jit(lambda c: exact.prepare(c, independent=True))(c)
    np.testing.assert_allclose(field(p2, ts, x), exact.velocity(c, sched, ts, x), rtol=1e-12)
    # the declared structure survives the trace; a traced undeclared one cannot be inspected
    assert jax.jit(exact.prepare)(c).independent
    general = fmjax.JointGaussianMixture(c.weights, c.means, c.covs)
    assert exact.prepare(general).independent  # concrete: prepare reads it off the numbers
    assert not jax.jit(exact.prepare)(general).independent  # traced, undeclared: per-time path
    f = exact.velocity_field(prepared, sched)
    np.testing.assert_allclose(f(0.4, x), exact.velocity(c, sched, 0.4, x), rtol=1e-12)
    chex.assert_shape(exact.marginal(prepared, sched, 0.4).means, (3, 2))
    with pytest.raises(TypeError, match="exact.prepare: `coupling` must be a JointGaussianMix"):
        exact.prepare(fmjax.random_gaussian_mixture(jax.random.key(0), 2, 2))


@pytest.mark.parametrize("quantities", [("velocity",), _QS])
def test_time_free_memory_does_not_grow_with_components(quantities):
    """The time-free path streams too: one t per point, 8x more components, same temp bytes."""
    sched = schedules.linear()
    n, d = 20_000, 8
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    ts = jax.ShapeDtypeStruct((n,), jnp.float32)
    temp = {}
    for k in (64, 512):
        prepared = exact.prepare(_independent(jax.random.key(0), k, d, dtype=jnp.float32))
        f = jax.jit(lambda p, t, x: exact.evaluate(p, sched, t, x, quantities))
        analysis = f.lower(prepared, ts, x).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        temp[k] = analysis.temp_size_in_bytes
    naive = 4 * n * 512 * d
    assert temp[512] <= 1.1 * temp[64], temp
    assert temp[512] < naive / 4, (temp, naive)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda c, s: exact.velocity(c, s, 0.5, jnp.zeros((2, 2), jnp.complex64)),
         "exact.velocity: `x` must be real"),
        (lambda c, s: exact.velocity(c, s, 0.5 + 0.1j, jnp.zeros((2, 2))),
         "exact.velocity: `t` must be real"),
        (lambda c, s: exact.velocity(c, s, 0.5, jnp.zeros((2, 2), jnp.float16)),
         "`x` must be of dtype float32 or float64"),
        (lambda c, s: exact.marginal(c, s, 0.5 + 0.1j), "exact.marginal: `t` must be real"),
    ],
)  # fmt: skip
def test_complex_and_half_precision_inputs_are_refused(make, match):
    """A cast would drop the imaginary part or the precision: TypeError naming the argument."""
    c = random_joint_mixture(jax.random.key(1), 2, 2)
    with pytest.raises(TypeError, match=match):
        make(c, schedules.linear())
    # control: integer points are cast, real ones pass
    assert exact.velocity(c, schedules.linear(), 0.5, jnp.zeros((2, 2), jnp.int32)).shape == (2, 2)
