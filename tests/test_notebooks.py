"""The notebooks: committed without outputs, in sync with notebooks/_build.py, with a setup cell
that installs from a source the user sets (no placeholder).

The experiment notebooks are executed top to bottom (FMJAX_QUICK=1) by tests/test_experiments.py,
whose experiment checks read the results of those runs: each quick experiment runs once in the
suite. The quick-start notebook, which uses the API directly, is executed here.
"""

import os
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
        "00_quickstart.ipynb",
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


def _setup_cell(path: Path) -> str:
    return next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


def test_setup_cell_installs_from_a_set_source_or_stops_with_one_message(tmp_path):
    """No placeholder URL; without fmjax and without a source the cell stops with one message
    (run in a fresh interpreter where ``fmjax`` cannot be found); with a source it calls pip
    with that source (pip replaced by a recorder)."""
    cells = {_setup_cell(p) for p in NOTEBOOKS}
    assert len(cells) == 1  # one setup for every notebook
    cell = cells.pop()
    assert "<org>" not in cell and "FMJAX_SOURCE" in cell
    harness = (
        "import importlib.util, subprocess, sys\n"
        "importlib.util.find_spec = lambda name, *a: None  # fmjax is not installed\n"
        "subprocess.run = lambda cmd, check: print('PIP', cmd[-1])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FMJAX_SOURCE"}
    run = lambda code, **kw: subprocess.run(  # noqa: E731
        [sys.executable, "-c", harness + code], capture_output=True, text=True, cwd=tmp_path, **kw
    )
    stopped = run(cell, env=env)
    assert stopped.returncode == 1 and stopped.stdout == ""
    assert stopped.stderr.strip().startswith("fmjax is not installed: set FMJAX_SOURCE")
    url = "git+https://example.org/fmjax"
    given = run(cell, env={**env, "FMJAX_SOURCE": url})
    assert given.returncode == 0 and f"PIP fmjax[all] @ {url}" in given.stdout, given.stderr
    (tmp_path / "fmjax-0.2.0-py3-none-any.whl").write_text("")  # an uploaded wheel
    found = run(cell, env=env)
    assert "PIP fmjax-0.2.0-py3-none-any.whl[all]" in found.stdout, found.stderr


def test_quickstart_runs_on_quick_settings(tmp_path):
    """00_quickstart top to bottom (FMJAX_QUICK=1): the exact field's likelihood equals the
    exact -log p1 (printed to 3 decimals, Tsit5 at 1e-5: within 0.01), and evaluate reports."""
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "00_quickstart.ipynb", as_version=4)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with pytest.MonkeyPatch.context() as mp:  # the kernel subprocess inherits the environment
        mp.setenv("FMJAX_QUICK", "1")
        mp.setenv("MPLBACKEND", "Agg")
        mp.setenv("PYTHONPATH", path)
        client = nbclient.NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    values = dict(
        line.split(":", 1) for line in text.splitlines() if line.startswith(("exact", "learned"))
    )
    assert abs(float(values["exact -log p1"]) - float(values["exact field"])) < 0.01
    assert "relative_velocity_error" in text and "nfe_to_accuracy" in text
