"""Mixtures: validation, log-density against a reference, sampling moments, pytree behaviour."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax.mixtures import random_gaussian_mixture, random_joint_mixture


def _np_log_prob(w, m, s, x):
    out = []
    for xi in np.asarray(x, np.float64):
        terms = []
        for wk, mk, sk in zip(w, m, s, strict=True):
            diff = xi - mk
            _, logdet = np.linalg.slogdet(sk)
            q = diff @ np.linalg.solve(sk, diff)
            terms.append(np.log(wk) - 0.5 * (q + logdet + len(mk) * np.log(2 * np.pi)))
        out.append(np.logaddexp.reduce(terms))
    return np.array(out)


def test_log_prob_matches_reference(x64):
    p = random_gaussian_mixture(jax.random.key(0), 4, 3)
    x = 3 * jax.random.normal(jax.random.key(1), (2, 5, 3))
    got = p.log_prob(x)
    chex.assert_shape(got, (2, 5))
    want = _np_log_prob(p.weights, p.means, p.covs, x.reshape(-1, 3)).reshape(2, 5)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_sample_moments(x64):
    """Sample mean/covariance within ~5 standard errors of the exact mixture moments."""
    p = random_gaussian_mixture(jax.random.key(2), 3, 2, mean_scale=2.0)
    n = 200_000
    xs = p.sample(jax.random.key(3), n)
    chex.assert_shape(xs, (n, 2))
    sd = jnp.sqrt(jnp.diag(p.covariance()))
    assert jnp.all(jnp.abs(xs.mean(0) - p.mean()) < 5 * sd / np.sqrt(n))
    # Covariance entries: standard error <= ~2 sd_i sd_j / sqrt(n) for these light tails.
    err = jnp.abs(jnp.cov(xs.T) - p.covariance())
    assert jnp.all(err < 10 * jnp.outer(sd, sd) / np.sqrt(n))


def test_joint_sample_cross_covariance(x64):
    c = random_joint_mixture(jax.random.key(4), 1, 2, mean_scale=1.0)
    x0, x1 = c.sample(jax.random.key(5), 200_000)
    emp = jnp.cov(jnp.concatenate([x0, x1], 1).T)
    sd = jnp.sqrt(jnp.diag(c.covs[0]))
    assert jnp.all(jnp.abs(emp - c.covs[0]) < 10 * jnp.outer(sd, sd) / np.sqrt(200_000))
    np.testing.assert_array_equal(c.source().means, c.means[:, :2])
    np.testing.assert_array_equal(c.target().covs, c.covs[:, 2:, 2:])


def test_sampling_is_deterministic_by_key():
    p = random_gaussian_mixture(jax.random.key(0), 2, 2)
    np.testing.assert_array_equal(p.sample(jax.random.key(1), 10), p.sample(jax.random.key(1), 10))
    assert not np.array_equal(p.sample(jax.random.key(1), 10), p.sample(jax.random.key(2), 10))


def test_pytree_through_jit_vmap_grad(x64):
    p = random_gaussian_mixture(jax.random.key(0), 3, 2)
    x = jnp.ones((4, 2))
    np.testing.assert_allclose(jax.jit(lambda p, x: p.log_prob(x))(p, x), p.log_prob(x))
    # vmap over a stack of mixtures (leading axis on every leaf).
    stacked = jax.tree.map(lambda *a: jnp.stack(a), p, p)
    out = jax.vmap(lambda p: p.log_prob(x))(stacked)
    chex.assert_shape(out, (2, 4))
    g = jax.grad(lambda p: p.log_prob(x).sum())(p)
    assert isinstance(g, fmjax.GaussianMixture)
    assert all(jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(g))
    with pytest.raises(AttributeError, match="immutable"):
        p.weights = jnp.ones(3) / 3


GOOD_W, GOOD_M, GOOD_S = np.array([0.5, 0.5]), np.zeros((2, 2)), np.stack([np.eye(2)] * 2)


@pytest.mark.parametrize(
    "w,m,s,match",
    [
        (np.array([0.6, 0.6]), GOOD_M, GOOD_S, "`weights` must sum to 1"),
        (np.array([1.5, -0.5]), GOOD_M, GOOD_S, "`weights` must be >= 0"),
        (np.ones((2, 1)) / 2, GOOD_M, GOOD_S, "`weights` must have shape"),
        (GOOD_W, np.zeros((3, 2)), GOOD_S, "`means` must have shape"),
        (GOOD_W, GOOD_M, np.stack([np.eye(3)] * 2), "`covs` must have shape"),
        (
            GOOD_W,
            GOOD_M,
            np.stack([np.eye(2), [[1.0, 0.5], [0.0, 1.0]]]),
            r"`covs\[1\]` is not symm",
        ),
        (
            GOOD_W,
            GOOD_M,
            np.stack([np.eye(2), [[1.0, 2.0], [2.0, 1.0]]]),
            r"`covs\[1\]` is not pos",
        ),
        (GOOD_W, np.array([[0.0, np.nan], [0.0, 0.0]]), GOOD_S, "`means` contains NaN"),
        (GOOD_W, GOOD_M, np.stack([np.eye(2), np.full((2, 2), np.inf)]), "`covs` contains NaN"),
    ],
)
def test_validation(w, m, s, match):
    with pytest.raises(ValueError, match=match):
        fmjax.GaussianMixture(w, m, s)


def test_joint_validation():
    with pytest.raises(ValueError, match="even"):
        fmjax.JointGaussianMixture(np.ones(1), np.zeros((1, 3)), np.eye(3)[None])
    p2 = random_gaussian_mixture(jax.random.key(0), 2, 2)
    p3 = random_gaussian_mixture(jax.random.key(0), 2, 3)
    with pytest.raises(
        ValueError, match=r"`p1` must be of the dimension of `p0` \(2\), got 'dim 3'"
    ):
        fmjax.independent_coupling(p2, p3)
    with pytest.raises(TypeError, match="mixtures.independent_coupling: `p0` must be a Gaussian"):
        fmjax.independent_coupling(np.zeros(2), p2)


def test_construction_under_jit_skips_value_checks():
    """Inside jit values are unknown: shape checks only, no error, no host sync."""

    @jax.jit
    def build(w):
        return fmjax.GaussianMixture(w, jnp.zeros((2, 2)), jnp.stack([jnp.eye(2)] * 2)).weights

    np.testing.assert_allclose(build(jnp.array([0.3, 0.7])), [0.3, 0.7])


def test_zero_weight_component(x64):
    """A component with weight 0 contributes nothing and produces no NaN."""
    p = fmjax.GaussianMixture(np.array([1.0, 0.0]), np.array([[0.0, 0.0], [5.0, 5.0]]), GOOD_S)
    q = fmjax.GaussianMixture(np.ones(1), np.zeros((1, 2)), np.eye(2)[None])
    x = jnp.array([[0.3, -0.2], [5.0, 5.0]])
    np.testing.assert_allclose(p.log_prob(x), q.log_prob(x), rtol=1e-14)
    c = fmjax.independent_coupling(p, q)
    v = fmjax.exact.velocity(c, fmjax.schedules.linear(), 0.5, x)
    vq = fmjax.exact.velocity(fmjax.independent_coupling(q, q), fmjax.schedules.linear(), 0.5, x)
    np.testing.assert_allclose(v, vq, rtol=1e-12)


def test_standard_normal_is_the_one_source(x64):
    p = fmjax.standard_normal(3)
    assert p.n_components == 1 and p.dim == 3 and p.means.dtype == jnp.float64
    x = jax.random.normal(jax.random.key(0), (5, 3))
    want = -0.5 * jnp.sum(x * x, -1) - 1.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(p.log_prob(x), want, rtol=1e-12)
    with pytest.raises(TypeError, match="mixtures.standard_normal: `dim` must be an int"):
        fmjax.standard_normal(2.0)
    with pytest.raises(ValueError, match="`dim` must be an int >= 1"):
        fmjax.standard_normal(0)


def test_wrong_array_type_is_a_type_error():
    with pytest.raises(TypeError, match="mixtures.GaussianMixture: `weights` must be an array"):
        fmjax.GaussianMixture(object(), np.zeros((1, 2)), np.eye(2)[None])


# ----------------------------------------------------------------------------- issue 14 inputs


@pytest.mark.parametrize("cls", [fmjax.GaussianMixture, fmjax.JointGaussianMixture])
@pytest.mark.parametrize("which", ["weights", "means", "covs"])
def test_complex_arrays_are_a_type_error(cls, which):
    """Complex input used to lose its imaginary part with only a warning."""
    d = 2 if cls is fmjax.JointGaussianMixture else 1
    args = {"weights": np.ones(1), "means": np.zeros((1, d)), "covs": np.eye(d)[None]}
    args[which] = args[which] + 1j
    with pytest.raises(TypeError, match=rf"mixtures.{cls.__name__}: `{which}` must be real"):
        cls(**args)
    args[which] = args[which].real  # control: the real part alone is valid
    cls(**args)


@pytest.mark.parametrize("cls,dim", [(fmjax.GaussianMixture, 0), (fmjax.JointGaussianMixture, 0)])
def test_zero_dimension_is_a_value_error(cls, dim):
    """d = 0 used to raise ZeroDivisionError inside validation."""
    with pytest.raises(ValueError, match=rf"mixtures.{cls.__name__}: `means` must have shape"):
        cls(np.ones(1), np.zeros((1, dim)), np.zeros((1, dim, dim)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_unsupported_float_dtypes_are_refused(dtype):
    """float16 used to be accepted and to fail later inside jaxlib's Cholesky."""
    with pytest.raises(TypeError, match="`means` must be of dtype float32 or float64"):
        fmjax.GaussianMixture(np.ones(1), jnp.zeros((1, 2), dtype), np.eye(2)[None])
    with pytest.raises(TypeError, match="mixtures.standard_normal: `dtype` must be"):
        fmjax.standard_normal(2, dtype)
    with pytest.raises(TypeError, match="mixtures.random_gaussian_mixture: `dtype` must be"):
        random_gaussian_mixture(jax.random.key(0), 2, 2, dtype=dtype)
    # control: float32 and integer inputs (cast to the default float) are fine
    p = fmjax.GaussianMixture(
        np.ones(1), jnp.zeros((1, 2), jnp.float32), np.eye(2, dtype=int)[None]
    )
    assert p.means.dtype == jnp.float32 and fmjax.standard_normal(2, jnp.float32).dim == 2


