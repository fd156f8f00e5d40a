"""The exact engine with latent noise gamma_t z (stochastic interpolants), float64.

Against the independent NumPy reference (extended to gamma), the continuity equation, the
Fokker-Planck equation of the SDE family, the gamma -> 0 limit, and the time-free path (where
the noise stays diagonal in the pencil basis) against the per-time path. Every test has a control
that shows it can fail.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import exact, schedules
from fmjax.mixtures import random_joint_mixture
from tests.reference import reference

NOISY = {
    "linear+brownian": schedules.linear().with_noise(schedules.brownian(0.7)),
    "cosine+bsquared": schedules.cosine().with_noise(schedules.bsquared()),
    "trig(brownian)": schedules.trig(schedules.brownian()),
    "vp+sinesquared": schedules.vp().with_noise(schedules.sinesquared(0.5)),
}
TIMES = (0.0, 1e-3, 0.3, 0.5, 1 - 1e-3, 1.0)
_QS = ("velocity", "log_prob", "score", "divergence")
D = 2


def _rel(a, b):
    """Largest error relative to the largest value, or absolute below 1 (a divergence may be
    ~0 everywhere, e.g. at t = 0 of an independent coupling with da_0 = 0)."""
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0)


def _coupling(kind, d=D, k_seed=0):
    key = jax.random.key(20 + k_seed)
    if kind == "joint":
        return random_joint_mixture(key, 3, d, mean_scale=2.0)
    p1 = fmjax.random_gaussian_mixture(jax.random.fold_in(key, 1), 3, d, mean_scale=2.0)
    if kind == "normal_source":  # S00 = I: V^T V diagonal, the time-free path keeps the noise
        return fmjax.independent_coupling(fmjax.standard_normal(d), p1)
    if kind == "isotropic_target":  # S11 = c I: diagonal too
        p1 = fmjax.GaussianMixture(
            p1.weights, p1.means, 0.5 * jnp.broadcast_to(jnp.eye(d), p1.covs.shape)
        )
        p0 = fmjax.random_gaussian_mixture(jax.random.fold_in(key, 2), 2, d, mean_scale=2.0)
        return fmjax.independent_coupling(p0, p1)
    p0 = fmjax.random_gaussian_mixture(jax.random.fold_in(key, 2), 2, d, mean_scale=2.0)
    return fmjax.independent_coupling(p0, p1)  # "independent": general, V^T V not diagonal


def _points(c, n=24, seed=7):
    """Points spread over the components' means (mean_scale 2: mixed responsibilities)."""
    return 2.5 * jax.random.normal(jax.random.key(seed), (n, c.dim))


def _clip(sched, t):
    return min(t, sched.t_max)


@pytest.mark.parametrize(
    "name, kind",
    [("linear+brownian", "joint"), ("trig(brownian)", "joint")]
    + [
        pytest.param(n, "joint", marks=pytest.mark.slow)
        for n in ("cosine+bsquared", "vp+sinesquared")
    ]
    + [("linear+brownian", "normal_source"), ("trig(brownian)", "normal_source")],
)
def test_noise_matches_numpy_reference(x64, name, kind):
    """Every quantity (through ``prepare`` for the independent couplings: time-free where the
    noise is diagonal, the per-time fallback elsewhere) against the reference at six times:
    float64 round-off through d x d solves of condition < ~1e3: 1e-10."""
    sched = NOISY[name]
    c = _coupling(kind)
    arg = c if kind == "joint" else exact.prepare(c)
    x = _points(c)
    for t in TIMES:
        t = _clip(sched, t)
        got = exact.evaluate(arg, sched, t, x, _QS)
        resp = exact.responsibilities(arg, sched, t, x)
        want = reference(c.weights, c.means, c.covs, sched, t, x, divergence=True)
        for q, w in zip(_QS, (want[0], want[1], want[2], want[4]), strict=True):
            assert _rel(getattr(got, q), w) < 1e-10, (q, t)
        np.testing.assert_allclose(resp, want[3], rtol=1e-10, atol=1e-14)
    # Control: the engine without the noise term is far from the noisy reference.
    x = _points(c)
    plain = exact.evaluate(arg, sched.with_noise(None), 0.5, x, _QS)
    want = reference(c.weights, c.means, c.covs, sched, 0.5, x, divergence=True)
    assert _rel(plain.velocity, want[0]) > 1e-2
    assert _rel(plain.log_prob, want[1]) > 1e-2


