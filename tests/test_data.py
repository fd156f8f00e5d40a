"""Toy samplers: shapes, determinism, the checkerboard parity rule, moments of mixtures."""

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import data


def _mixture_cov(gmm):
    """Law of total covariance, in numpy (GaussianMixture.covariance trips rank promotion)."""
    w, m, c = (np.asarray(a, np.float64) for a in (gmm.weights, gmm.means, gmm.covs))
    dm = m - w @ m
    return np.einsum("k,kij->ij", w, c) + np.einsum("k,ki,kj->ij", w, dm, dm)


SAMPLERS = [data.checkerboard, data.eight_gaussians, data.two_moons, data.swiss_roll, data.rings]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda f: f.__name__)
def test_shapes_and_determinism(sampler):
    key = jax.random.key(3)
    x = sampler(key, 500)
    chex.assert_shape(x, (500, 2))
    assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(x, sampler(key, 500))  # same key, same points
    assert not np.allclose(x, sampler(jax.random.key(4), 500))
    # points are not all the same (a degenerate sampler would pass the checks above)
    assert float(jnp.min(jnp.std(x, axis=0))) > 0.3


def test_checkerboard_occupies_black_squares():
    n = 40_000
    x = np.asarray(data.checkerboard(jax.random.key(0), n), np.float64) * 0.45  # unscaled
    assert np.all((x >= -2 - 1e-6) & (x < 2 + 1e-6))
    # float32 rounding of /0.45 then *0.45 can move a point across a grid line by ~1e-7: skip
    # the few points within 1e-5 of a line (expected fraction ~ 8e-5) and check the rest.
    near = np.any(np.abs(x - np.round(x)) < 1e-5, axis=1)
    assert near.mean() < 1e-3
    cells = np.floor(x[~near]).astype(int)
    assert np.all((cells[:, 0] + cells[:, 1]) % 2 == 0)
    # all 8 black squares are used, uniformly: counts ~ Binomial(n, 1/8), sd ~ 66
    _, counts = np.unique(cells, axis=0, return_counts=True)
    assert len(counts) == 8
    assert np.all(np.abs(counts - n / 8) < 6 * np.sqrt(n / 8 * 7 / 8))


def test_eight_gaussians_matches_its_mixture():
    gmm = data.eight_gaussians_mixture()
    n = 20_000
    x = data.eight_gaussians(jax.random.key(1), n)
    # mean 0 and covariance (r^2/2 + s^2) I; Monte Carlo sd of each moment < 0.05, bound 5 sd
    np.testing.assert_allclose(x.mean(0), gmm.mean(), atol=0.1)
    np.testing.assert_allclose(jnp.cov(x.T), _mixture_cov(gmm), atol=0.15)
    # every sample is near one of the 8 centres: log-density not far below the modes'
    assert float(jnp.min(gmm.log_prob(x))) > float(jnp.max(gmm.log_prob(gmm.means))) - 30


def test_from_mixture_moments(x64):
    gmm = fmjax.random_gaussian_mixture(jax.random.key(2), 4, 3, mean_scale=2.0)
    n = 50_000
    x = data.from_mixture(gmm)(jax.random.key(5), n)
    chex.assert_shape(x, (n, 3))
    mean, cov = np.asarray(gmm.mean()), _mixture_cov(gmm)
    # Monte Carlo standard errors: mean_i ~ sqrt(C_ii / n); C_ij ~ sqrt((C_ii C_jj + C_ij^2) / n)
    # (Gaussian approximation of the fourth moments; mixtures have heavier tails, so use 6 sd).
    se_mean = np.sqrt(np.diag(cov) / n)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert np.all(np.abs(np.mean(x, 0) - mean) < 5 * se_mean)
    assert np.all(np.abs(np.cov(np.asarray(x).T) - cov) < 6 * se_cov)


def test_from_array_resamples_rows():
    rows = jnp.arange(12.0).reshape(6, 2)
    sample = data.from_array(rows)
    x = sample(jax.random.key(0), 3000)
    chex.assert_shape(x, (3000, 2))
    idx = np.asarray(x[:, 0] / 2).astype(int)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(rows)[idx])  # whole rows
    counts = np.bincount(idx, minlength=6)
    assert np.all(np.abs(counts - 500) < 6 * np.sqrt(3000 * (1 / 6) * (5 / 6)))
    np.testing.assert_array_equal(x, sample(jax.random.key(0), 3000))
    with pytest.raises(ValueError, match="data"):
        data.from_array(jnp.zeros(5))
    with pytest.raises(ValueError, match="data"):
        data.from_array(jnp.array([[0.0, jnp.nan]]))