def _cond_cov(cond):
    """A 2x2 rotated diagonal covariance with the given condition number (not axis-aligned)."""
    r = np.array([[0.6, -0.8], [0.8, 0.6]])
    return (r @ np.diag([1.0, 1.0 / cond]) @ r.T)[None]


def test_float32_refuses_a_covariance_it_cannot_factorise():
    """cond 1e8 passed float64 validation and gave NaN for every quantity in float32."""
    import warnings

    from fmjax.mixtures import IllConditionedWarning, cond_warn

    with pytest.raises(ValueError, match=r"`covs\[0\]` must be positive definite in float32"):
        fmjax.GaussianMixture(np.ones(1), np.zeros((1, 2), np.float32), _cond_cov(1e8))
    with pytest.raises(ValueError, match=r"`covs\[0\]` must be positive definite in float32"):
        fmjax.GaussianMixture(np.ones(1), np.zeros((1, 2), np.float32), _cond_cov(1e7))
    # cond 1e6: valid, but warned (relative errors ~ cond * eps in float32)
    assert 1e4 < cond_warn(np.float32) < 1e6 < 1 / np.finfo(np.float32).eps
    with pytest.warns(
        IllConditionedWarning, match=r"`covs\[0\]` has condition number [0-9.e+]+, above 8.39e\+04"
    ):
        p = fmjax.GaussianMixture(np.ones(1), np.zeros((1, 2), np.float32), _cond_cov(1e6))
    assert np.all(np.isfinite(p.log_prob(jnp.ones((3, 2), jnp.float32))))
    # controls: cond 1e3 is silent in float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fmjax.GaussianMixture(np.ones(1), np.zeros((1, 2), np.float32), _cond_cov(1e3))
    # the joint mixture checks the dtype too
    joint = np.zeros((1, 4, 4))
    joint[0, :2, :2], joint[0, 2:, 2:] = np.eye(2), _cond_cov(1e8)[0]
    with pytest.raises(ValueError, match="JointGaussianMixture: `covs.0.` must be positive defin"):
        fmjax.JointGaussianMixture(np.ones(1), np.zeros((1, 4), np.float32), joint)


