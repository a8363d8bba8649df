"""The ready-made jobs behind the command line.

``measure``: train a model (the default LeNet-5-like CNN on the shipped Fashion-MNIST subset) for a few hundred
steps of SGD with momentum at a fixed batch size (an :class:`~noisescale.training.AdaptiveTrainer`) while its
monitor measures B_simple every step and B_noise periodically; write the history as CSV and a figure as PNG, and
return the summary.

Under torchrun (``WORLD_SIZE`` > 1 in the environment) ``measure`` and ``train`` run data-parallel
(:func:`distributed_job`): NCCL with one GPU per process on CUDA, gloo on CPU, the model wrapped in
DistributedDataParallel, the batch size global. Every rank computes the same history; rank 0 alone prints,
shows progress and writes files.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from noisescale.data import load_fashion_mnist
from noisescale.models import lenet5
from noisescale.monitor import NoiseScaleSummary


def per_example_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example classification loss, shape (B,): the mean of it is the usual cross-entropy."""
    return F.cross_entropy(outputs, targets, reduction="none")


def load_model_factory(spec: str | None) -> Callable[[], torch.nn.Module]:
    """``"package.module:factory"`` -> the factory (a callable returning an nn.Module); None -> the default CNN."""
    if spec is None:
        return lenet5
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise ValueError(f"--model must look like 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--model {spec!r}: cannot load {attribute!r} from module {module_name!r}: {error}") from error
    if not callable(factory):
        raise TypeError(f"--model {spec!r}: {attribute!r} is a {type(factory).__name__}, not a callable")
    return factory


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def is_main_process() -> bool:
    """True except on the ranks > 0 of a torchrun launch (``RANK`` in the environment)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def distributed_job(device_name: str) -> Iterator[torch.device]:
    """This process's device; under torchrun (``WORLD_SIZE`` > 1) also the process group for the job's duration.

    On CUDA each process takes GPU ``LOCAL_RANK`` and NCCL; on CPU, gloo. Outside torchrun: just the device.
    """
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel when a process group is up (:func:`distributed_job`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class TrainingJob(NamedTuple):
    train_set: Any
    test_set: Any
    network: torch.nn.Module  # the bare model: evaluate on it (no collectives)
    model: torch.nn.Module  # the one to train: ``network`` in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer


def build_training_job(model_spec: str | None, data: str | None, device: torch.device, *, seed: int,
                       learning_rate: float, momentum: float) -> TrainingJob:
    """Seeded set-up shared by ``measure`` and ``train``: Fashion-MNIST, the model on ``device`` (wrapped for DDP
    inside :func:`distributed_job`) and SGD with momentum over it."""
    torch.manual_seed(seed)
    train_set, test_set = load_fashion_mnist(data)
    network = load_model_factory(model_spec)().to(device)
    model = data_parallel(network, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    return TrainingJob(train_set, test_set, network, model, optimizer)


@dataclass(frozen=True)
class MeasureOutcome:
    summary: NoiseScaleSummary
    test_accuracy: float
    data_source: str
    history_csv: Path | None  # None on the ranks > 0 of a torchrun launch, which write nothing
    figure_png: Path | None
    seconds: float


def evaluate_accuracy(model: torch.nn.Module, dataset, device: torch.device, batch_size: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for inputs, targets in DataLoader(dataset, batch_size=batch_size):
            correct += (model(inputs.to(device)).argmax(1) == targets.to(device)).sum().item()
    model.train(was_training)
    return correct / len(dataset)


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
    from noisescale.training import AdaptiveTrainer

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
        from noisescale.plot import plot_noise_scale_history, save_figure

        figure_png = save_figure(plot_noise_scale_history(monitor.history), out_dir / "measure.png")
    return MeasureOutcome(
        summary=monitor.summary(),
        test_accuracy=test_accuracy,
        data_source=_describe(job.train_set.info),
        history_csv=history_csv,
        figure_png=figure_png,
        seconds=time.perf_counter() - start,
    )
