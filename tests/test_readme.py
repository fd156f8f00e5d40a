"""The README's Python examples run as written and compute what they say (they are the first code
users copy). Each block is found by a line it must contain and checked by name: a renamed
variable or a removed block fails here instead of skipping a check."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
MARKERS = {
    "exact": "fmjax.exact.evaluate(coupling",
    "learn": "losses.loss_floor(coupling",
    "modules": "nnx.BatchNorm(",
    "devices": "sharding.data_mesh()",
    "interpolants": "with_noise(schedules.brownian",
    "couplings": "couplings.mixture_ot(p0, p1)",
}


def _run(name: str) -> dict:
    found = [b for b in BLOCKS if MARKERS[name] in b]
    assert len(found) == 1, f"README: one python block must contain {MARKERS[name]!r}"
    env: dict = {}
    exec(compile(found[0], f"README.md[{name} example]", "exec"), env)
    return env


def test_every_block_is_checked():
    assert len(BLOCKS) == len(MARKERS)
    for block in BLOCKS:
        assert sum(m in block for m in MARKERS.values()) == 1


def test_exact_engine_example():
    env = _run("exact")
    fmjax, coupling, s, x = env["fmjax"], env["coupling"], env["s"], env["x"]
    assert env["alpha"].shape == (1000, 4)
    np.testing.assert_allclose(env["alpha"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(env["ev"].score, env["score"], rtol=1e-5, atol=1e-6)  # float32
    assert env["ev"].log_prob is None  # not requested
    # the jitted field with one t per point, at the point whose t is 0.3 (row i: t = i / 999)
    i = 299
    want = fmjax.exact.velocity(coupling, s, i / 999, x[i])
    np.testing.assert_allclose(env["u"][i], want, rtol=1e-4, atol=1e-5)
    # the prepared (time-free) field gives the same velocities; float32 on two algebras
    np.testing.assert_allclose(env["u_fast"], env["u"], rtol=1e-4, atol=1e-5)


def test_learn_and_check_example():
    env = _run("learn")
    fmjax = env["fmjax"]
    coupling, s, x1 = env["coupling"], env["s"], env["x1"]
    # The ODE log-likelihood of the exact field equals the exact log-density (Tsit5 tolerance).
    want = fmjax.exact.log_prob(coupling, s, 1.0, x1[:10])
    np.testing.assert_allclose(env["logp"], want, atol=2e-2)
    # After 300 steps the learned field halves the zero field's error (E|u|^2) on average over t.
    err = env["err"]
    zero = fmjax.metrics.velocity_error(
        lambda t, x: jnp.zeros_like(x), coupling, s, env["ts"], 512, key=jax.random.key(3)
    )
    assert err.shape == (11,) and np.all(np.isfinite(err))
    assert float(err.mean()) < 0.5 * float(zero.mean())
    assert env["result"].step == 300 and float(env["floor"].mean) > 0


def test_bring_your_own_model_example():
    """The NNX module (BatchNorm, Dropout) and the Equinox module come back trained, as modules
    of their class; in eval mode the NNX one is deterministic and both fields have a fifth of
    the zero field's error (E|u|^2) or less."""
    env = _run("modules")
    coupling, s, ts = env["coupling"], env["s"], env["ts"]
    trained, eqx_model = env["trained"], env["eqx_result"].params
    assert type(trained) is env["Net"] and type(eqx_model) is env["EqxNet"]
    assert not np.array_equal(trained.bn.var[...], env["model"].bn.var[...])  # carried
    x = jax.random.normal(jax.random.key(5), (64, 2))
    np.testing.assert_array_equal(trained(0.5, x), trained(0.5, x))
    zero = env["fmjax"].metrics.velocity_error(
        lambda t, x: jnp.zeros_like(x), coupling, s, ts, 512, key=jax.random.key(2)
    )
    for err in (env["err"], env["eqx_err"]):
        assert err.shape == (10,) and float(err.mean()) < 0.2 * float(zero.mean())


def test_many_devices_example():
    env = _run("devices")
    assert env["result"].step == 20
    np.testing.assert_allclose(
        env["u"],
        env["fmjax"].exact.velocity(env["coupling"], env["s"], 0.5, env["x"]),
        rtol=1e-5,
    )


def test_stochastic_interpolants_example():
    """SDE from a 2-mode source reaches the 3 target modes; u_hat = u, finite at t = 0, 1."""
    env = _run("interpolants")
    x1 = np.asarray(env["x1"])[:, 0]
    assert x1.shape == (2000,)
    # mode masses 0.3 / 0.4 / 0.3 (binomial sd ~0.011 for n = 2000; 0.06 leaves room for bias)
    for lo, hi, w in ((-np.inf, -3.0, 0.3), (-3.0, 3.0, 0.4), (3.0, np.inf, 0.3)):
        assert abs(np.mean((x1 > lo) & (x1 < hi)) - w) < 0.06
    t, x = jnp.array([0.0, 0.5, 1.0]), jnp.array([[-2.0], [0.5], [4.0]])
    np.testing.assert_allclose(env["u_hat"](t, x), env["u"](t, x), rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(env["u_hat"](t, x)))
    params = env["models"].init(env["model"], key=jax.random.key(0))
    for loss in (env["drift_loss"], env["score_loss"]):
        assert np.isfinite(float(loss(params, jax.random.key(1))))


def test_couplings_example():
    env = _run("couplings")
    ot, mw, x0, x1 = env["ot"], env["mw"], env["x0"], env["x1"]
    g0, g1 = env["g0"], env["g1"]
    # one Euler step of the exact OT field lands on the Bures map (float32)
    s0, s1 = np.asarray(g0.covs[0], np.float64), np.asarray(g1.covs[0], np.float64)
    w, v = np.linalg.eigh(s1)  # s0 = I here: A = S1^{1/2}
    a = v @ np.diag(np.sqrt(w)) @ v.T
    assert np.allclose(s0, np.eye(2))
    want = np.asarray(g1.means[0]) + np.asarray(x0) @ a.T
    np.testing.assert_allclose(x1, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(mw.plan).sum(0), 1 / 8, rtol=1e-5)
    np.testing.assert_allclose(mw.cost, env["couplings"].transport_cost(mw.coupling), rtol=1e-5)
    assert env["b"].shape == (1000, 2) and np.all(np.isfinite(env["b"]))
    assert float(ot.cost) < float(env["cost"])  # entropic coupling moves mass farther
