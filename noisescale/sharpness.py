"""Keskar's epsilon-sharpness of a model's loss at its current parameters.

Keskar, Mudigere, Nocedal, Smelyanskiy & Tang (ICLR 2017), "On Large-Batch Training for Deep Learning:
Generalization Gap and Sharp Minima", metric 2.1:

    phi_{x,f}(eps, A) = 100 * (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)),
    C_eps = {z in R^p : |z_i| <= eps (|(A^+ x)_i| + 1)},

with x the flat parameter vector (n entries), f the mean loss over the given data, and either the full space
(A = I_n, box eps (|x_i| + 1)) or a random subspace (A an n x p standard normal matrix, A^+ its
pseudo-inverse). As in the paper the maximum is found inexactly with a few iterations of L-BFGS-B
(scipy.optimize) on -f, gradients from torch autograd; the value is a lower bound of the true maximum (a
local maximum of a non-concave f). The model is evaluated with torch.func.functional_call on copies of its
parameters and buffers and is never changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.optimize
import torch
from torch import nn

from noisescale._compiled import eager
from noisescale._functional import functional_call
from noisescale._rng import isolated_rng
from noisescale.batches import batch_size_of, call_arguments, select_examples, tensors_of

LossFunction = Callable[[Any, Any], torch.Tensor]  # (model outputs, targets) -> per-example losses (B,)


@dataclass(frozen=True)
class SharpnessResult:
    """phi_{x,f}(eps, A) (``sharpness``, in percent of 1 + f(x)) and how it was found."""

    sharpness: float
    loss: float  # f(x)
    max_loss: float  # largest f(x + A y) found in the box C_eps
    iterations: int  # L-BFGS-B iterations
    function_evaluations: int
    epsilon: float
    subspace_dim: int | None  # p; None for the full parameter space (A = I)
    parameter_count: int  # n


def random_subspace(
    parameter_count: int, dim: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """A standard normal ``parameter_count x dim`` matrix A spanning Keskar's random subspace."""
    if not 1 <= dim <= parameter_count:
        raise ValueError(f"subspace dim must lie in 1..{parameter_count} (the parameter count), got {dim}")
    return torch.randn(parameter_count, dim, generator=generator, dtype=dtype)


