"""Rows of the B examples scattered among a call's rows, gathered into one zero-padded block per example.

A layer called on rows picked from the examples' tokens (a mixture of experts routes each token to a few experts,
each expert runs on the tokens routed to it) holds each example's rows in no fixed place. Its per-example
gradients are those of a layer on (B, K, ...) blocks, row i holding example i's rows and zero rows after them,
K the most rows an example has: a zero output-gradient row adds nothing to a weight's gradient, whatever its
input row. One scatter per tensor into one buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from noisescale.per_example.factors import compute_dtype

__all__ = ["bounds", "Padding"]


def bounds(values: Tensor, size: int) -> Tensor:
    """(size + 1,) where each of 0..size (the first of size: the end) starts in the sorted ``values``, so that their
    differences count each: by binary search, which unlike ``bincount`` has a deterministic CUDA kernel
    (``torch.use_deterministic_algorithms``)."""
    return torch.searchsorted(values, torch.arange(size + 1, device=values.device))


class Padding:
    """The rows of ``groups`` groups (an MoE's experts; 1 for one layer) as (B, K_e, dim) blocks per group e,
    example i's rows of group e in row i, zero rows after them, K_e the most rows an example has in e.
    ``group``, ``owner``: each row's, sorted by group and then owner."""

    def __init__(self, group: Tensor, owner: Tensor, groups: int, batch: int):
        cell = group * batch + owner   # sorted
        starts = bounds(cell, groups * batch)
        per_cell = torch.diff(starts)
        slot = torch.arange(cell.numel(), device=cell.device) - starts[cell]
        widths = per_cell.view(groups, batch).amax(1).clamp_min(1)
        first = torch.cumsum(widths * batch, 0) - widths * batch
        self.position = first[group] + owner * widths[group] + slot
        self.widths, self.batch, self.rows = widths.tolist(), batch, int(first[-1] + widths[-1] * batch)

    @classmethod
    def of_owners(cls, owners: Tensor, batch: int) -> tuple[Padding, Tensor]:
        """One group: rows owned by examples ``owners`` (N,), in any order; also the order (N,) that sorts them,
        in which ``blocks`` takes the rows."""
        order = torch.argsort(owners, stable=True)
        owner = owners[order]
        return cls(torch.zeros_like(owner), owner, 1, batch), order

    def blocks(self, t: Tensor) -> list[Tensor]:
        """(B, K_e, dim) per group, from t (N, dim) in the sorted order."""
        t = compute_dtype(t)
        buffer = t.new_zeros(self.rows, t.shape[-1])
        buffer[self.position] = t
        return [block.view(self.batch, width, t.shape[-1])
                for block, width in zip(buffer.split([self.batch * w for w in self.widths]), self.widths)]
