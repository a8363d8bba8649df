"""Curvature-aware noise scale B_noise = tr(H Sigma)/(G^T H G) and Hessian proxies, built on torch.func.

McCandlish et al. (2018), section 2.2: with Hessian H, true gradient G and per-example gradient covariance
Sigma, the optimal step for a batch of B examples improves the loss by a fraction 1/(1 + B_noise/B) of the
noiseless one, B_noise = tr(H Sigma)/(G^T H G); B_simple = tr(Sigma)/|G|^2 is the H = identity proxy.

Estimators (all from one batch of B i.i.d. examples, loss = mean of the per-example losses):
- Hessian-vector products H v by forward-over-reverse differentiation, torch.func.jvp of torch.func.grad.
- tr(H) by Hutchinson's estimator: E[v^T H v] = tr(H) for Rademacher v (entries +-1, E[v v^T] = I);
  its standard error is the sample standard deviation over probes / sqrt(num_probes).
- G^T H G: E[gbar^T H gbar] = G^T H G + tr(H Sigma)/B (because E[gbar gbar^T] = G G^T + Sigma/B), so the
  estimate subtracts the tr(H Sigma) estimate divided by B.
- tr(H Sigma) = E[d^T H d] with d = g_i - G; on m per-example gradients with their own mean gbar_m,
  sum_i (g_i - gbar_m)(g_i - gbar_m)^T/(m - 1) is the unbiased sample covariance (the mean uses one degree
  of freedom, hence m - 1 and not m), and tr(H .) is linear, so sum_i d_i^T H d_i/(m - 1) is unbiased.
- The empirical Fisher trace mean_i |g_i|^2 = tr(Sigma) + |G|^2 in expectation: a cheap proxy for tr(H)
  (equal to it for a well-specified likelihood at the optimum).

Independence: the batch Hessian H_hat is random and built from the same examples as the gradients, and the
same-example terms bias gbar^T H_hat gbar and d_i^T H_hat d_i by O(tr(H)/B) relative (e.g. (x_i^T g_i)^2
~ tr(D)^2 for linear regression). The batch is therefore split in two disjoint halves: the first half
gives gbar and the per-example gradients, the second half gives the Hessian those are multiplied with.
Hutchinson's tr(H) uses the whole batch.

None of these calls changes the model or training: parameters and buffers enter torch.func.functional_call
as detached copies, no .grad is written, and the global RNG (dropout) runs inside torch.random.fork_rng.
Probes come from an explicit torch.Generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from noisescale._checks import check_int
from noisescale._rng import isolated_rng
from noisescale.per_example.layers import uses_batch_statistics

__all__ = [
    "HessianNoiseScale",
    "HutchinsonTrace",
    "trainable_parameters",
    "hessian_vector_product",
    "hutchinson_trace",
    "hessian_noise_scale",
    "HESSIAN_NOISE_SCALE_MIN_BATCH",
]

LossFunction = Callable[[Tensor, Tensor], Tensor]
Inputs = Tensor | tuple[Tensor, ...]  # the model's positional inputs, each with the batch in dim 0
HESSIAN_NOISE_SCALE_MIN_BATCH = 4  # two halves (gradient, Hessian) of at least two examples each
Parameters = dict[str, Tensor]


@dataclass(frozen=True)
class HutchinsonTrace:
    """Hutchinson estimate of tr(H) and its standard error over ``num_probes`` Rademacher probes."""

    estimate: float
    stderr: float
    num_probes: int


@dataclass(frozen=True)
class HessianNoiseScale:
    """Curvature quantities of one batch; average g_h_g and trace_h_sigma over steps before taking b_noise."""

    trace_h: float
    trace_h_stderr: float
    g_h_g: float  # unbiased G^T H G: gbar^T H gbar - tr(H Sigma)/gradient_batch_size
    trace_h_sigma: float
    fisher_trace: float  # mean_i |g_i|^2 over the per-example subsample
    gradient_batch_size: int
    num_sigma_examples: int

    @property
    def b_noise(self) -> float:
        """tr(H Sigma)/(G^T H G) of this batch; +inf when the G^T H G estimate is <= 0."""
        if self.g_h_g <= 0:
            return math.inf
        return self.trace_h_sigma / self.g_h_g


def trainable_parameters(model: nn.Module) -> Parameters:
    """Detached copies of the parameters that require grad, by name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"model {type(model).__name__} has no parameter with requires_grad=True")
    return params


