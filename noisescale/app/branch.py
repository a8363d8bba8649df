"""The ``noisescale branch`` command: the critical batch size of a byte-level language model measured directly by
branching (Merrill et al. 2025; :mod:`noisescale.branching`), on the shipped text or the user's own text file and
model factory. Resumable: the reference run's checkpoints and every finished branch are kept in ``--out``."""

from __future__ import annotations

import argparse
from pathlib import Path


def _integers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _fractions(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error
    if not values or not all(0 < value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"checkpoint fractions must lie in (0, 1), got {text!r}")
    return values


def add_branch_command(subparsers) -> None:
    """Register ``noisescale branch`` (called from :func:`noisescale.app.cli.build_parser`)."""
    parser = subparsers.add_parser(
        "branch",
        help="critical batch size of a language model measured directly by branching (Merrill et al. 2025)",
        description="Train a reference run (AdamW, warmup + cosine) of a byte-level language model, branch short "
        "runs at batch sizes B_0 2^k from its checkpoints (learning rate scaled by --rule, equal tokens), and print "
        "the largest batch size whose validation loss stays within --tolerance of the smallest batch's.",
    )
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="a text file, read as bytes (default: the shipped SymPy-core source corpus)")
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="trailing share that validates")
    parser.add_argument("--model", default="noisescale.models:byte_gpt", metavar="PACKAGE.MODULE:FACTORY",
                        help="a callable returning a model mapping byte tokens (B, T) to logits (B, T, 256)")
    parser.add_argument("--block-size", type=int, default=64, help="tokens (bytes) per sequence")
    parser.add_argument("--batch-size", type=int, default=32, help="the reference run's batch size (sequences)")
    parser.add_argument("--lr", type=float, default=3e-3, help="the reference run's peak AdamW learning rate")
    parser.add_argument("--steps", type=int, default=600, help="the reference run's optimizer steps")
    parser.add_argument("--checkpoints", type=_fractions, default=[0.05, 0.125, 0.25, 0.5, 0.75],
                        help="where to branch, as fractions of the reference run (comma-separated)")
    parser.add_argument("--branch-batch-sizes", type=_integers, default=[8, 16, 32, 64, 128, 256],
                        help="B_0, 2 B_0, ... (comma-separated); the smallest is the reference of the tolerance")
    parser.add_argument("--branch-examples", type=int, default=2048, help="sequences each branch trains on")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per branch (the uncertainty of B_crit)")
    parser.add_argument("--rule", choices=["sqrt", "linear", "none"], default="sqrt",
                        help="learning rate of a branch at B: eta_c times sqrt/linear/none of B / --batch-size")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative loss tolerance (0.01: 1 %%)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", default="runs/branch", help="output folder (checkpoints, CSVs); reruns resume")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference run")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(run=run_branch_command)


def run_branch_command(args: argparse.Namespace) -> int:
    import hashlib
    from dataclasses import asdict

    import torch

    from noisescale.branching import (
        LanguageModelSettings, critical_batch_sizes, load_checkpoints, run_branches, save_checkpoints,
        train_reference_run,
    )
    from noisescale.devices import resolve_device
    from noisescale.models import load_model_factory
    from noisescale.text import load_shipped_corpus, load_text_file, unigram_cross_entropy

    device = resolve_device(args.device)
    factory = load_model_factory(args.model)
    corpus = (load_shipped_corpus(args.validation_fraction) if args.text is None
              else load_text_file(args.text, args.validation_fraction))
    settings = LanguageModelSettings(block_size=args.block_size, batch_size=args.batch_size, learning_rate=args.lr)
    corpus.check_block_size(settings.block_size)
    examples = args.steps * args.batch_size
    marks = sorted({max(1, round(fraction * args.steps)) * args.batch_size for fraction in args.checkpoints})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text_sha256 = hashlib.sha256(torch.cat([corpus.train, corpus.validation]).to(torch.uint8).numpy()).hexdigest()
    key = {"model": args.model, "text_sha256": text_sha256, "validation_fraction": args.validation_fraction,
           "settings": asdict(settings), "examples": examples, "marks": marks, "seed": args.seed}
    print(f"text: {corpus.source}, {len(corpus.train)} training / {len(corpus.validation)} validation bytes; "
          f"unigram baseline {unigram_cross_entropy(corpus.train, corpus.validation):.4f} nats/byte")
    checkpoints = load_checkpoints(out / "reference.pt", key)
    if checkpoints is None:
        torch.manual_seed(args.seed)
        checkpoints = train_reference_run(factory().to(device), corpus, settings, examples=examples,
                                          checkpoint_examples=marks, seed=args.seed)
        save_checkpoints(out / "reference.pt", checkpoints, key)
    else:
        print(f"reference run reloaded from {out / 'reference.pt'}")
    print(f"reference run: validation loss {checkpoints[-1].validation_loss:.4f} nats/byte after {args.steps} steps")
    branches = run_branches(out / "branches.csv", factory, checkpoints[:-1], corpus, settings,
                            batch_sizes=args.branch_batch_sizes, branch_examples=args.branch_examples,
                            seeds=range(args.seeds), rule=args.rule, device=device, progress=not args.no_progress)
    table = critical_batch_sizes(branches[branches["checkpoint_examples"].isin(marks)], args.tolerance)
    table.to_csv(out / "critical_batch_size.csv", index=False)
    print(f"critical batch size by branching ({args.branch_examples} sequences per branch, lr rule {args.rule}, "
          f"tolerance {args.tolerance:.2%} of the B = {min(args.branch_batch_sizes)} branch's loss):")
    for row in table.itertuples():
        bound = " (lower bound: the largest B passed)" if row.at_largest else (
            " (upper bound: 2 B_0 already failed)" if row.at_smallest else "")
        print(f"  step {row.checkpoint_step:>6} ({row.tokens} tokens): B_crit = {row.b_crit}{bound}; per seed "
              f"{row.b_crit_seeds}")
    print(f"branches: {out / 'branches.csv'}\ntable: {out / 'critical_batch_size.csv'}")
    return 0
