"""fmjax.evaluate: the exact field scores ~0 on every error, a perturbed field by its known
error (control), files are written, and `fmjax evaluate` runs from the command line."""

import json

import jax
import numpy as np
import pytest

import fmjax
from fmjax import exact, problems
from fmjax.evaluation import EvaluationReport

N = 300
SHIFT = 1.5


@pytest.fixture(scope="module")
def problem():
    return problems.get("gmm_1d")


@pytest.fixture(scope="module")
def exact_field(problem):
    return exact.velocity_field(exact.prepare(problem.coupling), problem.schedule)


@pytest.fixture(scope="module")
def reports(problem, exact_field, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    shifted = lambda t, x: exact_field(t, x) + SHIFT  # noqa: E731
    key = jax.random.key(0)
    return {
        "exact": fmjax.evaluate(exact_field, problem, key=key, n=N, n_times=6, out=out),
        "shifted": fmjax.evaluate(shifted, "gmm_1d", key=key, n=N, n_times=6, w2=False),
        "out": out,
    }


def test_exact_field_scores_zero(reports):
    r = reports["exact"]
    assert isinstance(r, EvaluationReport) and r.problem == "gmm_1d" and r.dim == 1
    # The reference is the same exact field: errors vanish to round-off.
    assert float(np.max(np.asarray(r.velocity_error))) < 1e-8
    # Same draws, the same function compiled in two programs: float32 round-off only.
    assert abs(r.excess_loss) < 1e-6 and r.excess_loss_stderr < 1e-6
    assert r.loss == pytest.approx(r.loss_floor, rel=1e-6) and r.loss_floor > 0
    # Likelihood of exact target samples by the augmented ODE (exact divergence, Tsit5 at
    # 1e-5) = the exact log-density: the gap is solver error only.
    assert abs(r.nll_gap) < 1e-3, r.nll_gap
    # ODE samples of the exact field vs exact target samples: the noise level of the statistic.
    assert abs(r.energy) < 3 * abs(r.energy_noise) + 0.02
    assert r.sliced_w2 < 2 * r.sliced_w2_noise + 0.1
    assert r.nfe_to_accuracy is not None and r.nfe_adaptive > 0
    assert r.nfe_errors[-1] <= r.nfe_tol < r.nfe_errors[0]


def test_shifted_field_is_caught(reports):
    # Control: v = u + 1.5 has |v - u|^2 = 2.25 everywhere (d = 1), exactly.
    r, e = reports["shifted"], reports["exact"]
    np.testing.assert_allclose(np.asarray(r.velocity_error), SHIFT**2, rtol=1e-5)
    assert r.relative_velocity_error > 0
    # The excess loss estimates the same 2.25, within its Monte Carlo error (4 standard errors).
    assert abs(r.excess_loss - SHIFT**2) < 4 * r.excess_loss_stderr + 1e-6
    assert r.excess_loss_stderr > 0
    # Same key, same draws: the floor does not depend on the field.
    assert r.loss_floor == e.loss_floor
    # Samples are shifted by 1.5 at t = 1: clearly outside the noise of the sample distances,
    # and the flow's density misses the target's (KL > 0).
    assert r.energy > 5 * abs(e.energy_noise) + 0.02
    assert r.nll_gap > 0.05
    assert r.sliced_w2 is None


def test_report_files(reports):
    out = reports["out"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["problem"] == "gmm_1d" and abs(saved["excess_loss"]) < 1e-6
    assert len(saved["velocity_error"]) == 6
    for name in ("velocity_error", "nfe", "samples"):
        assert (out / f"{name}.png").stat().st_size > 5000
        assert saved["figures"][name].endswith(f"{name}.png")
    summary = reports["exact"].summary()
    assert "velocity_error" not in summary and summary["nll_gap"] == saved["nll_gap"]


def test_argument_errors(exact_field):
    with pytest.raises(ValueError, match="problems.get: `name` must be one of"):
        fmjax.evaluate(exact_field, "nope", key=jax.random.key(0))
    with pytest.raises(TypeError, match="evaluation.evaluate: `velocity` must be a velocity"):
        fmjax.evaluate(None, "gmm_1d", key=jax.random.key(0))
    with pytest.raises(ValueError, match="evaluation.evaluate: `divergence` must be one of"):
        fmjax.evaluate(exact_field, "gmm_1d", key=jax.random.key(0), divergence="fast")
    with pytest.raises(TypeError, match="evaluation.evaluate: `key` must be a PRNG key"):
        fmjax.evaluate(exact_field, "gmm_1d", key=0)


def test_cli_evaluate_exact(tmp_path, capsys):
    from fmjax import cli

    out = tmp_path / "ev"
    args = ["evaluate", "--exact", "--problem", "gmm_1d", "--n", "100", "--no-w2",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "gmm_1d" in printed and "excess_loss" in printed
    saved = json.loads((out / "report.json").read_text())
    assert saved["mean_velocity_error"] < 1e-8 and saved["n"] == 100
    with pytest.raises(SystemExit, match="problems.get: `name` must be one of"):
        cli.main(["evaluate", "--exact", "--problem", "nope"])


def test_leaderboard_table_and_cli_validation():
    from fmjax import cli
    from fmjax.leaderboard import _markdown

    rows = [{"problem": "gmm_1d", "model": "exact", "relative_velocity_error": 0.0,
             "excess_loss": 1.23456, "nll_gap": None, "energy": 0.01, "energy_noise": 0.02,
             "nfe_to_accuracy": 16}]  # fmt: skip
    table = _markdown(rows).splitlines()
    assert table[0].startswith("| problem | model |") and table[1].startswith("|---|")
    assert table[2] == "| gmm_1d | exact | 0 | 1.23 | - | 0.01 | 0.02 | 16 |"
    with pytest.raises(SystemExit, match="cli: `--problem` must be one of"):
        cli.main(["evaluate", "--all", "--problem", "gmm_1d,nope"])


@pytest.mark.slow
def test_leaderboard_tiny(tmp_path):
    from fmjax.leaderboard import leaderboard

    rows = leaderboard(("gmm_1d",), steps=200, n=200, width=32, out=tmp_path)
    exact_row, mlp_row = rows
    assert exact_row["model"] == "exact" and abs(exact_row["excess_loss"]) < 1e-6
    assert 0 < mlp_row["relative_velocity_error"] < 0.5
    assert (tmp_path / "leaderboard.md").read_text().count("gmm_1d") == 2


@pytest.mark.slow  # ~20 s on 2 cores; test_cli_evaluate_exact covers the command in CI
def test_cli_evaluate_trained_model(tmp_path, capsys):
    # `fmjax evaluate --model DIR` on a tiny model written by `fmjax train` (20 steps on the
    # "gmm" data, whose exact problem is demo_2d): the report is written and the untrained-ish
    # field is clearly worse than exact (positive velocity error and excess loss).
    from fmjax import cli

    run, out = tmp_path / "run", tmp_path / "ev"
    train = ["train", "--data", "gmm", "--width", "8", "--depth", "2", "--batch-size", "32",
             "--steps", "20", "--out", str(run), "--no-progress"]  # fmt: skip
    assert cli.main(train) == 0
    args = ["evaluate", "--model", str(run), "--n", "100", "--no-w2", "--out", str(out)]
    assert cli.main(args) == 0
    assert "demo_2d" in capsys.readouterr().out
    saved = json.loads((out / "report.json").read_text())
    assert saved["problem"] == "demo_2d" and saved["n"] == 100
    assert saved["relative_velocity_error"] > 0.01 and saved["excess_loss"] > 0
