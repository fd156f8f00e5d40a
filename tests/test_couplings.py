"""Couplings: Gaussian OT (straight paths, Bures cost), mixture OT (exact plan, marginals),
entropic OT / Schrodinger bridge (closed form, limits, Sinkhorn on samples), and the exact
quantities of these couplings (continuity equation)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import fmjax
from fmjax import couplings, exact, schedules
from fmjax.mixtures import random_gaussian_mixture, random_spd


def _gaussian(key, d, mean_scale=1.0, eps=0.2):
    km, kc = jax.random.split(key)
    return fmjax.GaussianMixture(
        jnp.ones(1), mean_scale * jax.random.normal(km, (1, d)), random_spd(kc, 1, d, eps)
    )


def _pair(d=3, seed=0):
    k0, k1 = jax.random.split(jax.random.key(seed))
    return _gaussian(k0, d), _gaussian(k1, d, mean_scale=2.0)


def _np_bures_map(s0, s1):
    """Independent reference: A = S0^{-1/2} (S0^{1/2} S1 S0^{1/2})^{1/2} S0^{-1/2} by scipy."""
    r = np.real(scipy.linalg.sqrtm(np.asarray(s0, np.float64)))
    ri = np.linalg.inv(r)
    return ri @ np.real(scipy.linalg.sqrtm(r @ np.asarray(s1, np.float64) @ r)) @ ri


def _np_bures_w2(m0, s0, m1, s1):
    r = np.real(scipy.linalg.sqrtm(np.asarray(s0, np.float64)))
    root = np.real(scipy.linalg.sqrtm(r @ np.asarray(s1, np.float64) @ r))
    return float(np.sum((m0 - m1) ** 2) + np.trace(s0) + np.trace(s1) - 2 * np.trace(root))


# ----------------------------------------------------------------------------- Gaussian OT


def test_gaussian_ot_one_euler_step_lands_on_the_map(x64):
    """Straight paths: x0 + u_0(x0) = T(x0) to 1e-10, and u_t is constant along each line."""
    p0, p1 = _pair()
    ot = couplings.gaussian_ot(p0, p1)
    sched = schedules.linear()
    x0 = np.asarray(p0.sample(jax.random.key(1), 50))
    a = _np_bures_map(p0.covs[0], p1.covs[0])
    tx = np.asarray(p1.means[0]) + (x0 - np.asarray(p0.means[0])) @ a.T
    step = x0 + exact.velocity(ot.coupling, sched, 0.0, x0)
    np.testing.assert_allclose(step, tx, atol=1e-10)
    # midway (per-time Cholesky of the singular joint's S_t): the same velocity T(x0) - x0
    xt = 0.5 * (x0 + tx)
    np.testing.assert_allclose(exact.velocity(ot.coupling, sched, 0.5, xt), tx - x0, atol=1e-10)
    # control: the independent coupling's one Euler step misses the map by O(1)
    ind = fmjax.independent_coupling(p0, p1)
    assert np.max(np.abs(x0 + exact.velocity(ind, sched, 0.0, x0) - tx)) > 0.1


def test_gaussian_ot_cost_is_bures_w2(x64):
    """cost = closed form (scipy sqrtm reference) = ott-jax's W2 = E|x1 - x0|^2 (Monte Carlo)."""
    p0, p1 = _pair(d=4, seed=3)
    ot = couplings.gaussian_ot(p0, p1)
    want = _np_bures_w2(p0.means[0], p0.covs[0], p1.means[0], p1.covs[0])
    np.testing.assert_allclose(ot.cost, want, rtol=1e-10)
    np.testing.assert_allclose(couplings.gaussian_w2(p0, p1), want, rtol=1e-10)
    np.testing.assert_allclose(couplings.transport_cost(ot.coupling), want, rtol=1e-10)
    pytest.importorskip("ott")
    from ott.tools.gaussian_mixture.gaussian import Gaussian

    with jax.numpy_rank_promotion("allow"):  # ott relies on implicit rank promotion
        g0 = Gaussian.from_mean_and_cov(p0.means[0], p0.covs[0])
        g1 = Gaussian.from_mean_and_cov(p1.means[0], p1.covs[0])
        np.testing.assert_allclose(g0.w2_dist(g1), want, rtol=1e-8)
    n = 20_000
    x0, x1 = ot.coupling.sample(jax.random.key(4), n)
    x0, x1 = np.asarray(x0), np.asarray(x1)
    sq = np.sum((x1 - x0) ** 2, -1)
    assert abs(sq.mean() - want) < 5 * sq.std() / np.sqrt(n)
    # samples are deterministic pairs: x1 = T(x0) exactly (singular joint sampled exactly)
    a = _np_bures_map(p0.covs[0], p1.covs[0])
    tx = np.asarray(p1.means[0]) + (x0 - np.asarray(p0.means[0])) @ a.T
    np.testing.assert_allclose(x1, tx, atol=1e-10)
    # control: the independent coupling moves mass farther (and its MC mean detects it)
    ind = couplings.transport_cost(fmjax.independent_coupling(p0, p1))
    assert ind - want > 20 * sq.std() / np.sqrt(n)


