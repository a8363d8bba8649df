"""Seaborn figures shared by the command line, the analysis scripts and the notebooks (PNG, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_noise_scale_history(history: pd.DataFrame):
    """B_simple (moving average with its interval, single-batch estimates faint, B_noise where measured) and
    the training loss against examples seen."""
    import seaborn as sns

    plt = _pyplot()
    sns.set_theme(style="whitegrid")
    figure, (noise_axis, loss_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    measured = history[history.get("measured", True) & ~history.get("nonfinite", False).fillna(False).astype(bool)]
    if "b_simple_batch" in measured:
        positive = measured[measured["b_simple_batch"] > 0]
        noise_axis.scatter(positive["examples_seen"], positive["b_simple_batch"], s=4, alpha=0.25,
                           color="tab:blue", label="B_simple, single batch")
        noise_axis.plot(measured["examples_seen"], measured["b_simple"], color="tab:blue", label="B_simple, EMA")
        noise_axis.fill_between(measured["examples_seen"], measured["b_simple_low"], measured["b_simple_high"],
                                color="tab:blue", alpha=0.2, label="interval")
    if "b_noise" in history and history["b_noise"].notna().any():
        points = history[history["b_noise"].notna()]
        noise_axis.plot(points["examples_seen"], points["b_noise"], "o-", color="tab:red", label="B_noise")
    noise_axis.set_yscale("log")
    noise_axis.set_ylabel("noise scale (examples)")
    noise_axis.legend(loc="best", fontsize="small")
    sns.lineplot(data=history, x="examples_seen", y="loss", ax=loss_axis, color="tab:gray")
    loss_axis.set_xlabel("examples seen")
    loss_axis.set_ylabel("training loss")
    figure.tight_layout()
    return figure


def save_figure(figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``figure`` as a PNG (folders created) and close it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return path