def test_marginal_includes_the_noise(x64):
    sched = NOISY["linear+brownian"]
    c = _coupling("joint")
    g = 0.7 * np.sqrt(0.25)
    got = exact.marginal(c, sched, 0.5)
    plain = exact.marginal(c, sched.with_noise(None), 0.5)
    np.testing.assert_allclose(got.covs, np.asarray(plain.covs) + g * g * np.eye(D), rtol=1e-12)
    np.testing.assert_allclose(got.means, plain.means, rtol=1e-12)
    x = _points(c)
    np.testing.assert_allclose(got.log_prob(x), exact.log_prob(c, sched, 0.5, x), rtol=1e-12)
    assert not np.allclose(plain.log_prob(x), got.log_prob(x), rtol=1e-3)  # control


@functools.partial(jax.jit, static_argnums=1)
def _pde_terms(c, sched, t, x):
    """d_t log p, u, grad log p, div u, div s, Laplacian of log p, by autodiff (per point).

    One compiled program per case: eager autodiff through the engine would compile op by op.
    """

    def lp(t, x):
        return exact.log_prob(c, sched, t, x)

    dlogp_dt = jax.vmap(jax.grad(lp), (None, 0))(t, x)
    grad = jax.vmap(jax.grad(lp, argnums=1), (None, 0))(t, x)
    lap = jnp.trace(jax.vmap(jax.hessian(lp, argnums=1), (None, 0))(t, x), axis1=-2, axis2=-1)
    jac_u = jax.vmap(jax.jacfwd(lambda x: exact.velocity(c, sched, t, x)))(x)
    jac_s = jax.vmap(jax.jacfwd(lambda x: exact.score(c, sched, t, x)))(x)
    tr = functools.partial(jnp.trace, axis1=-2, axis2=-1)
    u = exact.velocity(c, sched, t, x)
    div = exact.divergence(c, sched, t, x)
    u0 = exact.velocity(c, sched.with_noise(None), t, x)
    jac0 = jax.vmap(jax.jacfwd(lambda x: exact.velocity(c, sched.with_noise(None), t, x)))(x)
    return dlogp_dt, u, grad, tr(jac_u), tr(jac_s), lap, div, u0, tr(jac0)