def test_singular_joint_is_a_valid_coupling(x64):
    """The rank-d OT joint is accepted (float64 and float32); a non-PSD joint is refused."""
    p0, p1 = _pair()
    c = couplings.gaussian_ot(p0, p1).coupling
    assert np.linalg.eigvalsh(np.asarray(c.covs[0]))[0] < 1e-12  # genuinely singular
    fmjax.JointGaussianMixture(c.weights, c.means, c.covs)
    c32 = couplings.gaussian_ot(
        *(
            fmjax.GaussianMixture(*(x.astype(jnp.float32) for x in (p.weights, p.means, p.covs)))
            for p in (p0, p1)
        )
    ).coupling
    assert c32.covs.dtype == jnp.float32
    fmjax.JointGaussianMixture(c32.weights, c32.means, c32.covs)
    # control: a cross-covariance 10% beyond the OT one is not a coupling of anything
    d = p0.dim
    bad = np.array(c.covs)
    bad[0, :d, d:] *= 1.1
    bad[0, d:, :d] *= 1.1
    with pytest.raises(ValueError, match=r"`covs\[0\]` must be positive semi-definite"):
        fmjax.JointGaussianMixture(c.weights, c.means, bad)
    # S00 itself must be positive definite
    bad = np.array(c.covs)
    bad[0, :d, :d] = 0.0
    with pytest.raises(ValueError, match=r"`covs\[0\]` is not positive definite in its S00"):
        fmjax.JointGaussianMixture(c.weights, c.means, bad)


def test_check_path_finds_where_particles_meet(x64):
    """x1 = -x0 is a valid (singular) coupling, but S_{1/2} = 0 on the linear path."""
    d = 2
    cov = np.block([[np.eye(d), -np.eye(d)], [-np.eye(d), np.eye(d)]])[None]
    flip = fmjax.JointGaussianMixture(np.ones(1), np.zeros((1, 2 * d)), cov)
    with pytest.raises(ValueError, match=r"component 0 must be positive definite .* t = 0.5\b"):
        couplings.check_path(flip, schedules.linear())
    # controls: the OT coupling's path is fine, and so is the flip with Brownian noise added
    p0, p1 = _pair(d=d)
    assert couplings.check_path(couplings.gaussian_ot(p0, p1).coupling, schedules.linear()) > 0.01
    noisy = schedules.linear().with_noise(schedules.brownian(0.5))
    assert couplings.check_path(flip, noisy, n_times=33) > 0


# ----------------------------------------------------------------------------- mixture OT


def _uniform_gmm(key, k, d):
    p = random_gaussian_mixture(key, k, d, mean_scale=2.0)
    return fmjax.GaussianMixture(jnp.full((k,), 1.0 / k), p.means, p.covs)


def _w2_matrix(p0, p1):
    return np.array(
        [
            [_np_bures_w2(m0, s0, m1, s1) for m1, s1 in zip(p1.means, p1.covs, strict=True)]
            for m0, s0 in zip(p0.means, p0.covs, strict=True)
        ]
    )


