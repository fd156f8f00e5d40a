"""Multi-process checks of fmjax.sharding and fmjax.train, run by tests/test_multiprocess.py.

Every process of a job runs this script with the same arguments; the test launches them
(``FMJAX_COORDINATOR``, ``FMJAX_NUM_PROCESSES``, ``FMJAX_PROCESS_ID`` in the environment, CPU
devices from ``JAX_NUM_CPU_DEVICES``) and compares the files they write::

    python tests/_multiprocess_check.py ROLE OUT [CLI ARGS...]

ROLE is one of:

* ``multi``: 2 processes x 2 CPU devices (gloo collectives on localhost), every check below;
* ``single``: 1 process x 4 CPU devices, the same checks: the reference;
* ``fault``: 2 processes train with checkpoints and process 1 kills itself (SIGKILL) mid-run;
* ``cli``: ``fmjax.cli.main(CLI ARGS)``.

Each process writes ``OUT/<role>.<process>.npz`` (arrays) and ``OUT/<role>.<process>.json``
(messages, shapes, the files it opened for writing, seen by an audit hook). ``multi`` and
``single`` hand each other a checkpoint at step ``HALF`` through ``OUT/handoff.<role>`` (a copy
plus a ``.done`` marker) to resume it on the other layout.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import data, exact, losses, mixtures, models, sample, schedules, sharding, train

STEPS, HALF, CHUNK = 24, 12, 6  # fit: steps, checkpoint (and hand-off) step, steps per call
BATCH = 16  # 4 rows per device
MODELS = 4  # fit_many: one model per device
KILL_STEP = 18  # fault: process 1 dies after this step (the last checkpoint is HALF)
WAIT_S = 120  # longest wait for the other job's hand-off


_PROBLEMS: dict = {}


def problem(mesh=None):
    """(loss, params) of the fit checks, float64: CFM of a tiny MLP from N(0, I) to a 2-D
    mixture; one loss object per mesh, so that every fit on it reuses one compiled program."""
    if mesh not in _PROBLEMS:
        target = mixtures.random_gaussian_mixture(jax.random.key(0), 3, 2, dtype=jnp.float64)
        model = models.MLP(dim=2, width=8, depth=1, time_embedding="raw")
        params = models.init(model, key=jax.random.key(1))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        pairs = data.independent_pairs(data.gaussian_source(2, dtype=jnp.float64), target.sample)
        if mesh is not None:
            pairs = sharding.sharded_pairs(pairs, mesh)
        _PROBLEMS[mesh] = losses.cfm(model.apply, pairs, schedules.linear(), BATCH), params
    return _PROBLEMS[mesh]


FIT = dict(steps_per_call=CHUNK, learning_rate=1e-2, ema_decay=0.9)  # and key=jax.random.key(2)


def _flat(prefix: str, tree) -> dict:
    leaves = jax.tree.leaves(sharding.to_host(tree))
    return {f"{prefix}/{i}": np.asarray(a) for i, a in enumerate(leaves)}


def _result(prefix: str, r: train.FitResult) -> dict:
    out = _flat(f"{prefix}/params", r.params)
    out.update(_flat(f"{prefix}/ema", r.ema_params))
    out[f"{prefix}/losses"] = np.asarray(r.losses)
    return out


def _message(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _wait_for(path: Path) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > WAIT_S:
            raise TimeoutError(f"no {path} after {WAIT_S} s")
        time.sleep(0.2)


def check_fit(role: str, out: Path, mesh, res: dict, info: dict) -> None:
    """fit with sharded_pairs: whole, half + resume, the other layout's hand-off, refusals."""
    loss, params = problem(mesh=mesh)
    FIT["key"] = jax.random.key(2)  # (not at import: JAX starts after jax.distributed)
    full = train.fit(
        loss,
        params,
        steps=STEPS,
        mesh=mesh,
        progress=True,
        checkpoint_dir=out / f"ck_full.{role}",
        checkpoint_every=HALF,
        **FIT,
    )
    res.update(_result("full", full))
    info["params_replicated"] = all(
        a.sharding.is_fully_replicated and len(a.addressable_shards) == jax.local_device_count()
        for a in jax.tree.leaves(full.params)
    )
    # Interrupted at HALF, then resumed on the same layout.
    ck = out / f"ck_half.{role}"
    half = train.fit(loss, params, steps=HALF, mesh=mesh, progress=False, checkpoint_dir=ck, **FIT)
    res.update(_result("half", half))
    handoff = out / f"handoff.{role}"
    if jax.process_index() == 0:
        shutil.copytree(ck, handoff)
        (out / f"handoff.{role}.done").touch()
    _barrier("handoff written")
    resumed = train.fit(
        loss, params, steps=STEPS, mesh=mesh, progress=False, checkpoint_dir=ck, **FIT
    )
    res.update(_result("resumed", resumed))
    info["resumed_from"] = resumed.resumed_from
    # The other layout's checkpoint: refused as it is, continued with resume="force".
    other = out / ("handoff.single" if role == "multi" else "handoff.multi")
    _wait_for(other.with_name(other.name + ".done"))
    kw = dict(steps=STEPS, mesh=mesh, progress=False, checkpoint_dir=other, **FIT)
    info["cross_refused"] = _message(lambda: train.fit(loss, params, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cross = train.fit(loss, params, resume="force", **kw)
    res.update(_result("cross", cross))
    info["cross_resumed_from"] = cross.resumed_from
    if role == "multi":
        # stop() true on process 1 alone (a signal only it received), after its 2nd chunk: both
        # processes stop at that step, with one checkpoint.
        calls = []

        def stop():
            calls.append(1)
            return jax.process_index() == 1 and len(calls) >= 2

        ck = out / "ck_stop.multi"
        stopped = train.fit(
            loss,
            params,
            steps=STEPS,
            mesh=mesh,
            progress=False,
            stop=stop,
            checkpoint_dir=ck,
            **FIT,
        )
        info["stop_step"] = stopped.step
        info["stop_checkpoints"] = sorted(p.name for p in ck.iterdir() if p.name.isdigit())
    if role == "single":
        # Control: another key (other batches); a mesh of 2 of the 4 devices is refused.
        other_key = dict(FIT, key=jax.random.key(3))
        res.update(
            _result(
                "otherkey",
                train.fit(loss, params, steps=STEPS, mesh=mesh, progress=False, **other_key),
            )
        )
        small = sharding.data_mesh(jax.devices()[:2])
        loss2, _ = problem(mesh=small)
        info["mesh_refused"] = _message(
            lambda: train.fit(
                loss2, params, steps=STEPS, mesh=small, progress=False, checkpoint_dir=ck, **FIT
            )
        )


def check_many(mesh, res: dict, info: dict) -> None:
    """fit_many: 4 problem instances (target means), one model per device, two per process."""
    shifts = jnp.linspace(-2.0, 2.0, 2 * MODELS, dtype=jnp.float64).reshape(MODELS, 2)
    model = models.MLP(dim=2, width=8, depth=1, time_embedding="raw")
    keys = jax.random.split(jax.random.key(5), MODELS)
    params = jax.vmap(lambda k: models.init(model, key=k))(keys)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)

    def loss(p, k, shift):
        def pairs(key, n):
            x = jax.random.normal(key, (2, n, 2), jnp.float64)
            return x[0], 0.5 * x[1] + shift

        return losses.cfm(model.apply, pairs, schedules.linear(), BATCH)(p, k)

    r = train.fit_many(
        loss,
        params,
        keys=keys,
        steps=10,
        instances=shifts,
        learning_rate=1e-2,
        mesh=mesh,
        progress=False,
    )
    leaf = jax.tree.leaves(r.params)[0]
    info["many_local_models"] = [int(s.data.shape[0]) for s in leaf.addressable_shards]
    res.update(_flat("many/params", r.params))
    res["many/losses"] = np.asarray(r.losses)


def check_evaluate(mesh, res: dict, info: dict) -> None:
    """Exact velocity of a GMM on 256 sharded points, and an RK4 solve from sharded x0."""
    coupling = mixtures.random_joint_mixture(jax.random.key(6), 4, 2, dtype=jnp.float64)
    fn = functools.partial(exact.velocity, coupling, schedules.cosine(), 0.3)
    x = jax.random.normal(jax.random.key(7), (256, 2), jnp.float64)
    u = sharding.evaluate(fn, x, mesh)
    info["evaluate_local_rows"] = [int(s.data.shape[0]) for s in u.addressable_shards]
    res["evaluate/u"] = sharding.to_host(u)
    velocity = functools.partial(exact.velocity, coupling, schedules.linear())
    x1 = sharding.evaluate(lambda x: sample.ode(velocity, x, solver="rk4", steps=4).x, x, mesh)
    info["sample_local_rows"] = [int(s.data.shape[0]) for s in x1.addressable_shards]
    res["sample/rk4"] = sharding.to_host(x1)


def run_checks(role: str, out: Path, res: dict, info: dict) -> None:
    jax.config.update("jax_enable_x64", True)
    mesh = sharding.data_mesh()
    info["devices"] = [jax.device_count(), jax.local_device_count(), jax.process_count()]
    for name, check in (("evaluate", check_evaluate), ("many", check_many)):
        t0 = time.perf_counter()
        check(mesh, res, info)
        info[f"{name}_s"] = time.perf_counter() - t0
        print(name, info[f"{name}_s"], time.process_time(), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    check_fit(role, out, mesh, res, info)
    info["fit_s"] = time.perf_counter() - t0


def run_fault(out: Path) -> None:
    """Train with checkpoints every HALF steps; process 1 dies (SIGKILL) after KILL_STEP."""
    mesh = sharding.data_mesh()
    loss, params = problem(mesh=mesh)

    def die(step, losses, aux):
        if step == KILL_STEP and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    print(f"fault: process {jax.process_index()} starts", file=sys.stderr, flush=True)
    train.fit(
        loss,
        params,
        steps=STEPS,
        mesh=mesh,
        progress=False,
        callback=die,
        checkpoint_dir=out / "ck_fault",
        checkpoint_every=HALF,
        **FIT,
    )
    print("fault: the fit finished without process 1", file=sys.stderr, flush=True)


def _record_writes(out: Path) -> list[str]:
    """Paths under ``out`` that this process opens for writing or creates (audit hook)."""
    root, seen = str(out.resolve()), []

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], str | os.PathLike):
            path, mode = os.fspath(args[0]), args[1] if len(args) > 1 else "r"
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writing and os.path.abspath(path).startswith(root):
                seen.append(os.path.relpath(os.path.abspath(path), root))
        elif event in ("os.mkdir", "os.rename", "os.replace") and args:
            path = os.fspath(args[0]) if isinstance(args[0], str | os.PathLike) else ""
            if path and os.path.abspath(path).startswith(root):
                seen.append(f"{event} " + os.path.relpath(os.path.abspath(path), root))

    sys.addaudithook(hook)
    return seen


def main(argv: list[str]) -> int:
    role, out = argv[0], Path(argv[1])
    writes = _record_writes(out)
    t0 = time.perf_counter()
    status = 0
    res, info = {}, {"role": role}
    if role == "cli":  # `fmjax train` starts jax.distributed itself, from FMJAX_*
        from fmjax import cli

        status = cli.main(argv[2:])
    else:
        sharding.initialize_distributed(heartbeat_timeout_seconds=10)
        run_checks(role, out, res, info)
    pid = info["process"] = jax.process_index()
    info["seconds"] = time.perf_counter() - t0
    info["cpu_seconds"] = time.process_time()
    info["writes"] = sorted(set(writes))
    np.savez(out / f"{role}.{pid}.npz", **res)
    (out / f"{role}.{pid}.json").write_text(json.dumps(info))
    if role == "multi":  # last: process 1 dies, process 0 must then stop with an error
        _barrier("results written")
        run_fault(out)
        return 3
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
