"""Running model code without touching the caller's random state."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def isolated_rng(tensors: Iterable[torch.Tensor]):
    """``torch.random.fork_rng`` over the CPU and the CUDA devices ``tensors`` live on: dropout inside the block
    draws from a copy of the global generators, so the caller's random stream (and its training) is unchanged."""
    devices = sorted({tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
                      for tensor in tensors if tensor.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)
