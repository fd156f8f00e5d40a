"""Tests of fmjax.sharding and of training with a mesh.

The many-device checks run tests/_multidevice_check.py in a subprocess with 8 fake CPU devices
(``--xla_force_host_platform_device_count`` must be set before JAX starts); the in-process tests
use the one real CPU device, where a mesh must change nothing at all, plus argument validation.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import data, exact, losses, mixtures, models, schedules, sharding, train

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- one device


def _cfm_problem():
    coupling = mixtures.random_joint_mixture(jax.random.key(0), 3, 2)
    model = models.MLP(dim=2, width=8, depth=1, time_embedding="raw")
    return data.coupling_pairs(coupling), model, models.init(model, key=jax.random.key(1))


def test_fit_with_one_device_mesh_is_identical_and_resumes(tmp_path):
    """The same program: a 1-device mesh must not change a single bit. The replicated state is
    also saved and restored onto the mesh: an interrupted run (7 + 7 steps) equals the whole."""
    pairs, model, params = _cfm_problem()
    mesh = sharding.data_mesh()
    assert mesh.size == 1
    kw = dict(steps=14, steps_per_call=5, ema_decay=0.9, progress=False)
    plain = train.fit(losses.cfm(model.apply, pairs, schedules.linear(), 32), params,
                      key=jax.random.key(2), **kw)  # fmt: skip
    loss = losses.cfm(model.apply, sharding.sharded_pairs(pairs, mesh), schedules.linear(), 32)
    meshed = train.fit(loss, params, key=jax.random.key(2), mesh=mesh, **kw)
    ck = dict(kw, checkpoint_dir=tmp_path / "ck", checkpoint_every=7, mesh=mesh)
    train.fit(loss, params, key=jax.random.key(2), **dict(ck, steps=7))
    resumed = train.fit(loss, params, key=jax.random.key(2), **ck)
    assert resumed.step == 14
    for run in (meshed, resumed):
        for a, b in zip(jax.tree.leaves((plain.params, plain.ema_params, plain.losses)),
                        jax.tree.leaves((run.params, run.ema_params, run.losses)),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert jax.tree.leaves(run.params)[0].sharding == sharding.replicated(mesh)
    assert not np.array_equal(plain.params["params"]["out"]["kernel"],
                              params["params"]["out"]["kernel"])  # fmt: skip


def test_fit_rejects_bad_mesh():
    pairs, model, params = _cfm_problem()
    loss = losses.cfm(model.apply, pairs, schedules.linear(), 8)
    with pytest.raises(TypeError, match="`mesh`"):
        train.fit(loss, params, key=jax.random.key(0), steps=1, mesh="data", progress=False)


def test_placement_and_evaluate_on_one_device():
    mesh = sharding.data_mesh()
    x = jnp.arange(12.0).reshape(6, 2)
    y = sharding.shard_batch({"a": x, "b": x[:, 0]}, mesh)
    assert y["a"].sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(y["a"], x)
    r = sharding.replicate({"w": x}, mesh)
    assert r["w"].sharding.is_fully_replicated
    c = jax.jit(lambda v: sharding.constrain_batch(2 * v, mesh))(x)
    np.testing.assert_array_equal(c, 2 * x)

    coupling = mixtures.random_joint_mixture(jax.random.key(4), 3, 2)
    fn = functools.partial(exact.velocity, coupling, schedules.linear())
    pts = jax.random.normal(jax.random.key(5), (64, 2))
    g, t = (lambda p, s: fn(s, p)), jnp.asarray(0.4)
    u = sharding.evaluate(g, pts, mesh, t)  # extra args replicated
    np.testing.assert_array_equal(u, jax.jit(g)(pts, t))  # the same program, bit for bit
    with pytest.raises(ValueError, match="`fn"):
        sharding.evaluate(lambda p: jnp.sum(p), pts, mesh)
    with pytest.raises(ValueError, match="`x` is a scalar"):
        sharding.shard_batch(jnp.ones(()), mesh)


def test_data_mesh_validation():
    mesh = sharding.data_mesh(axis="batch")
    assert mesh.axis_names == ("batch",) and mesh.size == jax.device_count()
    with pytest.raises(ValueError, match="`axis`"):
        sharding.data_mesh(axis="")
    with pytest.raises(ValueError, match="`devices`"):
        sharding.data_mesh(devices=[])
    with pytest.raises(ValueError, match="`devices`"):
        sharding.data_mesh(devices=jax.devices() * 2)
    with pytest.raises(TypeError, match="sharding.shard_batch: `mesh` must be a jax.sharding"):
        sharding.shard_batch(jnp.ones((4, 2)), mesh=None)
    with pytest.raises(TypeError, match="sharding.sharded_pairs: `sample_pairs`"):
        sharding.sharded_pairs(None, mesh)
    with pytest.raises(TypeError, match="sharding.data_mesh: `axis`"):
        sharding.data_mesh(axis=3)


def test_sharded_pairs_warns_without_partitionable_threefry():
    prev = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    try:
        with pytest.warns(UserWarning, match="jax_threefry_partitionable"):
            sharding.sharded_pairs(lambda k, n: (k, k), sharding.data_mesh())
    finally:
        jax.config.update("jax_threefry_partitionable", prev)


# ----------------------------------------------------------------------------- 8 devices


def _start_multidevice_check() -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_multidevice_check.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module", autouse=True)
def _multidevice_process(request):
    """Start the 8-device subprocess when the module starts (if a selected test needs it), so it
    runs while the one-device tests run; killed at the end if still running."""
    wanted = any("multidevice" in getattr(item, "fixturenames", ()) for item in
                 request.session.items)  # fmt: skip
    proc = _start_multidevice_check() if wanted else None
    yield proc
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def multidevice(_multidevice_process):
    """Measurements from tests/_multidevice_check.py on 8 fake CPU devices (~40 s on 2 cores)."""
    out, err = _multidevice_process.communicate(timeout=600)
    assert _multidevice_process.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def test_multidevice_training_equals_single_device(multidevice):
    assert multidevice["threefry_partitionable"]
    r = multidevice["train"]
    # float64, 20 Adam steps, batch 64 = 8 per device. The only difference is the order in which
    # the batch mean (so the gradient) is summed: per device, then all-reduced. That is round-off,
    # measured 1.5e-16 relative (float32 runs measured 2e-7); the bound 1e-12 leaves room for
    # growth over the steps and catches any change in the data (another batch moves the
    # parameters by ~1e-2).
    assert r["params_rel_err"] < 1e-12, r
    assert r["ema_rel_err"] < 1e-12, r
    assert r["loss_rel_err"] < 1e-12, r
    assert r["params_moved"] > 1e-2, r  # training did something (lr 1e-2, 20 steps)
    assert r["params_replicated"], r


def test_multidevice_training_is_data_parallel(multidevice):
    r = multidevice["data_parallel"]
    # The compiled gradient draws (8, 2) pairs per device and never the whole (64, 2) batch,
    # has per-device (8, width) activations, none of the full (64, width), and an all-reduce;
    # the sharded draw is the single-device draw, bit for bit.
    assert r["hlo_local_pairs"] and not r["hlo_full_pairs"], r
    assert r["hlo_all_reduce"] and r["hlo_local_batch"] and not r["hlo_full_batch"], r
    assert r["pairs_bit_equal"] and r["pairs_sharded"], r


def test_multidevice_fit_many_splits_models(multidevice):
    r = multidevice["many"]
    # float32, vmap over 1 model per device vs 8 on one device: the same arithmetic up to the
    # shapes the CPU kernels see (round-off, measured 1.5e-7 after 10 Adam steps).
    assert r["params_rel_err"] < 1e-5, r
    assert r["models_sharded"], r


def test_multidevice_exact_evaluation(multidevice):
    r = multidevice["evaluate"]
    assert r["shape"] == [4096, 2]
    assert r["sharded"], r
    # Row-wise computation: the same arithmetic per point; measured bit-identical, and at most
    # float32 round-off of the ~10-sized velocity if the CPU kernels vectorise 512 rows apart.
    assert r["abs_err"] <= 1e-5 * r["scale"], r


def test_multidevice_sampling(multidevice):
    rk4, tsit5 = multidevice["sample"]["rk4"], multidevice["sample"]["tsit5"]
    assert rk4["sharded"] and tsit5["sharded"]
    # Fixed steps: each sample follows the same arithmetic, so only velocity round-off (float32,
    # 16 steps x 4 stages; measured 3.6e-6 of a scale of 10) separates the two.
    assert rk4["abs_err"] <= 1e-5 * rk4["scale"], rk4
    # Adaptive steps: the step size is shared by the batch (max norm, all-reduced when sharded).
    # Round-off in the error estimate moves the step sizes slightly, so the two solutions differ
    # by up to the local error the controller allows, rtol * |x| = 1e-4 * scale (measured 1e-6
    # to 2.5e-5 relative, 256 to 1024 points); the number of steps is the same.
    assert tsit5["same_num_steps"], tsit5
    assert tsit5["abs_err"] <= 1e-4 * tsit5["scale"], tsit5


def test_multidevice_errors_name_arguments(multidevice):
    e = multidevice["errors"]
    assert "`x`" in e["shard_batch"] and "12" in e["shard_batch"] and "8" in e["shard_batch"]
    assert "`x['b']`" in e["shard_batch_tree"]
    assert "n=12" in e["sharded_pairs"]
    assert "`x`" in e["evaluate"]
    assert "`fn(x)" in e["evaluate_output"]
    assert "params_batch" in e["fit_many"] and "multiple of 8" in e["fit_many"]


# ----------------------------------------------------------------------------- multi-host


@pytest.fixture
def no_distributed(monkeypatch):
    """Record calls to jax.distributed.initialize instead of making them."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_initialize_distributed_single_process_is_a_no_op(no_distributed):
    for kwargs in ({"env": {}}, {"env": {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}},
                   {"num_processes": 1, "env": {}},
                   {"env": {"FMJAX_NUM_PROCESSES": "1"}}):  # fmt: skip
        cfg = sharding.initialize_distributed(**kwargs)
        assert cfg.source == "single process" and cfg.num_processes == 1, kwargs
    assert no_distributed == []