def _mean_loss_function(model: nn.Module, loss_fn: LossFunction) -> Callable[[Parameters, tuple, Tensor], Tensor]:
    """params, inputs (a tuple), targets -> mean per-example loss; each call works on fresh copies of the buffers.

    Copying inside the transformed function lets BatchNorm in training mode update its running statistics
    (on the copy) without torch.func rejecting the mutation of a captured tensor.
    """
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def mean_loss(params: Parameters, inputs: tuple[Tensor, ...], targets: Tensor) -> Tensor:
        buffer_copies = {name: b.clone() for name, b in buffers.items()}
        outputs = functional_call(model, {**params, **buffer_copies}, inputs)
        losses = loss_fn(outputs, targets)
        if losses.shape != (targets.shape[0],):
            raise ValueError(
                f"loss_fn must return per-example losses of shape ({targets.shape[0]},) (use reduction='none'), "
                f"got shape {tuple(losses.shape)}"
            )
        return losses.mean()

    return mean_loss


def _check_batch(inputs: Inputs, targets: Tensor, minimum: int) -> tuple[tuple[Tensor, ...], int]:
    """The inputs as a tuple (a single tensor becomes a 1-tuple) and the batch size, validated."""
    inputs = (inputs,) if isinstance(inputs, Tensor) else inputs
    if not (isinstance(inputs, tuple) and inputs and all(isinstance(t, Tensor) for t in inputs)) or not isinstance(
        targets, Tensor
    ):
        raise TypeError(f"inputs must be a tensor or a non-empty tuple of tensors and targets a tensor, got "
                        f"{type(inputs).__name__}, {type(targets).__name__}")
    shapes = [tuple(t.shape) for t in (*inputs, targets)]
    if any(len(shape) == 0 or shape[0] != shapes[-1][0] for shape in shapes):
        raise ValueError(f"inputs and targets need the same leading batch dimension, got shapes {shapes}")
    if targets.shape[0] < minimum:
        raise ValueError(f"this estimate needs a batch of at least {minimum} examples, got {targets.shape[0]}")
    return inputs, int(targets.shape[0])


def _rows(inputs: tuple[Tensor, ...], index: slice | Tensor) -> tuple[Tensor, ...]:
    return tuple(t[index] for t in inputs)


def _dot(left: Parameters, right: Parameters) -> Tensor:
    return sum((left[name] * right[name]).sum() for name in left)


def _hvp_function(mean_loss, inputs: tuple, targets: Tensor) -> Callable[[Parameters, Parameters], Parameters]:
    """(params, vector) -> H v, forward-over-reverse: jvp of grad."""

    def hvp(params: Parameters, vector: Parameters) -> Parameters:
        return jvp(lambda p: grad(mean_loss)(p, inputs, targets), (params,), (vector,))[1]

    return hvp


def hessian_vector_product(
    model: nn.Module, loss_fn: LossFunction, inputs: Inputs, targets: Tensor, vector: Parameters
) -> Parameters:
    """H v for the Hessian H of the mean loss over the batch; ``vector`` maps trainable names to tensors."""
    inputs, _ = _check_batch(inputs, targets, minimum=1)
    params = trainable_parameters(model)
    if set(vector) != set(params) or any(vector[n].shape != params[n].shape for n in params):
        raise ValueError(
            f"vector must have the trainable parameters' names and shapes {[(n, tuple(p.shape)) for n, p in params.items()]}"
        )
    with isolated_rng(params.values()):
        return _hvp_function(_mean_loss_function(model, loss_fn), inputs, targets)(params, vector)


def _rademacher_like(params: Parameters, generator: torch.Generator) -> Parameters:
    return {
        name: (torch.randint(0, 2, p.shape, generator=generator, device=generator.device) * 2 - 1).to(p)
        for name, p in params.items()
    }