def test_pair_samplers(x64):
    src = data.gaussian_source(2)
    pairs = data.independent_pairs(src, data.checkerboard)
    x0, x1 = pairs(jax.random.key(0), 4000)
    chex.assert_shape([x0, x1], [(4000, 2), (4000, 2)])
    # independent draws: x0 standard normal, uncorrelated with x1 (sd of corr ~ 1/sqrt(n))
    np.testing.assert_allclose(np.cov(np.asarray(x0).T), np.eye(2), atol=0.1)
    corr = np.corrcoef(np.asarray(x0[:, 0]), np.asarray(x1[:, 0]))[0, 1]
    assert abs(corr) < 5 / np.sqrt(4000)
    with pytest.raises(ValueError, match="dim"):
        data.gaussian_source(0)

    joint = fmjax.random_joint_mixture(jax.random.key(1), 2, 2)
    x0, x1 = data.coupling_pairs(joint)(jax.random.key(2), 10)
    y0, y1 = joint.sample(jax.random.key(2), 10)
    np.testing.assert_array_equal(x0, y0)
    np.testing.assert_array_equal(x1, y1)


# ----------------------------------------------------------------------------- digits


def test_digits_scaling_shapes_labels():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = data.digits()
    chex.assert_shape(x, (1797, 8, 8, 1))
    assert x.dtype == jnp.result_type(float)
    # v / 8 - 1 maps the 17 grey levels 0..16 onto [-1, 1] in steps of 1/8
    np.testing.assert_allclose(np.asarray(x)[..., 0], raw.images / 8 - 1, atol=1e-6)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    flat = data.digits(flat=True)
    chex.assert_shape(flat, (1797, 64))
    np.testing.assert_array_equal(flat, np.asarray(x).reshape(1797, 64))  # row-major
    labels = data.digits_labels()
    assert labels.dtype == jnp.int32
    np.testing.assert_array_equal(labels, raw.target)
    assert data.digits(dtype=jnp.float32).dtype == jnp.float32
    with pytest.raises(TypeError, match="data.digits: `dtype`"):
        data.digits(dtype=jnp.float16)


def test_digits_without_sklearn_names_the_extra(monkeypatch):
    import sys

    data._load_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    try:
        with pytest.raises(ImportError, match=r"data.digits needs scikit-learn.*fmjax\[images\]"):
            data.digits()
    finally:
        data._load_digits.cache_clear()


# ----------------------------------------------------------------------------- sample_path

BROWN = fmjax.schedules.linear().with_noise(fmjax.schedules.brownian(1.0))


def _coupling():
    return fmjax.random_joint_mixture(jax.random.key(3), 3, 2)


def test_sample_path_velocity_is_the_time_derivative_of_x_t(x64):
    """velocity = d x_t / dt at fixed (x0, x1, z): the JVP of x_t in t, to round-off."""
    key, c = jax.random.key(0), _coupling()
    sched = fmjax.schedules.cosine().with_noise(fmjax.schedules.bsquared(0.5))
    t = jnp.linspace(0.1, 0.9, 64)
    path = data.sample_path(key, c, sched, 64, t=t)
    _, dxt = jax.jvp(lambda s: data.sample_path(key, c, sched, 64, t=s).xt, (t,), (jnp.ones(64),))
    np.testing.assert_allclose(path.velocity, dxt, rtol=1e-12, atol=1e-12)
    a, b, _, _ = sched(t)
    g = sched.gamma(t)[0]
    want = b[:, None] * path.x0 + a[:, None] * path.x1 + g[:, None] * path.z
    np.testing.assert_allclose(path.xt, want, rtol=1e-12)
    # without noise z is None and x_t has no noise term
    clean = data.sample_path(key, c, fmjax.schedules.cosine(), 64, t=t)
    assert clean.z is None
    np.testing.assert_allclose(clean.x0, path.x0)  # the pairs do not depend on the schedule


def test_sample_path_times_and_errors(key):
    c = _coupling()
    drawn = data.sample_path(key, c, fmjax.schedules.vp(), 512)
    assert drawn.t.shape == (512,) and float(drawn.t.max()) <= fmjax.schedules.vp().t_max
    fixed = data.sample_path(key, c.sample, fmjax.schedules.linear(), 8, t=0.25)
    np.testing.assert_array_equal(fixed.t, jnp.full(8, 0.25))
    with pytest.raises(ValueError, match="data.sample_path: `t`"):
        data.sample_path(key, c, fmjax.schedules.linear(), 8, t=jnp.zeros(3))
    with pytest.raises(TypeError, match="data.sample_path: `times`"):
        data.sample_path(key, c, fmjax.schedules.linear(), 8, t=0.5, times=lambda k, n: k)
    with pytest.raises(TypeError, match="data.sample_path: `sample_pairs`"):
        data.sample_path(key, lambda k, n: jnp.zeros((n, 2)), fmjax.schedules.linear(), 8)


def _second_moment(c, t):
    """Exact E|X_t|^2 of linear + brownian(1): tr(A C A^T) + |A m|^2 + gamma^2 d, A = [b I, a I]."""
    d = c.dim
    joint = fmjax.GaussianMixture(c.weights, c.means, c.covs)
    a_mat = jnp.concatenate([(1 - t) * jnp.eye(d), t * jnp.eye(d)], axis=1)
    m = a_mat @ joint.mean()
    return float(jnp.trace(a_mat @ joint.covariance() @ a_mat.T) + m @ m + t * (1 - t) * d)


