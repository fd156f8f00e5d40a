"""The ``fmjax`` command: demo table/JSON/figures, --help everywhere, train -> sample, configs."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmjax.cli import main

SUBCOMMANDS = ("demo", "experiment", "train", "sample", "bench")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--out", str(out), "--quick", "--no-progress"])
    return rc, out, buf.getvalue()


def test_demo_writes_table_json_and_figures(demo_run):
    rc, out, stdout = demo_run
    assert rc == 0
    header = stdout.split("model")[1].splitlines()[0].split()
    assert header == ["loss", "loss_floor", "velocity_error", "energy_ode", "energy_sde", "nll"]
    assert any(line.startswith("learned") for line in stdout.splitlines())
    assert any(line.startswith("exact") for line in stdout.splitlines())
    result = json.loads((out / "results.json").read_text())
    names = {Path(p).name for p in result["figures"].values()}
    assert {"exact_density_velocity.png", "exact_trajectories.png", "samples.png"} <= names
    for p in result["figures"].values():
        assert Path(p).stat().st_size > 5000


def test_demo_numbers_against_exact_answers(demo_run):
    _, out, _ = demo_run
    m = json.loads((out / "results.json").read_text())["metrics"]
    learned, exact, ref = m["rows"]["learned"], m["rows"]["exact"], m["reference"]
    # Same draw for the held-out loss and the floor: the exact field's CFM loss IS the floor
    # (float32 sums in a different order: 1e-4 relative).
    np.testing.assert_allclose(exact["loss"], exact["loss_floor"], rtol=1e-4)
    assert learned["loss"] > exact["loss_floor"]
    # Excess loss ~ velocity error; both far below the zero field's error even after 300 steps.
    assert learned["velocity_error"] < 0.5 * ref["zero_field_velocity_error"]
    # Exact field: ODE/SDE samples at the noise level of two exact samples (|.| ~ 0.01 for 500
    # points), and the augmented-ODE NLL equals the exact entropy estimate on the same points
    # (solver tolerance 1e-5, float32).
    assert abs(exact["energy_ode"]) < 0.05 and abs(exact["energy_sde"]) < 0.05
    np.testing.assert_allclose(exact["nll"], ref["target_entropy"], atol=0.02)
    # Cross-entropy of exact samples under the model >= entropy (KL >= 0), up to MC noise.
    assert learned["nll"] > ref["target_entropy"] - 0.05
    assert learned["energy_ode"] < 0.5 and learned["energy_sde"] < 0.5


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: fmjax {command}" in capsys.readouterr().out


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(c in text for c in SUBCOMMANDS)


def test_train_then_sample_with_toml_config(tmp_path, capsys):
    cfg = tmp_path / "train.toml"
    cfg.write_text("steps = 40\nwidth = 16\ndepth = 2\nbatch_size = 64\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--steps", "30", "--out", str(run),
                 "--no-progress"]) == 0  # fmt: skip
    res = json.loads((run / "results.json").read_text())
    assert res["config"]["steps"] == 30  # the flag wins over the file
    assert res["config"]["width"] == 16  # the file's value is used
    assert res["loss_floor"] > 0 and res["velocity_error"] > 0
    assert (run / "params.msgpack").is_file() and (run / "model.json").is_file()

    smp = tmp_path / "smp"
    assert main(["sample", "--model", str(run), "--method", "sde", "--n", "200",
                 "--steps", "20", "--out", str(smp), "--no-progress"]) == 0  # fmt: skip
    assert capsys.readouterr().err == ""  # --no-progress: no status lines
    res = json.loads((smp / "results.json").read_text())
    assert res["nfe"] == 20 and np.load(smp / "samples.npy").shape == (200, 2)
    assert (smp / "samples.png").stat().st_size > 5000


def test_sample_sde_uses_the_default_diffusion(tmp_path, monkeypatch):
    """`fmjax sample --method sde` leaves `diffusion` to `sample.sde`'s default (vanishing at
    the data end, issue 21); control: `--diffusion 0.5` is passed on."""
    from fmjax import sample

    seen, sde = [], sample.sde
    monkeypatch.setattr(sample, "sde", lambda *a, **kw: seen.append(kw) or sde(*a, **kw))
    for i, (flags, want) in enumerate((([], None), (["--diffusion", "0.5"], 0.5))):
        argv = ["sample", "--exact", "--method", "sde", "--n", "50", "--steps", "4"]
        assert main([*argv, *flags, "--out", str(tmp_path / str(i)), "--no-progress"]) == 0
        assert seen and {kw["diffusion"] for kw in seen} == {want}  # a first and a timed call
        seen.clear()


def test_sample_exact_field_matches_target(tmp_path, capsys):
    out = tmp_path / "exact"
    assert main(["sample", "--exact", "--n", "400", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert abs(res["energy_distance"]) < 0.05  # exact field: noise level only
    assert res["nfe"] > 0
    # the two-sided checks against the exact demo GMM (controls: tests/test_evaluation.py)
    assert abs(res["cross_entropy_z"]) < 4 and res["target_entropy_stderr"] > 0
    assert 0.3 < res["worst_spread_ratio"] < 3 and "worst_spread_ratio_noise" in res
    # A status line per phase on stderr, with its time (none with --no-progress: the control
    # is in test_train_then_sample_with_toml_config).
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" ...")[0] for ln in lines] == [
        "sampling 400 points by ODE (tsit5; a first call with compilation, then a timed one)",
        "energy distance of 400 samples to 400 target samples",
        f"writing samples.npy, samples.png and results.json to {out}",
    ]
    assert all(re.fullmatch(r".* \.\.\. \d+\.\d s", ln) for ln in lines), lines


def test_bad_config_and_options_exit(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(SystemExit, match="unknown keys"):
        main(["train", "--config", str(bad), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="unknown keys for DemoConfig"):
        main(["demo", "--config", str(bad), "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="cli: `--steps` must be an int >= 1, got 0"):
        main(["train", "--steps", "0", "--out", str(tmp_path / "z")])
    with pytest.raises(SystemExit, match="`data` must be one of"):
        main(["train", "--data", "nope", "--out", str(tmp_path / "v")])
    with pytest.raises(SystemExit, match="written by train_model"):
        main(["sample", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "w")])


def test_experiment_with_json_config(tmp_path, capsys):
    cfg = tmp_path / "cfm.json"
    tiny = {"batch_sizes": [8, 32], "repeats": 2, "n_reference": 512, "pretrain_steps": 0}
    cfg.write_text(json.dumps(tiny))
    out = tmp_path / "cfm"
    assert main(["experiment", "cfm_equals_fm", "--quick", "--config", str(cfg),
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["batch_sizes"] == [8, 32] and len(res["metrics"]["cosine_cfm"]) == 2


def test_bench_dispatch_checks_names():
    # In the test run the checkout's `benchmarks` package is importable.
    with pytest.raises(SystemExit, match="cli: `name` must be one of builtin, all, exact_velocity"):
        main(["bench", "nope"])


def test_bench_outside_a_checkout_says_what_it_needs(tmp_path):
    # An installed fmjax without the checkout's benchmarks/: a package folder that holds only
    # fmjax, run from another directory. Builtin works; a script name exits with one clear line.
    site = tmp_path / "site"
    site.mkdir()
    (site / "fmjax").symlink_to(ROOT / "fmjax", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def fmjax(*argv):
        return subprocess.run([sys.executable, "-m", "fmjax.cli", *argv], cwd=tmp_path,
                              env=env, capture_output=True, text=True)  # fmt: skip

    proc = fmjax("bench", "exact_velocity")
    assert proc.returncode == 1 and "benchmarks" not in proc.stdout, proc.stdout
    assert "runs the scripts in benchmarks/ of a source checkout" in proc.stderr, proc.stderr
    assert "python -m benchmarks" in proc.stderr and "bench builtin" in proc.stderr
    out = tmp_path / "b.json"
    proc = fmjax("bench", "builtin", "--n", "500", "--repeats", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["median_s"] > 0


def test_bench_builtin(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "builtin", "--n", "2000", "--repeats", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 2000 and res["points_per_s"] > 0


@pytest.mark.slow
def test_full_demo(tmp_path):
    # The `make demo` run (default settings): the learned model is close to the exact field.
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    m = json.loads((tmp_path / "results.json").read_text())["metrics"]
    learned, ref = m["rows"]["learned"], m["reference"]
    assert learned["velocity_error"] < 0.02 * ref["zero_field_velocity_error"]
    assert learned["energy_ode"] < 0.02 and learned["energy_sde"] < 0.02
    assert learned["nll"] - ref["target_entropy"] < 0.2  # KL(p1 || model) in nats


# ----------------------------------------------------------------------------- train: checkpoints

TINY = [
    "--data",
    "moons",
    "--width",
    "8",
    "--depth",
    "2",
    "--batch-size",
    "32",
    "--checkpoint-every",
    "25",
]


def _fmjax_process(*argv):
    """``python -m fmjax.cli ARGV`` from the checkout, output captured (stdout line-buffered)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fmjax.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _checkpoints(out):
    return sorted(int(p.name) for p in (out / "checkpoints").glob("*") if p.name.isdigit())


