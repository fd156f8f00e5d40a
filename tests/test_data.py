"""Toy samplers: shapes, determinism, the checkerboard parity rule, moments of mixtures."""

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
