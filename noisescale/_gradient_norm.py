"""The squared norm of the gradient one backward brings to a model's parameters, before it is accumulated."""

from __future__ import annotations

import math

import torch

__all__ = ["GradientSquaredNorm", "dense_gradient", "gradient_values", "gradients_finite"]


def gradient_values(grad: torch.Tensor) -> torch.Tensor:
    """The values a gradient holds, whose norm is its norm: the gradient itself, or a sparse one's coalesced values
    (``nn.Embedding(sparse=True)``; rows hit twice added first)."""
    return grad.coalesce().values() if grad.is_sparse else grad


def dense_gradient(grad: torch.Tensor) -> torch.Tensor:
    """The gradient as a dense tensor of its parameter's shape (a sparse one's, ``nn.Embedding(sparse=True)``'s,
    made dense), for sums and comparisons with per-example gradients."""
    return grad.to_dense() if grad.is_sparse else grad


def gradients_finite(model: torch.nn.Module) -> bool:
    """Whether every p.grad of ``model`` is finite (one float64 sum: inf and NaN propagate, finite values cannot
    overflow)."""
    grads = [gradient_values(p.grad).sum(dtype=torch.float64) for p in model.parameters() if p.grad is not None]
    return not grads or math.isfinite(torch.stack(grads).sum().item())


class GradientSquaredNorm:
    """|g|^2 of the gradient one backward brings to the model's trainable parameters, read by tensor hooks before
    it is accumulated into p.grad and divided by ``scale``^2 (the micro-batch's weight b_k / B times the loss
    scale): the squared norm of the micro-batch's own mean-loss gradient. Installs nothing unless ``enabled``."""

    def __init__(self, model: torch.nn.Module, scale: float, enabled: bool):
        self._parameters = [p for p in model.parameters() if p.requires_grad] if enabled else []
        self._scale, self._parts, self._handles = scale, [], []

    def __enter__(self) -> GradientSquaredNorm:
        self._handles = [p.register_hook(self._add) for p in self._parameters]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()

    def _add(self, grad: torch.Tensor) -> None:
        self._parts.append(torch.linalg.vector_norm(gradient_values(grad), dtype=torch.float64).square())

    @property
    def received(self) -> bool:
        """Whether a backward has brought the parameters a gradient inside the block so far."""
        return bool(self._parts)

    def sqnorm(self) -> torch.Tensor:
        if not self._parts:   # no gradient reached the parameters
            return torch.zeros((), dtype=torch.float64)
        return torch.stack(self._parts).sum() / self._scale**2