def test_mixture_ot_matches_enumeration(x64):
    """Uniform K = 3 to 3: the optimal plan is a permutation / 3 (Birkhoff); enumerate all 6."""
    p0 = _uniform_gmm(jax.random.key(0), 3, 2)
    p1 = _uniform_gmm(jax.random.key(1), 3, 2)
    res = couplings.mixture_ot(p0, p1)
    cost = _w2_matrix(p0, p1)
    perms = [sum(cost[i, j] for i, j in enumerate(p)) / 3 for p in itertools.permutations(range(3))]
    np.testing.assert_allclose(res.cost, min(perms), rtol=1e-10)
    np.testing.assert_allclose(couplings.transport_cost(res.coupling), min(perms), rtol=1e-10)
    assert res.coupling.n_components == 3
    # control: the permutations are not all equally good, so picking the best matters
    assert max(perms) - min(perms) > 0.1

    # 2 x 2 with unequal weights: one degree of freedom x = P_00, optimum at an end of its range
    q0 = random_gaussian_mixture(jax.random.key(2), 2, 2)
    q1 = random_gaussian_mixture(jax.random.key(3), 2, 2)
    a, b, c = np.asarray(q0.weights), np.asarray(q1.weights), _w2_matrix(q0, q1)

    def total(x):
        plan = np.array([[x, a[0] - x], [b[0] - x, 1 - a[0] - b[0] + x]])
        return np.sum(plan * c), plan

    lo, hi = max(0.0, a[0] + b[0] - 1), min(a[0], b[0])
    want, plan = min(total(lo), total(hi), key=lambda r: r[0])
    res = couplings.mixture_ot(q0, q1)
    np.testing.assert_allclose(res.cost, want, rtol=1e-10)
    np.testing.assert_allclose(res.plan, plan, atol=1e-12)


def test_mixture_ot_marginals_are_exact(x64):
    """Each joint component carries one source and one target component unchanged; the weights
    add up to p0's and p1's."""
    p0 = random_gaussian_mixture(jax.random.key(4), 3, 2)
    p1 = random_gaussian_mixture(jax.random.key(5), 4, 2)
    res = couplings.mixture_ot(p0, p1)
    np.testing.assert_allclose(res.plan.sum(1), p0.weights, atol=1e-14)
    np.testing.assert_allclose(res.plan.sum(0), p1.weights, atol=1e-14)
    assert res.coupling.n_components <= 3 + 4 - 1  # a vertex of the transport polytope
    i, j = np.nonzero(np.asarray(res.plan))
    src, tgt = res.coupling.source(), res.coupling.target()
    np.testing.assert_array_equal(src.means, p0.means[i])
    np.testing.assert_array_equal(src.covs, p0.covs[i])
    np.testing.assert_array_equal(tgt.means, p1.means[j])
    np.testing.assert_array_equal(tgt.covs, p1.covs[j])
    np.testing.assert_allclose(np.bincount(i, res.coupling.weights, 3), p0.weights, atol=1e-14)
    np.testing.assert_allclose(np.bincount(j, res.coupling.weights, 4), p1.weights, atol=1e-14)
    x = jax.random.normal(jax.random.key(6), (7, 2))
    np.testing.assert_allclose(src.log_prob(x), p0.log_prob(x), rtol=1e-12)
    np.testing.assert_allclose(tgt.log_prob(x), p1.log_prob(x), rtol=1e-12)
    # control: the independent plan costs clearly more
    assert couplings.transport_cost(fmjax.independent_coupling(p0, p1)) > res.cost + 1.0


