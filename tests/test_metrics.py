"""Metrics against closed forms, exact references and identities.

Monte Carlo tolerances: where an estimator is random, R independent replicates are drawn (vmapped)
and the replicate mean is compared with the exact expectation within Z standard errors
(SE = replicate std / sqrt(R)); Z = 5 keeps a false failure below ~1e-4 for R >= 16 (t tails),
while a wrong formula (e.g. a missing factor or a biased estimator) moves the mean by many SE.
"""

import functools
import itertools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import fmjax
from fmjax import metrics
from fmjax.metrics import kernels

Z = 5.0


def _normal(key, n, mean, std):
    mean = jnp.asarray(mean, dtype=jnp.result_type(float))
    return mean[None] + jnp.asarray(std) * jax.random.normal(key, (n, mean.shape[0]), mean.dtype)


def _replicates(fn, key, r):
    """fn(key) -> scalar for r independent keys: (mean, standard error of the mean)."""
    vals = np.asarray(jax.vmap(fn)(jax.random.split(key, r)), dtype=np.float64)
    return vals.mean(), vals.std(ddof=1) / math.sqrt(r)


def _mean_abs_normal(mu, s, d):
    """E|Z| for Z ~ N(mu, s^2 I_d), d in {1, 2}: folded normal (d = 1), Rice mean (d = 2)."""
    nu = float(np.linalg.norm(mu))
    if d == 1:
        return s * math.sqrt(2 / math.pi) * math.exp(-(nu**2) / (2 * s * s)) + nu * (
            1 - 2 * special.ndtr(-nu / s)
        )
    x = -(nu**2) / (2 * s * s)
    # Laguerre L_{1/2}(x) = e^{x/2} [(1 - x) I0(-x/2) - x I1(-x/2)], with scaled Bessels ive.
    lag = (1 - x) * special.ive(0, -x / 2) - x * special.ive(1, -x / 2)
    return s * math.sqrt(math.pi / 2) * lag


def _energy_closed(delta, d):
    """Energy distance between N(0, I_d) and N(delta, I_d): X - Y ~ N(-delta, 2 I)."""
    s = math.sqrt(2.0)
    return 2 * _mean_abs_normal(delta, s, d) - 2 * _mean_abs_normal(np.zeros(d), s, d)


# ----------------------------------------------------------------------------- energy distance


def test_mean_abs_normal_reference_against_numpy():
    # The closed forms used below, checked once against a large numpy sample (SE ~ 1e-3).
    rng = np.random.default_rng(0)
    for d, mu in ((1, np.array([0.7])), (2, np.array([1.0, -0.5]))):
        z = mu + 1.3 * rng.standard_normal((400_000, d))
        est = np.linalg.norm(z, axis=1)
        assert abs(est.mean() - _mean_abs_normal(mu, 1.3, d)) < Z * est.std() / math.sqrt(len(z))


@pytest.mark.parametrize("d", [1, 2])
def test_energy_distance_matches_gaussian_closed_form(d, key):
    delta = np.full(d, 0.8)
    n, r = 600, 16

    def one(k):
        kx, ky = jax.random.split(k)
        return metrics.energy_distance(_normal(kx, n, np.zeros(d), 1.0), _normal(ky, n, delta, 1.0))

    mean, se = _replicates(one, key, r)
    exact = _energy_closed(delta, d)
    assert exact > 10 * se  # the law difference is clearly resolved
    assert abs(mean - exact) < Z * se + 1e-4, (mean, exact, se)


def test_energy_distance_same_law_u_and_v_statistic_expectations(key):
    # Same law N(0, I_2): the U-statistic has expectation 0 exactly; the V-statistic
    # 2 E|X - X'| / n (for n = m), with E|X - X'| = sqrt(pi) in 2-D.
    n, r = 400, 24

    def both(k):
        kx, ky = jax.random.split(k)
        x, y = _normal(kx, n, np.zeros(2), 1.0), _normal(ky, n, np.zeros(2), 1.0)
        return jnp.stack(
            [metrics.energy_distance(x, y), metrics.energy_distance(x, y, unbiased=False)]
        )

    vals = np.asarray(jax.vmap(both)(jax.random.split(key, r)), np.float64)
    mean, se = vals.mean(0), vals.std(0, ddof=1) / math.sqrt(r)
    assert abs(mean[0]) < Z * se[0], (mean, se)
    v_expect = 2 * math.sqrt(math.pi) / n
    assert abs(mean[1] - v_expect) < Z * se[1], (mean, v_expect, se)
    # Scale of the same-law value: O(E|X - X'| / n), far below the different-law value above.
    assert np.all(np.abs(vals[:, 0]) < 10 * math.sqrt(math.pi) / n)


