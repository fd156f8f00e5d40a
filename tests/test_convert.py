"""Conversions velocity <-> x1 / x0 prediction <-> score against the exact GMM engine."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import convert, exact, schedules

SCHEDULES = [schedules.linear(), schedules.cosine(), schedules.polynomial(2.0), schedules.vp()]
TIMES = [0.05, 0.3, 0.5, 0.8, 0.95]


def _problem(d=2, k=3, seed=0):
    """Independent coupling of N(0, I) with a random GMM target (float64)."""
    p1 = fmjax.random_gaussian_mixture(jax.random.key(seed), k, d, mean_scale=2.0)
    p0 = fmjax.GaussianMixture(jnp.ones(1), jnp.zeros((1, d)), jnp.eye(d)[None])
    return fmjax.independent_coupling(p0, p1), p1


def _points(seed, n=64, d=2):
    return 2.0 * jax.random.normal(jax.random.key(seed), (n, d))


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s.name)
def test_velocity_to_score_matches_exact_score(x64, sched):
    c, _ = _problem()
    x = _points(1, n=80)
    t = jnp.asarray(TIMES)[jnp.arange(80) % len(TIMES)]  # each time on 16 points
    u = exact.velocity(c, sched, t, x)
    got = convert.velocity_to_score(sched, t, x, u)
    want = exact.score(c, sched, t, x)
    # float64 closed forms; the conversion divides by b D_t (>= ~0.05 here): 1e-10 is ~1e5 ulp.
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # and the inverse map recovers the exact velocity from the exact score
    np.testing.assert_allclose(
        convert.score_to_velocity(sched, t, x, want), u, rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s.name)
def test_x1_prediction_matches_tweedie(x64, sched):
    """E[X1 | x] from the velocity equals Tweedie's (x + b^2 s) / a with the exact score."""
    c, _ = _problem()
    x = _points(2)
    t = jnp.asarray(TIMES)[jnp.arange(64) % len(TIMES)]  # one time per point
    a, b, _, _ = sched(t)
    x1_tweedie = (x + (b * b)[:, None] * exact.score(c, sched, t, x)) / a[:, None]
    x1 = convert.velocity_to_x1(sched, t, x, exact.velocity(c, sched, t, x))
    np.testing.assert_allclose(x1, x1_tweedie, rtol=1e-9, atol=1e-9)  # /a (>= 0.0025): looser
    x0 = convert.velocity_to_x0(sched, t, x, exact.velocity(c, sched, t, x))
    np.testing.assert_allclose(
        x0, -b[:, None] * exact.score(c, sched, t, x), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s.name)
def test_round_trips(x64, sched):
    x = _points(3, n=40)
    y = _points(4, n=40)
    t = jnp.linspace(0.05, 0.95, 40)
    pairs = [
        (convert.velocity_to_x1, convert.x1_to_velocity),
        (convert.velocity_to_x0, convert.x0_to_velocity),
        (convert.velocity_to_score, convert.score_to_velocity),
        (convert.x1_to_x0, convert.x0_to_x1),
    ]
    for fwd, back in pairs:
        for f, g in ((fwd, back), (back, fwd)):
            np.testing.assert_allclose(
                g(sched, t, x, f(sched, t, x, y)),
                y,
                rtol=1e-9,
                atol=1e-9,
                err_msg=f"{f.__name__} then {g.__name__}",
            )
    # x1 and x0 predictions of the same velocity are consistent: x = a x1 + b x0
    a, b, _, _ = sched(t)
    x1 = convert.velocity_to_x1(sched, t, x, y)
    x0 = convert.velocity_to_x0(sched, t, x, y)
    np.testing.assert_allclose(a[:, None] * x1 + b[:, None] * x0, x, rtol=1e-10, atol=1e-10)


def test_well_posed_ends(x64):
    """At t = 0, x1 -> velocity is finite and exact; at t = 1, x0 -> velocity is (linear)."""
    c, p1 = _problem()
    x = _points(5)
    for sched in (schedules.linear(), schedules.cosine()):
        # E[X1 | X0 = x] = E[X1] for an independent coupling
        u0 = convert.x1_to_velocity(sched, 0.0, x, jnp.broadcast_to(p1.mean(), x.shape))
        np.testing.assert_allclose(u0, exact.velocity(c, sched, 0.0, x), rtol=1e-12, atol=1e-12)
        # E[X0 | X1 = x] = E[X0] = 0
        u1 = convert.x0_to_velocity(sched, 1.0, x, jnp.zeros_like(x))
        np.testing.assert_allclose(u1, exact.velocity(c, sched, 1.0, x), rtol=1e-12, atol=1e-12)
        u = exact.velocity(c, sched, 1.0, x)
        np.testing.assert_allclose(convert.velocity_to_x1(sched, 1.0, x, u), x, atol=1e-12)
        u = exact.velocity(c, sched, 0.0, x)
        np.testing.assert_allclose(convert.velocity_to_x0(sched, 0.0, x, u), x, atol=1e-12)
    # documented singularity: the score from a velocity at t = 1 (b = 0) is not finite
    s = convert.velocity_to_score(schedules.linear(), 1.0, x, x)
    assert not np.any(np.isfinite(s))


