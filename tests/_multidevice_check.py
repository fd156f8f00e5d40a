"""Multi-device checks of fmjax.sharding, run by tests/test_sharding.py in a subprocess.

Run it with 8 fake CPU devices (the environment must be set before JAX starts, hence the
subprocess)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tests/_multidevice_check.py [check ...]

It prints one JSON object of measurements on its last line; the assertions (with their
tolerances) are in tests/test_sharding.py. Checks: "data_parallel" (the sharded draw and the
compiled sharded gradient), "train" (data-parallel fit vs one device, float64), "many"
(fit_many with models split across devices), "evaluate" (exact velocity of a GMM on sharded
points), "sample" (ODE solve from sharded x0), "errors" (messages for batch sizes that do not
divide the devices).
"""

from __future__ import annotations

import functools
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import data, exact, losses, mixtures, models, schedules, sharding, train

N_DEV = 8
BATCH = 8 * N_DEV  # global batch: 8 rows per device
WIDTH = 12  # MLP width, distinct from every other size so the HLO regex finds activations


def _max_rel(a, b) -> float:
    """max over leaves of max|a - b| / max|a| (relative to the leaf's scale)."""
    errs = jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(x))),
        a,
        b,
    )
    return max(jax.tree.leaves(errs))


def _max_abs(a, b) -> float:
    """max over leaves of max|a - b|."""
    errs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(errs))


