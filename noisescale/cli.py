"""Command line: ``noisescale <command>`` (also ``python -m noisescale``).

Each command registers itself in :func:`build_parser` through one ``_add_<name>_command`` function,
which imports its implementation lazily so that ``noisescale --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisescale",
        description="Measure the gradient noise scale of PyTorch training and choose the batch size from it.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def _add_measure_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "measure",
        help="train a model while measuring its gradient noise scale (default: a CNN on Fashion-MNIST)",
        description="Train a model for a few hundred steps while measuring B_simple every step and B_noise "
        "periodically; print the summary and write the history (CSV) and a figure (PNG).",
    )
    parser.add_argument("--model", default=None, metavar="PACKAGE.MODULE:FACTORY",
                        help="a callable returning an nn.Module for 1x28x28 images and 10 classes "
                        "(default: noisescale.models:lenet5)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a directory of Fashion-MNIST/MNIST IDX files (default: the Debian copy when "
                        "installed, else the subset shipped with noisescale)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--backend", default="auto", choices=["auto", "ghost", "vmap"],
                        help="per-example gradient norm backend")
    parser.add_argument("--hessian-every", type=int, default=50, help="steps between B_noise measurements (0: never)")
    parser.add_argument("--out", default="runs/measure", help="output folder for the CSV and PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=_run_measure)


def _run_measure(args) -> int:
    from noisescale.jobs import run_measure

    outcome = run_measure(
        model_spec=args.model,
        data=args.data,
        batch_size=args.batch_size,
        steps=args.steps,
        learning_rate=args.lr,
        device=args.device,
        backend=args.backend,
        hessian_every=args.hessian_every,
        out_dir=args.out,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"data: {outcome.data_source}")
    print(outcome.summary)
    print(f"test accuracy after training: {outcome.test_accuracy:.3f}")
    print(f"history: {outcome.history_csv}\nfigure: {outcome.figure_png}\ntook {outcome.seconds:.1f} s")
    return 0


_COMMANDS: list = [_add_measure_command]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
