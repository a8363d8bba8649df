"""Smith, Kindermans & Le (2017) on the shipped Fashion-MNIST subset: decay the learning rate, or grow the batch?

Five training modes (noisescale.training.AdaptiveTrainer), each for several seeds, same model, optimizer and
epochs: ``lr-decay`` (B = B_0, eps divided by 5 at each milestone; the baseline), ``batch-increase`` (B times 5
instead, eps decays only once B reaches B_max), ``hybrid`` (B and eps each by sqrt 5, as in the MNIST
replication, seed 004), ``fixed`` (neither) and ``noise-adaptive`` (B = kappa * moving-average B_simple from the
monitor, constant eps). Reports final test accuracy (mean, sd over seeds), optimizer steps, examples seen and
training wall-clock, and checks the target: batch-increase and noise-adaptive within 0.5 percentage points
of lr-decay's mean accuracy with at least 3x fewer optimizer steps.

Writes data/adaptive/: adaptive_runs.csv (one row per run), adaptive_summary.csv (per mode),
adaptive_evaluations.csv (test accuracy after each epoch), adaptive_history.csv (per step, selected columns),
adaptive_curves.png. Run from the repository root:

    nice python3 analysis/adaptive_fashion_mnist.py [--seeds 3] [--epochs 11] [--model mlp|cnn] [--out DIR]

``--fixed-grid`` adds the strongest plain baseline instead: fixed batch sizes (``--fixed-batch-sizes``) at the
same epochs with no schedule, the learning rate tuned per B over ``--fixed-lrs`` on seed 0 (by test accuracy,
as the sweep of data/tradeoff/ tunes by it), then the other seeds at each B's chosen rate. It reads the modes'
runs from OUT/adaptive_runs.csv (made by the plain invocation with the same options) and writes
fixed_grid_runs.csv and fixed_vs_adaptive_summary.csv: every mode and every tuned fixed B, with step ratios
against lr-decay and against the best fixed B (the tuned B with the highest mean accuracy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from noisescale.app.jobs import evaluate_accuracy  # noqa: E402
from noisescale.app.plot import plot_training_curves, save_figure  # noqa: E402
from noisescale.data import load_fashion_mnist  # noqa: E402
from noisescale.losses import per_example_cross_entropy  # noqa: E402
from noisescale.models import lenet5, mlp  # noqa: E402
from noisescale.training import TRAIN_MODES, AdaptiveTrainer, make_batch_size_source  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "data" / "adaptive"
HISTORY_COLUMNS = ["mode", "seed", "step", "epoch", "examples_seen", "batch_size", "learning_rate", "loss",
                   "b_simple", "seconds"]
MODE_ORDER = ["lr-decay", "batch-increase", "hybrid", "noise-adaptive", "fixed"]


def run_one(mode: str, seed: int, train_set, test_set, args, *, batch_size: int | None = None,
            lr: float | None = None) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    batch_size = args.batch_size if batch_size is None else batch_size
    lr = args.lr if lr is None else lr
    torch.manual_seed(seed)
    model = mlp(hidden=(args.hidden,)) if args.model == "mlp" else lenet5()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
    source = make_batch_size_source(mode, epochs=args.epochs, batch_size=batch_size,
                                    max_batch_size=max(args.max_batch_size, batch_size), learning_rate=lr,
                                    milestones=args.milestones, decay_factor=0.2, kappa=args.kappa)
    # the schedules need no measurement (every 10th step, for the B_simple curves); noise-adaptive measures all
    measure_every = 1 if mode == "noise-adaptive" else 10
    evaluations = []

    def after_epoch(trainer: AdaptiveTrainer) -> None:
        evaluations.append({"mode": mode, "seed": seed, "epoch": trainer.epoch, "step": trainer.steps,
                            "seconds": trainer.seconds,
                            "test_accuracy": evaluate_accuracy(model, test_set, torch.device("cpu"))})

    with AdaptiveTrainer(model, per_example_cross_entropy, optimizer, train_set, **source, seed=seed,
                         max_micro_batch=args.max_micro_batch, monitor_options={"measure_every": measure_every},
                         progress=False) as trainer:
        history = trainer.train(args.epochs, callback=after_epoch)
    history = history.assign(mode=mode, seed=seed)
    run = {"mode": mode, "seed": seed, "batch_size": batch_size, "learning_rate": lr,
           "test_accuracy": evaluations[-1]["test_accuracy"], "steps": trainer.steps,
           "examples_seen": trainer.sampler.examples_seen, "seconds": trainer.seconds,
           "final_batch_size": int(history["batch_size"].iloc[-1])}
    print(f"{mode:>15} B={batch_size} lr={lr:g} seed {seed}: accuracy {run['test_accuracy']:.4f}, {run['steps']} steps, "
          f"final B {run['final_batch_size']}, {run['seconds']:.1f} s", flush=True)
    return run, pd.DataFrame(evaluations), history[[c for c in HISTORY_COLUMNS if c in history]]


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    summary = runs.groupby("mode").agg(
        seeds=("seed", "count"),
        accuracy_mean=("test_accuracy", "mean"), accuracy_sd=("test_accuracy", "std"),
        steps_mean=("steps", "mean"), steps_sd=("steps", "std"),
        examples_seen_mean=("examples_seen", "mean"),
        seconds_mean=("seconds", "mean"), seconds_sd=("seconds", "std"),
    ).reindex([m for m in MODE_ORDER if m in set(runs["mode"])])
    baseline = summary.loc["lr-decay"]
    summary["accuracy_gap_pp"] = 100 * (summary["accuracy_mean"] - baseline["accuracy_mean"])
    summary["step_reduction"] = baseline["steps_mean"] / summary["steps_mean"]
    summary["meets_target"] = (summary["accuracy_gap_pp"] >= -0.5) & (summary["step_reduction"] >= 3)
    return summary


def run_fixed_grid(train_set, test_set, args) -> pd.DataFrame:
    """Seed 0 over every (B, lr); then the other seeds at each B's learning rate of highest seed-0 accuracy."""
    runs = [run_one("fixed", 0, train_set, test_set, args, batch_size=size, lr=lr)[0]
            for size in args.fixed_batch_sizes for lr in args.fixed_lrs]
    first = pd.DataFrame(runs)
    chosen = first.loc[first.groupby("batch_size")["test_accuracy"].idxmax(), ["batch_size", "learning_rate"]]
    runs += [run_one("fixed", seed, train_set, test_set, args, batch_size=int(size), lr=float(lr))[0]
             for size, lr in chosen.itertuples(index=False) for seed in range(1, args.seeds)]
    grid = pd.DataFrame(runs)
    grid["tuned"] = [(size, lr) in set(chosen.itertuples(index=False, name=None))
                     for size, lr in zip(grid["batch_size"], grid["learning_rate"])]
    return grid