@pytest.fixture(scope="module")
def signalled(tmp_path_factory):
    """Two ``fmjax train`` runs in parallel: one gets SIGTERM as soon as it announces itself
    (before its first chunk of 25 steps ends), the other SIGINT once its checkpoint of step 25
    exists, i.e. mid-training (it asks for 10^6 steps, far more than it can run)."""
    import signal
    import time

    base = tmp_path_factory.mktemp("signals")
    term_out, int_out, twice_out = base / "term", base / "int", base / "twice"
    term = _fmjax_process("train", "--steps", "100", *TINY, "--out", str(term_out))
    sigint = _fmjax_process("train", "--steps", "1000000", *TINY, "--out", str(int_out),
                            "--no-progress")  # fmt: skip
    twice = _fmjax_process(
        "train", "--steps", "1000000", *TINY, "--out", str(twice_out), "--no-progress"
    )
    assert term.stdout.readline().startswith("fmjax train:")  # handlers are installed first
    term.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 240
    while not _checkpoints(int_out) and time.monotonic() < deadline and sigint.poll() is None:
        time.sleep(0.05)
    sigint.send_signal(signal.SIGINT)
    while not _checkpoints(twice_out) and time.monotonic() < deadline and twice.poll() is None:
        time.sleep(0.05)
    twice.send_signal(signal.SIGINT)  # Ctrl-C twice
    twice.send_signal(signal.SIGINT)
    done = {}
    for name, proc in (("term", term), ("int", sigint), ("twice", twice)):
        stdout, stderr = proc.communicate(timeout=240)
        done[name] = (proc.returncode, stdout, stderr)
    return done, term_out, int_out, twice_out