def test_energy_distance_blocks_and_jit_agree_with_direct_formula(key, x64, monkeypatch):
    # Independent reference: all pairwise distances by broadcasting (float64, small n).
    kx, ky = jax.random.split(key)
    x, y = jax.random.normal(kx, (37, 3)), 2.0 + jax.random.normal(ky, (23, 3))
    dxy = np.linalg.norm(np.asarray(x)[:, None] - np.asarray(y)[None], axis=-1)
    dxx = np.linalg.norm(np.asarray(x)[:, None] - np.asarray(x)[None], axis=-1)
    dyy = np.linalg.norm(np.asarray(y)[:, None] - np.asarray(y)[None], axis=-1)
    u = 2 * dxy.mean() - dxx.sum() / (37 * 36) - dyy.sum() / (23 * 22)
    v = 2 * dxy.mean() - dxx.mean() - dyy.mean()
    monkeypatch.setattr(kernels, "_PAIR_BUDGET", 200)  # force several padded row blocks
    np.testing.assert_allclose(metrics.energy_distance(x, y), u, rtol=1e-10)
    np.testing.assert_allclose(jax.jit(metrics.energy_distance)(x, y), u, rtol=1e-10)
    np.testing.assert_allclose(metrics.energy_distance(x, y, unbiased=False), v, rtol=1e-10)


def test_energy_distance_gradient_is_finite_at_coincident_points(key):
    x = jax.random.normal(key, (8, 2))
    g = jax.grad(lambda a: metrics.energy_distance(a, x[::-1], unbiased=False))(x)
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------- MMD


def _rbf_mean(delta, var, d, bws):
    """E sum_h exp(-|Z|^2 / 2h^2) for Z ~ N(delta, var I_d)."""
    nu2 = float(np.sum(np.square(delta)))
    return sum(
        (h * h / (h * h + var)) ** (d / 2) * math.exp(-nu2 / (2 * (h * h + var))) for h in bws
    )


def test_mmd_matches_gaussian_closed_form_and_is_unbiased_under_null(key):
    d, n, r = 2, 400, 16
    bws = (0.5, 1.0, 2.0)
    delta = np.array([0.6, 0.0])
    s1, s2 = 1.0, 1.5  # N(0, s1^2 I) vs N(delta, s2^2 I)
    exact = (
        _rbf_mean(np.zeros(d), 2 * s1**2, d, bws)
        + _rbf_mean(np.zeros(d), 2 * s2**2, d, bws)
        - 2 * _rbf_mean(delta, s1**2 + s2**2, d, bws)
    )

    def pair(k):
        kx, ky, kz = jax.random.split(k, 3)
        x, y = _normal(kx, n, np.zeros(d), s1), _normal(ky, n, delta, s2)
        z = _normal(kz, n, np.zeros(d), s1)
        return jnp.stack([metrics.mmd(x, y, bws), metrics.mmd(x, z, bws)])

    vals = np.asarray(jax.vmap(pair)(jax.random.split(key, r)), np.float64)
    mean, se = vals.mean(0), vals.std(0, ddof=1) / math.sqrt(r)
    assert exact > 10 * se[0]
    assert abs(mean[0] - exact) < Z * se[0], (mean[0], exact, se[0])
    assert abs(mean[1]) < Z * se[1], (mean[1], se[1])  # unbiased: expectation 0 under P = Q


