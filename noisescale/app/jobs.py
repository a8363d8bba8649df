"""What the commands share: the seeded set-up of a training job (data, model, loss, optimizer, DDP), the process
group under torchrun, evaluation on the test set, and atomic writes of the outputs.

Under torchrun (``WORLD_SIZE`` > 1 in the environment) ``measure`` and ``train`` run data-parallel
(:func:`distributed_job`): NCCL with one GPU per process on CUDA, gloo on CPU, the model wrapped in
DistributedDataParallel, the batch size global. Every rank computes the same history; rank 0 alone prints,
shows progress and writes files. ``--parallel fsdp`` shards the model with FSDP2 instead (``fully_shard`` on every
top-level child with parameters and on the model; :mod:`noisescale.sharded`); outside torchrun the model is not
wrapped, but the options still follow it (``measure``'s ``--hessian-every`` defaults to 0, and B_noise and
``--checkpoint`` are refused).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from noisescale._modes import eval_mode
from noisescale.app.options import (
    DEFAULT_LOSS, DEFAULT_MODEL, JobData, build_model, check_finite_data, check_first_batch, load_job_data, load_loss,
    resolve_device_option,
)
from noisescale.batches import call_model, fetch_examples, to_device
from noisescale.checkpoints import atomic_path


def is_main_process() -> bool:
    """True except on the ranks > 0 of a torchrun launch (``RANK`` in the environment)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def distributed_job(device_name: str) -> Iterator[torch.device]:
    """This process's device; under torchrun (``WORLD_SIZE`` > 1) also the process group for the job's duration.

    On CUDA each process takes GPU ``LOCAL_RANK`` and NCCL; on CPU, gloo. Outside torchrun: just the device.
    """
    device = resolve_device_option(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    except BaseException:
        dist.destroy_process_group()   # no barrier: the other ranks may never reach it
        raise
    # every rank has finished its collectives before any tears its group down (rank 0 may still be writing a
    # checkpoint when another rank is done)
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
    dist.destroy_process_group()


PARALLEL_MODES = ("ddp", "fsdp")


def data_parallel(model: torch.nn.Module, device: torch.device, parallel: str = "ddp") -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel (``parallel="ddp"``) or sharded in place by FSDP2
    (``"fsdp"``: ``fully_shard`` on each top-level child with parameters, then on the model, over all ranks)
    when a process group is up (:func:`distributed_job`)."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class TrainingJob(NamedTuple):
    data: JobData
    network: torch.nn.Module  # the bare model: evaluate on it (no collectives; under FSDP the sharded model)
    model: torch.nn.Module  # the one to train: ``network`` in DistributedDataParallel under torchrun
    loss_fn: Callable[[Any, Any], torch.Tensor]
    optimizer: torch.optim.Optimizer


def build_training_job(device: torch.device, *, model: str | None = None, dataset: str | None = None,
                       data: str | None = None, loss: str | None = None, seed: int, learning_rate: float,
                       momentum: float, parallel: str = "ddp") -> TrainingJob:
    """Seeded set-up shared by ``measure`` and ``train``: the data (``--dataset``, else Fashion-MNIST from
    ``--data``), the model on ``device`` (initialised from ``seed`` whatever the dataset factory drew; wrapped for
    DDP inside :func:`distributed_job`), the per-example loss and SGD with momentum over the model. The model and
    loss are run once on two training examples first, so that a mismatch fails here with the options to check, and
    a ``--dataset`` holding NaN (or Inf in its targets) is refused
    (:func:`~noisescale.app.options.check_finite_data`)."""
    model, loss = model or DEFAULT_MODEL, loss or DEFAULT_LOSS
    loss_fn = load_loss(loss)
    torch.manual_seed(seed)
    job_data = load_job_data(dataset, data, seed)
    torch.manual_seed(seed)
    network = build_model(model).to(device)
    specs = {"--model": model, "--dataset" if dataset else "--data": dataset or data or "auto", "--loss": loss}
    check_first_batch(network, loss_fn, job_data.train, device, specs)
    check_finite_data(job_data, dataset)
    wrapped = data_parallel(network, device, parallel)  # FSDP shards ``network`` itself: evaluation runs on every rank
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=learning_rate, momentum=momentum)
    return TrainingJob(job_data, network, wrapped, loss_fn, optimizer)


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class Evaluation:
    """The model on the test set: mean per-example loss, and accuracy where it applies (classification: integer
    targets with one logit vector per target, ``outputs.shape[:-1] == targets.shape``; negative targets, such as
    the ignore index -100, are left out); otherwise ``accuracy`` is None."""

    loss: float
    accuracy: float | None
    examples: int

    def describe(self, when: str) -> str:
        """The line the commands print: the accuracy where it applies, else the mean test loss."""
        if self.accuracy is not None:
            return f"test accuracy {when}: {self.accuracy:.3f}"
        return f"test loss {when}: {self.loss:.4g} (mean per-example loss over {self.examples} test examples)"

    def fields(self) -> dict[str, Any]:
        return {"test_accuracy": self.accuracy, "test_loss": self.loss, "test_examples": self.examples}