def test_as_velocity_and_from_velocity(x64):
    c, _ = _problem()
    sched = schedules.cosine()
    x = _points(6)
    t = jnp.linspace(0.1, 0.9, 64)
    vel = functools.partial(exact.velocity, c, sched)
    want = vel(t, x)
    for target in convert.TARGETS:
        pred = convert.from_velocity(vel, sched, target)
        back = jax.jit(convert.as_velocity(pred, sched, target))
        np.testing.assert_allclose(back(t, x), want, rtol=1e-10, atol=1e-10, err_msg=target)
    with pytest.raises(ValueError, match="target"):
        convert.as_velocity(vel, sched, "eps")


def test_broadcasting_scalar_and_batched_t():
    sched = schedules.linear()
    x = jnp.ones((3, 5, 2))
    u = jnp.full((3, 5, 2), 2.0)
    out_scalar = convert.velocity_to_x1(sched, 0.5, x, u)
    out_batched = convert.velocity_to_x1(sched, jnp.full((3, 5), 0.5), x, u)
    assert out_scalar.shape == (3, 5, 2)
    np.testing.assert_array_equal(out_scalar, out_batched)
    # x1 = (b u - db x) / D = 0.5 * 2 + 1 = 2 for the linear schedule at t = 1/2
    np.testing.assert_allclose(out_scalar, 2.0)


# ----------------------------------------------------------------------------- latent noise

NOISY = [
    schedules.linear().with_noise(schedules.brownian(0.7)),
    schedules.trig(schedules.brownian(1.0)),
    schedules.cosine().with_noise(schedules.sinesquared(0.5)),
]


def engine_has_gamma():
    """Whether fmjax.exact handles a schedule with noise (branch ENGINE-GAMMA merged)."""
    c, _ = _problem()
    noisy = schedules.linear().with_noise(schedules.brownian())
    try:
        cov = exact.marginal(c, noisy, 0.5).covs
    except Exception:  # noqa: BLE001 - an engine without gamma may refuse the schedule
        return False
    return not np.allclose(cov, exact.marginal(c, schedules.linear(), 0.5).covs)


needs_engine = pytest.mark.skipif(not engine_has_gamma(), reason="exact engine without gamma")


def _posterior_parts(seed, n=40, d=3):
    k = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(ki, (n, d), jnp.float64) for ki in k)


@pytest.mark.parametrize("sched", NOISY, ids=lambda s: s.name)
def test_noisy_conversions_by_algebra(x64, sched):
    """Build (x, u) from chosen (x0_hat, x1_hat, s) and recover each of them, t in (0, 1]."""
    x0h, x1h, s = _posterior_parts(7)
    t = jnp.linspace(0.05, 0.95, 40)
    a, b, da, db = (c[:, None] for c in sched(t))
    g, _, g_dg = (c[:, None] for c in sched.gamma(t))
    x = b * x0h + a * x1h - g * g * s  # eta = -gamma s
    v = db * x0h + da * x1h
    u = v - g_dg * s
    tol = dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(convert.velocity_to_x1(sched, t, x, u, score=s), x1h, **tol)
    np.testing.assert_allclose(convert.velocity_to_x0(sched, t, x, u, score=s), x0h, **tol)
    np.testing.assert_allclose(convert.x1_to_velocity(sched, t, x, x1h, score=s), u, **tol)
    np.testing.assert_allclose(convert.x0_to_velocity(sched, t, x, x0h, score=s), u, **tol)
    np.testing.assert_allclose(convert.x1_to_x0(sched, t, x, x1h, score=s), x0h, **tol)
    np.testing.assert_allclose(convert.x0_to_x1(sched, t, x, x0h, score=s), x1h, **tol)
    np.testing.assert_allclose(convert.drift_to_velocity(sched, t, x, v, score=s), u, **tol)
    np.testing.assert_allclose(convert.velocity_to_drift(sched, t, x, u, score=s), v, **tol)
    eta = convert.score_to_denoiser(sched, t, x, s)
    np.testing.assert_allclose(eta, -g * s, **tol)
    np.testing.assert_allclose(convert.denoiser_to_score(sched, t, x, eta), s, **tol)
    # control: dropping the score (the gamma = 0 formula) is wrong here
    assert not np.allclose(convert.velocity_to_x1(schedules.linear(), t, x, u), x1h, atol=1e-3)