def test_mmd_validates_bandwidths(key):
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="metrics.mmd: `bandwidths` must be"):
        metrics.mmd(x, x, bandwidths=(1.0, -1.0))
    with pytest.raises(TypeError, match="bandwidths"):
        metrics.mmd(x, x, bandwidths="wide")
    with pytest.raises(ValueError, match="same dimension"):
        metrics.mmd(x, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="at least 2 points"):
        metrics.mmd(x[:1], x)
    assert np.isfinite(float(metrics.mmd(x[:2], x)))  # control: 2 points are enough


# ----------------------------------------------------------------------------- Wasserstein


def test_gaussian_w2_closed_form_special_cases(x64):
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2; commuting covariances: sum (sqrt a_i - sqrt b_i)^2.
    np.testing.assert_allclose(
        metrics.gaussian_w2(
            jnp.array([1.0]), jnp.array([[4.0]]), jnp.array([-1.0]), jnp.array([[0.25]])
        ),
        4.0 + 1.5**2,
        rtol=1e-12,
    )
    a, b = np.array([1.0, 3.0, 0.5]), np.array([2.0, 0.1, 0.5])
    q = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 3)))[0]
    got = metrics.gaussian_w2(jnp.zeros(3), q @ np.diag(a) @ q.T, jnp.ones(3), q @ np.diag(b) @ q.T)
    np.testing.assert_allclose(got, 3.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rtol=1e-10)


def test_w2_exact_matches_brute_force_over_permutations(key, x64):
    # n = 6: all 720 assignments enumerated; the Hungarian optimum must equal the minimum.
    kx, ky = jax.random.split(key)
    x, y = jax.random.normal(kx, (6, 2)), jax.random.normal(ky, (6, 2)) + 1.0
    c = np.sum((np.asarray(x)[:, None] - np.asarray(y)[None]) ** 2, axis=-1)
    best = min(c[np.arange(6), list(p)].mean() for p in itertools.permutations(range(6)))
    np.testing.assert_allclose(metrics.w2(x, y), best, rtol=1e-10)
    np.testing.assert_allclose(metrics.w2(x, y, squared=False), math.sqrt(best), rtol=1e-10)


def test_w2_exact_1d_equals_sorted_matching_and_jits(key):
    # In 1-D the optimal matching pairs order statistics (monotone rearrangement).
    kx, ky = jax.random.split(key)
    x, y = jax.random.normal(kx, (200, 1)), 0.5 + 2.0 * jax.random.normal(ky, (200, 1))
    ref = np.mean((np.sort(np.asarray(x[:, 0])) - np.sort(np.asarray(y[:, 0]))) ** 2)
    np.testing.assert_allclose(metrics.w2(x, y), ref, rtol=1e-5)  # float32 cost round-off
    np.testing.assert_allclose(jax.jit(metrics.w2)(x, y), ref, rtol=1e-5)


def _whitened(key, n):
    """n points in R^2 with sample mean exactly 0 and sample covariance exactly I."""
    z = jax.random.normal(key, (n, 2))
    z = z - jnp.mean(z, axis=0)[None]
    chol = jnp.linalg.cholesky(jnp.matmul(z.T, z, precision="highest") / n)
    return jax.scipy.linalg.solve_triangular(chol, z.T, lower=True).T


def test_w2_exact_and_entropic_against_gaussian_closed_form(key):
    # Samples with exactly the first two moments of N(m1, I) and N(m2, diag(sd2^2)). Gelbrich's
    # bound: any two measures with these moments have W2^2 >= the Gaussian closed form, so the
    # exact empirical value can only exceed it; the excess is the discrete matching bias,
    # O(log n / n) in 2-D (measured 0.08-0.12 over 8 seeds at n = 256): bound it by 0.2.
    n = 256
    kx, ky = jax.random.split(key)
    m1, m2 = jnp.zeros(2), jnp.array([2.0, 0.0])
    sd2 = jnp.array([2.0, 0.5])
    x = _whitened(kx, n) + m1[None]
    y = _whitened(ky, n) * sd2[None] + m2[None]
    closed = float(metrics.gaussian_w2(m1, jnp.eye(2), m2, jnp.diag(sd2**2)))  # 4 + 1.25
    exact = float(metrics.w2(x, y))
    assert -1e-4 < exact - closed < 0.2, (exact, closed)  # 1e-4: float32 round-off of costs
    # Translation identity of OT with uniform weights (the plan is unchanged):
    # W2^2(x, y + c) = W2^2(x, y) + |c|^2 + 2 c . (mean(y) - mean(x)).
    c = jnp.array([1.0, -1.0])
    shifted = float(metrics.w2(x, y + c[None]))
    np.testing.assert_allclose(shifted - exact, float(c @ c + 2 * c @ (m2 - m1)), rtol=1e-4)
    # Debiased Sinkhorn divergence vs the discrete optimum on the same samples: they differ by
    # O(epsilon) (measured -3e-3 at epsilon = 0.01 over 3 seeds); 3 epsilon leaves margin.
    entropic = float(metrics.w2(x, y, epsilon=0.01))
    assert abs(entropic - exact) < 0.03, (entropic, exact)


