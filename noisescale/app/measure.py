"""The ``noisescale measure`` job.

Without ``--checkpoint``: train a model (default: the LeNet-5-like CNN on the shipped Fashion-MNIST subset) for
``--steps`` steps of SGD with momentum at a fixed batch size (an :class:`~noisescale.training.AdaptiveTrainer`)
while its monitor measures B_simple every step and B_noise periodically. With ``--checkpoint PATH``: load the
trained weights and measure over ``--steps`` batches of the training set without optimizer steps
(:func:`noisescale.monitor.measure`; the parameters stay as loaded). Either way the model is evaluated on the
test set, and the history (CSV), a figure (PNG) and the summary (JSON) are written atomically to ``--out``, which
is created and checked before any work. Under torchrun it runs data-parallel
(:func:`noisescale.app.jobs.distributed_job`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import noisescale
from noisescale.app.jobs import (
    Evaluation, build_training_job, distributed_job, evaluate, is_main_process, noise_scale_fields,
    write_summary_json,
)
from noisescale.app.options import UsageError, one_line, option_error, prepare_output_folder
from noisescale.app.plot import plot_noise_scale_history, save_figure
from noisescale.batches import fetch_examples
from noisescale.checkpoints import CheckpointError, atomic_path, load_checkpoint
from noisescale.monitor import NoiseScaleSummary, measure
from noisescale.training import AdaptiveTrainer


@dataclass(frozen=True)
class MeasureOutcome:
    summary: NoiseScaleSummary
    evaluation: Evaluation
    data_source: str
    checkpoint: Path | None  # the measured checkpoint; None when the job trained the model itself
    optimizer_steps: int
    history_csv: Path | None  # None on the ranks > 0 of a torchrun launch, which write nothing
    figure_png: Path | None
    summary_json: Path | None
    seconds: float
    hessian_off: str = "--hessian-every 0"   # what left B_noise unmeasured, in the command's terms

    @property
    def test_accuracy(self) -> float | None:
        return self.evaluation.accuracy

    def report(self) -> str:
        """What ``noisescale measure`` prints."""
        when = "after training" if self.checkpoint is None else "of the checkpoint"
        lines = [f"data: {self.data_source}"]
        if self.checkpoint is not None:
            lines.append(f"checkpoint: {self.checkpoint} (measured without optimizer steps)")
        lines += [self.summary.describe(hessian_off=self.hessian_off), self.evaluation.describe(when),
                  f"history: {self.history_csv}\nfigure: {self.figure_png}\nsummary: {self.summary_json}",
                  f"took {self.seconds:.1f} s"]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The summary of ``--json`` and ``measure_summary.json`` (non-finite values: see jobs.json_ready)."""
        return {
            "command": "measure", "noisescale_version": noisescale.__version__, "data": self.data_source,
            "checkpoint": self.checkpoint, "steps": self.summary.steps, "examples": self.summary.examples_seen,
            "optimizer_steps": self.optimizer_steps, **noise_scale_fields(self.summary), **self.evaluation.fields(),
            "history_csv": self.history_csv, "figure_png": self.figure_png, "summary_json": self.summary_json,
            "seconds": self.seconds,
        }


