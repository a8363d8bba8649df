"""A model whose forward takes two tensors, for checking tuple inputs against the single-tensor path."""

from __future__ import annotations

import torch


class TwoInputs(torch.nn.Module):
    """net(cat(x, z)): the same function as ``net`` on the concatenated input, taking it in two parts."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, z], dim=1))
