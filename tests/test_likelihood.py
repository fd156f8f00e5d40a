"""Tests of fmjax.likelihood: exact GMM log-densities and divergences, gradients vs FD, solver
objects, the schedule's valid interval, and the keyword-only key."""

import functools

import chex
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix
import pytest

import fmjax
from fmjax import likelihood, mixtures, sample, schedules

D = 2


def _coupling(key, source=None, k=3, dtype=jnp.float64):
    p0 = source or mixtures.standard_normal(D, dtype)
    p1 = fmjax.random_gaussian_mixture(key, k, D, mean_scale=2.0, eps=0.3, dtype=dtype)
    return fmjax.independent_coupling(p0, p1), p0, p1


def test_log_likelihood_matches_exact(x64):
    """Backward augmented ODE with the exact field gives exact log p_t (t = 1 and t = 0.5).

    A non-standard Gaussian source exercises ``source_log_prob``. Tsit5 at rtol = atol = 1e-6
    integrates the log-density to ~1e-6 nats here (measured 5e-7); the issue's bound is 1e-3.
    """
    src = fmjax.GaussianMixture(
        jnp.ones(1), jnp.array([[0.5, -1.0]]), jnp.array([[[1.5, 0.3], [0.3, 0.8]]])
    )
    c, _, p1 = _coupling(jax.random.key(0), source=src)
    s = schedules.linear()
    v = functools.partial(fmjax.exact.velocity, c, s)
    x = p1.sample(jax.random.key(1), 5)
    out = likelihood.log_likelihood(v, x, source_log_prob=src, rtol=1e-6, atol=1e-6)
    assert out.log_prob.shape == (5,) and out.x0.shape == (5, D)
    np.testing.assert_allclose(out.log_prob, p1.log_prob(x), atol=1e-4)
    # The source points are the backward ODE solution.
    np.testing.assert_allclose(
        out.x0, sample.ode(v, x, t0=1.0, t1=0.0, rtol=1e-6, atol=1e-6).x, atol=1e-5
    )
    half = likelihood.log_likelihood(v, x, t=0.5, source_log_prob=src, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(half.log_prob, fmjax.exact.log_prob(c, s, 0.5, x), atol=1e-4)


def test_sample_and_log_prob_matches_exact(x64):
    """Forward pass: the samples are the ODE samples and their log p is the exact target density."""
    c, _, p1 = _coupling(jax.random.key(2))
    v = functools.partial(fmjax.exact.velocity, c, schedules.cosine())
    x0 = sample.draw_source(jax.random.key(3), 6, D, dtype=jnp.float64)
    out = likelihood.sample_and_log_prob(v, x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.x, sample.ode(v, x0, rtol=1e-6, atol=1e-6).x, atol=1e-5)
    np.testing.assert_allclose(out.log_prob, p1.log_prob(out.x), atol=1e-4)  # as above
    assert int(out.nfe) == 1 + 6 * int(out.num_steps)  # Tsit5 is FSAL with 7 stages


def test_autodiff_divergence_matches_closed_form(x64):
    c, _, _ = _coupling(jax.random.key(4))
    s = schedules.linear()
    v = functools.partial(fmjax.exact.velocity, c, s)
    x = jax.random.normal(jax.random.key(5), (3, 4, D), jnp.float64) * 2.0
    got = likelihood.autodiff_divergence(v, 0.3, x)
    want = fmjax.exact.divergence(c, s, 0.3, x)
    # Forward-mode JVPs and the closed form agree to float64 round-off on O(10) values.
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # Control: the divergence at another time differs by far more than the tolerance.
    assert float(jnp.max(jnp.abs(fmjax.exact.divergence(c, s, 0.6, x) - got))) > 1e-3


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_divergence_is_unbiased(x64, probe):
    """Mean of e^T J e over 4000 probes is within 5 standard errors of the exact divergence."""
    c, _, _ = _coupling(jax.random.key(6))
    s = schedules.linear()
    v = functools.partial(fmjax.exact.velocity, c, s)
    x = jax.random.normal(jax.random.key(7), (5, D), jnp.float64) * 2.0
    keys = jax.random.split(jax.random.key(8), 4000)
    est = jax.vmap(
        lambda k: likelihood.autodiff_divergence(v, 0.6, x, method="hutchinson", key=k, probe=probe)
    )(keys)  # (M, 5)
    exact = fmjax.exact.divergence(c, s, 0.6, x)
    se = est.std(axis=0) / np.sqrt(est.shape[0])
    assert np.all(np.abs(est.mean(axis=0) - exact) < 5 * se + 1e-12)
    # Power: the estimator is not trivially the exact value (else the test above says nothing).
    assert float(jnp.max(se)) > 1e-3


def test_hutchinson_log_likelihood_is_unbiased(x64):
    """With fixed probes per point the trajectory is unchanged, so the estimate is unbiased.

    3 points, each repeated 300 times with its own Rademacher probe, in one solve: the mean over
    repeats is within 5 standard errors (plus 1e-4 solver error) of the exact log p_1.
    """
    c, _, p1 = _coupling(jax.random.key(9))
    v = functools.partial(fmjax.exact.velocity, c, schedules.linear())
    x = p1.sample(jax.random.key(10), 3)
    reps = jnp.broadcast_to(x[None], (300, 3, D))
    out = likelihood.log_likelihood(
        v, reps, method="hutchinson", key=jax.random.key(11), rtol=1e-6, atol=1e-6
    )
    est = out.log_prob  # (300, 3)
    se = est.std(axis=0) / np.sqrt(est.shape[0])
    assert np.all(np.abs(est.mean(axis=0) - p1.log_prob(x)) < 5 * se + 1e-4)
    assert float(jnp.min(se)) > 1e-4  # the probes do vary the estimate


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_gradient_matches_finite_differences(x64, method):
    """d/dparams of the mean log-likelihood (RK4, 6 steps) vs central differences, float64.

    Fixed steps make the solve a smooth function of the parameters; central differences with
    h = 1e-5 have O(h^2) truncation and O(1e-16 / h) round-off, ~1e-10, so rtol 1e-6 is safe.
    """
    model = fmjax.models.MLP(2, width=8, depth=2, time_embedding="raw", param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(12), (4, D), jnp.float64)
    params = model.init(jax.random.key(13), 0.0, x)
    kw = dict(solver="rk4", steps=6, method=method, key=jax.random.key(14))

    def loss(p):
        return jnp.mean(
            likelihood.log_likelihood(functools.partial(model.apply, p), x, **kw).log_prob
        )

    grad = jax.grad(loss)(params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    direction = jax.random.normal(jax.random.key(15), flat.shape, jnp.float64)
    h = 1e-5
    fd = (loss(unravel(flat + h * direction)) - loss(unravel(flat - h * direction))) / (2 * h)
    ad = jnp.dot(jax.flatten_util.ravel_pytree(grad)[0], direction)
    np.testing.assert_allclose(ad, fd, rtol=1e-6)


def test_likelihood_validation():
    v = lambda t, x: -x  # noqa: E731
    x = jnp.ones((3, D))
    with pytest.raises(ValueError, match=r"likelihood.log_likelihood: `method`"):
        likelihood.log_likelihood(v, x, method="skilling")
    with pytest.raises(TypeError, match="`key`"):
        likelihood.log_likelihood(v, x, method="hutchinson")
    with pytest.raises(ValueError, match="`probe`"):
        likelihood.log_likelihood(v, x, method="hutchinson", key=jax.random.key(0), probe="x")
    with pytest.raises(ValueError, match="`n_probes`"):
        likelihood.log_likelihood(v, x, method="hutchinson", key=jax.random.key(0), n_probes=0)
    with pytest.raises(TypeError, match="`source_log_prob`"):
        likelihood.log_likelihood(v, x, source_log_prob="normal")
    with pytest.raises(ValueError, match="`t`"):
        likelihood.log_likelihood(v, x, t=2.0)
    with pytest.raises(ValueError, match="`t`"):
        likelihood.sample_and_log_prob(v, x, t=0.0)
    with pytest.raises(ValueError, match=r"`t` must be in \[0, 0.999\]"):
        likelihood.log_likelihood(v, x, t=1.0, schedule=schedules.vp())
    with pytest.raises(ValueError, match="`stepsize_controller`"):
        likelihood.log_likelihood(
            v, x, solver="rk4", stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3)
        )
    with pytest.raises(ValueError, match=r"likelihood.autodiff_divergence: `method`"):
        likelihood.autodiff_divergence(v, 0.5, x, method="trace")


def test_key_is_keyword_only():
    v = lambda t, x: -x  # noqa: E731
    x, key = jnp.ones((3, D)), jax.random.key(0)
    with pytest.raises(TypeError):
        likelihood.log_likelihood(v, x, key)
    with pytest.raises(TypeError):
        likelihood.sample_and_log_prob(v, x, key)
    with pytest.raises(TypeError):
        likelihood.autodiff_divergence(v, 0.5, x, "hutchinson", key)


def test_solver_and_controller_objects_match_names(x64):
    """A diffrax solver / controller object gives exactly the solve of the matching names."""
    c, _, p1 = _coupling(jax.random.key(16))
    v = functools.partial(fmjax.exact.velocity, c, schedules.linear())
    x = p1.sample(jax.random.key(17), 4)
    by_name = likelihood.log_likelihood(v, x, rtol=1e-6, atol=1e-6)
    pid = diffrax.PIDController(rtol=1e-6, atol=1e-6, norm=optimistix.max_norm)
    by_object = likelihood.log_likelihood(v, x, solver=diffrax.Tsit5(), stepsize_controller=pid)
    np.testing.assert_array_equal(by_object.log_prob, by_name.log_prob)
    assert int(by_object.nfe) == int(by_name.nfe)
    fwd = likelihood.sample_and_log_prob(v, x, solver=sample.RK4(), steps=6)
    fwd_name = likelihood.sample_and_log_prob(v, x, solver="rk4", steps=6)
    np.testing.assert_array_equal(fwd.log_prob, fwd_name.log_prob)
    assert int(fwd.nfe) == 24


def test_integrates_back_to_the_start_of_the_interval(x64):
    """With a schedule starting at t_min > 0 the solve stops there and p_{t_min} is the source.

    polynomial(0.5) is valid on [1e-3, 1] (da_t infinite at 0). Taking the exact p_{t_min} as
    ``source_log_prob`` makes the result exact again (Tsit5 at 1e-7: ~1e-6 nats); x0 is the
    backward ODE solution to t_min. The velocity's ``.schedule`` supplies the interval.
    """
    s = schedules.polynomial(0.5)
    c, _, p1 = _coupling(jax.random.key(18))

    class Field:
        schedule = s

        def __call__(self, t, x):
            return fmjax.exact.velocity(c, s, t, x)

    x = p1.sample(jax.random.key(19), 4)
    src = functools.partial(fmjax.exact.log_prob, c, s, s.t_min)
    out = likelihood.log_likelihood(Field(), x, source_log_prob=src, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(out.log_prob, p1.log_prob(x), atol=1e-4)
    back = sample.ode(Field(), x, t0=1.0, t1=s.t_min, rtol=1e-7, atol=1e-7).x
    np.testing.assert_allclose(out.x0, back, atol=1e-5)


def test_vp_likelihood_defaults_to_valid_interval(x64):
    """On vp the data time defaults to t_max = 0.999 and the result is exact log p_{0.999}.

    The vp path starts at a_0 = 6.6e-3, not exactly at N(0, I): the exact p_0 as the source.
    """
    s = schedules.vp()
    c, _, p1 = _coupling(jax.random.key(20))
    v = functools.partial(fmjax.exact.velocity, c, s)
    x = p1.sample(jax.random.key(21), 4)
    src = functools.partial(fmjax.exact.log_prob, c, s, 0.0)
    out = likelihood.log_likelihood(v, x, schedule=s, source_log_prob=src, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(out.log_prob, fmjax.exact.log_prob(c, s, s.t_max, x), atol=1e-4)


def test_log_likelihood_under_jit_matches_eager():
    chex.clear_trace_counter()
    c, _, p1 = _coupling(jax.random.key(22), dtype=jnp.float32)
    v = functools.partial(fmjax.exact.velocity, c, schedules.linear())
    x = p1.sample(jax.random.key(23), 4)
    kw = dict(solver="rk4", steps=8, method="hutchinson")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(x, key):
        return likelihood.log_likelihood(v, x, key=key, **kw).log_prob

    eager = likelihood.log_likelihood(v, x, key=jax.random.key(0), **kw).log_prob
    np.testing.assert_allclose(jitted(x, jax.random.key(0)), eager, rtol=1e-5)
    jitted(x + 0.5, jax.random.key(1))  # new values: no retrace


def test_source_of_the_wrong_dimension_names_source_log_prob():
    """A source of another d used to crash inside a JAX reshape."""
    v = lambda t, x: -x  # noqa: E731
    x = jnp.ones((3, D))
    p3 = mixtures.standard_normal(D + 1)
    for f in (likelihood.log_likelihood, likelihood.sample_and_log_prob):
        with pytest.raises(ValueError, match=r"`source_log_prob` must be a GaussianMixture of the"):
            f(v, x, source_log_prob=p3, steps=2, solver="euler")
        with pytest.raises(ValueError, match=r"`source_log_prob` must be a callable x \(3, 2\)"):
            f(v, x, source_log_prob=p3.log_prob, steps=2, solver="euler")  # raises inside
        with pytest.raises(ValueError, match=r"`source_log_prob` must be .*got 'shape \(3, 1\)'"):
            f(v, x, source_log_prob=lambda y: y[..., :1], steps=2, solver="euler")
    # controls: a source of the right dimension, as a mixture or as a callable
    p2 = mixtures.standard_normal(D)
    a = likelihood.log_likelihood(v, x, source_log_prob=p2, steps=2, solver="euler")
    b = likelihood.log_likelihood(v, x, source_log_prob=p2.log_prob, steps=2, solver="euler")
    np.testing.assert_allclose(a.log_prob, b.log_prob)


def test_complex_points_are_a_type_error():
    v = lambda t, x: -x  # noqa: E731
    with pytest.raises(TypeError, match=r"likelihood.log_likelihood: `x` must be real"):
        likelihood.log_likelihood(v, jnp.ones((3, D)) + 0j, steps=2, solver="euler")
    with pytest.raises(TypeError, match=r"likelihood.autodiff_divergence: `x` must be"):
        likelihood.autodiff_divergence(v, 0.5, jnp.ones((3, D), jnp.float16))
    assert likelihood.autodiff_divergence(v, 0.5, jnp.ones((3, D))).shape == (3,)  # control
