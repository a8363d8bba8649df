"""A model's buffers kept as they were across model code run for a measurement (a probe, a check)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn


@contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Every buffer of ``model`` as it was before the block: its values, and the tensor itself where the block
    assigned a new one (``self.ema = 0.9 * self.ema + ...``, which a copy into the old tensor would miss)."""
    saved = [(owner, name, buffer, buffer.detach().clone()) for owner in model.modules()
             for name, buffer in owner._buffers.items() if buffer is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, buffer, values in saved:
                if owner._buffers.get(name) is not buffer:
                    owner._buffers[name] = buffer
                # only where the block changed it: a copy bumps the buffer's version counter, and a call of the
                # caller's own pass that took the buffer as an input (observe's check runs after that pass) would
                # then be refused as modified in place (a PyG GCN's edge_index kept as a buffer)
                if buffer.shape != values.shape or buffer.dtype != values.dtype:
                    buffer.data = values   # (the block gave its ``.data`` another shape: a growing memory bank)
                elif not torch.equal(buffer, values):
                    buffer.copy_(values)


class RunningStatistics:
    """The running statistics of a model's BatchNorm layers (running_mean, running_var, num_batches_tracked: what a
    forward in train mode updates), copied so that a step that fails, is retried or is skipped can put them back
    (a NaN batch would otherwise leave them NaN for good)."""

    def __init__(self, model: nn.Module):
        self._saved = [(buffer, buffer.detach().clone()) for module in model.modules()
                       if isinstance(module, nn.modules.batchnorm._BatchNorm)
                       for buffer in module.buffers(recurse=False)]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, values in self._saved:
                buffer.copy_(values)


def changed_in_place(buffer: torch.Tensor, version: int, before: torch.Tensor | None) -> bool:
    """Whether a forward changed ``buffer`` in place: its version counter moved, or, where a copy taken ``before``
    the forward is at hand, its values differ from the copy (a write through ``.data``, as VQ-VAE codebooks' EMA
    updates do it, leaves the counter as it was). NaN equals NaN here."""
    if buffer._version != version or before is not None and (buffer.shape != before.shape
                                                              or buffer.dtype != before.dtype):
        return True   # (``.data`` given another shape: a memory bank that grows by a row each forward)
    if before is None or torch.equal(buffer, before):
        return False
    return not (buffer.is_floating_point() or buffer.is_complex()) or not bool(
        ((buffer == before) | (buffer.isnan() & before.isnan())).all())


class PassBuffers(NamedTuple):
    """A module's buffers as a pass found them (by ``named_buffers()`` names) and the names of those a forward
    changes in place, which each forward of a re-run must start from a fresh copy of."""

    values: dict[str, torch.Tensor]
    changing: frozenset[str]


class BuffersBefore:
    """A model's buffers as a pass found them, for a re-run of the pass after it (the whole-model vmap), where its
    forward changes them in place (spectral norm's power iteration in train mode: the re-run must differentiate the
    weight of the pass, not one made one update later). Before each pass (``take``) it copies the buffers a forward
    was seen to change in place, every buffer before the first pass; the others are the pass's own tensors, which a
    forward that assigns a new buffer (``self.ema = ...``) leaves as they were. After the pass, ``missed`` names
    those it changed without a copy (a buffer that began to change after the first pass), whose values as the pass
    found them are lost; ``release`` drops the copies once the pass is measured. Changes are seen by the version
    counters, and after the first pass also by the values (``changed_in_place``): a buffer written through ``.data``
    in every pass is copied from the second on, but one that starts to change so later is not seen."""

    def __init__(self, model: nn.Module):
        self._model = model
        self._owners: list[nn.Module] | None = None   # the modules holding buffers (``watch``); None: all of them
        self._changing: set[tuple[nn.Module, str]] | None = None   # None: no pass seen yet, copy every buffer
        self._found: dict[tuple[nn.Module, str], tuple[torch.Tensor, int]] = {}   # the tensors, their versions
        self._copies: dict[int, torch.Tensor] = {}   # id of a found tensor -> its values before the pass

    def watch(self, owners: list[nn.Module]) -> None:
        """Look at these modules' buffers only (the model's modules that hold buffers, listed where the model's
        structure is known to be fixed): walking every module before each pass cost 1 us a module, 0.17 ms a call
        on a 12-layer GPT-2 holding no buffer at all. A buffer registered later in a module without one is not
        seen."""
        self._owners = owners

    def take(self) -> None:
        """Before a pass: its buffers, and copies of those seen to change in place (of all, before the first)."""
        owners = self._model.modules() if self._owners is None else self._owners
        self._found = {(owner, name): (buffer, buffer._version) for owner in owners
                       for name, buffer in owner._buffers.items() if buffer is not None}
        self._copies = {id(buffer): buffer.detach().clone() for key, (buffer, _) in self._found.items()
                        if self._changing is None or key in self._changing}

    def missed(self) -> list[str]:
        """After the pass (once): the buffers it changed in place without a copy, as "module path.name"; every
        buffer it changed is remembered, for the next ``take`` to copy."""
        first = self._changing is None   # the first pass compares values too (a write through .data)
        changed = {key for key, (buffer, version) in self._found.items()
                   if changed_in_place(buffer, version, self._copies.get(id(buffer)) if first else None)}
        self._changing = (self._changing or set()) | changed
        missed = [key for key in changed if id(self._found[key][0]) not in self._copies]
        if not missed:
            return []
        paths = {module: path for path, module in self._model.named_modules()}
        return sorted(f"{paths[owner]}.{name}".lstrip(".") for owner, name in missed)

    def of(self, module: nn.Module) -> PassBuffers:
        """The buffers of ``module`` (the model or a module in it) as the pass found them (the copy, where one was
        taken; a buffer the pass added, as it is now), and which of them change in place."""
        found, changing = {}, set()
        for key, buffer in module.named_buffers():
            path, _, name = key.rpartition(".")
            slot = (module.get_submodule(path), name)
            before, _ = self._found.get(slot, (buffer, None))
            found[key] = self._copies.get(id(before), before)
            if slot in (self._changing or ()):
                changing.add(key)
        return PassBuffers(found, frozenset(changing))

    def release(self) -> None:
        """Drop the copies (the pass is measured): they are not held from one call to the next."""
        self._copies = {}