def _hutchinson(hvp, params: Parameters, num_probes: int, generator: torch.Generator) -> HutchinsonTrace:
    samples = []
    for _ in range(num_probes):
        probe = _rademacher_like(params, generator)
        samples.append(_dot(probe, hvp(params, probe)))
    values = torch.stack(samples).double()
    return HutchinsonTrace(
        estimate=values.mean().item(), stderr=(values.std() / math.sqrt(num_probes)).item(), num_probes=num_probes
    )


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # non-deterministic seed without touching the global RNG
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def hutchinson_trace(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Inputs,
    targets: Tensor,
    *,
    num_probes: int = 16,
    generator: torch.Generator | None = None,
) -> HutchinsonTrace:
    """tr(H) of the batch mean loss by Hutchinson's estimator with Rademacher probes from ``generator``."""
    inputs, _ = _check_batch(inputs, targets, minimum=1)
    check_int(num_probes, "num_probes", 2)
    generator = _default_generator(generator)
    params = trainable_parameters(model)
    with isolated_rng(params.values()):
        hvp = _hvp_function(_mean_loss_function(model, loss_fn), inputs, targets)
        return _hutchinson(hvp, params, num_probes, generator)


def _reject_batch_statistics(model: nn.Module) -> None:
    for path, module in model.named_modules():
        if uses_batch_statistics(module):
            raise ValueError(
                f"per-example gradients are undefined for a BatchNorm that normalises with batch statistics "
                f"(module {path!r}, {type(module).__name__}: train mode or track_running_stats=False); call "
                "model.eval() around hessian_noise_scale, or use running statistics"
            )


def hessian_noise_scale(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Inputs,
    targets: Tensor,
    *,
    num_probes: int = 8,
    num_sigma_examples: int = 8,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> HessianNoiseScale:
    """tr(H), unbiased G^T H G, tr(H Sigma) and the empirical Fisher trace from one batch (module docstring).

    The first half of the batch gives the mean gradient gbar and ``num_sigma_examples`` per-example
    gradients (a random subsample drawn with ``generator``); the second half gives the Hessian. Cost:
    num_probes + num_sigma_examples + 1 Hessian-vector products; ``chunk_size`` bounds the vmap batch.
    ``inputs`` is the model's input tensor or a tuple of its positional inputs (e.g. tokens and a mask).
    """
    inputs, batch_size = _check_batch(inputs, targets, minimum=HESSIAN_NOISE_SCALE_MIN_BATCH)
    check_int(num_probes, "num_probes", 2)
    check_int(num_sigma_examples, "num_sigma_examples", 2)
    generator = _default_generator(generator)
    _reject_batch_statistics(model)
    params = trainable_parameters(model)
    mean_loss = _mean_loss_function(model, loss_fn)
    half = batch_size // 2
    gradient_inputs, gradient_targets = _rows(inputs, slice(half)), targets[:half]
    num_sigma_examples = min(num_sigma_examples, half)

    def single_example_loss(p: Parameters, example_inputs: tuple, example_target: Tensor) -> Tensor:
        return mean_loss(p, tuple(t.unsqueeze(0) for t in example_inputs), example_target.unsqueeze(0))

    with isolated_rng(params.values()):
        trace_h = _hutchinson(_hvp_function(mean_loss, inputs, targets), params, num_probes, generator)
        curvature_hvp = _hvp_function(mean_loss, _rows(inputs, slice(half, None)), targets[half:])
        mean_gradient = grad(mean_loss)(params, gradient_inputs, gradient_targets)
        subsample = torch.randperm(half, generator=generator, device=generator.device)[:num_sigma_examples]
        subsample = subsample.to(gradient_inputs[0].device)
        per_example = vmap(grad(single_example_loss), in_dims=(None, 0, 0), randomness="different",
                           chunk_size=chunk_size)(params, _rows(gradient_inputs, subsample),
                                                  gradient_targets[subsample])
        deviations = {name: g - g.mean(dim=0, keepdim=True) for name, g in per_example.items()}
        curvature_of_deviations = vmap(curvature_hvp, in_dims=(None, 0), randomness="same", chunk_size=chunk_size)(params, deviations)
        trace_h_sigma = sum(
            (deviations[n] * curvature_of_deviations[n]).flatten(1).sum(1) for n in params
        ).sum().item() / (num_sigma_examples - 1)
        raw_g_h_g = _dot(mean_gradient, curvature_hvp(params, mean_gradient)).item()
        fisher_trace = sum(g.flatten(1).pow(2).sum(1) for g in per_example.values()).mean().item()
    return HessianNoiseScale(
        trace_h=trace_h.estimate,
        trace_h_stderr=trace_h.stderr,
        g_h_g=raw_g_h_g - trace_h_sigma / half,
        trace_h_sigma=trace_h_sigma,
        fisher_trace=fisher_trace,
        gradient_batch_size=half,
        num_sigma_examples=num_sigma_examples,
    )