def test_w2_validates(key):
    x = jnp.zeros((5, 2))
    with pytest.raises(ValueError, match="metrics.w2: `y` must be the same number of points"):
        metrics.w2(x, jnp.zeros((6, 2)))
    with pytest.raises(ValueError, match="metrics.w2: `epsilon` must be"):
        metrics.w2(x, x, epsilon=-1.0)
    with pytest.raises(TypeError, match="epsilon"):
        metrics.w2(x, x, epsilon="small")
    with pytest.raises(ValueError, match=r"`x` must be an array of shape \(n, d\)"):
        metrics.w2(jnp.zeros(5), x)
    with pytest.raises(ValueError, match=r"gaussian_w2: `cov2` must be an array of shape"):
        metrics.gaussian_w2(jnp.zeros(2), jnp.eye(2), jnp.zeros(2), jnp.eye(3))


def test_sliced_wasserstein_1d_equals_w2_and_matches_closed_form(key):
    # d = 1: every direction is +-1, so SW_2^2 = W2^2 of the empirical measures exactly
    # (sorted matching), whose expectation is (m1 - m2)^2 + (s1 - s2)^2 up to O(log n / n).
    n, r = 500, 16

    def one(k):
        kx, ky, kp = jax.random.split(k, 3)
        x, y = _normal(kx, n, [0.0], 1.0), _normal(ky, n, [1.5], 2.0)
        sw = metrics.sliced_wasserstein(x, y, key=kp, n_projections=4)
        ref = jnp.mean(jnp.square(jnp.sort(x[:, 0]) - jnp.sort(y[:, 0])))
        return jnp.stack([sw, ref])

    vals = np.asarray(jax.vmap(one)(jax.random.split(key, r)), np.float64)
    np.testing.assert_allclose(vals[:, 0], vals[:, 1], rtol=1e-5)
    mean, se = vals[:, 0].mean(), vals[:, 0].std(ddof=1) / math.sqrt(r)
    assert abs(mean - (1.5**2 + 1.0)) < Z * se + 0.02, (mean, se)  # 0.02: sampling bias


def test_sliced_wasserstein_2d_isotropic_closed_form(key):
    # N(0, s1^2 I) vs N(delta, s2^2 I): projections give 1-D Gaussians, and averaging
    # (theta . delta)^2 over the circle gives SW_2^2 = |delta|^2 / 2 + (s1 - s2)^2.
    n, r = 400, 16
    delta = jnp.array([1.0, 1.0])

    def one(k):
        kx, ky, kp = jax.random.split(k, 3)
        x, y = _normal(kx, n, [0.0, 0.0], 1.0), _normal(ky, n, delta, 0.5)
        return metrics.sliced_wasserstein(x, y, key=kp, n_projections=64)

    mean, se = _replicates(one, key, r)
    assert abs(mean - (1.0 + 0.25)) < Z * se + 0.02, (mean, se)


