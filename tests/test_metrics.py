"""Metrics against closed forms, exact references and identities.

Monte Carlo tolerances: where an estimator is random, R independent replicates are drawn (vmapped)
and the replicate mean is compared with the exact expectation within Z standard errors
(SE = replicate std / sqrt(R)); Z = 5 keeps a false failure below ~1e-4 for R >= 16 (t tails),
while a wrong formula (e.g. a missing factor or a biased estimator) moves the mean by many SE.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import fmjax
from fmjax import _kernel_distances, metrics

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
    monkeypatch.setattr(_kernel_distances, "_PAIR_BUDGET", 200)  # force several padded row blocks
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
    with pytest.raises(ValueError, match="bandwidths"):
        metrics.mmd(x, x, bandwidths=(1.0, -1.0))
    with pytest.raises(ValueError, match="same dimension"):
        metrics.mmd(x, jnp.zeros((4, 3)))


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
    with pytest.raises(ValueError, match="equal sample sizes"):
        metrics.w2(x, jnp.zeros((6, 2)))
    with pytest.raises(ValueError, match="epsilon"):
        metrics.w2(x, x, epsilon=-1.0)
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        metrics.w2(jnp.zeros(5), x)


def test_sliced_wasserstein_1d_equals_w2_and_matches_closed_form(key):
    # d = 1: every direction is +-1, so SW_2^2 = W2^2 of the empirical measures exactly
    # (sorted matching), whose expectation is (m1 - m2)^2 + (s1 - s2)^2 up to O(log n / n).
    n, r = 500, 16

    def one(k):
        kx, ky, kp = jax.random.split(k, 3)
        x, y = _normal(kx, n, [0.0], 1.0), _normal(ky, n, [1.5], 2.0)
        sw = metrics.sliced_wasserstein(kp, x, y, n_projections=4)
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
        return metrics.sliced_wasserstein(kp, x, y, n_projections=64)

    mean, se = _replicates(one, key, r)
    assert abs(mean - (1.0 + 0.25)) < Z * se + 0.02, (mean, se)


# ----------------------------------------------------------------------------- model errors


# Jitted once per velocity pair (static callables): eager dispatch of the vmapped exact field is
# several times slower than compiling it.
_velocity_error = jax.jit(metrics.velocity_error, static_argnums=(0, 1, 6))


def _problem(key, d=2):
    return fmjax.random_joint_mixture(key, 3, d, mean_scale=2.0), fmjax.schedules.cosine()


def test_velocity_error_zero_for_exact_and_offset_squared(key, x64):
    c, s = _problem(key)
    ts = jnp.linspace(0.05, 0.95, 5)
    u = functools.partial(fmjax.exact.velocity, c, s)
    err0 = _velocity_error(u, None, c, s, key, ts, 64)
    assert err0.shape == (5,)
    np.testing.assert_allclose(err0, 0.0, atol=1e-24)  # identical computation: exactly zero
    off = jnp.array([0.3, -1.2])
    err = _velocity_error(lambda t, x: u(t, x) + off[None], u, c, s, key, ts, 64)
    np.testing.assert_allclose(err, float(off @ off), rtol=1e-12)


def test_velocity_error_samples_p_t(key):
    # velocity 0 vs reference x gives E|X_t|^2 = sum_k w_k (tr S_k + |mu_k|^2) of p_t: checks
    # that X_t is drawn from the right path (schedule and coupling) at every time.
    c, s = _problem(key)
    ts = jnp.array([0.0, 0.3, 0.7, 1.0])
    n = 4000
    err = _velocity_error(
        lambda t, x: jnp.zeros_like(x), lambda t, x: x, c, s, jax.random.key(3), ts, n
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
    with pytest.raises(ValueError, match="ts"):
        metrics.velocity_error(u, None, c, s, key, jnp.array([0.5, 1.5]), 8)
    with pytest.raises(ValueError, match="coupling"):
        metrics.velocity_error(u, None, c.target(), s, key, jnp.array([0.5]), 8)


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