def run_measure(
    *,
    model_spec: str | None = None,
    dataset: str | None = None,
    data: str | None = None,
    loss: str | None = None,
    checkpoint: str | Path | None = None,
    batch_size: int = 128,
    steps: int = 300,
    learning_rate: float = 0.02,
    momentum: float = 0.9,
    device: str = "auto",
    backend: str = "auto",
    hessian_every: int | None = None,
    out_dir: str | Path = "runs/measure",
    seed: int = 0,
    progress: bool = True,
    parallel: str = "ddp",
) -> MeasureOutcome:
    """Train while measuring, or measure a checkpoint (module docstring). Deterministic for a given seed on CPU.
    ``hessian_every``: None is 50, or 0 with ``parallel="fsdp"`` (where the Hessian proxies cannot run)."""
    if hessian_every is None:
        hessian_every = 0 if parallel == "fsdp" else 50
    if batch_size < 2:
        raise option_error("--batch-size", batch_size, "must be >= 2 to estimate a gradient variance")
    if steps < 1:
        raise option_error("--steps", steps, "must be >= 1")
    if hessian_every < 0:
        raise option_error("--hessian-every", hessian_every, "must be >= 0 (0: never)")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise option_error("--checkpoint", checkpoint, "no such file")
    if parallel == "fsdp" and hessian_every:
        raise option_error("--hessian-every", hessian_every, "must be 0 with --parallel fsdp (the Hessian proxies "
                           "need torch.func on whole parameters)")
    if parallel == "fsdp" and checkpoint is not None:
        raise option_error("--checkpoint", checkpoint, "cannot be measured with --parallel fsdp; use --parallel ddp")
    start = time.perf_counter()
    main = is_main_process()
    out_dir = prepare_output_folder(out_dir) if main else Path(out_dir)
    monitor_options = {"backend": backend, "hessian_every": hessian_every, "seed": seed}
    with distributed_job(device) as target_device:
        job = build_training_job(target_device, model=model_spec, dataset=dataset, data=data, loss=loss, seed=seed,
                                 learning_rate=learning_rate, momentum=momentum, parallel=parallel)
        if batch_size > len(job.data.train):
            raise option_error("--batch-size", batch_size, f"exceeds the {len(job.data.train)} training examples")
        if checkpoint is None:
            monitor = _train_and_measure(job, batch_size, steps, monitor_options, target_device, seed,
                                         progress and main)
            optimizer_steps = steps
        else:
            load_checkpoint_weights(job.network, checkpoint)
            batches = _measurement_batches(job.data.train, batch_size, steps, seed)
            monitor = measure(job.network, job.loss_fn, batches, max_batches=steps, device=target_device,
                              progress=progress and main,   # the batches come without replacement from N
                              **{"population_size": len(job.data.train), **monitor_options})
            optimizer_steps = 0
        evaluation = evaluate(job.network, job.loss_fn, job.data.test, target_device)
    paths = [out_dir / "measure_history.csv", out_dir / "measure.png", out_dir / "measure_summary.json"]
    if main:
        with atomic_path(paths[0]) as temporary:
            monitor.history.to_csv(temporary, index=False)
        with atomic_path(paths[1]) as temporary:
            save_figure(plot_noise_scale_history(monitor.history), temporary)
    outcome = MeasureOutcome(
        summary=monitor.summary(), evaluation=evaluation, data_source=job.data.description,
        checkpoint=None if checkpoint is None else Path(checkpoint), optimizer_steps=optimizer_steps,
        history_csv=paths[0] if main else None, figure_png=paths[1] if main else None,
        summary_json=paths[2] if main else None, seconds=time.perf_counter() - start,
        hessian_off="--hessian-every 0" + (", the default with --parallel fsdp" if parallel == "fsdp" else ""),
    )
    if main:
        write_summary_json(outcome.to_dict(), paths[2])
    return outcome


def _train_and_measure(job, batch_size: int, steps: int, monitor_options: dict, device: torch.device, seed: int,
                       progress: bool):
    trainer = AdaptiveTrainer(job.model, job.loss_fn, job.optimizer, job.data.train, batch_size=batch_size,
                              monitor_options=monitor_options, device=device, seed=seed, progress=False)
    with trainer, tqdm(total=steps, desc="measure", disable=not progress) as bar:
        for _ in range(steps):
            row = trainer.step()
            bar.update()
            bar.set_postfix(loss=f"{row['loss']:.3f}", b_simple=f"{trainer.monitor.average.b_simple:.3g}")
    return trainer.monitor


def _measurement_batches(dataset, batch_size: int, count: int, seed: int) -> Iterator[tuple[Any, Any]]:
    """``count`` batches of ``batch_size`` examples drawn without replacement within each seeded shuffle of the
    dataset (a new shuffle when one runs out)."""
    generator = torch.Generator().manual_seed(seed)
    produced = 0
    while produced < count:
        order = torch.randperm(len(dataset), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            if produced == count:
                return
            yield fetch_examples(dataset, order[start: start + batch_size])
            produced += 1


def load_checkpoint_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load ``--checkpoint`` into ``model``: a state_dict file (``torch.save(model.state_dict(), path)``) or a
    ``noisescale train`` checkpoint (``{"trainer": {"model": state_dict, ...}, ...}``), read with
    ``torch.load(weights_only=True)`` (no code in the file runs); a DDP ``module.`` prefix is dropped."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    device = next(model.parameters()).device
    try:
        content = load_checkpoint(path, map_location=device, source="--checkpoint")
    except CheckpointError as error:
        raise UsageError(f"{error} Expected torch.save(model.state_dict()) or a `noisescale train --checkpoint` "
                         "file.") from error
    if isinstance(content, dict) and isinstance(content.get("trainer"), dict) and "model" in content["trainer"]:
        content = content["trainer"]["model"]
    if not (isinstance(content, dict) and content and all(isinstance(value, torch.Tensor)
                                                           for value in content.values())):
        raise option_error("--checkpoint", path, f"holds a {type(content).__name__} that is not a model state_dict; "
                           "expected torch.save(model.state_dict()) or a `noisescale train --checkpoint` file")
    state = dict(content)
    consume_prefix_in_state_dict_if_present(state, "module.")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(f"--checkpoint {str(path)!r}: does not fit the --model: {one_line(error)}") from error