def test_train_sigterm_saves_a_checkpoint_and_a_rerun_continues(signalled, capsys):
    """SIGTERM during a run: a checkpoint at the end of the current chunk, one line on stderr,
    status 143, no traceback; the same command then resumes from that step and finishes."""
    done, out, _, _ = signalled
    rc, stdout, stderr = done["term"]
    assert rc == 143, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith("fmjax")]
    assert lines == [f"fmjax train: stopped by SIGTERM: checkpoint at step 25 of 100 saved in "
                     f"{out / 'checkpoints'}; run the same command again to continue"]  # fmt: skip
    assert _checkpoints(out) == [25] and not (out / "params.msgpack").exists()
    # A partial run rerun with another --data or --schedule is refused, naming what differs.
    for flag, now in (("--data", "checkerboard"), ("--schedule", "cosine")):
        refused = rf"with other settings \(they differ in loss\.[a-z_]+: saved .*now .*{now}"
        with pytest.raises(SystemExit, match=refused):
            main(["train", "--steps", "100", *TINY, flag, now, "--out", str(out)])
    assert _checkpoints(out) == [25] and not (out / "model.json").exists()
    capsys.readouterr()
    assert main(["train", "--steps", "100", *TINY, "--out", str(out), "--no-progress"]) == 0
    assert f"resumed from step 25 of {out / 'checkpoints'}" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["resumed_from"] == 25 and res["final_loss_steps"] == [90, 100]
    assert _checkpoints(out)[-1] == 100 and (out / "params.msgpack").is_file()