@pytest.mark.slow
def test_mixture_ot_agrees_with_ott_gmm_pair(x64):
    """ott-jax's GaussianMixturePair: the same Bures cost matrix, and its Sinkhorn plan (eps
    0.01) costs what the exact LP plan costs up to O(eps log K). (~25 s of ott compiles.)"""
    p0 = random_gaussian_mixture(jax.random.key(4), 3, 2)
    p1 = random_gaussian_mixture(jax.random.key(5), 4, 2)
    res = couplings.mixture_ot(p0, p1)
    pytest.importorskip("ott")
    from ott.tools.gaussian_mixture import gaussian_mixture, gaussian_mixture_pair

    with jax.numpy_rank_promotion("allow"):  # ott relies on implicit rank promotion
        g = [
            gaussian_mixture.GaussianMixture.from_mean_cov_component_weights(
                p.means, p.covs, p.weights
            )
            for p in (p0, p1)
        ]
        pair = gaussian_mixture_pair.GaussianMixturePair(g[0], g[1], epsilon=1e-2)
        cost = pair.get_cost_matrix()
        sk = pair.get_sinkhorn(cost, threshold=1e-9, max_iterations=20_000)
        assert sk.converged
        sink = float(jnp.sum(pair.get_normalized_sinkhorn_coupling(sk) * cost))
    np.testing.assert_allclose(cost, _w2_matrix(p0, p1), rtol=1e-6, atol=1e-6)
    # Sinkhorn's entropic plan (eps = 0.01, marginals to 1e-9) costs at most O(eps log K) more
    assert res.cost - 1e-6 <= sink < res.cost + 0.05
    # control: a wrong plan (the independent one) is far from both
    assert np.sum(np.outer(p0.weights, p1.weights) * np.asarray(cost)) > sink + 1.0


# ----------------------------------------------------------------------------- entropic OT


def _np_janati_cross(s0, s1, sigma):
    """C = 1/2 S0^{1/2} D S0^{-1/2} - sigma^2 I / 2, D = (4 S0^{1/2} S1 S0^{1/2} + sigma^4 I)^.5"""
    r = np.real(scipy.linalg.sqrtm(np.asarray(s0, np.float64)))
    d = np.real(scipy.linalg.sqrtm(4 * r @ np.asarray(s1) @ r + sigma**4 * np.eye(len(s0))))
    return 0.5 * r @ d @ np.linalg.inv(r) - 0.5 * sigma**2 * np.eye(len(s0))


def test_entropic_ot_closed_form(x64):
    """Cross-covariance = the literal formula; joint precision's off-diagonal block = -I/sigma^2
    (the first-order condition pi ~ exp(x.y / sigma^2) p0 p1 of the 2 sigma^2 KL problem)."""
    p0, p1 = _pair(d=3, seed=7)
    d = 3
    for sigma in (0.3, 1.0, 2.0):
        c = couplings.gaussian_entropic_ot(p0, p1, sigma).coupling
        cov = np.asarray(c.covs[0])
        np.testing.assert_allclose(cov[:d, :d], p0.covs[0], rtol=1e-14)
        np.testing.assert_allclose(cov[d:, d:], p1.covs[0], rtol=1e-14)
        np.testing.assert_allclose(cov[:d, d:], _np_janati_cross(p0.covs[0], p1.covs[0], sigma),
                                   atol=1e-10)  # fmt: skip
        prec = np.linalg.inv(cov)
        np.testing.assert_allclose(prec[:d, d:], -np.eye(d) / sigma**2, atol=1e-8)
    # control: the precision condition pins sigma (another sigma's coupling fails it)
    wrong = np.linalg.inv(np.asarray(couplings.gaussian_entropic_ot(p0, p1, 1.1).coupling.covs[0]))
    assert np.max(np.abs(wrong[:d, d:] + np.eye(d))) > 0.1


def test_entropic_ot_limits(x64):
    """sigma -> 0: gaussian_ot; sigma -> inf: sigma^2 C -> S0 S1 (C -> 0, independent)."""
    p0, p1 = _pair(d=3, seed=8)
    ot = couplings.gaussian_ot(p0, p1)
    small = couplings.gaussian_entropic_ot(p0, p1, 1e-4)
    np.testing.assert_allclose(small.coupling.covs, ot.coupling.covs, atol=1e-6)
    np.testing.assert_allclose(small.cost, ot.cost, rtol=1e-6)
    big = couplings.gaussian_entropic_ot(p0, p1, 1e3)
    cross = np.asarray(big.coupling.covs[0, :3, 3:])
    np.testing.assert_allclose(1e6 * cross, p0.covs[0] @ p1.covs[0], rtol=1e-4, atol=1e-6)
    ind = fmjax.independent_coupling(p0, p1)
    np.testing.assert_allclose(big.cost, couplings.transport_cost(ind), rtol=1e-5)
    # control: at sigma = 1 the coupling is neither
    mid = couplings.gaussian_entropic_ot(p0, p1, 1.0)
    assert ot.cost + 0.1 < mid.cost < couplings.transport_cost(ind) - 0.1