def _sharded_over(x, n: int) -> bool:
    """x is split along its leading axis over n distinct devices, each holding len(x) / n rows."""
    shards = x.addressable_shards
    return (
        len({s.device for s in shards}) == n
        and all(s.data.shape[0] == x.shape[0] // n for s in shards)
        and not x.sharding.is_fully_replicated
    )


def _problem(dtype):
    coupling = mixtures.random_joint_mixture(jax.random.key(0), 3, 2, dtype=dtype)
    model = models.MLP(dim=2, width=WIDTH, depth=1, time_embedding="raw")
    params = jax.tree.map(lambda p: p.astype(dtype), models.init(model, key=jax.random.key(1)))
    return coupling, model, params


def check_data_parallel(mesh) -> dict:
    """float32: the sharded draw equals the one-device draw, and the compiled gradient of a
    loss drawing through sharded_pairs is data parallel (per-device rows, an all-reduce)."""
    coupling, model, params = _problem(jnp.float32)
    pairs = data.coupling_pairs(coupling)
    loss = losses.cfm(model.apply, sharding.sharded_pairs(pairs, mesh), schedules.linear(), BATCH)
    hlo = jax.jit(jax.grad(loss)).lower(sharding.replicate(params, mesh), jax.random.key(3))
    hlo = hlo.compile().as_text()
    rows = {int(r) for r in re.findall(rf"f32\[(\d+),{WIDTH}\]", hlo)}  # activations (rows, width)
    x0s, x1s = jax.jit(sharding.sharded_pairs(pairs, mesh), static_argnums=1)(
        jax.random.key(4), BATCH
    )
    x0, x1 = jax.jit(pairs, static_argnums=1)(jax.random.key(4), BATCH)
    return {
        "hlo_all_reduce": "all-reduce" in hlo,
        "hlo_local_batch": BATCH // N_DEV in rows,
        "hlo_full_batch": BATCH in rows,
        "hlo_full_pairs": f"f32[{BATCH},2]" in hlo,  # the whole (64, 2) draw on any device
        "hlo_local_pairs": f"f32[{BATCH // N_DEV},2]" in hlo,
        "pairs_bit_equal": bool(np.array_equal(x0, x0s) and np.array_equal(x1, x1s)),
        "pairs_sharded": _sharded_over(x0s, N_DEV) and _sharded_over(x1s, N_DEV),
    }


def check_train(mesh) -> dict:
    """float64: fit with mesh (batch sharded by sharded_pairs) vs fit without, same key."""
    jax.config.update("jax_enable_x64", True)
    try:
        coupling, model, params = _problem(jnp.float64)
        pairs = data.coupling_pairs(coupling)
        sched = schedules.linear()
        kw = dict(steps=20, learning_rate=1e-2, ema_decay=0.9, progress=False)
        single = train.fit(losses.cfm(model.apply, pairs, sched, BATCH), params,
                           key=jax.random.key(2), **kw)  # fmt: skip
        loss = losses.cfm(model.apply, sharding.sharded_pairs(pairs, mesh), sched, BATCH)
        multi = train.fit(loss, params, key=jax.random.key(2), mesh=mesh, **kw)
    finally:
        jax.config.update("jax_enable_x64", False)
    leaf = jax.tree.leaves(multi.params)[0]
    return {
        "params_rel_err": _max_rel(single.params, multi.params),
        "ema_rel_err": _max_rel(single.ema_params, multi.ema_params),
        "loss_rel_err": float(np.max(np.abs(single.losses - multi.losses) / single.losses)),
        "params_replicated": bool(leaf.sharding.is_fully_replicated)
        and len(leaf.addressable_shards) == N_DEV,
        "params_moved": _max_abs(params, multi.params),
    }


def check_many(mesh) -> dict:
    """fit_many over 8 problem instances, models split across the 8 devices vs one device."""
    instances = [mixtures.random_joint_mixture(jax.random.key(i), 2, 2) for i in range(N_DEV)]
    batch_inst = jax.tree.map(lambda *a: jnp.stack(a), *instances)
    model = models.MLP(dim=2, width=WIDTH, depth=1, time_embedding="raw")
    keys = jax.random.split(jax.random.key(5), N_DEV)
    params = jax.vmap(lambda k: models.init(model, key=k))(keys)

    def loss(p, k, inst):
        return losses.cfm(model.apply, inst.sample, schedules.linear(), 32)(p, k)

    kw = dict(steps=10, instances=batch_inst, learning_rate=1e-2, progress=False)
    single = train.fit_many(loss, params, keys=keys, **kw)
    multi = train.fit_many(loss, params, keys=keys, mesh=mesh, **kw)
    leaf = jax.tree.leaves(multi.params)[0]
    return {
        "params_rel_err": _max_rel(single.params, multi.params),
        "models_sharded": _sharded_over(leaf, N_DEV),
    }


def check_evaluate(mesh) -> dict:
    """Exact velocity of a GMM on 4096 points: sharded vs one device (both jitted)."""
    coupling = mixtures.random_joint_mixture(jax.random.key(6), 4, 2)
    fn = functools.partial(exact.velocity, coupling, schedules.cosine(), 0.3)
    x = jax.random.normal(jax.random.key(7), (4096, 2))
    ref = jax.jit(fn)(x)
    u = sharding.evaluate(fn, x, mesh)
    return {
        "abs_err": float(np.max(np.abs(np.asarray(u) - np.asarray(ref)))),
        "scale": float(np.max(np.abs(ref))),
        "sharded": _sharded_over(u, N_DEV),
        "shape": list(u.shape),
    }


def check_sample(mesh) -> dict:
    """ODE sampling of the exact field from sharded x0 vs one device: RK4 and adaptive Tsit5."""
    from fmjax import sample

    coupling = mixtures.independent_coupling(
        mixtures.GaussianMixture(jnp.ones(1), jnp.zeros((1, 2)), jnp.eye(2)[None]),
        mixtures.random_gaussian_mixture(jax.random.key(8), 3, 2),
    )
    velocity = functools.partial(exact.velocity, coupling, schedules.linear())
    x0 = jax.random.normal(jax.random.key(9), (256, 2))
    out = {}
    for name, kw in (("rk4", dict(solver="rk4", steps=16)), ("tsit5", dict(rtol=1e-4, atol=1e-4))):

        def solve(x, kw=kw):
            sol = sample.ode(velocity, x, **kw)
            return sol.x, jnp.broadcast_to(sol.num_steps, x.shape[:1])

        ref, ref_steps = jax.jit(solve)(x0)
        x1, steps = sharding.evaluate(solve, x0, mesh)
        out[name] = {
            "abs_err": float(np.max(np.abs(np.asarray(x1) - np.asarray(ref)))),
            "scale": float(np.max(np.abs(ref))),
            "same_num_steps": int(ref_steps[0]) == int(steps[0]),
            "num_steps": int(steps[0]),
            "sharded": _sharded_over(x1, N_DEV),
        }
    return out


def _message(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def check_errors(mesh) -> dict:
    """Error messages for batch sizes that do not divide the 8 devices."""
    x = jnp.ones((12, 2))
    model = models.MLP(dim=2, width=4, depth=1)
    keys = jax.random.split(jax.random.key(0), 4)
    params = jax.vmap(lambda k: models.init(model, key=k))(keys)
    pairs = sharding.sharded_pairs(lambda k, n: (jnp.zeros((n, 2)), jnp.zeros((n, 2))), mesh)
    loss = losses.cfm(model.apply, lambda k, n: (jnp.zeros((n, 2)), jnp.zeros((n, 2))),
                      schedules.linear(), 8)  # fmt: skip
    return {
        "shard_batch": _message(lambda: sharding.shard_batch(x, mesh)),
        "shard_batch_tree": _message(lambda: sharding.shard_batch({"a": x[:8], "b": x}, mesh)),
        "sharded_pairs": _message(lambda: jax.jit(lambda k: pairs(k, 12))(jax.random.key(0))),
        "evaluate": _message(lambda: sharding.evaluate(lambda v: v, x, mesh)),
        "evaluate_output": _message(lambda: sharding.evaluate(lambda v: v[:4], x[:8], mesh)),
        "fit_many": _message(lambda: train.fit_many(loss, params, keys=keys, steps=1, mesh=mesh,
                                                    progress=False)),
    }  # fmt: skip


CHECKS = {
    "errors": check_errors,
    "data_parallel": check_data_parallel,
    "train": check_train,
    "many": check_many,
    "evaluate": check_evaluate,
    "sample": check_sample,
}


def main(names: list[str]) -> None:
    if jax.device_count() != N_DEV:
        raise SystemExit(f"needs {N_DEV} devices (XLA_FLAGS), got {jax.device_count()}")
    mesh = sharding.data_mesh()
    results = {"threefry_partitionable": bool(jax.config.jax_threefry_partitionable)}
    for name in names or list(CHECKS):
        results[name] = CHECKS[name](mesh)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