def evaluate(model: torch.nn.Module, loss_fn: Callable, dataset: Dataset, device: torch.device,
             batch_size: int = 1000) -> Evaluation:
    """:class:`Evaluation` of ``model`` (in eval mode, without gradients) on ``dataset``."""
    loss_sum, correct, counted, classification = 0.0, 0, 0, True
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            indices = torch.arange(start, min(start + batch_size, len(dataset)))
            inputs, targets = to_device(fetch_examples(dataset, indices), device)
            outputs = call_model(model, inputs)
            loss_sum += loss_fn(outputs, targets).double().sum().item()
            classification = classification and _is_classification(outputs, targets)
            if classification:
                kept = targets >= 0
                correct += (outputs.argmax(-1) == targets)[kept].sum().item()
                counted += int(kept.sum())
    accuracy = correct / counted if classification and counted else None
    return Evaluation(loss=loss_sum / len(dataset), accuracy=accuracy, examples=len(dataset))


def _is_classification(outputs: Any, targets: Any) -> bool:
    return (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)
            and not targets.dtype.is_floating_point and not targets.dtype.is_complex and targets.dtype != torch.bool
            and outputs.dim() == targets.dim() + 1 and outputs.shape[:-1] == targets.shape)


def evaluate_accuracy(model: torch.nn.Module, dataset, device: torch.device, batch_size: int = 1000) -> float:
    """Test accuracy of a classifier under cross-entropy (:func:`evaluate`)."""
    from noisescale.losses import per_example_cross_entropy

    return evaluate(model, per_example_cross_entropy, dataset, device, batch_size).accuracy


# ---------------------------------------------------------------------------------------------- outputs
def json_ready(value: Any) -> Any:
    """Strict-JSON values: NaN (not measured) -> None, +-inf (not resolved) -> "inf" / "-inf", paths -> str,
    tuples -> lists, recursively."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    return value


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(json_ready(summary), indent=2, allow_nan=False)


def write_summary_json(summary: dict[str, Any], path: str | Path) -> Path:
    """``summary`` as strict JSON (:func:`json_ready`), written atomically."""
    path = Path(path)
    with atomic_path(path) as temporary:
        temporary.write_text(summary_json(summary) + "\n")
    return path


def noise_scale_fields(summary) -> dict[str, Any]:
    """The JSON fields of a :class:`~noisescale.monitor.NoiseScaleSummary`; for a run that reports no noise scale
    (diverged, broken by bad data, never finite) the estimates are null and ``no_noise_scale`` says why."""
    reported = summary.reports_noise_scale
    estimates = {
        "b_simple": summary.b_simple,
        "b_simple_interval": list(summary.b_simple_interval),
        "trace_sigma": summary.trace_sigma,
        "grad_sqnorm": summary.grad_sqnorm,
        "b_noise": summary.b_noise,
        "b_noise_interval": list(summary.b_noise_interval),
    }
    if not reported:
        estimates = {key: [None, None] if isinstance(value, list) else None for key, value in estimates.items()}
    return {
        **estimates,
        "confidence": summary.confidence,
        "population_size": summary.population_size,
        "b_noise_measurements": summary.b_noise_measurements,
        "suggested_batch_size": summary.suggested_batch_size,
        "suggested_from": summary.suggested_from,
        "nonfinite_steps": summary.nonfinite_steps,
        "no_noise_scale": None if reported else next(
            reason for reason in (summary.divergence and f"the run diverged ({summary.divergence})",
                                  summary.broken_by_bad_data and f"bad data broke the run ({summary.bad_data}: "
                                  "every step since was non-finite)", summary.nonfinite_from_start)
            if reason),
        "bad_data": summary.bad_data,
    }
