"""Adaptive batch-size runs on the fixed-batch steps-examples front of the default CNN (McCandlish et al. 2018).

The shipped sweep (data/tradeoff/, LeNet-5 on the shipped Fashion-MNIST subset, SGD + momentum 0.9, learning
rate tuned per B, target 75 % test accuracy) gives the front S = S_min (1 + B_crit / B). Here runs whose batch
size changes during training go to the same target, measured exactly like the sweep's cells (all 2,000 test
images every 10 steps, centred 3-evaluation moving average, interpolated crossing, same training data and,
for seed 0, the same initial weights): the noise-adaptive policy (B = kappa * moving-average B_simple, several
kappa, constant learning rate or AdaScale coupling), Smith et al.'s batch-increase schedule and the hybrid, and
a fixed-batch control through the same trainer. Each run's (examples, steps) is placed relative to the front
and its 90 % bootstrap band (noisescale.frontier.front_position). Two controls: a fixed B = 64 (seed 0 must
reproduce the sweep's cell exactly) and the learning-rate decay of the same stages at a fixed B = 32 (the sweep's
cells keep their learning rate constant, so an anneal alone can land beyond their front). Then two bounded changes
to the policy: a faster moving average without hold steps (lag), and B_0 = 8 with AdaScale coupling (start at the
small noise scale of early training).

Writes data/adaptive_frontier/: runs.csv (one row per run), summary.csv (per kind: mean and standard error
over seeds, position of the mean), evaluations.csv, batch_sizes.csv (per step) and frontier.png. Resumable:
kinds and seeds already in runs.csv are skipped.

    nice python3 analysis/adaptive_frontier.py [--seeds 3] [--kinds NAME ...] [--sweep CSV] [--out DIR]

--sweep chooses the sweep the front is fitted to (default data/tradeoff/sweep_fashion_mnist.csv); put the runs on
the front of a sweep from the same machine: the machine alone moves single cells by a median 3 %, up to a third
(data/adaptive_frontier_replicate/ is the replicate sweep's front and all kinds rerun on its machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from noisescale.controller import NoiseScaleBatchPolicy  # noqa: E402
from noisescale.frontier import front_band, front_position, train_to_target  # noqa: E402
from noisescale.losses import per_example_cross_entropy  # noqa: E402
from noisescale.models import lenet5  # noqa: E402
from noisescale.sweep import SweepSettings, _evaluate, _load_data, fit_sweep, read_sweep_results  # noqa: E402
from noisescale.training import AdaptiveTrainer, make_batch_size_source  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "data" / "tradeoff" / "sweep_fashion_mnist.csv"
OUT = ROOT / "data" / "adaptive_frontier"
B0, LR0, B_MAX = 32, 0.05, 1024  # the README's adaptive defaults: B_0 = 32, learning rate 0.05


def _policy(kappa: float, hold_steps: int = 10, first_batch_size: int = B0) -> dict:
    return {"policy": NoiseScaleBatchPolicy(first_batch_size, min_batch_size=first_batch_size, max_batch_size=B_MAX,
                                            kappa=kappa, hold_steps=hold_steps)}


def _schedule(mode: str) -> dict:
    # Smith et al.'s factor-5 stages at 30 %, 55 % and 80 % of a one-epoch horizon (12,000 examples): the sweep's
    # cells at B <= 256 reach the target within about 0.5 to 2 epochs
    return make_batch_size_source(mode, epochs=1.0, batch_size=B0, max_batch_size=B_MAX, learning_rate=LR0)


# name -> (batch-size source, learning rate, learning-rate coupling, monitor options)
KINDS = {
    "fixed B=64 lr=0.1 (control)": (lambda: {"batch_size": 64}, 0.1, "none", {"measure_every": 10}),
    # the learning-rate decay of the same stages at a fixed B = 32: is a gain the batch growth's or the anneal's?
    "lr-decay B=32 (control)": (lambda: _schedule("lr-decay"), LR0, "none", {"measure_every": 10}),
    "batch-increase": (lambda: _schedule("batch-increase"), LR0, "none", {"measure_every": 10}),
    "hybrid": (lambda: _schedule("hybrid"), LR0, "none", {"measure_every": 10}),
    **{f"noise-adaptive kappa={kappa:g}": (lambda kappa=kappa: _policy(kappa), LR0, "none", {})
       for kappa in (0.5, 1.0, 2.0)},
    # kappa = 2 with AdaScale was dropped when, at kappa = 1, one seed ran away (B and learning rate growing together);
    # that was the factor before session 31 (a product of gain ratios taken when B changed), not AdaScale's gain
    **{f"noise-adaptive kappa={kappa:g} adascale": (lambda kappa=kappa: _policy(kappa), LR0, "adascale", {})
       for kappa in (0.5, 1.0)},
    # bounded improvements (lag of the moving average, hold steps): faster average, no hold
    "noise-adaptive kappa=1 fast (ema 0.8, hold 1)": (lambda: _policy(1.0, hold_steps=1), LR0, "none",
                                                     {"ema_decay": 0.8}),
    "noise-adaptive kappa=1 adascale fast (ema 0.8, hold 1)": (lambda: _policy(1.0, hold_steps=1), LR0,
                                                               "adascale", {"ema_decay": 0.8}),
    # start where the noise scale is: B_0 = 8 (B_simple is small early in training), at the learning rate the sweep
    # found best at B = 8, AdaScale coupling raising it as B grows
    **{f"noise-adaptive kappa={kappa:g} adascale B0=8 (lr 0.0125)": (
        lambda kappa=kappa: _policy(kappa, first_batch_size=8), 0.0125, "adascale", {}) for kappa in (1.0, 2.0)},
}
DEFAULT_KINDS = list(KINDS)


def run_one(kind: str, seed: int, data, settings: SweepSettings) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    train_x, train_y, test_x, test_y = data
    source, learning_rate, coupling, monitor_options = KINDS[kind]
    torch.manual_seed(seed)  # seed 0: the sweep's initial weights
    model = lenet5()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=settings.momentum)
    started = time.perf_counter()
    with AdaptiveTrainer(model, per_example_cross_entropy, optimizer, TensorDataset(train_x, train_y), **source(),
                         lr_coupling=coupling, seed=seed, progress=False,
                         monitor_options={"ema_decay": settings.ema_decay, **monitor_options}) as trainer:
        result = train_to_target(trainer, lambda: _evaluate(model, test_x, test_y, settings.target_metric),
                                 target=settings.target, eval_every=settings.eval_every,
                                 window=settings.smoothing_window, max_steps=settings.max_steps,
                                 max_examples=settings.max_examples)
    wall = time.perf_counter() - started
    crossing = min(int(result["steps"]), len(result["batch_sizes"]) - 1) if result["outcome"] == "reached" else -1
    run = {"kind": kind, "seed": seed, "outcome": result["outcome"], "steps": result["steps"],
           "examples": result["examples"], "batch_size_at_target": int(result["batch_sizes"][crossing]),
           "learning_rate_at_target": float(result["learning_rates"][crossing]),
           "steps_trained": result["steps_trained"], "examples_trained": result["examples_trained"],
           "train_seconds": result["train_seconds"], "eval_seconds": result["eval_seconds"], "wall_seconds": wall}
    print(f"{kind:>55} seed {seed}: {run['outcome']}, {run['steps']:.1f} steps, {run['examples']:.0f} examples, "
          f"B at target {run['batch_size_at_target']}, {wall:.1f} s", flush=True)
    evaluations = pd.DataFrame({"kind": kind, "seed": seed, "step": result["eval_steps"],
                                "test_accuracy": result["eval_values"]})
    steps = pd.DataFrame({"kind": kind, "seed": seed, "step": np.arange(1, len(result["batch_sizes"]) + 1),
                          "batch_size": result["batch_sizes"], "learning_rate": result["learning_rates"]})
    return run, evaluations, steps


def summarise(runs: pd.DataFrame, fit) -> pd.DataFrame:
    """Per kind: mean and standard error over seeds of examples and steps (runs that reached the target), the
    position of every seed and of the mean point relative to the front, wall times."""
    reached = runs[runs["outcome"] == "reached"]
    rows = []
    for kind, group in reached.groupby("kind", sort=False):
        seeds = len(group)
        se = (lambda column: group[column].std(ddof=1) / np.sqrt(seeds)) if seeds > 1 else (lambda column: np.nan)
        mean = front_position(fit, [group["examples"].mean()], [group["steps"].mean()])
        counts = group["position"].value_counts()
        first = group[group["seed"] == 0]  # the sweep's initial weights and data order
        rows.append({"kind": kind, "seeds": seeds, "censored": int((runs["kind"] == kind).sum()) - seeds,
                     "examples_mean": group["examples"].mean(), "examples_se": se("examples"),
                     "steps_mean": group["steps"].mean(), "steps_se": se("steps"),
                     "front_steps_at_mean": mean["front_steps"].iloc[0], "front_low": mean["front_low"].iloc[0],
                     "front_high": mean["front_high"].iloc[0], "steps_ratio_mean": group["steps_ratio"].mean(),
                     "position_of_mean": mean["position"].iloc[0],
                     "seeds_beyond_on_inside": "/".join(str(counts.get(p, 0)) for p in ("beyond", "on", "inside")),
                     "steps_ratio_seed0": first["steps_ratio"].iloc[0] if len(first) else np.nan,
                     "position_seed0": first["position"].iloc[0] if len(first) else "",
                     "batch_size_at_target_mean": group["batch_size_at_target"].mean(),
                     "examples_trained_mean": group["examples_trained"].mean(),
                     "train_seconds_mean": group["train_seconds"].mean(),
                     "wall_seconds_mean": group["wall_seconds"].mean()})
    return pd.DataFrame(rows)


def plot(frame: pd.DataFrame, fit, runs: pd.DataFrame, summary: pd.DataFrame, path: Path) -> None:
    """The front and its band in (E, S), the sweep's cells (best per B filled), every adaptive run (faint) and
    each kind's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from noisescale.app.plot import save_figure

    reached = frame[frame["outcome"] == "reached"]
    low = min(reached["examples"].min(), runs["examples"].min()) * 0.8
    high = max(reached["examples"].max(), runs["examples"].max()) * 1.2
    band = front_band(fit, np.geomspace(max(low, fit.e_min * 1.01), high, 300))
    figure, ax = plt.subplots(figsize=(8.0, 5.5))
    plt.close(figure)
    ax.fill_between(band["examples"], band["steps_low"], np.minimum(band["steps_high"], 1e4), color="grey",
                    alpha=0.25, label=f"{fit.confidence:.0%} band of the front")
    ax.plot(band["examples"], band["steps"], color="black", label="fixed-B front $S_{min}E/(E-E_{min})$")
    best = reached.loc[reached.groupby("batch_size")["steps"].idxmin()]
    ax.scatter(reached["examples"], reached["steps"], s=14, color="grey", alpha=0.5, label="sweep cells (all lr)")
    ax.scatter(best["examples"], best["steps"], s=30, color="black", marker="s", label="sweep, best lr per B")
    for _, row in best.iterrows():
        ax.annotate(f"{row['batch_size']:g}", (row["examples"], row["steps"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    colours, markers = plt.get_cmap("tab20"), "oDv^P"
    for index, row in summary.reset_index(drop=True).iterrows():
        colour, marker = colours(index % 20), markers[index % len(markers)]
        kind_runs = runs[(runs["kind"] == row["kind"]) & (runs["outcome"] == "reached")]
        ax.scatter(kind_runs["examples"], kind_runs["steps"], s=14, color=colour, alpha=0.45)
        ax.errorbar(row["examples_mean"], row["steps_mean"], xerr=row["examples_se"], yerr=row["steps_se"],
                    marker=marker, markersize=7, color=colour, markeredgecolor="black", label=row["kind"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples to 75 % test accuracy $E$")
    ax.set_ylabel("steps to 75 % test accuracy $S$")
    ax.set_title("Adaptive runs on the fixed-batch front (LeNet-5, Fashion-MNIST subset)")
    ax.legend(fontsize=6, loc="upper right")
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=DEFAULT_KINDS, choices=list(KINDS))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--sweep", type=Path, default=SWEEP,
                        help="the sweep CSV the front is fitted to (and whose settings the runs take)")
    parser.add_argument("--plot-only", action="store_true", help="redo the summary and figure from runs.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    frame = read_sweep_results(args.sweep)
    settings = SweepSettings(**{name: frame[name].iloc[0].item() if hasattr(frame[name].iloc[0], "item")
                                else frame[name].iloc[0] for name in SweepSettings.__dataclass_fields__})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = fit_sweep(frame)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {name: args.out / f"{name}.csv" for name in ("runs", "evaluations", "batch_sizes")}
    done = pd.read_csv(paths["runs"]) if paths["runs"].exists() else pd.DataFrame(columns=["kind", "seed"])
    finished = set(zip(done["kind"], done["seed"]))
    if not args.plot_only:
        data = _load_data(settings)
        started = time.perf_counter()
        for kind in args.kinds:
            for seed in range(args.seeds):
                if (kind, seed) in finished:
                    continue
                run, evaluations, steps = run_one(kind, seed, data, settings)
                for name, part in (("runs", pd.DataFrame([run])), ("evaluations", evaluations),
                                   ("batch_sizes", steps)):
                    part.to_csv(paths[name], mode="a", header=not paths[name].exists(), index=False)
        print(f"this invocation: {time.perf_counter() - started:.0f} s wall")
    runs = pd.read_csv(paths["runs"])
    reached = runs["outcome"] == "reached"
    positions = front_position(fit, runs.loc[reached, "examples"], runs.loc[reached, "steps"])
    runs = runs.drop(columns=[c for c in ("front_steps", "steps_ratio", "position") if c in runs])
    runs.loc[reached, "front_steps"] = positions["front_steps"].to_numpy()
    runs.loc[reached, "steps_ratio"] = positions["steps_ratio"].to_numpy()
    runs.loc[reached, "position"] = positions["position"].to_numpy()
    runs.to_csv(paths["runs"], index=False)
    summary = summarise(runs, fit)
    summary.to_csv(args.out / "summary.csv", index=False)
    sweep = args.sweep.resolve()
    sweep_cost = {"sweep": str(sweep.relative_to(ROOT)) if sweep.is_relative_to(ROOT) else str(args.sweep),
                  "cells": len(frame), "examples_trained": float((frame["steps_trained"] * frame["batch_size"]).sum()),
                  "seconds": float(frame["seconds"].sum()), "fit": fit.summary()}
    (args.out / "sweep_cost.json").write_text(json.dumps(sweep_cost, indent=2))
    plot(frame, fit, runs, summary, args.out / "frontier.png")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 4):
        print(fit.summary())
        print(summary)
        print(f"the sweep: {sweep_cost['cells']} cells, {sweep_cost['examples_trained']:.0f} examples trained, "
              f"{sweep_cost['seconds']:.0f} s of cell compute")
    return 0


if __name__ == "__main__":
    sys.exit(main())
