"""Per-example losses: shape (B,), and the training loss is their mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["per_example_cross_entropy"]


def per_example_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example classification loss, shape (B,): the mean of it is the usual cross-entropy."""
    return F.cross_entropy(outputs, targets, reduction="none")