def fixed_vs_adaptive(modes: pd.DataFrame, grid: pd.DataFrame) -> pd.DataFrame:
    """One row per mode and per tuned fixed B: accuracy (mean, standard error over seeds), steps, examples, and
    the step ratios against lr-decay and against the best fixed B (highest mean accuracy among the tuned B)."""
    tuned = grid[grid["tuned"]].assign(mode=lambda f: [f"fixed B={b} (lr {lr:g})" for b, lr in
                                                       zip(f["batch_size"], f["learning_rate"])])
    runs = pd.concat([modes, tuned], ignore_index=True)
    table = runs.groupby("mode", sort=False).agg(
        seeds=("seed", "count"), accuracy_mean=("test_accuracy", "mean"), accuracy_sd=("test_accuracy", "std"),
        steps_mean=("steps", "mean"), examples_seen_mean=("examples_seen", "mean"), seconds_mean=("seconds", "mean"))
    table["accuracy_se"] = table["accuracy_sd"] / table["seeds"] ** 0.5
    fixed_rows = table.loc[table.index.str.startswith("fixed B=")]
    best = fixed_rows["accuracy_mean"].idxmax()
    table["best_fixed"] = table.index == best
    table["fewer_steps_than_lr_decay"] = table.loc["lr-decay", "steps_mean"] / table["steps_mean"]
    table["fewer_steps_than_best_fixed"] = table.loc[best, "steps_mean"] / table["steps_mean"]
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=11.0)
    parser.add_argument("--milestones", type=float, nargs="+", default=[2.0, 5.0, 8.0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=2048)
    parser.add_argument("--max-micro-batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--kappa", type=float, default=1.0)
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                        help="an MLP with one hidden layer, or the LeNet-5-like CNN of noisescale.models")
    parser.add_argument("--hidden", type=int, default=256, help="width of the MLP's hidden layer")
    parser.add_argument("--modes", nargs="+", default=MODE_ORDER[:4], choices=TRAIN_MODES)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--fixed-grid", action="store_true",
                        help="run the tuned fixed-batch baseline and compare with OUT/adaptive_runs.csv")
    parser.add_argument("--fixed-batch-sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--fixed-lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    args = parser.parse_args(argv)
    if "lr-decay" not in args.modes:
        parser.error("--modes must include the lr-decay baseline")
    torch.set_num_threads(1)
    train_set, test_set = load_fashion_mnist(source="subset")
    if args.fixed_grid:
        modes_path = args.out / "adaptive_runs.csv"
        if not modes_path.exists():
            parser.error(f"--fixed-grid compares with {modes_path}: run without --fixed-grid first")
        started = time.perf_counter()
        grid = run_fixed_grid(train_set, test_set, args)
        wall = time.perf_counter() - started
        grid.to_csv(args.out / "fixed_grid_runs.csv", index=False)
        table = fixed_vs_adaptive(pd.read_csv(modes_path), grid)
        table.to_csv(args.out / "fixed_vs_adaptive_summary.csv")
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
            print(table)
        print(f"total wall-clock {wall:.0f} s for {len(grid)} fixed-batch runs")
        return 0
    started = time.perf_counter()
    results = [run_one(mode, seed, train_set, test_set, args) for mode in args.modes for seed in range(args.seeds)]
    wall = time.perf_counter() - started
    runs, evaluations, history = (pd.concat(parts, ignore_index=True) if isinstance(parts[0], pd.DataFrame)
                                  else pd.DataFrame(parts) for parts in zip(*results))
    summary = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(args.out / "adaptive_runs.csv", index=False)
    summary.to_csv(args.out / "adaptive_summary.csv")
    evaluations.to_csv(args.out / "adaptive_evaluations.csv", index=False)
    history.to_csv(args.out / "adaptive_history.csv", index=False)
    save_figure(plot_training_curves(history, evaluations), args.out / "adaptive_curves.png")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print(summary)
    print(f"total wall-clock {wall:.0f} s for {len(runs)} runs ({args.seeds} seeds x {len(args.modes)} modes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