def test_sinkhorn_on_samples_agrees_with_closed_form(x64):
    """ott-jax Sinkhorn (epsilon = 2 sigma^2) on n = 1500 samples: the plan's cross-covariance
    agrees with the closed form within 0.08 (empirical entropic OT converges at ~n^{-1/2};
    repeated seeds give errors ~0.02-0.04 here); OT and independent are > 0.2 away."""
    pytest.importorskip("ott")
    from ott.geometry import pointcloud
    from ott.solvers import linear as ott_linear

    d, sigma, n = 2, 0.7, 1500
    p0 = fmjax.GaussianMixture(jnp.ones(1), jnp.zeros((1, d)), jnp.eye(d)[None])
    s1 = jnp.array([[2.0, 0.6], [0.6, 0.8]])
    p1 = fmjax.GaussianMixture(jnp.ones(1), jnp.array([[1.0, -0.5]]), s1[None])
    want = np.asarray(couplings.gaussian_entropic_ot(p0, p1, sigma).coupling.covs[0, :d, d:])
    x = p0.sample(jax.random.key(0), n)
    y = p1.sample(jax.random.key(1), n)
    with jax.numpy_rank_promotion("allow"):  # ott relies on implicit rank promotion
        geom = pointcloud.PointCloud(x, y, epsilon=2 * sigma**2)  # cost |x - y|^2 (default)
        out = ott_linear.solve(geom, threshold=1e-6, max_iterations=5000)
        plan = np.array(out.matrix)
    plan /= plan.sum()
    xc = np.asarray(x) - plan.sum(1) @ np.asarray(x)
    yc = np.asarray(y) - plan.sum(0) @ np.asarray(y)
    got = xc.T @ plan @ yc
    assert np.max(np.abs(got - want)) < 0.08
    ot_cross = np.asarray(couplings.gaussian_ot(p0, p1).coupling.covs[0, :d, d:])
    assert np.max(np.abs(ot_cross - want)) > 0.2 and np.max(np.abs(want)) > 0.2  # controls


# ----------------------------------------------------------------------------- bridges


def test_bridge_marginal_covariance_is_bunne_closed_form(x64):
    """Sigma_t = (1-t)^2 S0 + t^2 S1 + t(1-t)(C + C^T + sigma^2 I) (Bunne et al. 2023)."""
    p0, p1 = _pair(d=3, seed=9)
    sigma = 0.8
    bridge = couplings.schrodinger_bridge(p0, p1, sigma)
    assert bridge.schedule == schedules.linear().with_noise(schedules.brownian(sigma))
    c = _np_janati_cross(p0.covs[0], p1.covs[0], sigma)
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        want = (
            (1 - t) ** 2 * p0.covs[0]
            + t**2 * p1.covs[0]
            + t * (1 - t) * (c + c.T + sigma**2 * np.eye(3))
        )
        got = exact.marginal(bridge.coupling, bridge.schedule, t)
        np.testing.assert_allclose(got.covs[0], want, atol=1e-10)
        np.testing.assert_allclose(got.means[0], (1 - t) * p0.means[0] + t * p1.means[0])
    # control: without the noise term the covariance misses sigma^2 t (1 - t) I
    plain = exact.marginal(bridge.coupling, schedules.linear(), 0.5)
    half = 0.25 * (p0.covs[0] + p1.covs[0] + c + c.T + sigma**2 * np.eye(3))
    assert np.max(np.abs(plain.covs[0] - half)) > 0.1


