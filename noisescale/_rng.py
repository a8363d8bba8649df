"""The global random state: running model code without touching it, and saving and restoring it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def isolated_rng(tensors: Iterable[torch.Tensor]):
    """``torch.random.fork_rng`` over the CPU and the CUDA devices ``tensors`` live on: dropout inside the block
    draws from a copy of the global generators, so the caller's random stream (and its training) is unchanged."""
    devices = sorted({tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
                      for tensor in tensors if tensor.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def rng_state(device: torch.device | None) -> dict[str, Tensor]:
    """The global CPU generator's state ("torch") and, for a CUDA ``device``, that device's ("cuda")."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device | None) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
