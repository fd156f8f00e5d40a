"""fmjax.evaluate: the exact field scores ~0 on every error, a perturbed field by its known
error (control), a collapsed and a spread-out sampler are caught by the two-sided sample checks
(where the energy distance stays at its noise level), files are written, and `fmjax evaluate`
runs from the command line."""

import json

import jax
import numpy as np
import pytest

import fmjax
from fmjax import exact, problems
from fmjax.evaluation import EvaluationReport, _merge_equal
from fmjax.mixtures import GaussianMixture, independent_coupling

N = 1000
SHIFT = 1.5
SHRINK, WIDEN = 0.7, 1.3  # each target mode's deviations scaled: spread ratio 0.49, 1.69


@pytest.fixture(scope="module")
def problem():
    return problems.get("gmm_1d")


@pytest.fixture(scope="module")
def exact_field(problem):
    return exact.velocity_field(exact.prepare(problem.coupling), problem.schedule)


def _scaled_field(problem, scale):
    """The exact field of the problem with each target component's deviations scaled by
    ``scale`` (covariances by scale^2): its ODE samples are exact samples shrunk toward (scale
    < 1) or pushed away from (> 1) their component means. The same pytree structure as the exact
    field, so ``evaluate`` reuses its compiled programs."""
    c = problem.coupling
    p1 = _merge_equal(c.target())
    moved = GaussianMixture(p1.weights, p1.means, scale**2 * p1.covs)
    coupling = independent_coupling(_merge_equal(c.source()), moved)
    return exact.velocity_field(exact.prepare(coupling), problem.schedule)