def test_velocity_error_draws_noise_independent_of_the_pairs(x64):
    """Regression (issue 22): v(t, x) = x against a zero reference gives E|X_t|^2, which the
    exact moments fix. metrics.velocity_error drew z from fold_in(k, 1) == split(k)[1], the key
    of the mixture sampler's own noise, so z was the noise behind x0 (+24 standard errors).
    4000 draws (2000 times x n = 2, n = 2 as in the report): tolerance 4 standard errors; the
    old key is the control, > 10 standard errors off."""
    p1 = fmjax.GaussianMixture(jnp.array([0.5, 0.5]), jnp.array([[1.0, 0.0], [-1.0, 0.5]]),
                               jnp.stack([jnp.eye(2), 0.5 * jnp.eye(2)]))  # fmt: skip
    c, t = fmjax.independent_coupling(fmjax.standard_normal(2), p1), 0.5
    ts = jnp.full((2000,), t)
    identity = lambda t, x: x  # noqa: E731
    zero = lambda t, x: jnp.zeros_like(x)  # noqa: E731
    per_time = fmjax.metrics.velocity_error(identity, c, BROWN, ts, 2, key=jax.random.key(1),
                                            reference=zero)  # fmt: skip
    exact = _second_moment(c, t)
    se = float(jnp.std(per_time) / jnp.sqrt(ts.shape[0]))
    assert abs(float(jnp.mean(per_time)) - exact) < 4 * se

    def old(k):  # the old draw: z from fold_in(k, 1)
        x0, x1 = c.sample(k, 2)
        xt = 0.5 * x0 + 0.5 * x1
        xt = xt + 0.5 * jax.random.normal(jax.random.fold_in(k, 1), xt.shape, xt.dtype)
        return jnp.mean(jnp.sum(xt * xt, -1))

    bad = jax.vmap(old)(jax.random.split(jax.random.key(1), 2000))
    assert abs(float(jnp.mean(bad)) - exact) > 10 * float(jnp.std(bad) / jnp.sqrt(2000))


def test_latent_noise_is_independent_of_pairs_in_sample_path(x64):
    """z is uncorrelated with x0, x1 and t (|r| < 4 / sqrt(n)); the old key fold_in(key, 1),
    the time key, gives a z that is a function of t (the control)."""
    n = 4096
    pairs = data.independent_pairs(data.gaussian_source(1), data.gaussian_source(1))
    path = data.sample_path(jax.random.key(0), pairs, BROWN, n)
    for other in (path.t, path.x0[:, 0], path.x1[:, 0]):
        assert abs(np.corrcoef(np.asarray(path.z[:, 0]), np.asarray(other))[0, 1]) < 4 / np.sqrt(n)
    z_bad = jax.random.normal(jax.random.fold_in(jax.random.key(0), 1), (n,), jnp.float64)
    assert abs(np.corrcoef(np.asarray(z_bad), np.asarray(path.t))[0, 1]) > 0.5


def test_every_caller_draws_its_points_with_sample_path(monkeypatch):
    """The losses, the metrics, the evaluation and the experiments draw (x0, x1, z, x_t) through
    data.sample_path and nothing else (one key convention): each call is recorded by a spy.
    (sample_path's own draws are checked above: z independent of x0, x1 and t.)"""
    from fmjax import evaluation, exact, losses

    couplings_exp = importlib.import_module("fmjax.experiments.couplings")
    si_exp = importlib.import_module("fmjax.experiments.stochastic_interpolants")

    calls = []
    real = data._sample_path

    def spy(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(data, "_sample_path", spy)
    sched = fmjax.schedules.linear().with_noise(fmjax.schedules.bsquared(0.5))
    c, n = _coupling(), 37  # an odd n: no compiled program of another test is reused
    apply_fn = lambda p, t, x: x  # noqa: E731
    field = lambda t, x: x  # noqa: E731
    key, ts = jax.random.key(0), jnp.array([0.3, 0.6])
    cfm = losses.cfm(apply_fn, c.sample, sched, n, target="drift")
    marginal = losses.marginal_fm(apply_fn, c, sched, n, target="drift")
    runs = {
        "losses.cfm": lambda: cfm(None, key),
        "losses.marginal_fm": lambda: marginal(None, key),
        "metrics.velocity_error": lambda: fmjax.metrics.velocity_error(
            field, c, sched, ts, n, key=key
        ),
        "evaluation": lambda: evaluation._loss_terms(
            *evaluation._split(field), c, exact.prepare(c), sched, n, key
        ),
        "couplings": lambda: couplings_exp._kinetic(c, sched, key, ts, n),
        "stochastic_interpolants": lambda: si_exp._field_errors(
            si_exp._Learned(
                jax.tree_util.Partial(apply_fn, None), jax.tree_util.Partial(apply_fn, None), sched
            ),
            c,
            sched,
            key,
            ts,
            n,
        ),  # fmt: skip
    }
    calls.clear()
    losses.loss_floor(c, sched, n, key=key, target="drift")  # eager checks: a real call
    assert calls, "losses.loss_floor drew its points without data.sample_path"
    for name, run in runs.items():
        calls.clear()
        jax.eval_shape(run)  # a trace is enough: the spy runs at trace time
        assert calls, f"{name} drew its points without data.sample_path"