def test_train_sigint_mid_run_saves_and_exits_130(signalled):
    """SIGINT (Ctrl-C) mid-training: the run saves the step it reached, says so in one line and
    exits with status 130 (control: it had been training, checkpoint 25 existed before)."""
    done, _, out, _ = signalled
    rc, stdout, stderr = done["int"]
    assert rc == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = _checkpoints(out)[-1]
    assert 25 < last < 1_000_000 and last % 25 == 0
    lines = [ln for ln in stderr.splitlines() if ln.startswith("fmjax")]
    assert lines == [
        f"fmjax train: stopped by SIGINT: checkpoint at step {last} of 1000000 "
        f"saved in {out / 'checkpoints'}; run the same command again to continue"
    ]


def test_train_twice_interrupted_or_corrupt_says_one_line(signalled):
    """Ctrl-C twice: status 130 and one line on stderr, no absl / asyncio traceback around it
    (orbax logged the interrupted save's traceback). Then the same command on that folder with
    its latest checkpoint damaged: status 1 and one line naming it (tensorstore's callbacks
    printed "Event loop is closed" tracebacks). Control: the first run had saved step 25."""
    done, _, _, out = signalled
    rc, stdout, stderr = done["twice"]
    assert rc == 130, stderr
    assert stderr.startswith("fmjax train: stopped ") and stderr.count("\n") == 1, stderr
    last = _checkpoints(out)[-1]
    assert last >= 25
    for f in (out / "checkpoints" / str(last) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    proc = _fmjax_process("train", "--steps", "1000000", *TINY, "--out", str(out), "--no-progress")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert stderr.startswith(f"checkpoint {out / 'checkpoints' / str(last)} is corrupt"), stderr
    assert stderr.count("\n") == 1, stderr


def _tiny_train(out, *extra):
    return main(["train", "--steps", "20", *TINY, "--out", str(out), "--no-progress", *extra])


def test_output_folders_not_empty_or_in_use_are_refused(tmp_path, capsys):
    """A non-empty --out is refused without --overwrite (train: unless it holds this run's
    checkpoints, which it resumes); a run with other settings is refused with what differs;
    a folder another run holds is refused; --overwrite starts over (controls: each refusal
    passes once its cause is removed)."""
    from fmjax.train.checkpoint import lock_directory, unlock_directory

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"`--out` '.*run' is not empty \(it holds notes.txt\); "
                       "pass --overwrite"):  # fmt: skip
        _tiny_train(out)
    with pytest.raises(SystemExit, match="is not empty"):
        main(["sample", "--exact", "--out", str(out)])
    with pytest.raises(SystemExit, match="is not empty"):
        main(["demo", "--quick", "--out", str(out)])
    (out / "notes.txt").unlink()
    assert _tiny_train(out) == 0
    assert json.loads((out / "results.json").read_text())["resumed_from"] is None
    assert _tiny_train(out) == 0  # its own files and checkpoints: resumed (nothing to train)
    assert json.loads((out / "results.json").read_text())["resumed_from"] == 20
    with pytest.raises(SystemExit, match=r"holds checkpoints of a run with other settings "
                       r"\(they differ in optimizer.*learning_rate=0.01.*--overwrite"):  # fmt: skip
        _tiny_train(out, "--lr", "0.01")
    # A finished run rerun on other data is refused, not relabelled (it said "resumed from
    # step 20", trained nothing and rewrote model.json with the new --data).
    model = (out / "model.json").read_text()
    with pytest.raises(SystemExit, match=r"differ in loss\.sample_pairs: .*checkerboard"):
        _tiny_train(out, "--data", "checkerboard")
    assert (out / "model.json").read_text() == model
    fd = lock_directory(out, "")
    try:
        with pytest.raises(SystemExit, match="is in use by another fmjax run"):
            _tiny_train(out)
    finally:
        unlock_directory(fd)
    (out / "notes.txt").write_text("mine")
    assert _tiny_train(out, "--lr", "0.01", "--overwrite") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["resumed_from"] is None and res["config"]["learning_rate"] == 0.01
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only its own files


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m"
    assert _tiny_train(out) == 0
    return out