def test_mixture_bridge_marginals_and_limit(x64):
    """For mixtures: MW2 plan between components, Gaussian bridges per pair; marginals exact,
    sigma -> 0 gives mixture_ot."""
    p0 = random_gaussian_mixture(jax.random.key(10), 2, 2)
    p1 = random_gaussian_mixture(jax.random.key(11), 3, 2)
    mw = couplings.mixture_ot(p0, p1)
    bridge = couplings.schrodinger_bridge(p0, p1, 0.5)
    np.testing.assert_array_equal(bridge.coupling.weights, mw.coupling.weights)
    x = jax.random.normal(jax.random.key(12), (5, 2))
    np.testing.assert_allclose(bridge.coupling.source().log_prob(x), p0.log_prob(x), rtol=1e-12)
    np.testing.assert_allclose(bridge.coupling.target().log_prob(x), p1.log_prob(x), rtol=1e-12)
    tiny = couplings.schrodinger_bridge(p0, p1, 1e-5).coupling
    np.testing.assert_allclose(tiny.covs, mw.coupling.covs, atol=1e-7)
    # control: sigma = 0.5 differs from the deterministic coupling
    assert np.max(np.abs(bridge.coupling.covs - mw.coupling.covs)) > 0.01


def _continuity_residual(c, sched, t, x):
    dlogp_dt = jax.vmap(jax.grad(lambda t, x: exact.log_prob(c, sched, t, x)), (None, 0))(t, x)
    u = exact.velocity(c, sched, t, x)
    grad_logp = jax.vmap(jax.grad(lambda x: exact.log_prob(c, sched, t, x)))(x)
    jac = jax.vmap(jax.jacfwd(lambda x: exact.velocity(c, sched, t, x)))(x)
    div_ad = jnp.trace(jac, axis1=-2, axis2=-1)
    flux = jnp.sum(u * grad_logp, -1)
    residual = dlogp_dt + div_ad + flux
    scale = jnp.abs(dlogp_dt) + jnp.abs(div_ad) + jnp.abs(flux)
    np.testing.assert_allclose(exact.divergence(c, sched, t, x), div_ad, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(exact.score(c, sched, t, x), grad_logp, rtol=1e-8, atol=1e-8)
    return jnp.max(jnp.abs(residual) / scale)


@pytest.mark.parametrize("kind", ["mixture_ot", "bridge"])
def test_continuity_equation(x64, kind):
    """d/dt log p_t + div u_t + u_t . grad log p_t = 0 by autodiff of the engine, for each
    coupling (the bridge's u_t is the probability-flow velocity, which also transports p_t).
    mixture_ot's components are Gaussian OT couplings (singular joints): that covers
    gaussian_ot too."""
    p0 = random_gaussian_mixture(jax.random.key(13), 2, 3, mean_scale=2.0)
    p1 = random_gaussian_mixture(jax.random.key(14), 3, 3, mean_scale=2.0)
    sched = schedules.linear()
    if kind == "mixture_ot":
        c = couplings.mixture_ot(p0, p1).coupling
    else:
        c, sched = couplings.schrodinger_bridge(p0, p1, 0.7)
    t = 0.37
    x = exact.marginal(c, sched, t).sample(jax.random.key(16), 20)
    assert _continuity_residual(c, sched, t, x) < 1e-9
    # control: the same field at another time does not transport p_t
    u_wrong = exact.velocity(c, sched, 0.6, x)
    u = exact.velocity(c, sched, t, x)
    assert jnp.max(jnp.abs(u_wrong - u)) > 0.1


# ----------------------------------------------------------------------------- arguments


def test_argument_errors():
    p = fmjax.standard_normal(2)
    q = random_gaussian_mixture(jax.random.key(0), 2, 2)
    with pytest.raises(ValueError, match="couplings.gaussian_ot: `p1` must be a one-component"):
        couplings.gaussian_ot(p, q)
    with pytest.raises(ValueError, match=r"`p1` must be of the dimension of `p0` \(2\)"):
        couplings.mixture_ot(p, fmjax.standard_normal(3))
    with pytest.raises(TypeError, match="couplings.mixture_ot: `p0` must be a GaussianMixture"):
        couplings.mixture_ot(np.zeros(2), q)
    with pytest.raises(ValueError, match="couplings.gaussian_entropic_ot: `sigma` must be"):
        couplings.gaussian_entropic_ot(p, p, 0.0)
    with pytest.raises(ValueError, match="couplings.schrodinger_bridge: `sigma` must be"):
        couplings.schrodinger_bridge(p, q, -1.0)
    # controls: valid calls
    assert couplings.gaussian_ot(p, p).coupling.n_components == 1
    assert fmjax.couplings.independent_coupling is fmjax.independent_coupling