class _MeanLoss:
    """f(theta) = mean_i loss_fn(model_theta(inputs_i), targets_i) and its gradient, for a flat theta."""

    def __init__(self, model: nn.Module, loss_fn: LossFunction, inputs, targets, batch_size: int | None):
        self.trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError(f"model {type(model).__name__} has no parameter with requires_grad=True")
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        self.constants = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
        self.constants.update({name: b.detach().clone() for name, b in model.named_buffers()})
        self.count = batch_size_of(inputs)
        self.chunk = self.count if batch_size is None else batch_size
        self.numels = [p.numel() for _, p in self.trainable]

    def flat_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for _, p in self.trainable])

    def __call__(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        theta = theta.detach().requires_grad_(True)
        pieces = theta.split(self.numels)
        parameters = {name: piece.view_as(p) for (name, p), piece in zip(self.trainable, pieces)}
        total, gradient = 0.0, torch.zeros_like(theta)
        for start in range(0, self.count, self.chunk):
            rows = slice(start, start + self.chunk)
            args, kwargs = call_arguments(select_examples(self.inputs, rows))
            with eager():   # compiled, each theta would recompile
                outputs = functional_call(self.model, {**parameters, **self.constants}, args, kwargs)
            losses = self.loss_fn(outputs, select_examples(self.targets, rows))
            expected = (min(self.chunk, self.count - start),)
            if not isinstance(losses, torch.Tensor) or losses.shape != expected:
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ValueError(f"loss_fn must return per-example losses of shape {expected}, got {shape} "
                                 "(use reduction='none')")
            batch_sum = losses.sum()
            gradient += torch.autograd.grad(batch_sum, theta)[0]
            total += batch_sum.item()
        return total / self.count, gradient / self.count


def _validate(epsilon: float, max_iterations: int, inputs, targets, batch_size: int | None) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    if not (isinstance(max_iterations, int) and max_iterations >= 1):
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")
    count = batch_size_of(inputs)  # a clear error for a container that is not a batch, or an empty one
    target_shapes = [tuple(t.shape) for t in tensors_of(targets)]
    if any(len(shape) == 0 or shape[0] != count for shape in target_shapes):
        raise ValueError(f"inputs and targets need the same positive length (examples in dim 0), got input shapes "
                         f"{[tuple(t.shape) for t in tensors_of(inputs)]} and target shapes {target_shapes}")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be None or a positive integer, got {batch_size!r}")


def _subspace_matrix(subspace, parameter_count: int, generator: torch.Generator, dtype, device) -> torch.Tensor | None:
    if subspace is None:
        return None
    if isinstance(subspace, torch.Tensor):
        if subspace.ndim != 2 or subspace.shape[0] != parameter_count or subspace.shape[1] < 1:
            raise ValueError(
                f"subspace matrix must have shape ({parameter_count}, p) with p >= 1, got {tuple(subspace.shape)}"
            )
        return subspace.to(dtype=dtype, device=device)
    if isinstance(subspace, bool) or not isinstance(subspace, int):
        raise TypeError(f"subspace must be None, an int dim or an (n, p) tensor, got {type(subspace).__name__}")
    return random_subspace(parameter_count, subspace, generator=generator, dtype=dtype).to(device)


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Any,
    targets: Any,
    *,
    epsilon: float = 1e-3,
    subspace: int | torch.Tensor | None = None,
    max_iterations: int = 10,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> SharpnessResult:
    """Keskar et al. (2017) sharpness phi_{x,f}(eps, A) of ``model`` at its parameters x.

    ``loss_fn(outputs, targets)`` returns per-example losses (B,); f is their mean over all ``inputs``
    (evaluated in chunks of ``batch_size``). ``subspace``: None for the full space (A = I), an int p for
    a random n x p standard normal A, or an explicit (n, p) matrix A. L-BFGS-B starts at a uniform random
    point of C_eps and runs at most ``max_iterations`` iterations (Keskar used 10). ``generator`` (CPU,
    default: seeded with 0) draws A (first) and the start point. Put the model in eval mode for a
    deterministic f (dropout, batch norm); buffers are copied, the global RNG state is restored.
    ``inputs``: a tensor, a tuple of positional inputs or a mapping of keyword inputs; ``targets``: a tensor,
    a pytree of tensors or None; every tensor holds the examples in dim 0 (:mod:`noisescale.batches`).
    """
    _validate(epsilon, max_iterations, inputs, targets, batch_size)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    mean_loss = _MeanLoss(model, loss_fn, inputs, targets, batch_size)
    x = mean_loss.flat_parameters()
    subspace_matrix = _subspace_matrix(subspace, x.numel(), generator, x.dtype, x.device)
    x_coordinates = x if subspace_matrix is None else torch.linalg.pinv(subspace_matrix) @ x  # A^+ x
    bound = (epsilon * (x_coordinates.abs() + 1)).double().cpu().numpy()
    start = (2 * torch.rand(len(bound), generator=generator, dtype=torch.float64) - 1).numpy() * bound

    with isolated_rng([x, *tensors_of(inputs)]):
        loss, _ = mean_loss(x)
        max_loss = loss

        def negative_loss_and_gradient(y: np.ndarray) -> tuple[float, np.ndarray]:
            nonlocal max_loss
            y = torch.as_tensor(y, dtype=x.dtype, device=x.device)
            step = y if subspace_matrix is None else subspace_matrix @ y
            value, gradient = mean_loss(x + step)
            max_loss = max(max_loss, value)
            if subspace_matrix is not None:
                gradient = subspace_matrix.T @ gradient
            return -value, -gradient.double().cpu().numpy()

        optimum = scipy.optimize.minimize(
            negative_loss_and_gradient,
            start,
            jac=True,
            method="L-BFGS-B",
            bounds=scipy.optimize.Bounds(-bound, bound),
            options={"maxiter": max_iterations},
        )
    return SharpnessResult(
        sharpness=100.0 * (max_loss - loss) / (1.0 + loss),
        loss=loss,
        max_loss=max_loss,
        iterations=int(optimum.nit),
        function_evaluations=int(optimum.nfev),
        epsilon=float(epsilon),
        subspace_dim=None if subspace_matrix is None else subspace_matrix.shape[1],
        parameter_count=x.numel(),
    )
