"""The Python examples of the README and of the documentation's guides run as written and compute
what they say (they are the first code users copy). Each block is found by a line it must
contain, in the page it lives in, and checked by name: a renamed variable or a removed block fails
here instead of skipping a check. The docs' home and get-started pages include the README's
block (pymdownx.snippets), so it is tested once, here."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The pages whose python blocks are all run here (pages written elsewhere test their own).
PAGES = [
    "README.md",
    "docs/get-started.md",
    "docs/concepts/interpolants.md",
    "docs/concepts/couplings.md",
    "docs/how-to/own-model.md",
    "docs/how-to/evaluate.md",
    "docs/how-to/samplers.md",
    "docs/how-to/devices.md",
]
BLOCKS = {
    page: re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)
    for page in PAGES
}
MARKERS = {  # name: (page, a line the block must contain)
    "exact": ("README.md", "fmjax.exact.evaluate(coupling"),
    "learn": ("docs/get-started.md", "losses.loss_floor(coupling"),
    "modules": ("docs/how-to/own-model.md", "nnx.BatchNorm("),
    "plain": ("docs/how-to/own-model.md", "def my_velocity(w, t, x)"),
    "devices": ("docs/how-to/devices.md", "sharding.data_mesh()"),
    "interpolants": ("docs/concepts/interpolants.md", "with_noise(schedules.brownian"),
    "couplings": ("docs/concepts/couplings.md", "couplings.mixture_ot(p0, p1)"),
    "evaluate": ("docs/how-to/evaluate.md", "report = fmjax.evaluate(field, problem"),
    "samplers": ("docs/how-to/samplers.md", "solver=diffrax.ShARK()"),
}


def _run(name: str) -> dict:
    page, marker = MARKERS[name]
    found = [b for b in BLOCKS[page] if marker in b]
    assert len(found) == 1, f"{page}: one python block must contain {marker!r}"
    env: dict = {}
    exec(compile(found[0], f"{page}[{name} example]", "exec"), env)
    return env


def test_every_block_is_checked():
    for page, blocks in BLOCKS.items():
        markers = [m for p, m in MARKERS.values() if p == page]
        assert len(blocks) == len(markers), page
        for block in blocks:
            assert sum(m in block for m in markers) == 1, (page, block[:80])


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


def test_plain_function_example():
    """The plain function with w = 1 is the exact field of N(0, I) -> N(0, I) (error ~0 up to
    float32 round-off); control: w = 0.5 is off by half of u, error 0.25 E|u|^2 > 0."""
    env = _run("plain")
    assert float(jnp.max(env["err"])) < 1e-8
    half = env["functools"].partial(env["my_velocity"], 0.5)
    ts, key = env["ts"], jax.random.key(0)
    off = env["metrics"].velocity_error(half, env["coupling"], env["s"], ts, 256, key=key)
    assert float(jnp.mean(off)) > 0.05
    assert env["x1"].shape == (100, 2) and np.all(np.isfinite(env["x1"]))


def test_evaluate_example():
    """The exact field scores ~0 against its own problem (a check of the harness)."""
    report = _run("evaluate")["report"]
    assert report.relative_velocity_error < 1e-6 and abs(report.excess_loss) < 1e-6
    assert abs(report.cross_entropy_z) < 4  # the exact sampler's z ~ N(0, 1)


def test_samplers_example():
    """ODE and ShARK SDE samples of the exact field put weight 1/2 on each mode (+-2, sd 0.5):
    binomial sd 0.011 for n = 2000, 0.05 leaves room for discretisation."""
    env = _run("samplers")
    for sol in (env["ode"], env["sde"]):
        x = np.asarray(sol.x)[:, 0]
        assert abs(np.mean(x > 0) - 0.5) < 0.05 and abs(np.mean(np.abs(x)) - 2.0) < 0.1
    assert env["ode"].nfe == 32
