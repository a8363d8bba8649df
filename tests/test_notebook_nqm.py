"""Execute notebooks/nqm.ipynb headless and check the numbers it prints against the CSVs and the library."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def _text(notebook) -> str:
    return "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.get("outputs", []) if output.get("output_type") == "stream")


@pytest.mark.parametrize("cwd", [ROOT / "notebooks", ROOT])
def test_notebook_runs_and_reports_the_key_numbers(cwd, hang_deadline_s):
    notebook = nbformat.read(ROOT / "notebooks" / "nqm.ipynb", as_version=4)
    deadline = round(hang_deadline_s)  # per cell and for the kernel's start: only a hang fails (tests/conftest.py)
    NotebookClient(notebook, kernel_name="python3", timeout=deadline, startup_timeout=deadline,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    text = _text(notebook)
    critical = pd.read_csv(ROOT / "data" / "nqm" / "critical_batch_sizes.csv")
    sgd = critical[(critical.precondition_power == 0) & (critical.momentum_mode == "none") & (critical.ema_mode == "none")]
    assert f"critical batch size sgd: {sgd.critical_batch_size.iloc[0]:.4g}" in text
    slope = float(re.search(r"SGD small-batch slope: (-?[\d.]+)", text).group(1))
    assert slope == pytest.approx(-1.0, abs=0.1)
    lr_slope = float(re.search(r"SGD optimal-LR slope for B <= 64: (-?[\d.]+)", text).group(1))
    assert lr_slope == pytest.approx(1.0, abs=0.1)
    small, large = map(float, re.search(r"EMA / SGD steps at B=1: ([\d.]+), at B=2\^20: ([\d.]+)", text).groups())
    assert small < 0.7 and large == pytest.approx(1.0, abs=0.02)
    recomputed, stored = re.search(r"recomputed: (\[.*?\]) stored: (\[.*?\])", text).groups()
    np.testing.assert_array_equal(eval(recomputed), eval(stored))