def test_sliced_wasserstein_key_is_keyword_only_and_validates(key):
    x = jnp.zeros((5, 2))
    with pytest.raises(TypeError):
        metrics.sliced_wasserstein(key, x, x)  # the old (key, x, y) order
    with pytest.raises(TypeError, match="sliced_wasserstein: `key` must be a PRNG key"):
        metrics.sliced_wasserstein(x, x, key=0)
    with pytest.raises(ValueError, match="sliced_wasserstein: `p` must be a number >= 1"):
        metrics.sliced_wasserstein(x, x, key=key, p=0.5)
    with pytest.raises(ValueError, match="`n_projections` must be an int >= 1"):
        metrics.sliced_wasserstein(x, x, key=key, n_projections=0)
    assert float(metrics.sliced_wasserstein(x, x, key=key, n_projections=2)) == 0.0  # control


# ----------------------------------------------------------------------------- model errors


# Jitted once per velocity pair (static callables): eager dispatch of the vmapped exact field is
# several times slower than compiling it.
_velocity_error = jax.jit(
    metrics.velocity_error, static_argnums=(0, 4), static_argnames=("reference",)
)


def _problem(key, d=2):
    return fmjax.random_joint_mixture(key, 3, d, mean_scale=2.0), fmjax.schedules.cosine()


def test_velocity_error_zero_for_exact_and_offset_squared(key, x64):
    c, s = _problem(key)
    ts = jnp.linspace(0.05, 0.95, 5)
    u = functools.partial(fmjax.exact.velocity, c, s)
    err0 = _velocity_error(u, c, s, ts, 64, key=key)  # reference None: the exact field
    assert err0.shape == (5,)
    np.testing.assert_allclose(err0, 0.0, atol=1e-24)  # identical computation: exactly zero
    off = jnp.array([0.3, -1.2])
    shifted = lambda t, x: u(t, x) + off[None]  # noqa: E731
    err = _velocity_error(shifted, c, s, ts, 64, key=key)
    np.testing.assert_allclose(err, float(off @ off), rtol=1e-12)
    # The same field as an explicit reference: the roles swap, the error is the same.
    err_ref = _velocity_error(u, c, s, ts, 64, key=key, reference=shifted)
    np.testing.assert_allclose(err_ref, float(off @ off), rtol=1e-12)


def test_velocity_error_samples_p_t(key):
    # velocity 0 vs reference x gives E|X_t|^2 = sum_k w_k (tr S_k + |mu_k|^2) of p_t: checks
    # that X_t is drawn from the right path (schedule and coupling) at every time.
    c, s = _problem(key)
    ts = jnp.array([0.0, 0.3, 0.7, 1.0])
    n = 4000
    err = _velocity_error(
        lambda t, x: jnp.zeros_like(x), c, s, ts, n, key=jax.random.key(3), reference=lambda t, x: x
    )
    for t, e in zip(np.asarray(ts), np.asarray(err), strict=True):
        p = fmjax.exact.marginal(c, s, t)
        m2 = float(
            jnp.sum(p.weights * (jnp.trace(p.covs, axis1=1, axis2=2) + jnp.sum(p.means**2, axis=1)))
        )
        sq = np.sum(np.asarray(p.sample(jax.random.key(9), n)) ** 2, axis=1)
        assert abs(e - m2) < Z * sq.std() / math.sqrt(n), (t, e, m2)


def test_velocity_error_validates(key):
    c, s = _problem(key)
    u = functools.partial(fmjax.exact.velocity, c, s)
    ts = jnp.array([0.5])
    fn = "metrics.velocity_error"
    with pytest.raises(ValueError, match=f"{fn}: `ts` must be in \\[0, 1\\]"):
        metrics.velocity_error(u, c, s, jnp.array([0.5, 1.5]), 8, key=key)
    with pytest.raises(ValueError, match=f"{fn}: `ts` must be a non-empty array of shape"):
        metrics.velocity_error(u, c, s, jnp.ones((2, 2)) / 2, 8, key=key)
    with pytest.raises(TypeError, match=f"{fn}: `coupling` must be a JointGaussianMixture"):
        metrics.velocity_error(u, c.target(), s, ts, 8, key=key)
    with pytest.raises(TypeError, match=f"{fn}: `schedule` must be an fmjax Schedule"):
        metrics.velocity_error(u, c, "linear", ts, 8, key=key)
    with pytest.raises(ValueError, match=f"{fn}: `n` must be an int >= 1, got 0"):
        metrics.velocity_error(u, c, s, ts, 0, key=key)
    with pytest.raises(TypeError, match=f"{fn}: `n` must be an int"):
        metrics.velocity_error(u, c, s, ts, 8.0, key=key)
    with pytest.raises(TypeError, match=f"{fn}: `reference` must be None or a velocity field"):
        metrics.velocity_error(u, c, s, ts, 8, key=key, reference=3.0)
    with pytest.raises(TypeError, match=f"{fn}: `key` must be a PRNG key"):
        metrics.velocity_error(u, c, s, ts, 8, key=None)
    assert metrics.velocity_error(u, c, s, ts, 8, key=key).shape == (1,)  # control


