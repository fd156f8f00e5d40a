"""Schedules: endpoints, derivatives against autodiff, validation, static hashing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import schedules

BUILTIN = [
    schedules.linear(),
    schedules.cosine(),
    schedules.polynomial(1.0),
    schedules.polynomial(2.5),
    schedules.vp(),
    schedules.vp(0.5, 5.0),
]


@pytest.mark.parametrize("sched", BUILTIN, ids=lambda s: s.name)
def test_derivatives_match_autodiff(x64, sched):
    """The hand-written da, db equal forward-mode derivatives of a, b (t away from vp's t=1)."""
    t = jnp.linspace(0.01, 0.99, 17)
    a, b, da, db = sched(t)
    da_ad = jax.vmap(jax.grad(lambda s: sched(s)[0]))(t)
    db_ad = jax.vmap(jax.grad(lambda s: sched(s)[1]))(t)
    np.testing.assert_allclose(da, da_ad, rtol=1e-12)
    np.testing.assert_allclose(db, db_ad, rtol=1e-10)
    assert a.shape == b.shape == t.shape


@pytest.mark.parametrize("sched", BUILTIN[:4], ids=lambda s: s.name)
def test_endpoints(x64, sched):
    a, b, _, _ = sched(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(a, [0.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(b, [1.0, 0.0], atol=1e-15)


def test_vp_matches_lipman(x64):
    """a_t = exp(-T(1-t)/2), b_t = sqrt(1 - a_t^2); a_0 is exp(-T(1)/2), not exactly 0."""
    s = schedules.vp(0.1, 20.0)
    t = jnp.array([0.0, 0.3, 1.0])
    big_t = 0.1 * (1 - t) + 0.5 * 19.9 * (1 - t) ** 2
    a, b, _, db = s(t)
    np.testing.assert_allclose(a, jnp.exp(-0.5 * big_t), rtol=1e-14)
    np.testing.assert_allclose(a**2 + b**2, 1.0, rtol=1e-14)
    assert 0 < a[0] < 1e-2 and db[-1] == -jnp.inf


def test_custom_schedule_derivatives(x64):
    s = schedules.custom(lambda t: jnp.sin(0.5 * jnp.pi * t), lambda t: jnp.cos(0.5 * jnp.pi * t))
    t = jnp.linspace(0, 1, 9)
    for got, want in zip(s(t), schedules.cosine()(t), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-14)


def test_custom_rejects_bad_endpoints():
    with pytest.raises(ValueError, match="endpoint"):
        schedules.custom(lambda t: t, lambda t: 1 - 0.5 * t)
    schedules.custom(lambda t: t, lambda t: 1 - 0.5 * t, check_endpoints=False)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: schedules.polynomial(0.0), ValueError, "schedules.polynomial: `n` must be"),
        (lambda: schedules.polynomial(float("nan")), ValueError, "`n`"),
        (lambda: schedules.polynomial("2"), TypeError, "`n` must be a real number"),
        (lambda: schedules.vp(-1.0, 2.0), ValueError, "schedules.vp: `beta_min`"),
        (lambda: schedules.vp(2.0, 1.0), ValueError, "`beta_max` must be >= beta_min"),
        (lambda: schedules.vp(eps=1.0), ValueError, "`eps` must be in"),
        (lambda: schedules.custom(1.0, lambda t: t), TypeError, "schedules.custom: `a` must be"),
        (lambda: schedules.custom(lambda t: t, lambda t: 1 - t, interval=(0.5, 0.2)), ValueError,
         "`interval` must be a pair 0 <= t_min < t_max <= 1"),
        (lambda: schedules.sigma_min_schedule(1.0), ValueError, "`sigma_min` must be in"),
    ],
)  # fmt: skip
def test_validation(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_valid_interval_is_carried_by_the_schedule():
    """Each schedule knows where it is finite; nothing needs to match its name."""
    assert schedules.linear().interval == (0.0, 1.0)
    assert schedules.vp().interval == (0.0, 0.999)
    assert schedules.vp(eps=1e-2).t_max == 0.99
    assert schedules.polynomial(0.5).t_min == 1e-3  # da_0 = inf for n < 1
    assert schedules.polynomial(2.0).interval == (0.0, 1.0)
    for sched in BUILTIN:  # coefficients are finite on the whole interval, ends included
        t = np.linspace(*sched.interval, 33)
        assert all(np.all(np.isfinite(v)) for v in sched(t)), sched.name
    # Control: vp's derivative is infinite just past its interval's end, at t = 1.
    assert not np.isfinite(schedules.vp()(1.0)[3])
    assert schedules.vp().contains(np.float32(0.999)) and not schedules.vp().contains(1.0)
    with pytest.raises(ValueError, match=r"f: `t` must be in \[0, 0.999\].*got 1.0"):
        schedules.vp().check_times("f", "t", np.array([0.5, 1.0]))
    # Traced times are not checked (validation never runs under a trace).
    jax.jit(lambda t: schedules.vp().check_times("f", "t", t) or t)(1.0)


def test_custom_schedule_interval():
    """A custom schedule singular at t = 1 is accepted with an interval that stops short of it."""
    a, b = (lambda t: 1 - jnp.sqrt(1 - t)), (lambda t: jnp.sqrt(1 - t))
    with pytest.raises(ValueError, match="schedules.custom: `interval` must be a range where"):
        schedules.custom(a, b)
    s = schedules.custom(a, b, "sqrt", interval=(0.0, 0.99))
    assert s.t_max == 0.99
    assert s == schedules.custom(a, b, "sqrt", interval=(0.0, 0.99))  # equal: no retrace
    assert s != schedules.custom(a, b, "sqrt", interval=(0.0, 0.9))


def test_sigma_min_schedule(x64):
    s = schedules.sigma_min_schedule(0.1)
    a, b, da, db = s(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(b, [1.0, 0.1])
    np.testing.assert_allclose(a, [0.0, 1.0])
    assert schedules.sigma_min_schedule(0.0)(0.3)[1] == schedules.linear()(0.3)[1]


def test_equal_schedules_hash_equal():
    assert schedules.polynomial(2) == schedules.polynomial(2.0)
    assert hash(schedules.vp()) == hash(schedules.vp(0.1, 20.0))
    assert schedules.linear() != schedules.cosine()
    # Static pytree: no leaves, passes through jit as an argument.
    assert jax.tree.leaves(schedules.cosine()) == []
    f = jax.jit(lambda s, t: s(t)[0])
    np.testing.assert_allclose(f(schedules.cosine(), 1.0), 1.0, rtol=1e-6)


def test_integer_time_is_promoted():
    a, *_ = schedules.linear()(1)
    assert jnp.issubdtype(a.dtype, jnp.floating)


def _vanishing_at(t0):
    """Both coefficients times (t - t0)^2: a_t = b_t = 0 at t0 only."""
    return (lambda t: t * (t - t0) ** 2, lambda t: (1 - t) * (t - t0) ** 2)


def test_custom_refuses_a_and_b_both_zero():
    """a_t = b_t = 0 at t = 0.5 (and at 0.3) used to be accepted and to give NaN there."""
    for t0 in (0.5, 0.3):
        with pytest.raises(ValueError, match=rf"schedules.custom: `b` must be nonzero .*t={t0:g}"):
            schedules.custom(*_vanishing_at(t0), check_endpoints=False)
    # control: a schedule where only one coefficient vanishes inside is fine
    s = schedules.custom(lambda t: t**2, lambda t: (1 - t) ** 2, check_endpoints=False)
    assert np.all(np.isfinite(np.asarray(s(np.linspace(0, 1, 11)))))


def test_custom_reports_where_the_coefficients_are_not_finite():
    with pytest.raises(ValueError, match=r"`interval` must be a range where .*t=0\.5"):
        schedules.custom(lambda t: t + 0.0 / (t - 0.5), lambda t: 1 - t)


def test_complex_times_are_a_type_error():
    s = schedules.linear()
    with pytest.raises(TypeError, match="schedules.Schedule: `t` must be real"):
        s(jnp.asarray([0.5 + 0.1j]))
    a, b, _, _ = s(jnp.asarray([0.5]))  # control
    np.testing.assert_allclose([a[0], b[0]], [0.5, 0.5])


NOISES = [
    schedules.brownian(1.0),
    schedules.brownian(0.3),
    schedules.bsquared(2.0),
    schedules.sinesquared(0.5),
    schedules.custom_noise(lambda t: 0.2 * jnp.sin(jnp.pi * t) ** 2, "custom"),
]


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: n.name)
def test_noise_derivative_and_product(x64, noise):
    """dgamma matches autodiff inside (0, 1); gamma * dgamma is finite at both ends."""
    t = jnp.linspace(0.01, 0.99, 17)
    g, dg, g_dg = noise(t)
    np.testing.assert_allclose(dg, jax.vmap(jax.grad(lambda s: noise(s)[0]))(t), rtol=1e-10)
    np.testing.assert_allclose(g_dg, g * dg, rtol=1e-12, atol=1e-15)
    g_end, _, g_dg_end = noise(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(g_end, 0.0, atol=1e-15)
    assert np.all(np.isfinite(g_dg_end))


def test_brownian_product_at_the_ends(x64):
    """The product is sigma^2 (1 - 2t) / 2, the limit of gamma * dgamma (dgamma alone is inf)."""
    g, dg, g_dg = schedules.brownian(2.0)(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(g_dg, [2.0, -2.0], rtol=1e-15)
    assert np.all(np.isinf(dg))  # control: the naive product would be 0 * inf = nan
    assert np.all(np.isnan(g * dg))


def test_trig_derivatives_and_endpoints(x64):
    s = schedules.trig(schedules.brownian(0.5))
    t = jnp.linspace(0.01, 0.99, 17)
    a, b, da, db = s(t)
    np.testing.assert_allclose(da, jax.vmap(jax.grad(lambda u: s(u)[0]))(t), rtol=1e-10)
    np.testing.assert_allclose(db, jax.vmap(jax.grad(lambda u: s(u)[1]))(t), rtol=1e-10)
    a, b, da, db = s(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(a, [0.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(b, [1.0, 0.0], atol=1e-15)
    assert np.all(np.isfinite(da)) and np.all(np.isfinite(db))
    assert s.has_noise and s.noise == schedules.brownian(0.5)


def test_with_noise_hashes_and_round_trips():
    s1 = schedules.linear().with_noise(schedules.brownian(0.5))
    s2 = schedules.linear().with_noise(schedules.brownian(0.5))
    assert s1 == s2 and hash(s1) == hash(s2) and s1.name == "linear+brownian(0.5)"
    assert s1 != schedules.linear().with_noise(schedules.brownian(0.6))
    assert s1.with_noise(None) == schedules.linear()
    assert not schedules.linear().has_noise
    g, dg, g_dg = schedules.linear().gamma(jnp.array([0.0, 0.5]))
    assert not np.any(g) and not np.any(g_dg)


def test_noise_no_retrace():
    calls = []

    @jax.jit
    def f(s, t):
        calls.append(1)
        return s.gamma(t)[0]

    f(schedules.linear().with_noise(schedules.bsquared()), 0.3)
    f(schedules.linear().with_noise(schedules.bsquared()), 0.4)
    assert len(calls) == 1
    f(schedules.linear().with_noise(schedules.bsquared(2.0)), 0.4)  # control: new noise retraces
    assert len(calls) == 2


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: schedules.brownian(0.0), ValueError, "schedules.brownian: `sigma` must be"),
        (lambda: schedules.bsquared(-1.0), ValueError, "schedules.bsquared: `scale`"),
        (lambda: schedules.custom_noise(0.3), TypeError, "schedules.custom_noise: `gamma`"),
        (lambda: schedules.custom_noise(lambda t: 0.1 + 0 * t), ValueError, "zero at t = 0"),
        (lambda: schedules.custom_noise(lambda t: -t * (1 - t)), ValueError, "nonnegative"),
        (lambda: schedules.trig(schedules.bsquared(5.0)), ValueError, "gamma_t < 1"),
        (lambda: schedules.trig(0.5), TypeError, "schedules.trig: `noise`"),
        (lambda: schedules.linear().with_noise("brownian"), TypeError, "`noise`"),
    ],
)  # fmt: skip
def test_noise_validation(make, error, match):
    with pytest.raises(error, match=match):
        make()
