"""A model's buffers kept as they were across model code run for a measurement (a probe, a check)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
                if not torch.equal(buffer, values):
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
