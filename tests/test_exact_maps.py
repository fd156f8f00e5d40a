"""Deterministic couplings x1 = m1 + A (x0 - m0), A symmetric positive-definite (the Gaussian OT
map): singular joint covariances, detected by ``prepare`` and evaluated time-free through the
eigendecomposition of A, against the per-time Cholesky path, the reference and exact transport."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import exact, schedules
from fmjax.exact import _otmap
from fmjax.mixtures import random_spd
from tests.reference import reference

_QS = ("velocity", "log_prob", "score", "divergence")
D = 3


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0)


def _map_coupling(k=3, d=D, seed=0, asymmetric=0.0):
    """Components x1 = m1 + A (x0 - m0), x0 ~ N(m0, S00), A SPD: S10 = A S00, S11 = A S00 A
    (singular joint covariance, built without validation)."""
    key = jax.random.key(seed)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    s00 = random_spd(k1, k, d)
    a = random_spd(k2, k, d, eps=0.3)
    a = a + asymmetric * jax.random.normal(k4, a.shape)
    means = 2.0 * jax.random.normal(k3, (k, 2 * d))
    s10 = a @ s00
    s11 = a @ s00 @ jnp.swapaxes(a, -1, -2)
    covs = jnp.concatenate(
        [jnp.concatenate([s00, jnp.swapaxes(s10, -1, -2)], -1), jnp.concatenate([s10, s11], -1)],
        -2,
    )
    w = jnp.arange(1.0, k + 1.0)
    structure = "map" if asymmetric == 0.0 else "general"  # declared, as gaussian_ot does
    return fmjax.JointGaussianMixture._from_leaves(w / w.sum(), means, covs, structure), a


@pytest.mark.parametrize("name", ["cosine", pytest.param("vp", marks=pytest.mark.slow)])
def test_map_path_matches_per_time_path_and_reference(x64, name, kernel_calls):
    sched = {"linear": schedules.linear(), "cosine": schedules.cosine(), "vp": schedules.vp()}[name]
    c, _ = _map_coupling()
    prepared = exact.prepare(c)
    assert prepared.deterministic and not prepared.independent
    assert isinstance(prepared.factors, _otmap.Map)
    calls = kernel_calls
    x = 2.5 * jax.random.normal(jax.random.key(1), (30, D))
    for t in (0.0, 1e-3, 0.5, sched.t_max):
        got = exact.evaluate(prepared, sched, t, x, _QS)
        per_time = exact.evaluate(c, sched, t, x, _QS)
        w = reference(c.weights, c.means, c.covs, sched, t, x, divergence=True)
        for q, want in zip(_QS, (w[0], w[1], w[2], w[4]), strict=True):
            # float64 round-off through d x d factors of condition < ~1e3: 1e-10.
            assert _rel(getattr(got, q), want) < 1e-10, (q, t)
            assert _rel(getattr(per_time, q), want) < 1e-10, (q, t)
        np.testing.assert_allclose(
            exact.responsibilities(prepared, sched, t, x), w[3], rtol=1e-10, atol=1e-14
        )
    assert calls.count("otmap") == 4
    ts = jnp.linspace(0.0, sched.t_max, x.shape[0])
    got = exact.evaluate(prepared, sched, ts, x, _QS)
    auto = exact.evaluate(c, sched, ts, x, _QS)  # concrete, unprepared: detected at call time
    assert calls.count("otmap") == 6
    per_point = exact.evaluate(exact.prepare(c, deterministic=False), sched, ts, x, _QS)
    assert calls.count("otmap") == 6
    for q in _QS:
        assert _rel(getattr(got, q), getattr(per_point, q)) < 1e-10, q
        np.testing.assert_array_equal(getattr(got, q), getattr(auto, q))


def test_single_map_transports_exactly(x64):
    """One component: X_t determines x0, so u_t(X_t) = db x0 + da x1 exactly (coordinate-free:
    no formula of the engine is used); the same with A replaced by another SPD matrix fails."""
    c, a = _map_coupling(k=1, seed=3)
    sched = schedules.cosine()
    prepared = exact.prepare(c)
    assert prepared.deterministic
    m0, m1 = c.means[:1, :D], c.means[:1, D:]
    x0 = (
        m0
        + jax.random.normal(jax.random.key(2), (50, D)) @ jnp.linalg.cholesky(c.covs[0, :D, :D]).T
    )
    x1 = m1 + (x0 - m0) @ a[0].T
    ts = jax.random.uniform(jax.random.key(4), (50,))
    at, bt, dat, dbt = (v[:, None] for v in sched(ts))
    xt = bt * x0 + at * x1
    got = exact.velocity(prepared, sched, ts, xt)
    np.testing.assert_allclose(got, dbt * x0 + dat * x1, rtol=1e-10, atol=1e-10)
    wrong, _ = _map_coupling(k=1, seed=4)
    wrong = fmjax.JointGaussianMixture._from_leaves(wrong.weights, c.means, wrong.covs)
    assert _rel(exact.velocity(exact.prepare(wrong), sched, ts, xt), dbt * x0 + dat * x1) > 1e-2


def test_non_maps_are_not_detected(x64):
    """Controls: an asymmetric A, a coupling with extra target noise, or an independent one is
    not a deterministic map; forcing the map path on the noisy one is visibly wrong. A schedule
    with latent noise takes the per-time path (correct)."""
    asym, _ = _map_coupling(asymmetric=0.3)
    assert fmjax.mixtures.structure_of(asym.covs, D) == "general"
    assert not exact.prepare(asym).deterministic
    c, _ = _map_coupling()
    extra = c.covs.at[:, D:, D:].add(0.05 * jnp.eye(D))
    noisy = fmjax.JointGaussianMixture(c.weights, c.means, extra)
    assert not exact.prepare(noisy).deterministic
    x = 2.0 * jax.random.normal(jax.random.key(1), (20, D))
    sched = schedules.linear()
    # One t per point (at one t and d <= 8 every coupling takes the low-dimension kernel).
    t5 = jnp.full((20,), 0.5)
    forced = exact.velocity(exact.prepare(noisy, deterministic=True), sched, t5, x)
    assert _rel(forced, exact.velocity(noisy, sched, 0.5, x)) > 1e-3
    ind = fmjax.independent_coupling(
        fmjax.random_gaussian_mixture(jax.random.key(0), 2, D),
        fmjax.random_gaussian_mixture(jax.random.key(1), 2, D),
    )
    assert not exact.prepare(ind).deterministic
    gsched = sched.with_noise(schedules.brownian(0.5))
    w = reference(c.weights, c.means, c.covs, gsched, 0.5, x)
    assert _rel(exact.velocity(exact.prepare(c), gsched, 0.5, x), w[0]) < 1e-10
    ts = jnp.full((20,), 0.5)
    assert _rel(exact.velocity(c, gsched, ts, x), w[0]) < 1e-10
