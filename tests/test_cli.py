"""The ``fmjax`` command: demo table/JSON/figures, --help everywhere, train -> sample, configs."""

import contextlib
import io
import json
import os
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
                 "--steps", "20", "--out", str(smp)]) == 0  # fmt: skip
    res = json.loads((smp / "results.json").read_text())
    assert res["nfe"] == 20 and np.load(smp / "samples.npy").shape == (200, 2)
    assert (smp / "samples.png").stat().st_size > 5000


def test_sample_exact_field_matches_target(tmp_path):
    out = tmp_path / "exact"
    assert main(["sample", "--exact", "--n", "400", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert abs(res["energy_distance"]) < 0.05  # exact field: noise level only
    assert res["nfe"] > 0


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
