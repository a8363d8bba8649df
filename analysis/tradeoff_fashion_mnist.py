"""Critical batch size of the default CNN (LeNet-5) on the shipped Fashion-MNIST subset, against its noise scale.

Sweep B = 8, 16, ..., 2048 with three learning rates per B (linear scaling from 0.05 at B = 128, capped at 0.2,
times 0.5 / 1 / 2), then widen each B's grid by a factor 2 past the edge where its best learning rate sits, for up
to ``--refine-rounds`` rounds (McCandlish et al. tuned the learning rate per B; a best learning rate at the grid's
edge overestimates the steps). Each cell trains to 75 % test accuracy (all 2,000 test images of the subset, every
10 steps, centred 3-evaluation moving average). Fit S = S_min (1 + B_crit / B) to the best learning rate per B and
compare B_crit with B_simple and B_noise measured at the target (McCandlish et al. 2018 found agreement within an
order of magnitude). Resumable: re-running skips finished cells.

    nice python3 analysis/tradeoff_fashion_mnist.py [--jobs 2] [--refine-rounds 3]

Writes data/tradeoff/sweep_fashion_mnist.csv (one row per cell), fit_fashion_mnist.json and two PNGs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from noisescale.sweep import (
    SweepSettings, best_learning_rate_cells, fit_sweep, geometric_batch_sizes, learning_rate_grid,
    noise_scale_at_target, refine_learning_rate_grid, run_sweep,
)

OUT = Path(__file__).resolve().parent.parent / "data" / "tradeoff"
BATCH_SIZES = geometric_batch_sizes(8, 2048)
LEARNING_RATES = learning_rate_grid(BATCH_SIZES, 0.05, 128, factors=(0.5, 1.0, 2.0), max_learning_rate=0.2)
SETTINGS = SweepSettings(target_metric="test_accuracy", target=0.75, model="noisescale.models:lenet5",
                         data_source="subset", eval_every=10, smoothing_window=3, max_steps=4000,
                         max_examples=400_000, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--refine-rounds", type=int, default=3,
                        help="rounds of widening each grid past the edge where its best learning rate sits")
    args = parser.parse_args()
    path = OUT / "sweep_fashion_mnist.csv"
    start = time.perf_counter()
    frame = run_sweep(path, BATCH_SIZES, LEARNING_RATES, SETTINGS, jobs=args.jobs)
    for _ in range(args.refine_rounds):
        grids = refine_learning_rate_grid(frame)
        if len(frame) == sum(len(grid) for grid in grids.values()):
            break  # every best learning rate lies inside its grid
        frame = run_sweep(path, BATCH_SIZES, grids, SETTINGS, jobs=args.jobs)
    wall = time.perf_counter() - start
    best = best_learning_rate_cells(frame)
    fit = fit_sweep(frame)
    noise = noise_scale_at_target(best)
    print(best[["batch_size", "learning_rate", "steps", "examples", "lr_at_grid_edge", "b_simple", "b_noise"]]
          .to_string(index=False))
    print(fit.summary())
    print(f"noise scale at the target (median over best cells' finite values): B_simple = {noise['b_simple']:.4g}, "
          f"B_noise = {noise['b_noise']:.4g} (unresolved in {noise['b_noise_unresolved']} of {len(best)} cells)")
    print(f"B_crit / B_noise = {fit.b_crit / noise['b_noise']:.3g}, B_crit / B_simple = {fit.b_crit / noise['b_simple']:.3g}")
    print(f"this run: {wall:.0f} s wall; all cells' own compute: {frame['seconds'].sum():.0f} s")
    result = {**fit.to_dict(), **noise, "b_crit_over_b_noise": fit.b_crit / noise["b_noise"],
              "b_crit_over_b_simple": fit.b_crit / noise["b_simple"], "cells": len(frame),
              "cells_compute_seconds": float(frame["seconds"].sum()), "wall_seconds_this_run": wall}
    (OUT / "fit_fashion_mnist.json").write_text(json.dumps(result, indent=2))
    from noisescale.app.plot import plot_noise_scale_vs_b_crit, plot_tradeoff, save_figure

    save_figure(plot_tradeoff(fit), OUT / "tradeoff_fashion_mnist.png")
    save_figure(plot_noise_scale_vs_b_crit(frame, fit), OUT / "noise_scale_vs_b_crit_fashion_mnist.png")


if __name__ == "__main__":
    main()
