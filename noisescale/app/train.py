"""The ``noisescale train`` job: train a model (default LeNet-5 on Fashion-MNIST; any ``--model``, ``--dataset`` and
``--loss``) with SGD + momentum while the batch size follows one of :data:`~noisescale.training.TRAIN_MODES`;
evaluate after every epoch, checkpoint, resume, and write the history, the evaluations, a figure and the summary
(JSON) to ``--out``, which is created and checked before training. Under torchrun it runs data-parallel."""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch.distributed as dist
from torch.utils.data import Subset, TensorDataset

import noisescale
from noisescale._checks import check_int
from noisescale._digits import printed, printed_b_simple
from noisescale.app.jobs import (
    Evaluation, build_training_job, distributed_job, evaluate, is_main_process, noise_scale_fields,
    write_summary_json,
)
from noisescale.app.options import one_line, option_error, prepare_output_file, prepare_output_folder
from noisescale.app.plot import plot_training_curves, save_figure
from noisescale.checkpoints import atomic_path, load_checkpoint, save_checkpoint
from noisescale.controller import round_to_multiple
from noisescale.monitor import NoiseScaleSummary
from noisescale.training import AdaptiveTrainer, make_batch_size_source

_SHOWN_BATCH_SIZE_CHANGES = 12  # more changes are printed as the first and last few


@dataclass(frozen=True)
class TrainOutcome:
    """What ``noisescale train`` reports: the final test metric, optimizer steps, examples seen, wall-clock, the
    noise scale measured at the end and the batch sizes used (with the step each began at)."""

    mode: str
    evaluation: Evaluation
    steps: int
    examples_seen: int
    seconds: float
    final_batch_size: int
    noise_scale: NoiseScaleSummary
    batch_sizes: list[tuple[int, int]]  # (first step, batch size) of every stretch of constant B
    history_csv: Path
    evaluations_csv: Path
    figure_png: Path
    summary_json: Path

    @property
    def test_accuracy(self) -> float | None:
        return self.evaluation.accuracy

    def __str__(self) -> str:
        metric = (f"test accuracy {self.test_accuracy:.4f}" if self.test_accuracy is not None
                  else f"test loss {self.evaluation.loss:.4g}")
        lines = [f"{self.mode}: {metric} after {self.steps} optimizer steps, {self.examples_seen} examples, "
                 f"final batch size {self.final_batch_size}, {self.seconds:.1f} s of training"]
        summary = self.noise_scale
        if not summary.reports_noise_scale:   # the summary says why (diverged, broken by bad data, never finite)
            lines += summary.describe(hessian_off="--hessian-every 0").splitlines()[1:]
        else:
            lines.append(self._noise_scale_line())
        if self.mode == "noise-adaptive":
            lines.append(f"  batch sizes chosen (from step): {_describe_changes(self.batch_sizes)}")
        return "\n".join(lines)

    def _noise_scale_line(self) -> str:
        summary = self.noise_scale
        shown = printed_b_simple(summary.b_simple, *summary.b_simple_interval)   # the digits the interval supports
        b_noise = (("not measured (--hessian-every 0)" if not summary.hessian_every else "not measured yet")
                   if math.isnan(summary.b_noise) else printed(summary.b_noise, *summary.b_noise_interval).value
                   if summary.b_noise_resolved else "not resolved")
        return (f"  noise scale at the end: B_simple = {shown.value} "
                f"({summary.confidence:.0%} interval {shown.low} .. {shown.high}), B_noise = {b_noise}")

    def to_dict(self) -> dict[str, Any]:
        """The summary of ``--json`` and ``train_<mode>_summary.json`` (non-finite values: see jobs.json_ready)."""
        return {
            "command": "train", "noisescale_version": noisescale.__version__, "mode": self.mode,
            "steps": self.steps, "examples": self.examples_seen, "final_batch_size": self.final_batch_size,
            "batch_sizes": [{"step": step, "batch_size": size} for step, size in self.batch_sizes],
            **noise_scale_fields(self.noise_scale), **self.evaluation.fields(),
            "history_csv": self.history_csv, "evaluations_csv": self.evaluations_csv, "figure_png": self.figure_png,
            "summary_json": self.summary_json, "seconds": self.seconds,
        }


