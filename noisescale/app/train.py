"""The ``noisescale train`` job: train a model (default LeNet-5 on Fashion-MNIST) with SGD + momentum while the
batch size follows one of :data:`~noisescale.training.TRAIN_MODES`; evaluate after every epoch, checkpoint, resume,
and write the history, the evaluations and a figure. Under torchrun it runs data-parallel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch.distributed as dist
from torch.utils.data import TensorDataset

from noisescale._checks import check_int
from noisescale.app.jobs import build_training_job, distributed_job, evaluate_accuracy, is_main_process
from noisescale.app.plot import plot_training_curves, save_figure
from noisescale.checkpoints import load_checkpoint, save_checkpoint
from noisescale.losses import per_example_cross_entropy
from noisescale.training import AdaptiveTrainer, make_batch_size_source


@dataclass(frozen=True)
class TrainOutcome:
    """What ``noisescale train`` reports: final test accuracy, optimizer steps, examples seen, wall-clock."""

    mode: str
    test_accuracy: float
    steps: int
    examples_seen: int
    seconds: float
    final_batch_size: int
    history_csv: Path
    evaluations_csv: Path
    figure_png: Path

    def __str__(self) -> str:
        return (f"{self.mode}: test accuracy {self.test_accuracy:.4f} after {self.steps} optimizer steps, "
                f"{self.examples_seen} examples, final batch size {self.final_batch_size}, "
                f"{self.seconds:.1f} s of training")


def run_train(
    *,
    mode: str,
    model_spec: str | None = None,
    data: str | None = None,
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
) -> TrainOutcome:
    """Train a model (default LeNet-5 on Fashion-MNIST) with SGD + momentum in one of TRAIN_MODES; evaluate on
    the test set after every epoch; save a checkpoint after every epoch when ``checkpoint`` is given. Under
    torchrun it runs data-parallel (:func:`noisescale.app.jobs.distributed_job`); rank 0 alone writes files."""
    main = is_main_process()
    with distributed_job(device) as target_device:
        job = build_training_job(model_spec, data, target_device, seed=seed, learning_rate=learning_rate,
                                 momentum=momentum)
        train_set = job.train_set
        if train_examples is not None:
            check_int(train_examples, "train_examples", 2)
            train_set = TensorDataset(*(tensor[:train_examples] for tensor in train_set.tensors))
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        source = make_batch_size_source(mode, epochs=epochs, batch_size=batch_size, max_batch_size=max_batch_size,
                                        learning_rate=learning_rate, milestones=milestones, decay_factor=decay_factor,
                                        kappa=kappa, granularity=world_size)
        trainer = AdaptiveTrainer(job.model, per_example_cross_entropy, job.optimizer, train_set, **source,
                                  max_micro_batch=max_micro_batch, lr_coupling=lr_coupling,
                                  policy_noise_scale=noise_scale, monitor_options={"hessian_every": hessian_every},
                                  device=target_device, amp=amp, seed=seed, progress=progress and main)
        evaluations: list[dict[str, Any]] = []
        if resume is not None:
            state = load_checkpoint(resume, map_location=target_device, required_keys=("trainer", "evaluations"),
                                    source="--resume")
            trainer.load_state_dict(state["trainer"])
            evaluations = list(state["evaluations"])

        def after_epoch(trainer: AdaptiveTrainer) -> None:
            row = trainer.history.iloc[-1]
            evaluations.append({"epoch": trainer.epoch, "step": trainer.steps,
                                "examples_seen": int(row["examples_seen"]), "seconds": trainer.seconds,
                                "batch_size": int(row["batch_size"]), "learning_rate": float(row["learning_rate"]),
                                "test_accuracy": evaluate_accuracy(job.network, job.test_set, target_device)})
            if checkpoint is not None and main:
                save_checkpoint({"trainer": trainer.state_dict(), "evaluations": evaluations}, checkpoint)

        with trainer:
            history = trainer.train(epochs, callback=after_epoch)
        if not evaluations or evaluations[-1]["step"] != trainer.steps:
            after_epoch(trainer)
    out_dir = Path(out_dir)
    history.insert(0, "mode", mode)
    evaluations_frame = pd.DataFrame(evaluations).assign(mode=mode)
    paths = [out_dir / f"train_{mode}_history.csv", out_dir / f"train_{mode}_evaluations.csv",
             out_dir / f"train_{mode}.png"]
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        history.to_csv(paths[0], index=False)
        evaluations_frame.to_csv(paths[1], index=False)
        save_figure(plot_training_curves(history, evaluations_frame), paths[2])
    return TrainOutcome(mode=mode, test_accuracy=evaluations[-1]["test_accuracy"], steps=trainer.steps,
                        examples_seen=trainer.sampler.examples_seen, seconds=trainer.seconds,
                        final_batch_size=int(history["batch_size"].iloc[-1]), history_csv=paths[0],
                        evaluations_csv=paths[1], figure_png=paths[2])