def test_float64_accepts_what_float32_refuses(x64):
    """Control: the same cond 1e8 covariance is fine in float64 (below 4.5e13, no warning)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = fmjax.GaussianMixture(np.ones(1), np.zeros((1, 2)), _cond_cov(1e8))
    assert p.covs.dtype == jnp.float64
    assert np.all(np.isfinite(p.log_prob(jnp.ones((3, 2)))))


# ----------------------------------------------------------------------------- singular joints


def test_singular_joint_accepted_and_sampled_exactly(x64):
    """A deterministic coupling x1 = 2 x0 + 1 (rank-d joint) is valid and samples exactly;
    joints beyond positive semi-definite are refused, whatever the dtype."""
    d = 2
    s0 = np.array([[1.0, 0.3], [0.3, 0.5]])
    cov = np.block([[s0, 2 * s0], [2 * s0, 4 * s0]])[None]
    means = np.concatenate([np.zeros(d), np.ones(d)])[None]
    c = fmjax.JointGaussianMixture(np.ones(1), means, cov)
    x0, x1 = c.sample(jax.random.key(0), 1000)
    np.testing.assert_allclose(x1, 2 * x0 + 1, atol=1e-12)
    # float32: rounding of the rank-deficient joint is tolerated
    c32 = fmjax.JointGaussianMixture(np.ones(1, np.float32), means.astype(np.float32),
                                     cov.astype(np.float32))  # fmt: skip
    x0, x1 = c32.sample(jax.random.key(0), 1000)
    np.testing.assert_allclose(x1, 2 * x0 + 1, atol=1e-4)
    # control: x1 = 2.1 x0 with Var(X1) = 4 S0 is not a coupling (Schur complement < 0)
    bad = np.block([[s0, 2.1 * s0], [2.1 * s0, 4 * s0]])[None]
    for dtype in (np.float64, np.float32):
        with pytest.raises(ValueError, match=r"`covs\[0\]` must be positive semi-definite"):
            fmjax.JointGaussianMixture(np.ones(1, dtype), means.astype(dtype), bad.astype(dtype))


# ----------------------------------------------------------------------------- sampling factors


def _lapack_calls(fn, *args) -> int:
    """Number of LAPACK custom calls (Cholesky, eigh, ...) in the lowered program."""
    text = jax.jit(fn).lower(*args).as_text()
    return sum(text.count(f"@lapack_{k}") for k in ("spotrf", "dpotrf", "ssyevd", "dsyevd"))


@functools.cache  # built once (float64: every caller runs under the x64 fixture)
def _couplings():
    key = jax.random.key(3)
    p0 = random_gaussian_mixture(jax.random.fold_in(key, 0), 3, 4)
    p1 = random_gaussian_mixture(jax.random.fold_in(key, 1), 5, 4)
    s0 = np.asarray(fmjax.mixtures.random_spd(jax.random.fold_in(key, 4), 1, 4)[0])
    deterministic = fmjax.JointGaussianMixture(  # x1 = 2 x0 + 1: a rank-d joint
        np.ones(1), np.concatenate([np.zeros(4), np.ones(4)])[None],
        np.block([[s0, 2 * s0], [2 * s0, 4 * s0]])[None],
    )  # fmt: skip
    return {
        "mixture": p1,
        "joint": random_joint_mixture(jax.random.fold_in(key, 2), 4, 4),
        "independent": fmjax.independent_coupling(p0, p1),
        "singular": deterministic,
    }


@pytest.mark.parametrize("name", ["mixture", "joint", "independent", "singular"])
def test_sample_compiles_no_lapack_and_matches_in_graph_factor(x64, name):
    """A concrete mixture's ``sample`` compiles to a gather and a matmul (its factor is cached):
    no batched LAPACK in a training step, where two concurrent calls can deadlock XLA's CPU
    pool. Its draws equal those of the in-graph factor (the mixture traced as an argument, the
    control that does contain LAPACK) to 1e-10: the cached factor is the same matrix."""
    c = _couplings()[name]
    key = jax.random.key(0)
    closed = lambda k: c.sample(k, 257)  # noqa: E731
    traced = lambda m, k: m.sample(k, 257)  # noqa: E731
    assert _lapack_calls(closed, key) == 0
    assert _lapack_calls(traced, c, key) >= 1  # control: the in-graph path factors
    got, want = jax.jit(closed)(key), jax.jit(traced)(c, key)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-10, rtol=0)


def test_sample_gradient_with_respect_to_covs_still_flows(x64):
    """The cache is not a leaf: differentiating through ``sample`` in ``covs`` factors in-graph,
    so the reparametrised gradient matches central differences (a stale cached factor would
    give zero)."""
    p = random_gaussian_mixture(jax.random.key(1), 2, 3)
    key = jax.random.key(2)
    direction = fmjax.mixtures.random_spd(jax.random.key(4), 2, 3)

    def f(s):
        q = fmjax.GaussianMixture._from_leaves(p.weights, p.means, p.covs + s * direction)
        return jnp.sum(q.sample(key, 64) ** 3)

    h = 1e-5
    fd = (f(h) - f(-h)) / (2 * h)
    g = jax.grad(f)(0.0)
    assert abs(float(fd)) > 1e-3
    np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_is_standard_normal_reads_each_end():
    """The source of independent_coupling(N(0, I), p1) is standard, its target is not; a
    shifted source, a scaled one or a cross-covariance (the OT map) are the controls."""
    p1 = fmjax.random_gaussian_mixture(jax.random.key(0), 3, 2)
    c = fmjax.independent_coupling(fmjax.standard_normal(2), p1)
    assert c.is_standard_normal(0) and not c.is_standard_normal(1)
    assert fmjax.independent_coupling(p1, fmjax.standard_normal(2)).is_standard_normal(1)
    shifted = fmjax.GaussianMixture(jnp.ones(1), jnp.full((1, 2), 0.1), jnp.eye(2)[None])
    scaled = fmjax.GaussianMixture(jnp.ones(1), jnp.zeros((1, 2)), 1.1 * jnp.eye(2)[None])
    for p0 in (shifted, scaled):
        assert not fmjax.independent_coupling(p0, p1).is_standard_normal(0)
    ot = fmjax.couplings.mixture_ot(fmjax.standard_normal(2), p1).coupling
    assert not ot.is_standard_normal(0)  # N(0, I) marginal, but coupled to x1
    with pytest.raises(ValueError, match="is_standard_normal: `end`"):
        c.is_standard_normal(2)


def test_repr_shows_shapes_truthfully():
    """A mixture prints its shapes; ``jax.tree.map(jnp.shape, m)`` prints (it raised
    AttributeError); a stacked batch of 8 shows ``batch_shape=(8,)``, not 8 components."""
    mixtures = fmjax.mixtures
    m = mixtures.random_gaussian_mixture(jax.random.key(0), n_components=3, dim=2)
    assert repr(m) == "GaussianMixture(n_components=3, dim=2, dtype=float32)"
    shapes = jax.tree.map(jnp.shape, m)
    assert repr(shapes) == "GaussianMixture(weights=(3,), means=(3, 2), covs=(3, 2, 2))"
    batch = jax.tree.map(lambda a: jnp.stack([a] * 8), m)  # as jax.vmap of a constructor
    assert repr(batch) == "GaussianMixture(batch_shape=(8,), n_components=3, dim=2, dtype=float32)"
    assert batch.n_components == 3
    c = mixtures.independent_coupling(mixtures.standard_normal(2), m)
    assert repr(jax.tree.map(jnp.shape, c)).endswith("covs=(3, 4, 4), structure='independent')")
