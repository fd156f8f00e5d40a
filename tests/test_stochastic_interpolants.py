"""The stochastic-interpolants experiment in quick mode: exact samplers reach the target.

Energy distances are U-statistics whose noise level is the distance between two exact target
samples of the same size (``energy_reference``); the distance of the untransported source
(``energy_source``) is the control a sampler must beat by far.
"""

import json

import numpy as np
import pytest

from fmjax import experiments as E


@pytest.fixture(scope="module")
def si(tmp_path_factory):
    out = tmp_path_factory.mktemp("si")
    result = E.stochastic_interpolants(quick=True, out=out)
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"].keys() == result.metrics.keys()
    return result


def test_exact_ode_and_sde_reach_the_target(si):
    m = si.metrics
    for pname, by_interp in m["energy"].items():
        floor = abs(m["energy_reference"][pname])
        src = m["energy_source"][pname]
        assert src > 0.5  # the control is far from the target
        for iname, by_sampler in by_interp.items():
            for sampler, e in by_sampler.items():
                if sampler.startswith("exact"):
                    # a few times the Monte Carlo noise (~0.01-0.03 at 600 points)
                    assert e < 3 * floor + 0.04, (pname, iname, sampler, e)


def test_learned_samplers_run_and_report(si):
    m = si.metrics
    learned = [(p, i, k, e) for p, d in m["energy"].items() for i, s in d.items()
               for k, e in s.items() if k.startswith("learned")]  # fmt: skip
    assert learned and all(np.isfinite(e) for *_, e in learned)
    # even a tiny, briefly trained drift + score transports mass toward the target
    assert all(e < m["energy_source"][p] for p, _, _, e in learned)
    for curves in m["errors"].values():
        assert len(curves["velocity"]) == len(m["error_times"])
        assert all(np.isfinite(curves["score"]))
    assert set(si.figures) == {"density_1d", "samples_2d", "samples_1d", "errors"}
    assert "| problem | interpolant |" in E.si_table(si)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="config.interpolants"):
        E.stochastic_interpolants(E.SIConfig.quick(interpolants=("vp",)), out=tmp_path)
    with pytest.raises(ValueError, match="config.learned"):
        E.stochastic_interpolants(E.SIConfig.quick(learned=("linear",)), out=tmp_path)