@pytest.fixture(scope="module")
def reports(problem, exact_field, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    shifted = lambda t, x: exact_field(t, x) + SHIFT  # noqa: E731
    key = jax.random.key(0)
    kw = dict(key=key, n=N, n_times=6)
    return {
        "exact": fmjax.evaluate(exact_field, problem, **kw, out=out),
        "shifted": fmjax.evaluate(shifted, "gmm_1d", **kw, w2=False),
        "shrunk": fmjax.evaluate(_scaled_field(problem, SHRINK), problem, **kw, w2=False),
        "widened": fmjax.evaluate(_scaled_field(problem, WIDEN), problem, **kw, w2=False),
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


def test_collapse_and_spread_are_caught_two_sided(reports):
    """gmm_1d (modes at -6, 0, 6, std 0.5), n = 1000. Exact field: the cross-entropy of its ODE
    samples is the target entropy within noise and every component's spread ratio is in the
    band [0.75, 1.3] (~300 points a mode: the ratio's sd is sqrt(2 / 300) = 0.08, so the band is
    > 3 sd). Controls: modes shrunk by 30% (spread x 0.49) lower the cross-entropy by
    (1 - 0.49) / 2 = 0.26 nats (~10 standard errors) and put every spread ratio below 0.6;
    widened by 30% (x 1.69) raise it by 0.35 nats (~8 standard errors), ratios above 1.4.
    Measured (key 0): z = -1.7 / -11.3 / +6.6, worst ratio 0.89 / 0.44 / 1.67.

    The energy distance is fooled: under the rule the exact field passes (|energy| < 3 |noise|
    + 0.02) both moved samplers pass too (measured energy -0.009 exact, -0.003 shrunk, -0.007
    widened; noise 0.002), while the NLL gap moves only for a collapse (0.20 vs 0.04 nats).
    """
    e, shrunk, wide = reports["exact"], reports["shrunk"], reports["widened"]
    assert e.target_entropy_stderr > 0 and shrunk.target_entropy == e.target_entropy
    assert abs(e.cross_entropy_z) < 3, e.cross_entropy_z
    assert abs(e.sample_cross_entropy - e.target_entropy) < 4 * e.target_entropy_stderr
    band = (0.75, 1.3)
    for r in (e.component_spread_ratio, [e.worst_spread_ratio, e.worst_spread_ratio_noise]):
        assert band[0] < np.min(r) and np.max(r) < band[1], r
    assert e.component_spread_ratio.shape == (3,)  # gmm_1d's 6 product components merged
    assert e.max_weight_error < 0.05 and e.max_mean_error < 0.2
    # collapse: far below the entropy, every mode's spread ratio ~0.49
    assert shrunk.cross_entropy_z < -6, shrunk.cross_entropy_z
    assert shrunk.target_entropy - shrunk.sample_cross_entropy > 0.15
    assert np.max(shrunk.component_spread_ratio) < 0.6 and shrunk.worst_spread_ratio < band[0]
    # spread: far above, every ratio ~1.69
    assert wide.cross_entropy_z > 4, wide.cross_entropy_z
    assert wide.sample_cross_entropy - wide.target_entropy > 0.15
    assert np.min(wide.component_spread_ratio) > 1.4 and wide.worst_spread_ratio > band[1]
    # the means and weights are right in both: only the spreads (and entropy) are wrong
    for r in (shrunk, wide):
        assert r.max_weight_error < 0.05 and r.max_mean_error < 0.2
    # what the energy distance alone says: all three within its noise rule
    for r in (e, shrunk, wide):
        assert abs(r.energy) < 3 * abs(e.energy_noise) + 0.02, r.energy
    assert e.sde_cross_entropy is None and e.sde_component_spread_ratio is None


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
    assert len(saved["component_spread_ratio"]) == 3 and saved["sde_energy"] is None
    assert "component_spread_ratio" not in summary and "worst_spread_ratio" in summary
    json.dumps(summary, allow_nan=False)


def test_argument_errors(exact_field):
    with pytest.raises(ValueError, match="problems.get: `name` must be one of"):
        fmjax.evaluate(exact_field, "nope", key=jax.random.key(0))
    with pytest.raises(TypeError, match="evaluation.evaluate: `velocity` must be a velocity"):
        fmjax.evaluate(None, "gmm_1d", key=jax.random.key(0))
    with pytest.raises(ValueError, match="evaluation.evaluate: `divergence` must be one of"):
        fmjax.evaluate(exact_field, "gmm_1d", key=jax.random.key(0), divergence="fast")
    with pytest.raises(TypeError, match="evaluation.evaluate: `key` must be a PRNG key"):
        fmjax.evaluate(exact_field, "gmm_1d", key=0)
    with pytest.raises(TypeError, match="evaluation.evaluate: `sde` must be True or False"):
        fmjax.evaluate(exact_field, "gmm_1d", key=jax.random.key(0), sde="yes")
    # gmm_1d's source is not N(0, I): the SDE cannot derive the score from the velocity
    with pytest.raises(ValueError, match="evaluation.evaluate: `sde` must be False for problem"):
        fmjax.evaluate(exact_field, "gmm_1d", key=jax.random.key(0), sde=True)
    with pytest.raises(ValueError, match="evaluation.evaluate: `sde_steps` must be"):
        fmjax.evaluate(exact_field, "gmm_1d", key=jax.random.key(0), sde_steps=0)


def test_cli_evaluate_exact(tmp_path, capsys):
    from fmjax import cli

    out = tmp_path / "ev"
    # --quick: the quick leaderboard's settings (no sliced W2; n = 300 unless --n is given); it
    # was ignored
    args = [
        "evaluate",
        "--exact",
        "--problem",
        "gmm_1d",
        "--quick",
        "--n",
        "100",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    fields = ("excess_loss", "sample_cross_entropy", "target_entropy", "worst_spread_ratio")
    assert "gmm_1d" in printed and all(f'"{f}"' in printed for f in fields)
    saved = json.loads((out / "report.json").read_text())
    assert saved["mean_velocity_error"] < 1e-8 and saved["n"] == 100
    assert saved["sliced_w2"] is None
    assert len(saved["component_spread_ratio"]) == 3 and saved["sde_cross_entropy"] is None
    with pytest.raises(SystemExit, match="problems.get: `name` must be one of"):
        cli.main(["evaluate", "--exact", "--problem", "nope"])


@pytest.mark.slow  # ~50 s on 2 busy cores (a second problem compiled, and the SDE)
def test_cli_evaluate_exact_sde(tmp_path, capsys):
    # With --sde (demo_2d: an N(0, I) source) the report has the SDE samples' checks too.
    from fmjax import cli

    out = tmp_path / "ev"
    args = ["evaluate", "--exact", "--problem", "demo_2d", "--n", "200", "--no-w2", "--sde"]
    args += ["--out", str(out)]
    assert cli.main(args) == 0
    assert '"sde_cross_entropy"' in capsys.readouterr().out
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["sde_component_spread_ratio"]) == 5 and saved["sde_nfe"] > 0
    # exact field, both samplers keep the marginals: the cross-entropies within noise
    assert abs(saved["cross_entropy_z"]) < 4 and abs(saved["sde_cross_entropy_z"]) < 4
    assert saved["sde_energy"] < 0.05


def test_leaderboard_table_and_cli_validation():
    from fmjax import cli
    from fmjax.leaderboard import _markdown

    rows = [{"problem": "gmm_1d", "model": "exact", "relative_velocity_error": 0.0,
             "excess_loss": 1.23456, "nll_gap": None, "energy": 0.01, "energy_noise": 0.02,
             "sample_cross_entropy": 1.5, "target_entropy": 1.85, "cross_entropy_z": -11.3,
             "worst_spread_ratio": 0.49, "nfe_to_accuracy": 16}]  # fmt: skip
    table = _markdown(rows).splitlines()
    assert table[0].startswith("| problem | model |") and table[1].startswith("|---|")
    assert (
        table[2]
        == "| gmm_1d | exact | 0 | 1.23 | - | 0.01 | 0.02 | 1.5 | 1.85 | -11.3 | 0.49 | 16 |"
    )
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