def test_noisy_conversions_finite_at_the_ends(x64):
    """brownian: dgamma is inf at t = 0, 1; drift + score -> velocity stays finite there."""
    sched = schedules.linear().with_noise(schedules.brownian())
    x0h, v, s = _posterior_parts(8, n=4)
    for t in (0.0, 1.0):
        u = convert.drift_to_velocity(sched, t, x0h, v, score=s)
        np.testing.assert_allclose(u, v - (0.5 - t) * s, rtol=1e-12)  # g_dg = (1 - 2t) / 2
        assert np.all(np.isfinite(convert.score_to_denoiser(sched, t, x0h, s)))
    # documented singularity: s = -eta / gamma is 0 / 0 at the ends
    assert not np.any(np.isfinite(convert.denoiser_to_score(sched, 0.0, x0h, 0 * s)))


def test_noisy_conversions_refusals():
    sched = schedules.linear().with_noise(schedules.brownian())
    x = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="`score`"):
        convert.velocity_to_x1(sched, 0.5, x, x)
    with pytest.raises(ValueError, match="`schedule`"):
        convert.velocity_to_score(sched, 0.5, x, x)
    with pytest.raises(ValueError, match="`schedule`"):
        convert.score_to_velocity(sched, 0.5, x, x)
    with pytest.raises(ValueError, match="`schedule`"):
        convert.denoiser_to_score(schedules.linear(), 0.5, x, x)
    f = lambda t, x: x  # noqa: E731
    with pytest.raises(ValueError, match="`score`"):
        convert.as_velocity(f, sched, "drift")
    with pytest.raises(ValueError, match="`target`"):
        convert.as_velocity(f, sched, "denoiser", score=f)
    with pytest.raises(ValueError, match="`schedule`"):
        convert.as_velocity(f, sched, "score")
    # without noise a score is not needed and drift = velocity
    np.testing.assert_array_equal(convert.as_velocity(f, schedules.linear(), "drift")(0.5, x), x)


@needs_engine
@pytest.mark.parametrize("sched", NOISY, ids=lambda s: s.name)
def test_noisy_conversions_match_exact_engine(x64, sched):
    """With the exact velocity and score: drift, x1/x0 predictions agree with the definitions."""
    c = fmjax.random_joint_mixture(jax.random.key(3), 3, 2, mean_scale=2.0)
    x = _points(9, n=60)
    t = jnp.asarray([0.0, 1e-3, 0.3, 0.5, 0.999, 1.0])[jnp.arange(60) % 6]
    ev = exact.evaluate(c, sched, t, x, ("velocity", "score"))
    u, s = ev.velocity, ev.score
    score = functools.partial(exact.score, c, sched)
    vel = functools.partial(exact.velocity, c, sched)
    x1 = convert.velocity_to_x1(sched, t, x, u, score=s)
    x0 = convert.velocity_to_x0(sched, t, x, u, score=s)
    a, b, _, _ = (q[:, None] for q in sched(t))
    g = sched.gamma(t)[0][:, None]
    # x = b x0_hat + a x1_hat + gamma eta holds by construction; the drift round trip too
    np.testing.assert_allclose(b * x0 + a * x1 - g * g * s, x, atol=1e-9)
    v = convert.velocity_to_drift(sched, t, x, u, score=s)
    assert np.all(np.isfinite(v))
    back = jax.jit(convert.as_velocity(convert.from_velocity(vel, sched, "drift", score=score),
                                       sched, "drift", score=score))  # fmt: skip
    np.testing.assert_allclose(back(t, x), u, rtol=1e-10, atol=1e-10)
    # Independent check of x1_hat = E[X1 | X_t = x]: Gaussian conditioning per component,
    # weighted by the exact responsibilities (NumPy, float64).
    resp = np.asarray(exact.responsibilities(c, sched, t, x))
    w, m, S = (np.asarray(q) for q in (c.weights, c.means, c.covs))
    a_, b_, g_ = (np.asarray(q)[:, 0] for q in (a, b, g))
    want = np.zeros_like(np.asarray(x))
    for i in range(x.shape[0]):
        for k in range(len(w)):
            S00, S01, S10, S11 = S[k, :2, :2], S[k, :2, 2:], S[k, 2:, :2], S[k, 2:, 2:]
            var = (b_[i] ** 2 * S00 + a_[i] * b_[i] * (S01 + S10) + a_[i] ** 2 * S11
                   + g_[i] ** 2 * np.eye(2))  # fmt: skip
            cov1 = b_[i] * S10 + a_[i] * S11  # Cov(X1, X_t)
            mu = b_[i] * m[k, :2] + a_[i] * m[k, 2:]
            cond = m[k, 2:] + cov1 @ np.linalg.solve(var, np.asarray(x[i]) - mu)
            want[i] += resp[i, k] * cond
    np.testing.assert_allclose(x1, want, rtol=1e-8, atol=1e-8)
    # At t = 0 and 1: X_0 = x0 exactly (x0_hat = x), X_1 = x1 (x1_hat = x).
    at0 = t == 0.0
    np.testing.assert_allclose(x0[at0], x[at0], atol=1e-9)
    at1 = t == 1.0
    np.testing.assert_allclose(x1[at1], x[at1], atol=1e-9)
