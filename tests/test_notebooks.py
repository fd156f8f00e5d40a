"""The notebooks: committed without outputs, in sync with notebooks/_build.py.

They are executed top to bottom (FMJAX_QUICK=1) by tests/test_experiments.py, whose experiment
checks read the results of those runs: each quick experiment runs once in the suite.
"""

import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat not installed")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def test_notebooks_exist_without_outputs():
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "01_gmm_to_gmm.ipynb",
        "02_ot_vs_vp.ipynb",
        "03_flows_and_scores.ipynb",
        "04_cfm_equals_fm.ipynb",
        "05_digits.ipynb",
        "06_stochastic_interpolants.ipynb",
        "07_couplings.ipynb",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


def test_generator_in_sync():
    # The committed notebooks are exactly what notebooks/_build.py writes.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "notebooks" / "_build.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
