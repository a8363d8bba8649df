"""Command line: ``noisescale <command>`` (also ``python -m noisescale``).

Each command registers itself in :func:`build_parser` through one ``_add_<name>_command`` function,
which imports its implementation lazily so that ``noisescale --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default after its help, unless the help already states it."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from noisescale import __version__

    parser = argparse.ArgumentParser(
        prog="noisescale",
        description="Measure the gradient noise scale of PyTorch training and choose the batch size from it.",
        epilog="Errors are printed as one line (exit status 2 for a problem with the options, 1 otherwise); "
        "--debug prints the full traceback instead.",
    )
    parser.add_argument("--version", action="version", version=f"noisescale {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def _command_parser(subparsers, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full traceback (default: one line)")
    return parser


def _add_model_and_data_arguments(parser, *, user_data: bool, data_default: str) -> None:
    """--model and --data (and --dataset, --loss where the command takes the user's own data), shared."""
    from noisescale.app.options import DEFAULT_LOSS, DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="PACKAGE.MODULE:FACTORY",
                        help="a callable (no arguments) returning the torch.nn.Module to train")
    parser.add_argument("--data", default=data_default, metavar="DIR",
                        help="Fashion-MNIST: a folder of its (or MNIST's) IDX files, 'subset' (the 12,000/2,000 "
                        "images shipped with noisescale), 'debian' (the Debian package's copy) or 'auto' (debian "
                        "when installed, else subset)")
    if user_data:
        parser.add_argument("--dataset", default=None, metavar="PACKAGE.MODULE:FACTORY",
                            help="your own data instead of Fashion-MNIST: a callable (no arguments) returning a "
                            "map-style Dataset of (inputs, targets) pairs (a seeded 10%% is held out for testing), "
                            "a (train, test) pair of them, or a DataLoader of one (its dataset is used)")
        parser.add_argument("--loss", default=DEFAULT_LOSS, metavar="PACKAGE.MODULE:FUNCTION",
                            help="per-example loss: loss(outputs, targets) -> shape (B,); the training loss is its "
                            "mean")


def _add_run_arguments(parser, *, out: str, out_help: str, json_name: str | None) -> None:
    """--device, --out, --seed, --threads, --no-progress (and --json), shared by the commands that train."""
    from noisescale.app.options import DEFAULT_THREADS

    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N")
    parser.add_argument("--out", default=out, help=out_help + "; created and checked before any training")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and the batches")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                        help="torch CPU threads (torch.set_num_threads); None: torch's own default")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    if json_name is not None:  # the commands that train: measure and train
        parser.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                            help="under torchrun: DistributedDataParallel, or FSDP2 sharding (fully_shard on each "
                            "top-level child with parameters; no B_noise: --hessian-every must be 0, measure's "
                            "default there, in one process too); in one process the model is not wrapped")
        parser.add_argument("--json", action="store_true",
                            help=f"print the summary as JSON instead of text (it is always written to "
                            f"OUT/{json_name}; NaN = not measured is null, an unresolved infinite value is \"inf\")")


def _add_measure_command(subparsers) -> None:
    parser = _command_parser(
        subparsers, "measure",
        help="measure the gradient noise scale while training a model, or of a trained checkpoint",
        description="Train a model (default: a CNN on Fashion-MNIST) for --steps steps while measuring B_simple "
        "every step and B_noise every --hessian-every; or, with --checkpoint, measure a trained model over --steps "
        "batches without optimizer steps. Prints the summary and the test accuracy (classification) or the mean "
        "test loss, and writes the history (CSV), a figure (PNG) and the summary (JSON).",
    )
    _add_model_and_data_arguments(parser, user_data=True, data_default="auto")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="measure these trained weights without optimizer steps: a torch.save(model."
                        "state_dict()) file or a `noisescale train --checkpoint` file (loaded with weights_only)")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step (>= 2)")
    parser.add_argument("--steps", type=int, default=300, help="steps (with --checkpoint: batches measured)")
    parser.add_argument("--lr", type=_POSITIVE, default=0.02, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--backend", default="auto", choices=["auto", "ghost", "vmap"],
                        help="per-example gradient norm backend")
    parser.add_argument("--hessian-every", type=int, default=None,
                        help="steps between B_noise measurements (0: never; default 50, and 0 with --parallel fsdp, "
                        "where the Hessian proxies cannot run)")
    _add_run_arguments(parser, out="runs/measure", out_help="output folder", json_name="measure_summary.json")
    parser.set_defaults(run=_run_measure)


