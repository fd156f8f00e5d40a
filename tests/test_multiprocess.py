"""Real multi-process runs (``jax.distributed``, gloo collectives on 127.0.0.1) on one machine.

One module fixture starts every process at once and waits for them all:

* ``multi``: 2 processes x 2 CPU devices (4 global devices) run tests/_multiprocess_check.py;
* ``single``: 1 process x 4 CPU devices runs the same checks, the reference; the two hand each
  other a checkpoint at step 12 to resume on the other layout;
* ``cli``: 2 processes run ``fmjax train`` (through the check script's audit hook), compared
  with a single-process ``fmjax train`` run here, in the pytest process (1 device).

After its checks, process 1 of ``multi`` kills itself mid-fit (SIGKILL): process 0 must stop
with an error within a bounded time and leave its last checkpoint intact.

The harness gives every process one deadline; a process still running then fails the test with
its name and the end of its stderr. Cost: 55-65 s of CPU in the 5 subprocesses (each ~2.5 s
of imports, the rest compilation of tiny programs, with XLA's optimisations off) plus ~15 s in
the pytest process; the fixture measured 84, 100, 118 and 186 s wall on this 2-core machine
at load averages of ~9, ~9, ~8 and ~16 (other jobs); from the CPU time, ~40 s on 2 idle
cores (an estimate, not measured).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tests" / "_multiprocess_check.py"
DEADLINE_S = 420  # for the whole fixture: 2 busy cores, 5 processes compiling at once
FAULT_BOUND_S = 60  # process 0 must be gone this long after process 1 died (heartbeat: 10 s)
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
CLI_ARGS = [
    "train",
    "--data",
    "checkerboard",
    "--steps",
    "40",
    "--batch-size",
    "16",
    "--width",
    "8",
    "--depth",
    "1",
    "--checkpoint-every",
    "20",
    "--seed",
    "3",
]


# ----------------------------------------------------------------------------- harness


class Finished(NamedTuple):
    """A process that ended: its exit status, stderr, stdout and when it ended (monotonic)."""

    returncode: int
    stderr: str
    stdout: str
    ended: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, process: int | None = None, n: int = 1, port: int = 0) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FMJAX_", "SLURM_", "XLA_FLAGS"))
    }
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED="1")
    # Tiny programs: XLA's optimisations cost more than they save (a third of the CPU time).
    env["XLA_FLAGS"] = XLA_FLAGS
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    if process is not None:
        env.update(
            FMJAX_COORDINATOR=f"127.0.0.1:{port}",
            FMJAX_NUM_PROCESSES=str(n),
            FMJAX_PROCESS_ID=str(process),
        )
    return env


def launch(name: str, argv: list[str], out: Path, *, processes: int, devices: int) -> dict:
    """Start ``processes`` processes of ``argv`` (2+: one jax.distributed job with its
    coordinator on a free localhost port), ``devices`` CPU devices each; stdout and stderr go
    to files in ``out``. Returns ``{"name process": Popen}``."""
    port = _free_port()
    procs = {}
    for i in range(processes):
        label = f"{name} process {i}" if processes > 1 else name
        env = _env(devices, i if processes > 1 else None, processes, port)
        tag = label.replace(" ", "_")
        procs[label] = subprocess.Popen(
            argv,
            env=env,
            cwd=out,
            stdout=open(out / f"{tag}.stdout", "w"),  # noqa: SIM115
            stderr=open(out / f"{tag}.stderr", "w"),  # noqa: SIM115
        )
    return procs


def wait(procs: dict, out: Path, deadline_s: float) -> dict[str, Finished]:
    """Wait for every process until one shared deadline; a process still running then is
    killed with the others and the test fails, naming each one that hung."""
    t_end = time.monotonic() + deadline_s
    ended: dict[str, float] = {}
    while len(ended) < len(procs) and time.monotonic() < t_end:
        for label, p in procs.items():
            if label not in ended and p.poll() is not None:
                ended[label] = time.monotonic()
        time.sleep(0.1)
    hung = [label for label in procs if label not in ended]
    for label in hung:
        procs[label].kill()
        procs[label].wait()

    def read(label: str, stream: str) -> str:
        return (out / f"{label.replace(' ', '_')}.{stream}").read_text(errors="replace")

    if hung:
        tails = "\n".join(f"--- {label} stderr:\n{read(label, 'stderr')[-1500:]}" for label in hung)
        raise AssertionError(
            f"{', '.join(hung)} hung: still running after {deadline_s:.0f} s (killed)\n{tails}"
        )
    return {
        label: Finished(p.returncode, read(label, "stderr"), read(label, "stdout"), ended[label])
        for label, p in procs.items()
    }


def test_harness_names_the_process_that_hangs(tmp_path):
    """The control of the harness: process 1 of a job sleeps past the deadline."""
    script = "import os, time; time.sleep(60 if os.environ['FMJAX_PROCESS_ID'] == '1' else 0)"
    procs = launch("sleepy", [sys.executable, "-c", script], tmp_path, processes=2, devices=1)
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"^sleepy process 1 hung: still running after 3 s"):
        wait(procs, tmp_path, 3)
    assert time.monotonic() - t0 < 10
    assert all(p.poll() is not None for p in procs.values())  # killed, not left behind


# ----------------------------------------------------------------------------- the runs


class Runs(NamedTuple):
    out: Path
    finished: dict[str, Finished]
    info: dict[str, dict]  # "multi.0", "multi.1", "single.0", "cli.0", "cli.1"
    arrays: dict[str, dict]
    seconds: float


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    out = tmp_path_factory.mktemp("multiprocess")
    t0 = time.monotonic()
    argv = [sys.executable, str(CHECK)]
    procs = launch("multi", [*argv, "multi", str(out)], out, processes=2, devices=2)
    procs |= launch("single", [*argv, "single", str(out)], out, processes=1, devices=4)
    cli = [*argv, "cli", str(out), *CLI_ARGS, "--out", str(out / "cli_multi")]
    procs |= launch("cli", cli, out, processes=2, devices=2)
    # The single-process `fmjax train`, meanwhile, in this process (one CPU device).
    from fmjax import cli as fmjax_cli

    status = fmjax_cli.main([*CLI_ARGS, "--no-progress", "--out", str(out / "cli_single")])
    assert status == 0
    finished = wait(procs, out, DEADLINE_S)
    info, arrays = {}, {}
    for path in out.glob("*.json"):
        info[path.stem] = json.loads(path.read_text())
    for path in out.glob("*.npz"):
        with np.load(path) as z:
            arrays[path.stem] = dict(z)
    return Runs(out, finished, info, arrays, time.monotonic() - t0)


def _ok(runs: Runs, *labels: str) -> None:
    for label in labels:
        f = runs.finished[label]
        assert f.returncode == 0, f"{label} exited with {f.returncode}:\n{f.stderr[-3000:]}"


def _max_rel(a: dict, b: dict, prefix: str) -> float:
    keys = sorted(k for k in a if k.startswith(prefix + "/"))
    assert keys and keys == sorted(k for k in b if k.startswith(prefix + "/")), prefix
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(a[k]))) for k in keys)


def test_two_processes_see_four_devices(runs):
    _ok(runs, "single")
    for p in (0, 1):
        assert runs.info[f"multi.{p}"]["devices"] == [4, 2, 2]  # global, local, processes
    assert runs.info["single.0"]["devices"] == [4, 4, 1]


def test_fit_with_sharded_pairs_across_processes(runs):
    m0, m1, s = runs.arrays["multi.0"], runs.arrays["multi.1"], runs.arrays["single.0"]
    # Both processes hold the same replicated parameters, bit for bit.
    assert _max_rel(m0, m1, "full") == 0.0
    assert runs.info["multi.0"]["params_replicated"] and runs.info["multi.1"]["params_replicated"]
    # float64, 24 Adam steps, batch 16 = 4 rows per device on both layouts: the same draws and
    # the same per-device sums; only the all-reduce (gloo across processes vs XLA's in-process
    # one) may add the 4 partial gradients in another order. Round-off, growing over the steps:
    # bound 1e-12 (measured 3.5e-16); another key (other batches) moves them by 0.4.
    assert _max_rel(s, m0, "full") < 1e-12
    other = {k.replace("otherkey", "full"): v for k, v in s.items() if k.startswith("otherkey/")}
    assert _max_rel(s, other, "full") > 1e-3


def test_fit_many_splits_models_across_processes(runs):
    m0, m1, s = runs.arrays["multi.0"], runs.arrays["multi.1"], runs.arrays["single.0"]
    assert runs.info["multi.0"]["many_local_models"] == [1, 1]  # 2 of the 4 models per process
    assert runs.info["multi.1"]["many_local_models"] == [1, 1]
    # Each model trains on its own device: the same arithmetic, no communication but the loss
    # history (gathered whole on every process). float64; bound 1e-12 for round-off.
    assert _max_rel(m0, m1, "many") == 0.0
    assert _max_rel(s, m0, "many") < 1e-12
    assert m0["many/losses"].shape == (4, 10)


def test_evaluate_and_sample_on_sharded_points(runs):
    m0, m1, s = runs.arrays["multi.0"], runs.arrays["multi.1"], runs.arrays["single.0"]
    for p in (0, 1):  # each process computes 2 x 64 of the 256 rows
        assert runs.info[f"multi.{p}"]["evaluate_local_rows"] == [64, 64]
        assert runs.info[f"multi.{p}"]["sample_local_rows"] == [64, 64]
    # Row-wise computations (exact velocity; RK4 with fixed steps): the same arithmetic per
    # point on both layouts, float64; bound 1e-12 relative for round-off (measured 0).
    for name in ("evaluate", "sample"):
        assert _max_rel(m0, m1, name) == 0.0
        assert _max_rel(s, m0, name) < 1e-12


def test_checkpoints_resume_within_and_across_layouts(runs):
    m0, s = runs.arrays["multi.0"], runs.arrays["single.0"]
    # 12 + 12 steps on the same layout: the uninterrupted run, bit for bit.
    assert runs.info["multi.0"]["resumed_from"] == 12
    assert _max_rel(m0, {k.replace("resumed", "full"): v for k, v in m0.items()}, "full") == 0.0
    # The other layout's checkpoint at step 12: refused as it is (the message names the
    # processes and devices), continued with resume="force": the uninterrupted run up to the
    # all-reduce's round-off (bound as for the fit).
    for role, other in (("multi.0", "single"), ("single.0", "multi")):
        msg = runs.info[role]["cross_refused"]
        assert "differs in layout" in msg and "resume='force'" in msg, msg
        assert f"handoff.{other}" in msg
        assert runs.info[role]["cross_resumed_from"] == 12
        a = runs.arrays[role]
        cross = {k.replace("cross", "full"): v for k, v in a.items() if k.startswith("cross/")}
        assert _max_rel(s, cross, "full") < 1e-12
    assert (
        "saved '2 process(es), 4 device(s)', now '1 process(es), 4 device(s)'"
        in (runs.info["single.0"]["cross_refused"])
    )
    # Another mesh (2 of the 4 devices) on resume is refused too.
    msg = runs.info["single.0"]["mesh_refused"]
    assert "saved '1 process(es), 4 device(s)', now '1 process(es), 2 device(s)'" in msg, msg


def test_a_stop_on_one_process_stops_all_at_the_same_step(runs):
    # process 1's stop() turns true after its 2nd chunk of 6 steps; process 0's never does.
    for p in (0, 1):
        assert runs.info[f"multi.{p}"]["stop_step"] == 2 * 6
        assert runs.info[f"multi.{p}"]["stop_checkpoints"] == ["12"]


def test_only_process_zero_prints_and_writes(runs):
    bar = re.compile(r"fit: +\d+%")
    assert bar.search(runs.finished["multi process 0"].stderr)
    assert not bar.search(runs.finished["multi process 1"].stderr)
    # Files process 1 opened for writing or created (audit hook; tensorstore's C++ writes
    # are not seen, hence the second check): none.
    assert runs.info["multi.1"]["writes"] == []
    assert any(w.startswith("ck_full.multi/12") for w in runs.info["multi.0"]["writes"])
    # orbax wrote the (host, replicated) arrays from process 0 alone.
    assert not list(runs.out.glob("ck_full.multi/*/*/ocdbt.process_1"))
    assert list(runs.out.glob("ck_full.multi/24/state/ocdbt.process_0"))


def test_a_killed_process_stops_the_others_and_keeps_the_last_checkpoint(runs, x64):
    from tests import _multiprocess_check as check

    f0, f1 = runs.finished["multi process 0"], runs.finished["multi process 1"]
    assert f1.returncode == -signal.SIGKILL, f1.stderr[-2000:]
    assert "fault: process 0 starts" in f0.stderr
    assert "fault: the fit finished without process 1" not in f0.stderr
    assert f0.returncode not in (0, 3), f0.stderr[-2000:]
    # No hang: process 0 is gone soon after process 1 (a broken gloo connection raises at once;
    # else the coordination service's 10 s heartbeat timeout aborts it).
    assert f0.ended - f1.ended < FAULT_BOUND_S
    assert re.search(r"another task died|Connection closed|unhealthy|heartbeat", f0.stderr)
    # The last checkpoint (step 12; the kill came after step 18) is intact: it restores, its
    # checksum verifies, and it holds the parameters of step 12 of the same run.
    from fmjax import train

    loss, params = check.problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layout differs: 1 process, 1 device
        r = train.fit(
            loss,
            params,
            key=jax.random.key(2),
            steps=check.HALF,
            progress=False,
            checkpoint_dir=runs.out / "ck_fault",
            resume="force",
            **{k: v for k, v in check.FIT.items() if k != "key"},
        )
    assert r.step == check.HALF and r.resumed_from == check.HALF
    half = {k: v for k, v in runs.arrays["multi.0"].items() if k.startswith("half/")}
    got = {f"half/params/{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(r.params))}
    for k, v in got.items():
        np.testing.assert_array_equal(v, half[k])


def test_cli_across_processes_writes_one_folder(runs):
    from fmjax import experiments, models

    _ok(runs, "cli process 0", "cli process 1")
    multi, single = runs.out / "cli_multi", runs.out / "cli_single"
    assert sorted(os.listdir(multi)) == sorted(os.listdir(single))
    assert runs.info["cli.1"]["writes"] == []  # process 1 wrote nothing
    assert "fmjax train:" in runs.finished["cli process 0"].stdout
    said = [
        ln
        for ln in runs.finished["cli process 1"].stdout.splitlines()
        if not ln.startswith("[Gloo]")
    ]
    assert said == []  # (gloo's connection messages aside, C++ writes them to stdout)
    a, b = experiments.load_model(single), experiments.load_model(multi)
    # float32, 40 Adam steps, batch 16: 1 device vs 4 devices on 2 processes sum the batch
    # mean in another order. Round-off (measured 7e-8 relative) can grow through Adam's
    # normalised steps, where a gradient component near 0 changes sign; bound 1e-4. Training
    # moved the parameters from their start by far more (checked: > 1e-2).
    start = models.init(a.model, key=jax.random.fold_in(jax.random.key(3), 0))  # --seed 3
    moved = 0.0
    for x, y, x0 in zip(*map(jax.tree.leaves, (a.params, b.params, start)), strict=True):
        x, y, x0 = np.asarray(x), np.asarray(y), np.asarray(x0)
        print(f"cli: max relative difference {np.max(np.abs(x - y)) / np.max(np.abs(x)):.3g}")
        assert np.max(np.abs(x - y)) <= 1e-4 * np.max(np.abs(x))
        moved = max(moved, float(np.max(np.abs(x - x0)) / np.max(np.abs(x))))
    assert moved > 1e-2
    ra = json.loads((single / "results.json").read_text())
    rb = json.loads((multi / "results.json").read_text())
    assert ra["config"] == rb["config"]
    assert abs(ra["final_loss"] - rb["final_loss"]) <= 1e-4 * abs(ra["final_loss"])


def test_report(runs):
    """Report (not a check; shown with ``-s``) the times and the measured differences."""
    print(f"\nmulti-process fixture: {runs.seconds:.1f} s wall")
    for label, info in sorted(runs.info.items()):
        print(label, {k: round(v, 1) for k, v in info.items() if k.endswith(("_s", "seconds"))})
    f0, f1 = runs.finished["multi process 0"], runs.finished["multi process 1"]
    print(f"fault: process 0 ended {f0.ended - f1.ended:.1f} s after process 1 was killed")
    m0, s = runs.arrays["multi.0"], runs.arrays["single.0"]
    for name in ("full", "many", "evaluate", "sample"):
        print(f"{name}: max relative difference 2 processes vs 1: {_max_rel(s, m0, name):.3g}")