def test_velocity_error_key_and_reference_are_keyword_only(key):
    # The old order (velocity, reference, coupling, schedule, key, ts, n) and a positional key
    # are both TypeErrors (Python's own: the signature has no seventh positional argument).
    c, s = _problem(key)
    u = functools.partial(fmjax.exact.velocity, c, s)
    ts = jnp.array([0.5])
    with pytest.raises(TypeError):
        metrics.velocity_error(u, None, c, s, key, ts, 8)
    with pytest.raises(TypeError):
        metrics.velocity_error(u, c, s, ts, 8, key)
    with pytest.raises(TypeError):
        metrics.velocity_error(u, c, s, ts, 8, key, None)


def test_velocity_error_respects_the_schedule_interval(key):
    # VP is singular at t = 1: its valid interval ends at 1 - eps. Times up to t_max give finite
    # errors (control); a concrete time beyond it is refused instead of returning NaN.
    c, _ = _problem(key)
    vp = fmjax.schedules.vp()
    zero = lambda t, x: jnp.zeros_like(x)  # noqa: E731
    ok = metrics.velocity_error(zero, c, vp, jnp.array([vp.t_min, 0.5, vp.t_max]), 16, key=key)
    assert np.all(np.isfinite(np.asarray(ok)))
    with pytest.raises(ValueError, match=r"metrics.velocity_error: `ts` must be in \[0, 0.999\]"):
        metrics.velocity_error(zero, c, vp, jnp.array([0.5, 1.0]), 16, key=key)


def test_nll_of_gaussian_samples_is_entropy(key):
    cov = jnp.array([[2.0, 0.3], [0.3, 0.5]])
    p = fmjax.GaussianMixture(jnp.ones(1), jnp.array([[1.0, -1.0]]), cov[None])
    x = p.sample(key, 20_000)
    entropy = 0.5 * math.log(np.linalg.det(2 * math.pi * math.e * np.asarray(cov)))
    lp = np.asarray(p.log_prob(x))
    assert abs(float(metrics.nll(p.log_prob, x)) - entropy) < Z * lp.std() / math.sqrt(len(lp))
    with pytest.raises(ValueError, match="samples"):
        metrics.nll(p.log_prob, x[0])


def test_nfe_to_accuracy_for_euler_on_linear_ode(key):
    # dx/dt = -x on [0, 1]: Euler with n steps gives (1 - 1/n)^n x0, exact e^{-1} x0. The RMSE is
    # |(1 - 1/n)^n - e^{-1}| * rms(x0), so the answer is computable by hand.
    x0 = jax.random.normal(key, (100, 2))

    def solve(n):
        def step(x, _):
            return x - x / n, None

        return jax.lax.scan(step, x0, None, length=n)[0]

    rms = float(jnp.sqrt(jnp.mean(jnp.sum(x0**2, axis=1))))
    counts = [1, 2, 4, 8, 16, 32, 64, 128]
    tol = 0.01 * rms
    want = min(c for c in counts if abs((1 - 1 / c) ** c - math.exp(-1)) * rms <= tol)
    res = metrics.nfe_to_accuracy(solve, math.exp(-1) * x0, counts, tol, evals_per_step=2)
    assert res.n_steps == want and res.nfe == 2 * want
    assert res.step_counts[-1] == want  # stopped early
    full = metrics.nfe_to_accuracy(solve, math.exp(-1) * x0, counts, 1e-9, stop_early=True)
    assert full.nfe is None and len(full.errors) == len(counts)
    assert all(a > b for a, b in itertools.pairwise(full.errors))  # Euler error decreases


