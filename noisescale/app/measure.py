"""The ``noisescale measure`` job: train a model (the default LeNet-5-like CNN on the shipped Fashion-MNIST subset)
for a few hundred steps of SGD with momentum at a fixed batch size (an :class:`~noisescale.training.AdaptiveTrainer`)
while its monitor measures B_simple every step and B_noise periodically; write the history as CSV and a figure as
PNG, and return the summary. Under torchrun it runs data-parallel (:func:`noisescale.app.jobs.distributed_job`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from noisescale.app.jobs import build_training_job, distributed_job, evaluate_accuracy, is_main_process
from noisescale.app.plot import plot_noise_scale_history, save_figure
from noisescale.losses import per_example_cross_entropy
from noisescale.monitor import NoiseScaleSummary
from noisescale.training import AdaptiveTrainer


@dataclass(frozen=True)
class MeasureOutcome:
    summary: NoiseScaleSummary
    test_accuracy: float
    data_source: str
    history_csv: Path | None  # None on the ranks > 0 of a torchrun launch, which write nothing
    figure_png: Path | None
    seconds: float


def _describe(info) -> str:
    return f"{info.name}, {info.n_train} training / {info.n_test} test images ({info.source}: {info.path})"


def run_measure(
    *,
    model_spec: str | None = None,
    data: str | None = None,
    batch_size: int = 128,
    steps: int = 300,
    learning_rate: float = 0.02,
    momentum: float = 0.9,
    device: str = "auto",
    backend: str = "auto",
    hessian_every: int = 50,
    out_dir: str | Path = "runs/measure",
    seed: int = 0,
    progress: bool = True,
) -> MeasureOutcome:
    """Train while measuring (module docstring). Deterministic for a given seed on CPU."""
    if batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2 to estimate a gradient variance, got {batch_size}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    start = time.perf_counter()
    main = is_main_process()
    with distributed_job(device) as target_device:
        job = build_training_job(model_spec, data, target_device, seed=seed, learning_rate=learning_rate,
                                 momentum=momentum)
        trainer = AdaptiveTrainer(job.model, per_example_cross_entropy, job.optimizer, job.train_set,
                                  batch_size=batch_size,
                                  monitor_options={"backend": backend, "hessian_every": hessian_every, "seed": seed},
                                  device=target_device, seed=seed, progress=False)
        with trainer, tqdm(total=steps, desc="measure", disable=not (progress and main)) as bar:
            for _ in range(steps):
                row = trainer.step()
                bar.update()
                bar.set_postfix(loss=f"{row['loss']:.3f}", b_simple=f"{trainer.monitor.average.b_simple:.4g}")
        monitor = trainer.monitor
        test_accuracy = evaluate_accuracy(job.network, job.test_set, target_device)
    history_csv = figure_png = None
    if main:
        out_dir = Path(out_dir)
        history_csv = monitor.to_csv(out_dir / "measure_history.csv")
        figure_png = save_figure(plot_noise_scale_history(monitor.history), out_dir / "measure.png")
    return MeasureOutcome(
        summary=monitor.summary(),
        test_accuracy=test_accuracy,
        data_source=_describe(job.train_set.info),
        history_csv=history_csv,
        figure_png=figure_png,
        seconds=time.perf_counter() - start,
    )