def _run_measure(args) -> int:
    from noisescale.app.jobs import is_main_process, summary_json
    from noisescale.app.measure import run_measure
    from noisescale.app.options import set_threads

    set_threads(args.threads)
    with _output_held(args.out):
        outcome = run_measure(
            model_spec=args.model,
            dataset=args.dataset,
            data=args.data,
            loss=args.loss,
            checkpoint=args.checkpoint,
            batch_size=args.batch_size,
            steps=args.steps,
            learning_rate=args.lr,
            device=args.device,
            backend=args.backend,
            hessian_every=args.hessian_every,
            out_dir=args.out,
            seed=args.seed,
            progress=not args.no_progress,
            parallel=args.parallel,
        )
    if is_main_process():
        print(summary_json(outcome.to_dict()) if args.json else outcome.report())
    return 0


@contextlib.contextmanager
def _output_held(out: str, checkpoint: str | None = None):
    """The command's ``--out`` folder, and the ``--checkpoint`` file it writes (wherever it lies), held by this run
    alone (``locked_output_folder``, ``locked_output_file``; a torchrun launch's rank 0 alone, which writes the
    files)."""
    from noisescale.app.jobs import is_main_process
    from noisescale.app.options import locked_output_file, locked_output_folder

    with contextlib.ExitStack() as held:
        if is_main_process():
            held.enter_context(locked_output_folder(out))
            if checkpoint is not None:
                held.enter_context(locked_output_file(checkpoint, "--checkpoint"))
        yield


def _run_nqm(args: argparse.Namespace) -> int:
    import numpy as np

    from noisescale import nqm
    from noisescale._digits import printed
    from noisescale.tradeoff import with_interval

    model = nqm.paper_model(args.dim, None if args.bins == 0 else args.bins)
    optimizer = nqm.OptimizerSetting(
        momentum=args.momentum if args.optimizer == "momentum" else 0.0,
        precondition_power=args.precondition_power,
        ema=args.ema,
    )
    curve = nqm.steps_vs_batch_size(
        model, optimizer, args.batch_sizes,
        momenta=nqm.DEFAULT_MOMENTUM_GRID if args.tune_momentum else None,
        emas=nqm.DEFAULT_EMA_GRID if args.tune_ema else None,
        target=args.target, max_steps=args.max_steps, progress=not args.no_progress,
    )
    bound = nqm.lower_bound_steps(model, curve.batch_sizes, args.target)
    print(f"NQM d={model.dim} ({model.curvatures.size} bins), target risk {args.target:g}, {optimizer.label}")
    print(f"{'batch_size':>12} {'steps':>12} {'learning_rate':>14} {'effective_lr':>13} {'momentum':>9} "
          f"{'ema':>9} {'lower_bound':>12}")
    for row, lower in zip(curve.to_frame().itertuples(), bound):
        steps = "inf" if not np.isfinite(row.steps) else f"{int(row.steps)}"
        print(f"{row.batch_size:>12g} {steps:>12} {row.learning_rate:>14.4g} {row.effective_learning_rate:>13.4g} "
              f"{row.momentum:>9.6g} {row.ema:>9.6g} {lower:>12.4g}")
    finite = np.isfinite(curve.steps)
    if finite.sum() < 2:
        print("critical batch size: undefined (fewer than two batch sizes reach the target)")
        return 0
    import warnings

    with warnings.catch_warnings(record=True) as caught:   # batch sizes left out: said once, as a note
        warnings.simplefilter("always")
        critical = nqm.critical_batch_size(curve.batch_sizes, curve.steps)
    print(f"critical batch size (steps = 2x perfect linear scaling): {critical:.4g}")
    for warning in caught:
        print(f"note: {warning.message}")
    if finite.sum() >= 3:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fit = nqm.fit_scaling_curve(curve, n_bootstrap=args.n_bootstrap)
            except ValueError as error:   # too few batch sizes below the one-step floor
                fit = None
                print(f"McCandlish fit: none ({error})")
        if fit is not None:
            low, high = fit.b_crit_interval
            shown = printed(fit.b_crit, low, high)   # with the digits the interval supports
            print(f"McCandlish fit: B_crit = {shown.value} (90% interval {shown.low} .. {shown.high}), "
                  f"{with_interval('S_min', fit.s_min, fit.s_min_interval)}, "
                  f"{with_interval('E_min', fit.e_min, fit.e_min_interval)}"
                  f"{'' if fit.resolved else ' -- not resolved'}")
        for warning in caught:
            print(f"note: {warning.message}")
    return 0