def test_nll_and_nfe_to_accuracy_validate():
    x = jnp.zeros((3, 2))
    with pytest.raises(TypeError, match="metrics.nll: `target_log_prob` must be a callable"):
        metrics.nll(None, x)
    with pytest.raises(ValueError, match=r"metrics.nll: `target_log_prob` must be a map"):
        metrics.nll(lambda a: a, x)
    fn = "metrics.nfe_to_accuracy"
    with pytest.raises(ValueError, match=f"{fn}: `step_counts` must be an int >= 1, got 0"):
        metrics.nfe_to_accuracy(lambda c: x, x, [0, 2], 0.1)
    with pytest.raises(ValueError, match=f"{fn}: `step_counts` must be a non-empty"):
        metrics.nfe_to_accuracy(lambda c: x, x, [], 0.1)
    with pytest.raises(ValueError, match=f"{fn}: `tol` must be a finite number > 0"):
        metrics.nfe_to_accuracy(lambda c: x, x, [1], 0.0)
    assert metrics.nfe_to_accuracy(lambda c: x, x, [1], 0.1).nfe == 1  # control


def test_optional_ott_names_its_extra(monkeypatch, key):
    # sys.modules[name] = None makes `import name` fail, as when ott-jax is not installed.
    x = jnp.zeros((4, 2))
    monkeypatch.setitem(sys.modules, "ott", None)
    with pytest.raises(ImportError, match=r"metrics.w2 needs ott-jax.*fmjax\[ot\]"):
        metrics.w2(x, x)
    with pytest.raises(ImportError, match=r"metrics.sliced_wasserstein needs ott-jax"):
        metrics.sliced_wasserstein(x, x, key=key)
    assert float(metrics.energy_distance(x, x + 1.0)) > 0  # control: the kernels need no ott


def test_complex_points_are_a_type_error(key):
    """Complex point clouds used to be accepted (a complex or real-part-only distance)."""
    x = jnp.zeros((3, 2))
    with pytest.raises(TypeError, match=r"metrics.energy_distance: `y` must be real"):
        metrics.energy_distance(x, x + 1j)
    with pytest.raises(TypeError, match=r"metrics.nll: `samples` must be real"):
        metrics.nll(lambda a: a[:, 0], x + 1j)
    assert float(metrics.energy_distance(x, x + 1.0)) > 0  # control
    assert float(metrics.nll(lambda a: a[:, 0], x)) == 0.0


# ----------------------------------------------------------------------------- component_stats


def _three_modes(dtype=None):
    return fmjax.GaussianMixture(
        jnp.array([0.2, 0.3, 0.5], dtype),
        jnp.array([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], dtype),
        jnp.array(
            [[[1.0, 0.3], [0.3, 0.5]], [[0.4, 0.0], [0.0, 0.8]], [[0.6, -0.2], [-0.2, 0.6]]], dtype
        ),
    )


def test_component_stats_consistent_for_exact_samples_two_sided(key, x64):
    """Exact samples give the mixture's own weights, means and spreads (the soft moments are
    unbiased: E[alpha_k X] = w_k m_k); shrinking each mode toward its mean by 30% (spread x 0.49)
    or widening it by 30% (x 1.69) moves every spread ratio far outside the noise band.

    Tolerance: n = 40000, the smallest weight 0.2 gives ~8000 points a mode, and the relative
    standard deviation of a 2-D trace is ~sqrt(2 / 8000 / 2) = 0.011: 0.06 is > 5 sigma.
    """
    p = _three_modes()
    x = p.sample(key, 40000)
    st = metrics.component_stats(x, p)
    np.testing.assert_allclose(st.weights, p.weights, atol=0.015)
    np.testing.assert_array_less(st.mean_error, 0.05)
    np.testing.assert_allclose(st.spread_ratio, 1.0, atol=0.06)
    np.testing.assert_allclose(st.covs, p.covs, atol=0.06)
    centre = p.means[jnp.argmax(p.responsibilities(x), axis=-1)]
    for factor, expected in ((0.7, 0.49), (1.3, 1.69)):
        moved = metrics.component_stats(centre + factor * (x - centre), p)
        np.testing.assert_allclose(moved.spread_ratio, expected, rtol=0.1)
        assert np.all(np.abs(moved.spread_ratio - 1.0) > 0.3)
    # a mode dropped shows in the weights
    dropped = metrics.component_stats(x[jnp.argmax(p.responsibilities(x), -1) != 0], p)
    assert dropped.weights[0] < 0.01 and abs(float(dropped.weight_error[0]) + 0.2) < 0.015


