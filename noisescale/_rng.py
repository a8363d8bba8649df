"""The random state: running model code without touching it, and saving and restoring it. The global generators
(torch's CPU and CUDA ones, Python's, NumPy's), and the ``torch.Generator`` objects a model's modules hold as
attributes of their own (a layer that draws its noise from ``self.generator``): an extra forward of noisescale's
advanced such a generator, and with it the training's later draws (a review measured a layer's noise scale 0.79 off
and the generator moved)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn


@contextmanager
def isolated_rng(tensors: Iterable[torch.Tensor], generators: Iterable[torch.Generator] = ()) -> Iterator[None]:
    """``torch.random.fork_rng`` over the CPU and the CUDA devices ``tensors`` live on, Python's and NumPy's
    global generators and ``generators`` (a model's own: :func:`module_generators`) saved and put back: dropout
    inside the block draws from a copy of the global generators (and so does model code that draws from ``random``
    or ``np.random``, as HF Wav2Vec2's time masking does, or from a generator of its own), so the caller's random
    stream (and its training) is unchanged."""
    devices = sorted({tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
                      for tensor in tensors if tensor.device.type == "cuda"})
    host, own = host_rng_state(), generator_states(generators)
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        set_host_rng_state(host)
        set_generator_states(own)


def module_generators(module: nn.Module) -> tuple[torch.Generator, ...]:
    """The ``torch.Generator`` objects that ``module`` and its descendants hold as attributes, or in a list, tuple
    or dict attribute (each once); not one held deeper, by another object, or by the loss function."""
    found = {}
    for child in module.modules():
        for name, value in vars(child).items():
            if name in _MODULE_BOOKKEEPING:   # (its parameters, buffers, submodules and hooks: a scan per fallback
                continue                      # call read them all, 24 us for an nn.MultiheadAttention)
            if isinstance(value, torch.Generator):
                found[id(value)] = value
            elif isinstance(value, (list, tuple, dict)):
                for item in value.values() if isinstance(value, dict) else value:
                    if isinstance(item, torch.Generator):
                        found[id(item)] = item
    return tuple(found.values())


_MODULE_BOOKKEEPING = frozenset(vars(nn.Module()))   # the attributes every nn.Module has of its own


def generator_states(generators: Iterable[torch.Generator]) -> list[tuple[torch.Generator, Tensor]]:
    """Each generator with its state, for :func:`set_generator_states`."""
    return [(generator, generator.get_state()) for generator in generators]


def set_generator_states(states: list[tuple[torch.Generator, Tensor]]) -> None:
    """Put back what :func:`generator_states` returned."""
    for generator, state in states:
        generator.set_state(state)


def host_rng_state() -> tuple:
    """Python's and NumPy's global generator states (about 0.1 ms to take: not for every step)."""
    return random.getstate(), np.random.get_state()


def set_host_rng_state(state: tuple) -> None:
    """Restore what :func:`host_rng_state` returned."""
    random.setstate(state[0])
    np.random.set_state(state[1])


def rng_state(device: torch.device | None, generators: Iterable[torch.Generator] = ()) -> dict[str, Tensor]:
    """The global CPU generator's state ("torch"), for a CUDA ``device`` that device's ("cuda"), and each of
    ``generators``' ("generator 0", ...: a model's own, :func:`module_generators`)."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state | {f"generator {i}": generator.get_state() for i, generator in enumerate(generators)}


def set_rng_state(state: dict[str, Tensor], device: torch.device | None,
                  generators: Iterable[torch.Generator] = ()) -> None:
    """Restore what :func:`rng_state` returned (``generators`` as given to it; one it did not hold, made since,
    is left as it is)."""
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    for i, generator in enumerate(generators):
        if f"generator {i}" in state:
            generator.set_state(state[f"generator {i}"])