def _add_nqm_command(subparsers) -> None:
    parser = _command_parser(
        subparsers, "nqm",
        help="steps to target and critical batch size in the noisy quadratic model (Zhang et al. 2019)",
        description="Tune the constant learning rate per batch size in the noisy quadratic model and print "
        "the steps to reach the target risk and the critical batch size.",
    )
    parser.add_argument("--optimizer", choices=["sgd", "momentum"], default="sgd",
                        help="plain SGD or heavy-ball momentum (--momentum)")
    parser.add_argument("--momentum", type=float, default=0.9, help="heavy-ball beta for --optimizer momentum")
    parser.add_argument("--tune-momentum", action="store_true", help="grid-search beta as well (slower)")
    parser.add_argument("--precondition-power", type=float, default=0.0, help="p of the preconditioner H^p")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA coefficient gamma of the iterates (0: off)")
    parser.add_argument("--tune-ema", action="store_true", help="grid-search gamma as well (slower)")
    parser.add_argument("--batch-sizes", type=_comma_separated(float, positive=True),
                        default=[2.0**k for k in range(21)], help="comma-separated (default: 2^0 .. 2^20)")
    parser.add_argument("--dim", type=int, default=10_000, help="dimension d, h_i = 1/i, C = H")
    parser.add_argument("--bins", type=int, default=100, help="eigenvalue bins (0: exact spectrum)")
    parser.add_argument("--target", type=float, default=0.01, help="target expected risk")
    parser.add_argument("--max-steps", type=int, default=2**30, help="give up on a batch size after this many steps")
    parser.add_argument("--n-bootstrap", type=int, default=200, help="bootstrap replicates of the fit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=_run_nqm)


def _comma_separated(kind, *, positive: bool = False):
    """An argparse type: "a,b,c" -> [kind(a), kind(b), kind(c)], optionally all > 0."""
    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from error
        if not values or (positive and any(not value > 0 for value in values)):
            raise argparse.ArgumentTypeError(f"expected {'positive ' * positive}comma-separated {kind.__name__} "
                                             f"values, got {text!r}")
        return values

    return parse


def _add_sweep_command(subparsers) -> None:
    parser = _command_parser(
        subparsers, "sweep",
        help="train to a target across batch sizes and learning rates; fit B_crit (McCandlish et al. 2018)",
        description="For each batch size of a geometric range and each learning rate of a per-B log grid, "
        "train the model until a smoothed test metric reaches the target; append one CSV row per cell (an "
        "interrupted sweep resumes), then fit S = S_min (1 + B_crit / B) to the best learning rate per B.",
    )
    parser.add_argument("--batch-sizes", type=_comma_separated(int, positive=True), default=None, metavar="B1,B2,...",
                        help="explicit geometric batch sizes, at least 3 (overrides --min-batch/--max-batch)")
    parser.add_argument("--min-batch", type=int, default=8, help="smallest batch size of the geometric range")
    parser.add_argument("--max-batch", type=int, default=2048, help="largest batch size of the geometric range")
    parser.add_argument("--lr", type=_POSITIVE, default=0.05, help="centre learning rate at --lr-reference-batch")
    parser.add_argument("--lr-reference-batch", type=int, default=128, help="batch size the --lr is for")
    parser.add_argument("--lr-scaling", default="linear", choices=["linear", "sqrt", "constant"],
                        help="how the centre learning rate follows the batch size")
    parser.add_argument("--lr-factors", type=_comma_separated(float, positive=True), default=[0.5, 1.0, 2.0],
                        help="grid = centre times each factor")
    parser.add_argument("--max-lr", type=float, default=0.2, help="cap of the centre learning rate")
    parser.add_argument("--target-metric", default="test_accuracy", choices=["test_accuracy", "test_loss"],
                        help="test_accuracy (reach at least) or test_loss (reach at most)")
    parser.add_argument("--target", type=float, default=0.8, help="the value of --target-metric to reach")
    _add_model_and_data_arguments(parser, user_data=False, data_default="subset")
    parser.add_argument("--train-examples", type=int, default=0, help="training examples used (0: all)")
    parser.add_argument("--eval-examples", type=int, default=0, help="test examples used (0: the whole test split)")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    parser.add_argument("--smoothing-window", type=int, default=3, help="centred moving average, evaluations")
    parser.add_argument("--max-steps", type=int, default=4000, help="per-cell step budget")
    parser.add_argument("--max-examples", type=int, default=0, help="per-cell example budget (0: none)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells trained in parallel processes (each with cpu_count // jobs threads)")
    _add_run_arguments(parser, out="runs/sweep/sweep.csv", out_help="CSV of cells (appended to; resumed)",
                       json_name=None)
    parser.set_defaults(run=_run_sweep)


def _run_sweep(args) -> int:
    from noisescale.app.options import (
        FASHION_MNIST_SOURCES, UsageError, build_model, option_error, prepare_output_file, resolve_device_option,
        set_threads,
    )
    from noisescale.sweep import (
        SweepSettings, best_learning_rate_cells, fit_sweep, geometric_batch_sizes, learning_rate_grid, run_sweep,
    )
    from noisescale.tradeoff import MIN_DISTINCT_BATCH_SIZES

    set_threads(args.threads)
    if args.data not in FASHION_MNIST_SOURCES and not Path(args.data).is_dir():
        raise option_error("--data", args.data, "is neither a folder of IDX files nor one of "
                           f"{', '.join(FASHION_MNIST_SOURCES)}")
    device = resolve_device_option(args.device)
    build_model(args.model)  # a wrong --model fails here, not in the first cell
    prepare_output_file(args.out, "--out")
    try:
        batch_sizes = args.batch_sizes or geometric_batch_sizes(args.min_batch, args.max_batch)
    except ValueError as error:
        raise UsageError(f"--min-batch {args.min_batch} --max-batch {args.max_batch}: {error}") from error
    if len(batch_sizes) < MIN_DISTINCT_BATCH_SIZES:   # it trained every cell, then said "no fit"
        given = (f"--batch-sizes {','.join(map(str, batch_sizes))}" if args.batch_sizes
                 else f"--min-batch {args.min_batch} --max-batch {args.max_batch}")
        raise UsageError(f"{given}: {len(batch_sizes)} batch size(s); the fit S = S_min (1 + B_crit / B) needs at "
                         f"least {MIN_DISTINCT_BATCH_SIZES}: give at least {MIN_DISTINCT_BATCH_SIZES}")
    try:
        grid = learning_rate_grid(batch_sizes, args.lr, args.lr_reference_batch, factors=args.lr_factors,
                                  scaling=args.lr_scaling, max_learning_rate=args.max_lr)
    except ValueError as error:
        raise UsageError(f"--lr {args.lr} --lr-reference-batch {args.lr_reference_batch} --max-lr {args.max_lr} "
                         f"--batch-sizes {','.join(map(str, batch_sizes))}: {error}") from error
    try:
        settings = SweepSettings(
            target_metric=args.target_metric, target=args.target, model=args.model, data_source=args.data,
            train_examples=args.train_examples, eval_examples=args.eval_examples, eval_every=args.eval_every,
            smoothing_window=args.smoothing_window, max_steps=args.max_steps, max_examples=args.max_examples,
            momentum=args.momentum, seed=args.seed, device=str(device),
        )
    except ValueError as error:  # "<field> must ...": the field is the option's name with underscores
        field = str(error).split()[0]
        raise UsageError(f"--{field.replace('_', '-')}: {error}") from error
    frame = run_sweep(args.out, batch_sizes, grid, settings, jobs=args.jobs, progress=not args.no_progress)
    best = best_learning_rate_cells(frame)
    columns = ["batch_size", "learning_rate", "steps", "examples", "lr_at_grid_edge", "b_simple", "b_noise"]
    print(f"{len(frame)} cells in {args.out}; best learning rate per batch size:")
    print(best[columns].to_string(index=False))
    try:
        fit = fit_sweep(frame)
    except ValueError as error:  # too few batch sizes reached the target; the cells stay in the file
        print(f"no fit: {error}")
        return 1
    print(fit.summary())
    return 0


def _add_train_command(subparsers) -> None:
    parser = _command_parser(
        subparsers, "train",
        help="train with noisescale choosing the batch size (Smith et al. schedules or the noise scale)",
        description="Train a model (default: LeNet-5 on Fashion-MNIST) with SGD and momentum 0.9 while the batch "
        "size follows a schedule (fixed, lr-decay, batch-increase, hybrid: Smith, Kindermans & Le 2017, factor-5 "
        "stages at 30/55/80% of the epochs) or the measured noise scale (noise-adaptive: B = kappa * B_simple). "
        "Prints the final test accuracy (or test loss), optimizer steps, examples seen, wall-clock, the noise scale "
        "at the end and the batch sizes chosen; writes CSV, PNG and JSON.",
    )
    parser.add_argument("--schedule", required=True, default=argparse.SUPPRESS,   # no "(default: None)"
                        choices=["fixed", "lr-decay", "batch-increase", "hybrid", "noise-adaptive"],
                        help="where the batch size comes from (required)")
    _add_model_and_data_arguments(parser, user_data=True, data_default="auto")
    parser.add_argument("--train-examples", type=int, default=None, metavar="N",
                        help="use only the first N training examples (quick trials); None: all")
    parser.add_argument("--epochs", type=float, default=10.0, help="epochs of training (fractions allowed)")
    parser.add_argument("--batch-size", type=int, default=32, help="initial (base) batch size B_0")
    parser.add_argument("--max-batch-size", type=int, default=1024, help="B_max")
    parser.add_argument("--lr", type=_POSITIVE, default=0.05, help="base learning rate eps_0")
    parser.add_argument("--milestones", type=float, nargs="+", default=None, metavar="EPOCH",
                        help="epochs where the noise is divided by 5 (default: 30/55/80%% of --epochs)")
    parser.add_argument("--kappa", type=float, default=1.0, help="noise-adaptive: B = kappa * B_simple")
    parser.add_argument("--lr-coupling", default="none", choices=["none", "linear", "sqrt", "adascale"],
                        help="noise-adaptive: how the learning rate follows B (adascale: AdaScale's gain of B / B_0 "
                             "at every step)")
    parser.add_argument("--noise-scale", default="b_simple", choices=["b_simple", "b_noise"],
                        help="noise-adaptive: the estimate B follows (b_noise needs --hessian-every)")
    parser.add_argument("--hessian-every", type=int, default=0,
                        help="steps between B_noise measurements (0: never)")
    parser.add_argument("--max-micro-batch", type=_at_least(int, 1), default=None,
                        help="largest forward/backward; bigger batches accumulate micro-batches (None: no limit)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                        help="mixed precision: bf16 autocast (CUDA or CPU), or fp16 with a loss scaler (CUDA only)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="save a checkpoint after every epoch (None: no checkpoint)")
    parser.add_argument("--resume", default=None, metavar="PATH", help="continue from a checkpoint (None: start anew)")
    _add_run_arguments(parser, out="runs/train", out_help="output folder", json_name="train_<schedule>_summary.json")
    parser.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from noisescale.app.jobs import is_main_process, summary_json
    from noisescale.app.options import set_threads
    from noisescale.app.train import run_train

    set_threads(args.threads)
    with _output_held(args.out, args.checkpoint):
        outcome = run_train(
            mode=args.schedule,
            model_spec=args.model,
            dataset=args.dataset,
            data=args.data,
            loss=args.loss,
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_batch_size=args.max_batch_size,
            learning_rate=args.lr,
            milestones=args.milestones,
            kappa=args.kappa,
            lr_coupling=args.lr_coupling,
            noise_scale=args.noise_scale,
            hessian_every=args.hessian_every,
            max_micro_batch=args.max_micro_batch,
            train_examples=args.train_examples,
            device=args.device,
            amp=args.amp,
            checkpoint=args.checkpoint,
            resume=args.resume,
            out_dir=args.out,
            seed=args.seed,
            progress=not args.no_progress,
            parallel=args.parallel,
        )
    if is_main_process():
        if args.json:
            print(summary_json(outcome.to_dict()))
        else:
            print(outcome)
            print(f"history: {outcome.history_csv}\nevaluations: {outcome.evaluations_csv}\n"
                  f"figure: {outcome.figure_png}\nsummary: {outcome.summary_json}")
    return 0


def _at_least(kind, minimum, *, strictly: bool = False):
    """An argparse type: a finite ``kind`` >= ``minimum`` (> with ``strictly``), checked before any work starts."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from error
        if not (math.isfinite(value) and (value > minimum if strictly else value >= minimum)):
            raise argparse.ArgumentTypeError(f"expected a finite {kind.__name__} {'>' if strictly else '>='} "
                                             f"{minimum}, got {text!r}")
        return value

    return parse


_POSITIVE = _at_least(float, 0.0, strictly=True)   # learning rates: a nan one was taken and reported as divergence


def _fractions_of_one(text: str) -> list[float]:
    """An argparse type: "a,b" -> [a, b], each strictly between 0 and 1."""
    values = _comma_separated(float, positive=True)(text)
    if not all(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in (0, 1), got {text!r}")
    return values


def _add_branch_command(subparsers) -> None:
    parser = _command_parser(
        subparsers, "branch",
        help="critical batch size of a language model measured directly by branching (Merrill et al. 2025)",
        description="Train a reference run (AdamW, warmup + cosine) of a byte-level language model, branch short "
        "runs at batch sizes B_0 2^k from its checkpoints (learning rate scaled by --rule, equal tokens), and print "
        "the largest batch size whose validation loss stays within --tolerance of the smallest batch's. A rerun "
        "with the same --out resumes (the reference run's checkpoints and every finished branch are kept).",
    )
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="a text file, read as bytes (default: the shipped SymPy-core source corpus)")
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="trailing share that validates")
    parser.add_argument("--model", default="noisescale.models:byte_gpt", metavar="PACKAGE.MODULE:FACTORY",
                        help="a callable returning a model mapping byte tokens (B, T) to logits (B, T, 256)")
    parser.add_argument("--block-size", type=_at_least(int, 1), default=64, help="tokens (bytes) per sequence")
    parser.add_argument("--batch-size", type=_at_least(int, 1), default=32,
                        help="the reference run's batch size (sequences)")
    parser.add_argument("--lr", type=_POSITIVE, default=3e-3, help="the reference run's peak AdamW learning rate")
    parser.add_argument("--steps", type=_at_least(int, 1), default=600, help="the reference run's optimizer steps")
    parser.add_argument("--checkpoints", type=_fractions_of_one, default=[0.05, 0.125, 0.25, 0.5, 0.75],
                        help="where to branch, as fractions of the reference run (comma-separated)")
    parser.add_argument("--branch-batch-sizes", type=_comma_separated(int, positive=True),
                        default=[8, 16, 32, 64, 128, 256],
                        help="at least 2 strictly increasing batch sizes, e.g. B_0, 2 B_0, ... (comma-separated), "
                        "each dividing --branch-examples; the smallest is the reference of the tolerance")
    parser.add_argument("--branch-examples", type=_at_least(int, 1), default=2048,
                        help="sequences each branch trains on: a multiple of every --branch-batch-sizes (whole "
                        "steps; refused otherwise, before any training)")
    parser.add_argument("--seeds", type=_at_least(int, 1), default=2,
                        help="seeds per branch (the uncertainty of B_crit)")
    parser.add_argument("--rule", choices=["sqrt", "linear", "none"], default="sqrt",
                        help="learning rate of a branch at B: eta_c times sqrt/linear/none of B / --batch-size")
    parser.add_argument("--tolerance", type=_at_least(float, 0.0), default=0.01,
                        help="relative loss tolerance (0.01: 1 %%)")
    _add_run_arguments(parser, out="runs/branch", out_help="output folder (checkpoints, CSVs; a rerun resumes)",
                       json_name=None)
    parser.set_defaults(run=_run_branch)


def _run_branch(args) -> int:
    from noisescale.app.branch import checked_branch_batch_sizes, run_branch_command

    checked_branch_batch_sizes(args)   # before the lock makes --out
    with _output_held(args.out):
        return run_branch_command(args)


_COMMANDS: list = [_add_measure_command, _add_nqm_command, _add_sweep_command, _add_train_command,
                   _add_branch_command]


def run() -> None:
    """The console command (``noisescale``, ``python -m noisescale``): :func:`main`, then exit with its status.

    A rank under torchrun (``WORLD_SIZE`` > 1) exits without finalizing the interpreter, once its output is flushed
    (every file it wrote is closed by then). torch leaves gloo's worker threads running past
    ``destroy_process_group`` (and, after FSDP2, the process group alive), and a worker that releases a finished
    collective's tensors once finalization has begun is killed taking the GIL, aborting the process at exit with
    "terminate called without an active exception" (pytorch/pytorch#190489). A stress test (session 26:
    gloo's worker threads reniced beside busy loops) aborted rank 1 of the FSDP ``train`` job 6 times in 20, and 0
    in 20 with this exit; unstressed, it failed one of five clean-clone CI runs in session 25, and none of
    113 runs of that job in session 26."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        sys.exit(main())
    try:
        code = main()
    except Exception:   # --debug's traceback; SystemExit (--help, a usage error) comes before any process group
        traceback.print_exc()
        code = 1
    with contextlib.suppress(OSError):   # a closed pipe
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error prints one line, ``noisescale: error: ...``, and returns 2 for a problem with the
    options or the user's model, data or files (UsageError, ValueError, TypeError, OSError), 1 otherwise;
    ``--debug`` raises it with its traceback instead."""
    # Read by OpenMP when torch loads (the imports below): threads that finish an operation sleep instead of
    # spinning, so a busy machine slows the run by its share of the cores rather than 2.5 to 4 times (measured on a
    # loaded 2-core machine, tests/conftest.py). A value the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from noisescale.app.options import UsageError, one_line

    args = build_parser().parse_args(argv)
    terminate = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():   # a kill as a Ctrl-C: temporary files removed
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt as interrupt:
        print(f"noisescale: {'terminated' if isinstance(interrupt, _Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(interrupt, _Terminated) else 130
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, UsageError):
            print(f"noisescale: error: {error}", file=sys.stderr)
            return 2
        print(f"noisescale: error: {one_line(error)} (run with --debug for the traceback)", file=sys.stderr)
        return 2 if isinstance(error, (ValueError, TypeError, OSError)) else 1
    finally:
        if threading.current_thread() is threading.main_thread():   # (None: a handler set outside Python)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if terminate is None else terminate)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's or torchrun's stop), raised where the command runs, as a Ctrl-C is: the files
    being written are abandoned cleanly (no hidden .tmp file left) and the command exits 143."""


def _terminated(signum, frame) -> None:
    raise _Terminated


if __name__ == "__main__":
    run()
