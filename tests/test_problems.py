"""Named problems: the registry, agreement with the experiments' definitions, the digits GMM
against scikit-learn's own density, and the fixed-seed 256-D mixture."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import data, problems


def _same_mixture(a, b, atol=1e-6):
    for name in ("weights", "means", "covs"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=atol, err_msg=name)


def test_registry_names_and_cache():
    names = problems.names()
    assert names == ("demo_2d", "gmm_2d", "gmm_2d_joint", "gmm_1d", "two_modes_3d",
                     "eight_gaussians", "digits_gmm", "gmm_256")  # fmt: skip
    p = problems.get("gmm_1d")
    assert isinstance(p, problems.Problem) and p.name == "gmm_1d" and p.dim == 1
    assert problems.get("gmm_1d") is p  # built once per process
    assert p.description and p.image_shape is None and p.schedule == fmjax.schedules.linear()
    with pytest.raises(ValueError, match="problems.get: `name` must be one of"):
        problems.get("mnist")
    with pytest.raises(TypeError, match="problems.get: `dtype`"):
        problems.get("gmm_1d", dtype=jnp.float16)


def test_problems_match_the_experiments():
    # The seed experiments assemble their laws from problems' parts where they can (problems.py
    # does not import the experiments, which need matplotlib); a diverging assembly fails here.
    from fmjax import experiments as E

    demo, _ = E.demo_problem()
    _same_mixture(problems.get("demo_2d").coupling, demo)
    joint = E.gmm_problems()["joint"]
    _same_mixture(problems.get("gmm_2d_joint").coupling, joint)
    _same_mixture(problems.get("gmm_2d").target(), joint.target())
    p0, p1 = E.gmm_1d_problem()
    _same_mixture(problems.get("gmm_1d").coupling, fmjax.independent_coupling(p0, p1))
    _same_mixture(problems.get("two_modes_3d").target(), E.flows_scores_target())
    _same_mixture(problems.get("eight_gaussians").target(), data.eight_gaussians_mixture())
    # Control: two different problems are told apart by the same comparison.
    with pytest.raises(AssertionError):
        _same_mixture(problems.get("gmm_2d").target(), demo.target())
    # Every source but the 1-D one and the joint coupling's is N(0, I) (the coupling's source
    # marginal repeats the one component once per target component).
    for name in ("demo_2d", "gmm_2d", "two_modes_3d", "eight_gaussians"):
        src = problems.get(name).source()
        np.testing.assert_array_equal(src.means, 0.0)
        np.testing.assert_array_equal(src.covs, np.broadcast_to(np.eye(src.dim), src.covs.shape))


def test_digits_gmm_density_matches_sklearn():
    sklearn = pytest.importorskip("sklearn")
    del sklearn
    from sklearn.mixture import GaussianMixture as SkGMM
    from threadpoolctl import threadpool_limits

    p = problems.get("digits_gmm")
    assert p.dim == 64 and p.coupling.n_components == 20 and p.image_shape == (8, 8, 1)
    x = np.asarray(data.digits(flat=True), np.float64)
    # An independent fit with the documented settings gives the same log-density of the data.
    with threadpool_limits(1):
        sk = SkGMM(20, covariance_type="full", reg_covar=1e-2, random_state=0).fit(x)
    want = sk.score_samples(x[:200])
    got = np.asarray(p.target().log_prob(jnp.asarray(x[:200], p.coupling.means.dtype)))
    # float32 Cholesky of 64 x 64 covariances with condition numbers ~350: ~1e-3 absolute
    # on log-densities of size ~30
    np.testing.assert_allclose(got, want, atol=5e-3)
    # Control: another K is a different density (by several nats per point).
    other = problems.digits_gmm(10)
    assert np.mean(np.abs(np.asarray(other.log_prob(jnp.asarray(x[:200], jnp.float32))) - want)) > 1
    # EM keeps the data's moments: pixel means, and variances + reg_covar (sampling error of
    # 2000 samples ~0.02 on the means, ~0.01 on the standard deviations).
    s = np.asarray(p.target().sample(jax.random.key(0), 2000))
    np.testing.assert_allclose(s.mean(0), x.mean(0), atol=0.1)
    np.testing.assert_allclose(s.std(0), np.sqrt(x.var(0) + 1e-2), atol=0.05)


def test_digits_gmm_without_sklearn_names_the_extra(monkeypatch):
    problems._fit_digits.cache_clear()
    data._load_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)
    try:
        with pytest.raises(ImportError, match=r"scikit-learn.*pip install 'fmjax\[images\]'"):
            problems.digits_gmm(12)
    finally:
        problems._fit_digits.cache_clear()
        data._load_digits.cache_clear()


@pytest.mark.slow  # building and validating 64 covariances of 256 x 256: ~5-15 s on a CPU
def test_gmm_256_is_the_seeded_random_mixture():
    p = problems.get("gmm_256")
    assert p.dim == 256 and p.target().n_components == 64
    want = fmjax.random_gaussian_mixture(jax.random.key(0), 64, 256)
    np.testing.assert_array_equal(p.target().means, want.means)
    assert p.coupling.n_components == 64  # 1 source component x 64 target components


_IN_STEP = """
import jax, fmjax
from fmjax import models, losses, problems
p = problems.get("digits_gmm")
m = models.MLP(dim=64, width=256, depth=3)
fn = losses.cfm(m.apply, p.coupling.sample, p.schedule, 256)
r = fmjax.fit(fn, models.init(m, key=jax.random.key(1)), key=jax.random.key(2), steps=1200,
              steps_per_call=400, progress=False)
print("finished", float(r.losses[-1]))
"""


def test_training_samples_digits_gmm_inside_the_step_without_hanging():
    """Regression: sampling the 20-component 64-D mixture inside the compiled training step used
    to run two batched LAPACK calls per step, which deadlocked XLA's 2-thread CPU pool (0% CPU,
    forever). Its factor is now cached, so the step holds no LAPACK call. Run in a subprocess
    with a timeout so that a regression fails instead of hanging the suite."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    try:
        out = subprocess.run([sys.executable, "-c", _IN_STEP], capture_output=True, text=True,
                             timeout=300, env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("training with in-step digits_gmm sampling hung (over 300 s)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "finished" in out.stdout
