"""The README's Python examples run as written (they are the first code users copy)."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
    env: dict = {}
    exec(compile(BLOCKS[i], f"README.md[python block {i}]", "exec"), env)
    if "logp" in env and "exact" in env and "x1" in env:
        # The ODE log-likelihood of the exact field equals the exact log-density (Tsit5 tolerance).
        want = env["fmjax"].exact.log_prob(env["coupling"], env["s"], 1.0, env["x1"][:10])
        np.testing.assert_allclose(env["logp"], want, atol=2e-2)
    if "err" in env:
        assert np.all(np.isfinite(env["err"]))
