"""Execute notebooks/tradeoff.ipynb headless and check its printed numbers against the library on the shipped CSV."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from noisescale.sweep import best_learning_rate_cells, fit_sweep, read_sweep_results

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "tradeoff.ipynb"
CSV = ROOT / "data" / "tradeoff" / "sweep_fashion_mnist.csv"


def _printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []) if output.get("output_type") == "stream")


@pytest.mark.skipif(not CSV.exists(), reason="the shipped sweep CSV is missing")
def test_notebook_runs_and_prints_the_fit_of_the_shipped_sweep(hang_deadline_s):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        deadline = round(hang_deadline_s)  # per cell and for the kernel's start: only a hang fails (tests/conftest.py)
        NotebookClient(notebook, kernel_name="python3", timeout=deadline, startup_timeout=deadline,
                       resources={"metadata": {"path": str(ROOT)}}).execute()  # cwd: the checkout, so noisescale imports
    printed = _printed(notebook)
    frame = read_sweep_results(CSV)
    fit = fit_sweep(frame)
    best = best_learning_rate_cells(frame)
    assert f"B_crit = {fit.b_crit:.4g}" in printed
    assert fit.summary() in printed
    finite_b_noise = best["b_noise"][np.isfinite(best["b_noise"])]
    assert f"unresolved (G^T H G estimate <= 0) in {len(best) - len(finite_b_noise)} of {len(best)} cells" in printed
    ratio = float(re.search(r"B_crit / B_noise = ([0-9.e+-]+)", printed).group(1))
    np.testing.assert_allclose(ratio, fit.b_crit / np.median(finite_b_noise), rtol=1e-2)
    ratio = float(re.search(r"B_crit / B_simple = ([0-9.e+-]+)", printed).group(1))
    np.testing.assert_allclose(ratio, fit.b_crit / np.median(best["b_simple"]), rtol=1e-2)
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) == 2  # the Pareto front with its hyperbola, and B_crit against the noise scale