def _broken(tmp_path, model_folder, name, damage):
    folder = tmp_path / name
    shutil.copytree(model_folder, folder)
    damage(folder)
    return folder


def _other_width(f):
    spec = json.loads((f / "model.json").read_text())
    spec["config"]["width"] = 16
    (f / "model.json").write_text(json.dumps(spec))


def _truncate(f):
    raw = (f / "params.msgpack").read_bytes()
    (f / "params.msgpack").write_bytes(raw[: len(raw) // 2])


def _flip(f):
    """XOR 8 bytes of the last weights: still a valid msgpack file of the right shapes."""
    raw = bytearray((f / "params.msgpack").read_bytes())
    raw[-12:-4] = bytes(b ^ 0xFF for b in raw[-12:-4])
    (f / "params.msgpack").write_bytes(bytes(raw))


def _config_type(f):
    spec = json.loads((f / "model.json").read_text())
    spec["config"]["steps"] = 1.5
    (f / "model.json").write_text(json.dumps(spec))


BROKEN = {
    "other_width": (_other_width, r"params.msgpack: does not hold parameters of the MLP of "
                    r"model.json \(width 16, depth 2, raw\): \['params'\]\[.*\] has shape "
                    r"\((2, )?8,?\), expected \((2, )?16,?\)"),
    "truncated": (_truncate, "params.msgpack: is truncated or not a msgpack file"),
    "flipped": (_flip, "params.msgpack: does not match the sha256 checksum recorded in "
                "model.json"),
    "missing": (lambda f: (f / "params.msgpack").unlink(), "params.msgpack: is missing"),
    "not_json": (lambda f: (f / "model.json").write_text("{width: 8"),
                 "model.json: is not valid JSON"),
    "not_a_config": (lambda f: (f / "model.json").write_text("[1, 2]"),
                     r"model.json: must be a JSON object \{\"config\""),
    "config_type": (_config_type, "model.json: holds an invalid config: "
                    r"experiments.TrainConfig: `steps` must be an int, got 1.5"),
}  # fmt: skip


@pytest.mark.parametrize("name", BROKEN)
def test_broken_model_folders_give_one_clear_line(tmp_path, model_folder, name):
    """A broken model folder: one line naming the file and what is wrong, no flax / msgpack
    traceback (control: the intact folder loads and samples)."""
    from fmjax import experiments

    damage, match = BROKEN[name]
    folder = _broken(tmp_path, model_folder, name, damage)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(folder), "--n", "50", "--out", str(tmp_path / "s")])
    msg = str(e.value.code)
    assert "\n" not in msg and str(folder) in msg
    assert re.search(match, msg), msg
    with pytest.raises(ValueError, match=match):
        experiments.load_model(folder)
    assert experiments.load_model(model_folder).config.width == 8  # control