@pytest.mark.parametrize(
    "name, kind",
    [("linear+brownian", "joint"), ("trig(brownian)", "normal_source")],
)
def test_continuity_and_fokker_planck_with_noise(x64, name, kind):
    """The probability-flow drift u and the SDE family drift u + eps s with diffusion
    sqrt(2 eps), eps in {0, 0.5, 2}, keep p_t: in log form,
    d_t log p = -div f - f . grad log p + eps (Lap log p + |grad log p|^2), f = u + eps s.
    All terms by autodiff of the engine; the closed-form divergence and score against autodiff.
    """
    sched = NOISY[name]
    c = _coupling(kind, d=3)
    arg = c if kind == "joint" else exact.prepare(c)
    t = 0.37
    x = _points(arg, n=12)
    dt, u, grad, div_u, div_s, lap, div, u0, div0 = _pde_terms(arg, sched, jnp.asarray(t), x)
    np.testing.assert_allclose(div, div_u, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(exact.score(arg, sched, t, x), grad, rtol=1e-9, atol=1e-9)
    for eps in (0.0, 0.5, 2.0):
        f = u + eps * grad
        div_f = div_u + eps * div_s
        diff = eps * (lap + jnp.sum(grad * grad, -1))
        drift = -div_f - jnp.sum(f * grad, -1)
        scale = jnp.abs(dt) + jnp.abs(div_f) + jnp.abs(jnp.sum(f * grad, -1)) + jnp.abs(diff)
        assert jnp.max(jnp.abs(dt - drift - diff) / scale) < 1e-9, eps  # float64 round-off
        if eps > 0:  # control: diffusion sqrt(eps) instead of sqrt(2 eps) breaks it
            assert jnp.max(jnp.abs(dt - drift - 0.5 * diff) / scale) > 1e-3
    # Control: the velocity of the same path without its noise term does not transport p_t.
    res0 = dt + div0 + jnp.sum(u0 * grad, -1)
    assert jnp.max(jnp.abs(res0)) > 1e-3


def test_small_noise_limit_is_the_noise_free_engine(x64):
    """gamma = 1e-7 sqrt(t (1 - t)): gamma^2 and gamma dgamma <= 5e-15, so every quantity is
    the gamma = 0 engine's to 1e-10 (per-time and time-free paths); sigma = 1e-2 is not."""
    c = _coupling("joint")
    cn = exact.prepare(_coupling("normal_source"))
    base = schedules.cosine()
    for arg in (c, cn):
        x = _points(arg)
        for t in (0.0, 0.3, 1.0):
            plain = exact.evaluate(arg, base, t, x, _QS)
            tiny = exact.evaluate(arg, base.with_noise(schedules.brownian(1e-7)), t, x, _QS)
            small = exact.evaluate(arg, base.with_noise(schedules.brownian(1e-2)), t, x, _QS)
            for q in _QS:
                assert _rel(getattr(tiny, q), getattr(plain, q)) < 1e-10, (q, t)
            assert _rel(small.velocity, plain.velocity) > 1e-6  # control


@pytest.mark.parametrize(
    "name, kind",
    [
        ("linear+brownian", "normal_source"),
        ("trig(brownian)", "isotropic_target"),
        pytest.param("vp+sinesquared", "normal_source", marks=pytest.mark.slow),
    ],
)
def test_time_free_path_keeps_diagonal_noise(x64, name, kind, kernel_calls):
    """S00 = I or S11 = c I: V^T V is diagonal, the time-free path is taken with noise (shared
    and per-point t) and agrees with the per-time Cholesky path to 1e-10."""
    sched = NOISY[name]
    c = _coupling(kind, d=3)
    prepared = exact.prepare(c)
    assert prepared.independent and prepared.noise_diagonal
    calls = kernel_calls
    x = _points(c)
    for t in (0.0, 1e-3, 0.5, sched.t_max):
        got = exact.evaluate(prepared, sched, t, x, _QS)
        want = exact.evaluate(c, sched, t, x, _QS)  # raw coupling, shared t: per-time path
        for q in _QS:
            assert _rel(getattr(got, q), getattr(want, q)) < 1e-10, (q, t)
    assert calls.count("pencil") == 4
    n = 40
    ts = jax.random.uniform(jax.random.key(1), (n,)) * sched.t_max
    ts = ts.at[:3].set(jnp.array([0.0, 1e-3, sched.t_max]))
    x = 2.0 * jax.random.normal(jax.random.key(2), (n, 3))
    got = exact.evaluate(prepared, sched, ts, x, _QS)
    auto = exact.evaluate(c, sched, ts, x, _QS)  # unprepared: V^T V checked on device
    assert calls.count("pencil") == 6
    want = exact.evaluate(exact.prepare(c, independent=False), sched, ts, x, _QS)
    assert calls.count("pencil") == 6  # the per-point Cholesky path
    for q in _QS:
        assert _rel(getattr(got, q), getattr(want, q)) < 1e-10, q
        np.testing.assert_array_equal(getattr(got, q), getattr(auto, q))


def test_noise_not_diagonal_falls_back_to_the_per_time_path(x64, kernel_calls):
    """General S00, S11: V^T V is not diagonal, so a noisy schedule takes the per-time path (and
    matches the reference) while a noise-free one keeps the time-free path. Control: forcing the
    time-free path with noise (``noise_diagonal=True``) drops V^T V's off-diagonal: wrong."""
    c = _coupling("independent", d=3)
    prepared = exact.prepare(c)
    assert prepared.independent and not prepared.noise_diagonal
    sched = NOISY["trig(brownian)"]
    calls = kernel_calls
    x = _points(c)
    ts = jnp.linspace(0.0, 1.0, x.shape[0])
    got = exact.evaluate(prepared, sched, 0.4, x, _QS)
    got_pp = exact.evaluate(prepared, sched, ts, x, _QS)
    assert "pencil" not in calls
    got_auto = exact.evaluate(c, sched, ts, x, _QS)  # unprepared: V^T V checked on device,
    assert calls[-2:] == ["pencil", "cholesky_points"]  # both traced, the second one runs
    calls.clear()
    exact.evaluate(prepared, sched.with_noise(None), ts, x, _QS)
    assert calls == ["pencil"]
    want = reference(c.weights, c.means, c.covs, sched, 0.4, x, divergence=True)
    for q, w in zip(_QS, (want[0], want[1], want[2], want[4]), strict=True):
        assert _rel(getattr(got, q), w) < 1e-10, q
    for i in (0, 5, x.shape[0] - 1):
        want = reference(c.weights, c.means, c.covs, sched, float(ts[i]), x[i : i + 1])
        assert _rel(got_pp.velocity[i], want[0][0]) < 1e-10
        assert _rel(got_auto.log_prob[i], want[1][0]) < 1e-10
    forced = exact.prepare(c, noise_diagonal=True)  # one t per point: the time-free kernel
    assert _rel(exact.velocity(forced, sched, ts, x), got_pp.velocity) > 1e-3


def test_prepare_noise_flag_arguments():
    c = _coupling("normal_source")
    with pytest.raises(TypeError, match="exact.prepare: `noise_diagonal` must be None, True"):
        exact.prepare(c, noise_diagonal=1)
    assert not exact.prepare(c, independent=False).noise_diagonal  # no factors, no flag
    traced = jax.jit(lambda c: exact.prepare(c, independent=True))(c)
    assert traced.independent and not traced.noise_diagonal  # traced factors: not inspected
    declared = jax.jit(lambda c: exact.prepare(c, independent=True, noise_diagonal=True))(c)
    assert declared.noise_diagonal
