"""What the commands share: the seeded set-up of a training job (data, model, optimizer, DDP), the process
group under torchrun, and test accuracy.

Under torchrun (``WORLD_SIZE`` > 1 in the environment) ``measure`` and ``train`` run data-parallel
(:func:`distributed_job`): NCCL with one GPU per process on CUDA, gloo on CPU, the model wrapped in
DistributedDataParallel, the batch size global. Every rank computes the same history; rank 0 alone prints,
shows progress and writes files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from noisescale.data import load_fashion_mnist
from noisescale.devices import resolve_device
from noisescale.models import load_model_factory


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


def evaluate_accuracy(model: torch.nn.Module, dataset, device: torch.device, batch_size: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for inputs, targets in DataLoader(dataset, batch_size=batch_size):
            correct += (model(inputs.to(device)).argmax(1) == targets.to(device)).sum().item()
    model.train(was_training)
    return correct / len(dataset)
