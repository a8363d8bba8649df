"""The ``noisescale branch`` command: the critical batch size of a byte-level language model measured directly by
branching (Merrill et al. 2025; :mod:`noisescale.branching`), on the shipped text or the user's own text file and
model factory. Resumable: the reference run's checkpoints and every finished branch are kept in ``--out``."""

from __future__ import annotations

import argparse


def checked_branch_batch_sizes(args: argparse.Namespace) -> list[int]:
    """--branch-batch-sizes once checked against --branch-examples (``check_branch_plan``), before the command
    takes its --out: a branch of B > --branch-examples, or one ending on a partial step, trained another batch
    size, and B_crit was reported for batch sizes never trained."""
    from noisescale.app.options import UsageError
    from noisescale.branching import check_branch_plan

    try:
        return check_branch_plan(args.branch_batch_sizes, args.branch_examples)
    except ValueError as error:
        raise UsageError(f"--branch-batch-sizes {','.join(map(str, args.branch_batch_sizes))} --branch-examples "
                         f"{args.branch_examples}: {error}") from error


def run_branch_command(args: argparse.Namespace) -> int:
    """Run the command for parsed arguments (registered in :mod:`noisescale.app.cli`)."""
    import hashlib
    from dataclasses import asdict

    import torch

    from noisescale.branching import (
        LanguageModelSettings, critical_batch_sizes, load_checkpoints, run_branches, save_checkpoints, saved_config,
        train_reference_run,
    )
    from noisescale.app.options import UsageError, prepare_output_folder, set_threads
    from noisescale.devices import resolve_device
    from noisescale.models import load_model_factory
    from noisescale.text import load_shipped_corpus, load_text_file, unigram_cross_entropy

    set_threads(args.threads)
    batch_sizes = checked_branch_batch_sizes(args)
    out = prepare_output_folder(args.out)
    device = resolve_device(args.device)
    factory = load_model_factory(args.model)
    corpus = (load_shipped_corpus(args.validation_fraction) if args.text is None
              else load_text_file(args.text, args.validation_fraction))
    settings = LanguageModelSettings(block_size=args.block_size, batch_size=args.batch_size, learning_rate=args.lr)
    corpus.check_block_size(settings.block_size)
    examples = args.steps * args.batch_size
    marks = sorted({max(1, round(fraction * args.steps)) * args.batch_size for fraction in args.checkpoints})
    text_sha256 = hashlib.sha256(torch.cat([corpus.train, corpus.validation]).to(torch.uint8).numpy()).hexdigest()
    key = {"model": args.model, "text_sha256": text_sha256, "validation_fraction": args.validation_fraction,
           "settings": asdict(settings), "examples": examples, "marks": marks, "seed": args.seed}
    print(f"text: {corpus.source}, {len(corpus.train)} training / {len(corpus.validation)} validation bytes; "
          f"unigram baseline {unigram_cross_entropy(corpus.train, corpus.validation):.4f} nats/byte")
    reference = out / "reference.pt"
    checkpoints = load_checkpoints(reference, key)
    if checkpoints is None and saved_config(reference) is not None:   # a rerun with other settings: refused
        # before anything is trained (it wrote its reference run over the other one, then refused its branches)
        raise UsageError(f"--out {str(out)!r} holds the reference run of other settings (text, model, "
                         "--block-size, --batch-size, --lr, --steps, --checkpoints or --seed differ): use another "
                         "--out, or delete its reference.pt and branches.csv to start anew")
    if checkpoints is None and reference.exists():
        print(f"{reference} cannot be read: the reference run is trained anew")
    if checkpoints is None:
        torch.manual_seed(args.seed)
        checkpoints = train_reference_run(factory().to(device), corpus, settings, examples=examples,
                                          checkpoint_examples=marks, seed=args.seed)
        save_checkpoints(reference, checkpoints, key)
    else:
        print(f"reference run reloaded from {reference}")
    print(f"reference run: validation loss {checkpoints[-1].validation_loss:.4f} nats/byte after {args.steps} steps")
    branches = run_branches(out / "branches.csv", factory, checkpoints[:-1], corpus, settings,
                            batch_sizes=batch_sizes, branch_examples=args.branch_examples,
                            seeds=range(args.seeds), rule=args.rule, device=device, progress=not args.no_progress)
    table = critical_batch_sizes(branches[branches["checkpoint_examples"].isin(marks)
                                          & branches["batch_size"].isin(batch_sizes)], args.tolerance)
    table.to_csv(out / "critical_batch_size.csv", index=False)
    print(f"critical batch size by branching ({args.branch_examples} sequences per branch, lr rule {args.rule}, "
          f"tolerance {args.tolerance:.2%} of the B = {batch_sizes[0]} branch's loss):")
    for row in table.itertuples():
        bound = " (lower bound: the largest B passed)" if row.at_largest else (
            " (upper bound: 2 B_0 already failed)" if row.at_smallest else "")
        print(f"  step {row.checkpoint_step:>6} ({row.tokens} tokens): B_crit = {row.b_crit}{bound}; per seed "
              f"{row.b_crit_seeds}")
    print(f"branches: {out / 'branches.csv'}\ntable: {out / 'critical_batch_size.csv'}")
    return 0