def test_model_folder_without_checksum_loads_with_a_warning(tmp_path, model_folder):
    """A folder written before model.json recorded the sha256 of params.msgpack loads, with a
    warning that it is unverified (control: the intact folder loads without one)."""
    import warnings

    import jax

    from fmjax import experiments

    def drop(f):
        spec = json.loads((f / "model.json").read_text())
        del spec["params_sha256"]
        (f / "model.json").write_text(json.dumps(spec))

    folder = _broken(tmp_path, model_folder, "old", drop)
    with pytest.warns(UserWarning, match="records no sha256 of params.msgpack"):
        old = experiments.load_model(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = experiments.load_model(model_folder)
    for a, b in zip(jax.tree.leaves(old.params), jax.tree.leaves(new.params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "command, text, match",
    [
        ("train", "steps = 1.5", "experiments.TrainConfig: `steps` must be an int, got 1.5"),
        ("train", 'learning_rate = "fast"', "`learning_rate` must be a real number, got 'fast'"),
        ("train", "data = 3", "experiments.TrainConfig: `data` must be a str, got 3"),
        ("demo", "n_eval = 2.0", "experiments.DemoConfig: `n_eval` must be an int, got 2.0"),
        ("sample", "n = 1.5", r"cli: `--n` must be an int, got 1.5"),
    ],
)
def test_config_values_of_the_wrong_type_exit_cleanly(tmp_path, command, text, match):
    """A config-file value of the wrong type is refused in one line naming it, like a bad flag
    (before, ``steps = 1.5`` passed the checks)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(text + "\n")
    argv = [command, "--config", str(cfg), "--out", str(tmp_path / "o")]
    argv += ["--exact"] if command == "sample" else []
    with pytest.raises(SystemExit, match=match):
        main(argv)
    assert not (tmp_path / "o").exists()


def test_train_help_shows_every_default(capsys):
    """``train --help`` shows the default of every option, equal to the TrainConfig default."""
    import dataclasses

    from fmjax.experiments import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--lr" if f.name == "learning_rate" else "--" + f.name.replace("_", "-")
        assert re.search(rf"{flag}\b.*?\(default {f.default}\)", text), f.name
    assert "--checkpoint-every CHECKPOINT_EVERY steps between checkpoints (default 500)" in text
    assert "(default outputs/train)" in text


@pytest.mark.slow  # ~90 s on 2 cores loaded by other runs: training, checkpoints, exact scores
def test_train_on_a_named_problem(tmp_path, capsys):
    """``fmjax train --problem gmm_1d`` trains a 1-D MLP on the problem's coupling and reports
    its exact loss floor and velocity error; the saved model loads back with that dimension."""
    import importlib

    import jax.numpy as jnp

    from fmjax import experiments, models

    out = tmp_path / "p"
    args = ["train", "--problem", "gmm_1d", "--steps", "20", "--width", "8", "--depth", "1"]
    assert main([*args, "--batch-size", "16", "--out", str(out), "--no-progress"]) == 0
    assert "fmjax train: gmm_1d, mlp" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["problem"] == "gmm_1d" and results["loss_floor"] > 0
    assert results["velocity_error"] > 0
    loaded = experiments.load_model(out)
    assert loaded.model.dim == 1 and loaded.velocity(0.5, jnp.zeros((3, 1))).shape == (3, 1)
    tm = importlib.import_module("fmjax.experiments.train_model")  # the module, not the function
    unet = tm._model(tm.TrainConfig(problem="digits_gmm", model="unet", channels=8))
    assert isinstance(unet, models.UNet) and unet.image_shape == (8, 8, 1)


def test_train_problem_and_model_flags(tmp_path):
    """``--model unet`` is refused for a problem that is not of images, ``--problem`` with
    another ``--data`` and an unknown problem too (one line each, before any work)."""
    with pytest.raises(SystemExit, match="`problem` must be one of .*digits_gmm.* with model"):
        main(["train", "--problem", "gmm_1d", "--model", "unet", "--out", str(tmp_path / "u")])
    with pytest.raises(SystemExit, match="`data` must be left at 'gmm'"):
        main(["train", "--problem", "gmm_1d", "--data", "moons", "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="`problem` must be one of"):
        main(["train", "--problem", "nope", "--out", str(tmp_path / "n")])
