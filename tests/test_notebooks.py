"""Execute every notebook top to bottom (FMJAX_QUICK=1) and check the generator is in sync."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip(
    "nbclient", reason="nbclient not installed (pip install nbclient nbformat ipykernel)"
)
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # The kernel is a subprocess: it inherits this environment (quick settings, import path).
    monkeypatch.setenv("FMJAX_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")
    )
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    # The experiment wrote its results next to the notebook's working directory.
    results = list(tmp_path.glob("outputs/*/results.json"))
    assert len(results) == 1
    result = json.loads(results[0].read_text())
    assert result["figures"]
    for fig in result["figures"].values():
        assert (tmp_path / fig).stat().st_size > 1000
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "QUICK = True" in text
