"""float32 exact quantities against the float64 reference, up to |x| = 1e4 (issue 14).

Far from the mass every per-component term is huge (|s_k|, |v_k| ~ 1e4) while the divergence is
O(1): the engine computes it centred (sum_k alpha_k (s_k - s) . (v_k - u)), merged across
component blocks as a weighted co-moment, so float32 stays accurate there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import exact, schedules
from fmjax.exact import _plan, _stream
from fmjax.mixtures import random_joint_mixture
from tests.reference import component_terms, reference

_QS = ("velocity", "log_prob", "score", "divergence")
D = 3


def _far_points():
    """8 directions at radii 1, 10, 1e2, 1e3, 1e4: (40, 3) float32."""
    dirs = jax.random.normal(jax.random.key(3), (8, D))
    dirs = dirs / jnp.linalg.norm(dirs, axis=1, keepdims=True)
    radii = jnp.array([1.0, 10.0, 1e2, 1e3, 1e4])
    return (radii[:, None, None] * dirs[None]).reshape(-1, D)


def _couplings():
    joint = random_joint_mixture(jax.random.key(6), 8, D, mean_scale=2.0)
    ind = fmjax.independent_coupling(
        fmjax.random_gaussian_mixture(jax.random.key(1), 3, D),
        fmjax.random_gaussian_mixture(jax.random.key(2), 3, D),
    )
    return {"joint": (joint, joint), "prepared": (exact.prepare(ind), ind)}


@pytest.fixture
def fresh_kernels():
    """Clear the compiled kernels after a test that changed the block budget."""
    yield
    jax.clear_caches()


def _errors(got, want, qs=_QS):
    """Per quantity: max error relative to 1 + |value| (vector norms for vector quantities)."""
    out = {}
    for q, w in zip(qs, want, strict=True):
        g = np.asarray(getattr(got, q), np.float64)
        if g.ndim == 2:
            err = np.linalg.norm(g - w, axis=-1) / (1 + np.linalg.norm(w, axis=-1))
        else:
            err = np.abs(g - w) / (1 + np.abs(w))
        out[q] = float(np.max(err))
    return out


# float32 eps = 1.2e-7; log p ~ -1e8 at |x| = 1e4 carries its own rounding (1e-7 relative), the
# vector quantities ~1e4 too; measured worst cases: 4e-6 (velocity), 7e-7 (log p), 2e-6
# (score), 2e-5 (divergence, relative to 1 + |div|).
TOL = {"velocity": 1e-4, "log_prob": 1e-5, "score": 1e-4, "divergence": 1e-4}


@pytest.mark.parametrize(
    "sched", [schedules.linear(), schedules.trig(schedules.brownian())], ids=["linear", "trig"]
)
def test_float32_far_from_the_mass(sched):
    """Shared t and one t per point, per-time (joint) and time-free (prepared independent)
    paths, at t = 0.3, 0.5 (and 0, 1 on the per-time path) for |x| up to 1e4.

    On the time-free path at t = 0 and 1 components that share a source (resp. target) component
    tie exactly (equal S_t), but their quadratic forms are evaluated in different pencil bases:
    float32 round-off of |x|^2 / S ~ 1e8 then breaks the ties at random far out, so those times
    are tested on the per-time path, whose tied components share their factors.
    """
    x = _far_points()
    for name, (arg, c) in _couplings().items():
        times = (0.0, 0.3, 0.5, 1.0) if name == "joint" else (0.3, 0.5)
        for t in times:
            w = reference(c.weights, c.means, c.covs, sched, t, x, divergence=True)
            want = (w[0], w[1], w[2], w[4])
            for tt in (t, jnp.full((x.shape[0],), t, jnp.float32)):
                got = exact.evaluate(arg, sched, tt, x, _QS)
                assert got.velocity.dtype == jnp.float32
                errs = _errors(got, want)
                for q in _QS:
                    assert errs[q] < TOL[q], (name, t, q, errs)


def test_uncentred_divergence_cancels_in_float32():
    """Control: from the same per-component terms rounded to float32, the old uncentred formula
    sum_k alpha_k (tr_k + s_k . v_k) - s . u is O(1) wrong at |x| = 1e4 (the issue's report),
    the centred one is not; and the engine's float32 divergence is right there."""
    c = random_joint_mixture(jax.random.key(6), 8, D, mean_scale=2.0)
    sched = schedules.linear()
    x = _far_points()[-8:]  # |x| = 1e4
    logp, vel, scr, trs = component_terms(c.weights, c.means, c.covs, sched, 0.5, x)
    want = reference(c.weights, c.means, c.covs, sched, 0.5, x, divergence=True)[4]
    resp = np.exp(logp - logp.max(1, keepdims=True))
    resp = (resp / resp.sum(1, keepdims=True)).astype(np.float32)
    vel, scr, trs = vel.astype(np.float32), scr.astype(np.float32), trs.astype(np.float32)
    u = np.einsum("nk,nkd->nd", resp, vel)
    s = np.einsum("nk,nkd->nd", resp, scr)
    old = np.einsum("nk,nk->n", resp, trs[None] + np.sum(scr * vel, -1)) - np.sum(s * u, -1)
    cen = np.einsum(
        "nk,nk->n", resp, trs[None] + np.sum((scr - s[:, None]) * (vel - u[:, None]), -1)
    )
    assert np.max(np.abs(old - want) / (1 + np.abs(want))) > 0.1
    assert np.max(np.abs(cen - want) / (1 + np.abs(want))) < 1e-4
    got = exact.divergence(c, sched, 0.5, x)
    assert np.max(np.abs(np.asarray(got, np.float64) - want) / (1 + np.abs(want))) < 1e-4


def test_divergence_at_t1_is_two_far_away():
    """The issue's example: at t = 1 (linear) an independent coupling's divergence is exactly
    d tr(...) = 2 for d = 2 everywhere (u_1(x) = E[x1 - x0 | x1 = x]); float32 at |x| = 1e4."""
    p0 = fmjax.random_gaussian_mixture(jax.random.key(1), 3, 2)
    p1 = fmjax.random_gaussian_mixture(jax.random.key(2), 3, 2)
    c = fmjax.independent_coupling(p0, p1)
    x = jnp.array([[1e4, 1e4], [-1e4, 3e3], [1e3, -2e3]], jnp.float32)
    np.testing.assert_allclose(exact.divergence(c, schedules.linear(), 1.0, x), 2.0, atol=1e-4)


def test_divergence_merge_across_blocks_of_one(x64, monkeypatch, fresh_kernels):
    """One component per scan step makes every component a Welford merge: both paths agree
    with a single block and with the reference to 1e-10 (float64)."""
    c = fmjax.independent_coupling(
        fmjax.random_gaussian_mixture(jax.random.key(1), 3, D, mean_scale=2.0),
        fmjax.random_gaussian_mixture(jax.random.key(2), 2, D, mean_scale=2.0),
    )
    sched = schedules.cosine()
    x = 2.0 * jax.random.normal(jax.random.key(0), (30, D))
    ts = jnp.linspace(0.0, 1.0, 30)
    want = reference(c.weights, c.means, c.covs, sched, 0.4, x, divergence=True)[4]
    prepared = exact.prepare(c)
    whole = [exact.divergence(a, sched, t, x) for a in (c, prepared) for t in (0.4, ts)]
    monkeypatch.setattr(_stream, "BLOCK_BUDGET", 1)
    jax.clear_caches()  # the compiled kernels baked the old budget in
    split = [exact.divergence(a, sched, t, x) for a in (c, prepared) for t in (0.4, ts)]
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-10)
    for got in (whole[0], whole[2], split[0], split[2]):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_per_point_small_d_kernel_matches_vmapped_lapack(
    x64, monkeypatch, kernel_calls, noisy=True
):
    """One t per point on a general joint coupling: the vectorised small-d kernel (right-looking
    factors over all points and components) against the vmapped shared-t kernel (LAPACK), every
    quantity, float64 round-off: 1e-10. Control: the kernel is really taken (and not for
    responsibilities)."""
    c = random_joint_mixture(jax.random.key(9), 5, D, mean_scale=2.0)
    sched = schedules.cosine()
    if noisy:
        sched = sched.with_noise(schedules.brownian(0.5))
    x = 2.5 * jax.random.normal(jax.random.key(0), (40, D))
    ts = jax.random.uniform(jax.random.key(1), (40,)).at[:2].set(jnp.array([0.0, 1.0]))
    calls = kernel_calls
    got = exact.evaluate(c, sched, ts, x, _QS)
    assert calls == ["cholesky_points"]
    monkeypatch.setattr(_plan, "LOW_D", 0)
    want = exact.evaluate(c, sched, ts, x, _QS)
    assert calls == ["cholesky_points", "cholesky_vmap"]
    for q in _QS:
        w = np.asarray(getattr(want, q))
        err = np.max(np.abs(np.asarray(getattr(got, q)) - w)) / max(np.max(np.abs(w)), 1.0)
        assert err < 1e-10, q
    for i in (0, 1, 7):
        ref = reference(c.weights, c.means, c.covs, sched, float(ts[i]), x[i : i + 1])
        np.testing.assert_allclose(got.velocity[i], ref[0][0], rtol=1e-10, atol=1e-10)
