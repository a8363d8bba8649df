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


def _add_train_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train with noisescale choosing the batch size (Smith et al. schedules or the noise scale)",
        description="Train a model (default: LeNet-5 on Fashion-MNIST) with SGD and momentum 0.9 while the batch "
        "size follows a schedule (fixed, lr-decay, batch-increase, hybrid: Smith, Kindermans & Le 2017, factor-5 "
        "stages at 30/55/80%% of the epochs) or the measured noise scale (noise-adaptive: B = kappa * B_simple). "
        "Prints the final test accuracy, optimizer steps, examples seen and wall-clock; writes CSV and PNG.",
    )
    parser.add_argument("--schedule", required=True,
                        choices=["fixed", "lr-decay", "batch-increase", "hybrid", "noise-adaptive"])
    parser.add_argument("--model", default=None, metavar="PACKAGE.MODULE:FACTORY",
                        help="a callable returning an nn.Module for 1x28x28 images and 10 classes "
                        "(default: noisescale.models:lenet5)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a directory of Fashion-MNIST/MNIST IDX files (default: the Debian copy when "
                        "installed, else the subset shipped with noisescale)")
    parser.add_argument("--train-examples", type=int, default=None, metavar="N",
                        help="use only the first N training examples (quick trials)")
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=32, help="initial (base) batch size B_0")
    parser.add_argument("--max-batch-size", type=int, default=1024, help="B_max")
    parser.add_argument("--lr", type=float, default=0.05, help="base learning rate eps_0")
    parser.add_argument("--milestones", type=float, nargs="+", default=None, metavar="EPOCH",
                        help="epochs where the noise is divided by 5 (default: 30/55/80%% of --epochs)")
    parser.add_argument("--kappa", type=float, default=1.0, help="noise-adaptive: B = kappa * B_simple")
    parser.add_argument("--lr-coupling", default="none", choices=["none", "linear", "sqrt", "adascale"],
                        help="noise-adaptive: how the learning rate follows a change of B")
    parser.add_argument("--max-micro-batch", type=int, default=None,
                        help="largest forward/backward; bigger batches accumulate micro-batches")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision on CUDA")
    parser.add_argument("--checkpoint", default=None, metavar="PATH", help="save a checkpoint after every epoch")
    parser.add_argument("--resume", default=None, metavar="PATH", help="continue from a checkpoint")
    parser.add_argument("--out", default="runs/train", help="output folder for the CSV and PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from noisescale.training import run_train

    outcome = run_train(
        mode=args.schedule,
        model_spec=args.model,
        data=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_batch_size=args.max_batch_size,
        learning_rate=args.lr,
        milestones=args.milestones,
        kappa=args.kappa,
        lr_coupling=args.lr_coupling,
        max_micro_batch=args.max_micro_batch,
        train_examples=args.train_examples,
        device=args.device,
        amp=args.amp,
        checkpoint=args.checkpoint,
        resume=args.resume,
        out_dir=args.out,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(outcome)
    print(f"history: {outcome.history_csv}\nevaluations: {outcome.evaluations_csv}\nfigure: {outcome.figure_png}")
    return 0


_COMMANDS: list = [_add_measure_command, _add_train_command]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
