"""Execute notebooks/language_model.ipynb headless on the shipped data/lm results and check its printed numbers
against values computed here from the CSVs."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "language_model.ipynb"
LM = ROOT / "data" / "lm"
FILES = ["summary.json", "reference_history.csv", "critical_batch_size.csv", "branches.csv", "warmup_curves.csv",
         "warmup_summary.csv", "tuned_lr.csv", "tuned_lr_curves.csv"]


@pytest.mark.skipif(not all((LM / name).exists() for name in FILES), reason="the shipped data/lm results are missing")
def test_notebook_runs_and_prints_the_shipped_results():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        NotebookClient(notebook, kernel_name="python3", timeout=120,
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.get("outputs", []) if output.get("output_type") == "stream")
    summary = json.loads((LM / "summary.json").read_text())
    assert f"unigram baseline: {summary['unigram_nats_per_byte']:.3f} nats/byte" in printed
    table = pd.read_csv(LM / "critical_batch_size.csv")
    ratio = (table["b_crit"] / table["b_simple"]).to_numpy()
    printed_ratio = float(re.search(r"B_crit / B_simple: median ([0-9.e+-]+)", printed).group(1))
    np.testing.assert_allclose(printed_ratio, np.median(ratio), rtol=1e-2)
    final = pd.read_csv(LM / "warmup_curves.csv").sort_values("examples_seen").groupby(["arm", "seed"]).tail(1)
    steps = final.groupby("arm")["step"].mean()
    losses = final.groupby("arm")["validation_loss"]
    arms = [arm for arm in final["arm"].unique() if arm != "fixed"]
    assert {"warmup", "warmup_floor", "adaptive", "fixed_64"} <= set(arms)
    for arm in arms:
        match = re.search(rf"{arm}: ([0-9.-]+)% fewer optimizer steps than the fixed batch; validation loss "
                          r"difference ([0-9.+-]+) \(SE ([0-9.]+)\); target [^:]*: (met|not met)", printed)
        np.testing.assert_allclose(float(match.group(1)), 100 * (1 - steps[arm] / steps["fixed"]), atol=0.051)
        gap = losses.mean()[arm] - losses.mean()["fixed"]
        np.testing.assert_allclose(float(match.group(2)), gap, atol=5.1e-5)
        se = np.hypot(losses.std()[arm] / np.sqrt(losses.count()[arm]),
                      losses.std()["fixed"] / np.sqrt(losses.count()["fixed"]))
        np.testing.assert_allclose(float(match.group(3)), se, atol=5.1e-5)
        met = (1 - steps[arm] / steps["fixed"] >= 0.4) and gap <= se
        assert match.group(4) == ("met" if met else "not met")
        assert summary["warmup"][arm]["target_met"] == met
    curves = pd.read_csv(LM / "tuned_lr_curves.csv")
    final = curves.sort_values("examples_seen").groupby(["arm", "lr_factor", "seed"]).tail(1)
    tuned = {}   # recomputed from the curves, not read from tuned_lr.csv: the factor run on every seed
    for arm, runs in final.groupby("arm"):
        runs = runs.groupby("lr_factor").filter(lambda group: len(group) == curves["seed"].nunique())
        assert runs["lr_factor"].nunique() == 1 and len(runs) == 5
        seed0 = final[(final["arm"] == arm) & (final["seed"] == 0)]   # tuned on seed 0
        assert runs["lr_factor"].iloc[0] == seed0.loc[seed0["validation_loss"].idxmin(), "lr_factor"]
        tuned[arm] = (runs["lr_factor"].iloc[0], runs["step"].mean(), runs["validation_loss"].mean())
    assert set(tuned) == {"fixed_8", "fixed_12", "fixed_16", "fixed_20", "fixed_24", "fixed_32", "fixed_40", "fixed_64",
                          "ramp_40", "ramp_80", "ramp_160", "adaptive"}
    fixed, lowest = [], np.inf   # (loss, steps) of the fixed batches no other beats in fewer steps
    for steps, loss in sorted((tuned[arm][1], tuned[arm][2]) for arm in tuned if arm.startswith("fixed_")):
        if loss < lowest:
            fixed, lowest = [(loss, steps), *fixed], loss
    for arm, label in [("adaptive", "online policy ("), ("ramp_40", "straight-line ramp 8 to 40 ("),
                       ("ramp_80", "straight-line ramp 8 to 80 ("), ("ramp_160", "straight-line ramp 8 to 160 (")]:
        factor, steps, loss = tuned[arm]
        front = np.interp(loss, *zip(*fixed), left=np.nan, right=np.nan)
        assert f"{label}factor {factor:g}): {steps:.0f} steps to {loss:.3f}, where the fixed batches need " \
               f"{front:.0f}" in printed
    best = min((arm for arm in tuned if arm.startswith("fixed_")), key=lambda arm: tuned[arm][2])
    factor, steps, loss = tuned[best]
    assert f"best fixed batch ({best}, factor {factor:g}): {steps:.0f} steps to {loss:.3f}" in printed
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) == 2  # noise scale against branching, and the warmup comparison
