"""metrics.velocity_error with a PreparedCoupling and with a schedule that carries latent noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import exact, metrics, schedules


def test_velocity_error_accepts_prepared_coupling(x64):
    c = fmjax.independent_coupling(
        fmjax.random_gaussian_mixture(jax.random.key(0), 2, 2),
        fmjax.random_gaussian_mixture(jax.random.key(1), 3, 2),
    )
    sched = schedules.cosine()
    ts = jnp.array([0.1, 0.5, 0.9])

    def field(t, x):
        return exact.velocity(c, sched, t, x) + 0.1

    key = jax.random.key(2)
    raw = metrics.velocity_error(field, c, sched, ts, 64, key=key)
    prep = metrics.velocity_error(field, exact.prepare(c), sched, ts, 64, key=key)
    np.testing.assert_allclose(prep, raw, rtol=1e-10)
    np.testing.assert_allclose(raw, 0.02, rtol=1e-8)  # |(0.1, 0.1)|^2 at every sample
    with pytest.raises(TypeError, match="metrics.velocity_error: `coupling` must be a Joint"):
        metrics.velocity_error(field, c.source, sched, ts, 64, key=key)


def test_velocity_error_samples_the_noisy_marginal(x64):
    """With latent noise X_t = b x0 + a x1 + gamma z: E|X_t|^2 (field x, reference 0) matches
    the exact marginal's second moment (it includes d gamma^2); without the z term it would be
    d gamma^2 = 2 lower, ~20 standard errors."""
    c = fmjax.random_joint_mixture(jax.random.key(3), 3, 2, mean_scale=1.0)
    sched = schedules.linear().with_noise(schedules.brownian(2.0))  # gamma(0.5)^2 = 1
    got = metrics.velocity_error(
        lambda t, x: x, c, sched, jnp.array([0.5]), 20_000, key=jax.random.key(4),
        reference=lambda t, x: jnp.zeros_like(x),
    )[0]  # fmt: skip
    m = exact.marginal(c, sched, 0.5)
    second = jnp.sum(m.weights * (jnp.sum(m.means**2, -1) + jnp.trace(m.covs, axis1=-2, axis2=-1)))
    assert abs(got - second) < 0.05 * second
    assert abs(got - (second - 2.0)) > 0.1 * second  # control: the noise-free moment