def test_component_stats_jits_and_validates(key):
    p = _three_modes()
    x = p.sample(key, 100)
    st = jax.jit(metrics.component_stats)(x, p)
    assert st.covs.shape == (3, 2, 2) and st.spread.shape == (3,)
    np.testing.assert_allclose(jnp.sum(st.weights), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="metrics.component_stats: `samples`"):
        metrics.component_stats(x[:, :1], p)
    with pytest.raises(TypeError, match="metrics.component_stats: `mixture`"):
        metrics.component_stats(x, fmjax.independent_coupling(p, p))


# ----------------------------------------------------------------------------- sample_checks


def test_sample_checks_two_sided_and_calibrated(key, x64):
    """The cross-entropy of exact samples is the entropy within its standard error: over R = 64
    independent pairs of exact samples (n = 1000) the z of ``cross_entropy_z`` has mean ~0 (Z
    standard errors: 1 / sqrt(64)) and std ~1 (a wrong standard error, e.g. without the sqrt(n)
    or one sample's only, moves it by > 40%). Controls: modes shrunk by 30% toward their means
    lower the cross-entropy by ~(1 - 0.49) d / 2 = 0.51 nats (d = 2, separated modes), widened
    by 30% raise it by ~0.69 nats; both are many standard errors away, and the worst spread
    ratio shows which way."""
    p = _three_modes()
    n, r = 1000, 64

    @jax.jit
    def draws(keys):  # 2r + 1 exact samples, then the last one shrunk and widened
        xs = jax.vmap(lambda k: p.sample(k, n))(keys)
        centre = p.means[jnp.argmax(p.responsibilities(xs[-1]), axis=-1)]
        moved = [centre + f * (xs[-1] - centre) for f in (0.7, 1.3)]
        return jnp.concatenate([xs, jnp.stack(moved)])

    batch = draws(jax.random.split(key, 2 * r + 1))
    x = batch[2 * r]
    c = jax.jit(jax.vmap(metrics.sample_checks, in_axes=(0, None)))(batch, p)  # one program
    a, b = (jax.tree.map(lambda v, s=s: v[s], c) for s in (slice(0, r), slice(r, 2 * r)))
    z = np.asarray(a.cross_entropy_z(b))
    assert abs(z.mean()) < Z / math.sqrt(r) and 0.7 < z.std() < 1.3, (z.mean(), z.std())
    one, shrunk, wide = (jax.tree.map(lambda v, i=i: v[i], c) for i in (2 * r, -2, -1))
    nlp = -p.log_prob(x)
    np.testing.assert_allclose(one.cross_entropy, nlp.mean())
    np.testing.assert_allclose(one.cross_entropy_stderr, nlp.std(ddof=1) / math.sqrt(n))
    assert one.weight_error.shape == one.spread_ratio.shape == (3,)
    for moved, factor, shift in ((shrunk, 0.7, -0.51), (wide, 1.3, 0.69)):
        diff = float(moved.cross_entropy - one.cross_entropy)
        assert abs(diff - shift) < 0.15, (factor, diff)
        assert abs(float(moved.cross_entropy_z(one))) > 8
        assert abs(float(moved.worst_spread_ratio) - factor**2) < 0.2
        assert (float(moved.worst_spread_ratio) - 1) * (factor - 1) > 0  # the right side
    with pytest.raises(ValueError, match=r"sample_checks: `samples` must be at least 2 points"):
        metrics.sample_checks(x[:1], p)