def _describe_changes(changes: list[tuple[int, int]]) -> str:
    parts = [f"{size} ({step})" for step, size in changes]
    if len(parts) > _SHOWN_BATCH_SIZE_CHANGES:
        parts = [*parts[:4], f"... {len(parts) - 7} more ...", *parts[-3:]]
    return " -> ".join(parts)


def batch_size_changes(history: pd.DataFrame) -> list[tuple[int, int]]:
    """(first step, B) of every stretch of steps with the same batch size, in order."""
    sizes = history["batch_size"].to_numpy()
    steps = history["step"].to_numpy()
    return [(int(steps[index]), int(sizes[index])) for index in range(len(sizes))
            if index == 0 or sizes[index] != sizes[index - 1]]


def _first_examples(dataset, count: int):
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(tensor[:count] for tensor in dataset.tensors))
    return Subset(dataset, range(min(count, len(dataset))))


def run_train(
    *,
    mode: str,
    model_spec: str | None = None,
    dataset: str | None = None,
    data: str | None = None,
    loss: str | None = None,
    epochs: float = 10.0,
    batch_size: int = 32,
    max_batch_size: int = 1024,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    milestones: list[float] | None = None,
    decay_factor: float = 0.2,
    kappa: float = 1.0,
    lr_coupling: str = "none",
    noise_scale: str = "b_simple",
    hessian_every: int = 0,
    max_micro_batch: int | None = None,
    train_examples: int | None = None,
    device: str = "auto",
    amp: str = "none",
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    out_dir: str | Path = "runs/train",
    seed: int = 0,
    progress: bool = True,
    parallel: str = "ddp",
) -> TrainOutcome:
    """Train a model (default LeNet-5 on Fashion-MNIST) with SGD + momentum in one of TRAIN_MODES; evaluate on
    the test set after every epoch; save a checkpoint after every epoch when ``checkpoint`` is given. Under
    torchrun it runs data-parallel (:func:`noisescale.app.jobs.distributed_job`); rank 0 alone writes files."""
    main = is_main_process()
    out_dir = Path(out_dir)
    if parallel == "fsdp" and hessian_every:
        raise option_error("--hessian-every", hessian_every, "must be 0 with --parallel fsdp (the Hessian proxies "
                           "need torch.func on whole parameters)")
    if noise_scale == "b_noise" and not hessian_every:
        raise option_error("--noise-scale", noise_scale, "needs --hessian-every k >= 1: B_noise comes from the "
                           "Hessian proxies, measured every k steps")
    if mode != "noise-adaptive":   # the options of the noise-scale policy, which no schedule reads
        for flag, value, default in (("--kappa", kappa, 1.0), ("--lr-coupling", lr_coupling, "none"),
                                     ("--noise-scale", noise_scale, "b_simple")):
            if value != default:
                raise option_error(flag, value, f"applies to --schedule noise-adaptive only, not {mode}")
    if isinstance(batch_size, int) and isinstance(max_batch_size, int) and batch_size > max_batch_size:
        raise option_error("--batch-size", batch_size, f"must not exceed --max-batch-size ({max_batch_size}, the "
                           "largest batch of every schedule)")
    if main:
        prepare_output_folder(out_dir)
        if checkpoint is not None:
            prepare_output_file(checkpoint, "--checkpoint")
    with distributed_job(device) as target_device:
        processes = dist.get_world_size() if dist.is_initialized() else 1
        for flag, value in (("--batch-size", batch_size), ("--max-batch-size", max_batch_size)):
            if value % processes:
                resumed = (" (a noise-adaptive run resumed from a checkpoint of another number of processes "
                           "takes its sizes rounded so)" if mode == "noise-adaptive" else "")
                raise option_error(flag, value, f"must be a multiple of the {processes} processes, which take equal "
                                   f"shares of each batch: give {round_to_multiple(value, processes)}{resumed}")
        job = build_training_job(target_device, model=model_spec, dataset=dataset, data=data, loss=loss, seed=seed,
                                 learning_rate=learning_rate, momentum=momentum, parallel=parallel)
        train_set = job.data.train
        if train_examples is not None:
            check_int(train_examples, "train_examples", 2)
            train_set = _first_examples(train_set, train_examples)
        source = make_batch_size_source(mode, epochs=epochs, batch_size=batch_size, max_batch_size=max_batch_size,
                                        learning_rate=learning_rate, milestones=milestones, decay_factor=decay_factor,
                                        kappa=kappa, granularity=processes)
        trainer = AdaptiveTrainer(job.model, job.loss_fn, job.optimizer, train_set, **source,
                                  max_micro_batch=max_micro_batch, lr_coupling=lr_coupling,
                                  policy_noise_scale=noise_scale, monitor_options={"hessian_every": hessian_every},
                                  device=target_device, amp=amp, seed=seed, progress=progress and main)
        evaluations: list[dict[str, Any]] = []
        latest: list[Evaluation] = []
        if resume is not None:
            state = load_checkpoint(resume, map_location=target_device, required_keys=("trainer", "evaluations"),
                                    source="--resume")
            try:
                with warnings.catch_warnings(record=True) as caught:   # the same on every rank: said once
                    trainer.load_state_dict(state["trainer"])
            except (ValueError, RuntimeError, KeyError) as error:   # another run's: name the options to check
                raise option_error("--resume", resume, f"the checkpoint is not of this run ({one_line(error)}); "
                                   "resume with the options it was started with (--seed; --schedule with its "
                                   "--epochs, --milestones, --batch-size, --max-batch-size and --lr; --kappa, "
                                   "--lr-coupling, --noise-scale, --hessian-every; the model and data), or start "
                                   "anew without --resume") from error
            for warning in caught if main else ():
                print(f"noisescale: warning: {warning.message}", file=sys.stderr)
            evaluations = list(state["evaluations"])
            if trainer.epoch >= epochs and main:
                print(f"noisescale: note: the checkpoint has trained {trainer.epoch:.4g} epochs already, --epochs "
                      f"{epochs:g}: nothing more is trained; give a larger --epochs to continue the run",
                      file=sys.stderr)

        def after_epoch(trainer: AdaptiveTrainer) -> None:
            row = trainer.history.iloc[-1]
            evaluation = evaluate(job.network, job.loss_fn, job.data.test, target_device)
            latest.append(evaluation)
            evaluations.append({"epoch": trainer.epoch, "step": trainer.steps,
                                "examples_seen": int(row["examples_seen"]), "seconds": trainer.seconds,
                                "batch_size": int(row["batch_size"]), "learning_rate": float(row["learning_rate"]),
                                "test_accuracy": math.nan if evaluation.accuracy is None else evaluation.accuracy,
                                "test_loss": evaluation.loss})
            if checkpoint is not None:
                state = trainer.state_dict()  # on every rank: under FSDP it gathers the shards (a collective)
                if main:
                    save_checkpoint({"trainer": state, "evaluations": evaluations}, checkpoint)

        with trainer:
            history = trainer.train(epochs, callback=after_epoch)
        if not evaluations or evaluations[-1]["step"] != trainer.steps:
            after_epoch(trainer)
        final = latest[-1] if latest else evaluate(job.network, job.loss_fn, job.data.test, target_device)
    history.insert(0, "mode", mode)
    evaluations_frame = pd.DataFrame(evaluations).assign(mode=mode)
    outcome = TrainOutcome(
        mode=mode, evaluation=final, steps=trainer.steps, examples_seen=trainer.sampler.examples_seen,
        seconds=trainer.seconds, final_batch_size=int(history["batch_size"].iloc[-1]),
        noise_scale=trainer.monitor.summary(), batch_sizes=batch_size_changes(history),
        history_csv=out_dir / f"train_{mode}_history.csv", evaluations_csv=out_dir / f"train_{mode}_evaluations.csv",
        figure_png=out_dir / f"train_{mode}.png", summary_json=out_dir / f"train_{mode}_summary.json",
    )
    if main:
        with atomic_path(outcome.history_csv) as temporary:
            history.to_csv(temporary, index=False)
        with atomic_path(outcome.evaluations_csv) as temporary:
            evaluations_frame.to_csv(temporary, index=False)
        with atomic_path(outcome.figure_png) as temporary:
            save_figure(plot_training_curves(history, evaluations_frame), temporary)
        write_summary_json(outcome.to_dict(), outcome.summary_json)
    return outcome
