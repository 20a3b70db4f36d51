"""The tutorial notebook (``examples/guides_and_diagnostics.ipynb``) runs from start to end with the
tiny settings of its parameters cell within two minutes, and is stored without outputs."""

import json
import math
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "guides_and_diagnostics.ipynb"
QUICK_PARTICLES = 16  # PARTICLES of the notebook's quick settings


def test_notebook_is_stored_without_outputs():
    cells = [cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
    assert cells and all(not cell.outputs and cell.execution_count is None for cell in cells)
    assert any("parameters" in cell.metadata.get("tags", []) for cell in cells)


def test_notebook_runs_with_tiny_settings_within_two_minutes(monkeypatch):
    monkeypatch.setenv("GRAM_PYRO_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    assert time.perf_counter() - start < 120
    summary = json.loads("".join(output.get("text", "") for output in notebook.cells[-1].outputs))
    assert set(summary) == {"gaussian", "residual"}
    for family in summary.values():
        assert all(math.isfinite(family[key]) for key in ("elbo_per_token", "iwae_per_token", "smc_per_token"))
        assert family["khat_max"] >= 0  # infinite where a weight tail has too few points to fit
        assert family["elbo_per_token"] < 0 and 1 <= family["ess_mean"] <= QUICK_PARTICLES
        assert 0 <= family["prior_accuracy"] <= 1 and 0 <= family["posterior_accuracy"] <= 1