def test_initialize_distributed_passes_arguments_and_env(no_distributed):
    cfg = sharding.initialize_distributed("node0:1234", 4, 2, local_device_ids=[0, 1], env={})
    assert cfg == sharding.DistributedConfig("node0:1234", 4, 2, "arguments")
    env = {"FMJAX_COORDINATOR": "10.0.0.1:999", "FMJAX_NUM_PROCESSES": "2",
           "FMJAX_PROCESS_ID": "1"}  # fmt: skip
    assert sharding.initialize_distributed(env=env).source == "environment"
    # Arguments win over the environment.
    assert sharding.initialize_distributed(process_id=0, env=env).process_id == 0
    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[01-02]"}
    assert sharding.initialize_distributed(env=slurm).source == "slurm"
    assert no_distributed == [
        dict(local_device_ids=[0, 1], coordinator_address="node0:1234", num_processes=4,
             process_id=2),
        dict(coordinator_address="10.0.0.1:999", num_processes=2, process_id=1),
        dict(coordinator_address="10.0.0.1:999", num_processes=2, process_id=0),
        {},  # SLURM: JAX reads the coordinator, count and id itself
    ]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_processes": 2, "process_id": 0}, "coordinator_address"),
        ({"coordinator_address": "h:1", "num_processes": 2}, "process_id"),
        ({"coordinator_address": "h:1", "process_id": 0}, "num_processes"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, r"\[0, 2\)"),
        ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, "num_processes"),
        ({"coordinator_address": "host", "num_processes": 2, "process_id": 0}, "host:port"),
        ({"coordinator_address": "h:99999", "num_processes": 2, "process_id": 0}, "port"),
        ({"num_processes": True}, "num_processes"),
        ({"env": {"FMJAX_NUM_PROCESSES": "two"}}, "FMJAX_NUM_PROCESSES"),
    ],
)
def test_initialize_distributed_validation(no_distributed, kwargs, match):
    kwargs.setdefault("env", {})
    with pytest.raises(ValueError, match=match):
        sharding.initialize_distributed(**kwargs)
    assert no_distributed == []


def test_place_and_to_host_in_one_process():
    """One process: ``place`` is ``jax.device_put`` (prefix shardings, typed keys included) and
    ``to_host`` a host copy; across processes both are checked by tests/test_multiprocess.py."""
    mesh = sharding.data_mesh()
    tree = {"x": jnp.arange(6.0).reshape(3, 2), "k": jax.random.key(0), "none": None}
    placed = sharding.place(
        tree, {"x": sharding.batch_sharding(mesh), "k": sharding.replicated(mesh), "none": None}
    )
    assert placed["x"].sharding == sharding.batch_sharding(mesh) and placed["none"] is None
    assert jnp.array_equal(jax.random.key_data(placed["k"]), jax.random.key_data(tree["k"]))
    host = sharding.to_host({"x": placed["x"], "y": 2.0})
    assert isinstance(host["x"], np.ndarray) and isinstance(host["y"], np.ndarray)
    np.testing.assert_array_equal(host["x"], tree["x"])
    with pytest.raises(ValueError):  # a control: a sharding tree that does not fit the tree
        sharding.place(tree, {"x": sharding.replicated(mesh)})
