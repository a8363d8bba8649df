"""Curvature-aware noise scale B_noise = tr(H Sigma)/(G^T H G) and Hessian proxies, built on torch.func.

McCandlish et al. (2018), section 2.2: with Hessian H, true gradient G and per-example gradient covariance
Sigma, the optimal step for a batch of B examples improves the loss by a fraction 1/(1 + B_noise/B) of the
noiseless one, B_noise = tr(H Sigma)/(G^T H G); B_simple = tr(Sigma)/|G|^2 is the H = identity proxy.

Estimators (all from one batch of B i.i.d. examples, loss = mean of the per-example losses):
- Hessian-vector products H v by forward-over-reverse differentiation, torch.func.jvp of torch.func.grad.
  Where an op has no forward derivative (CPU flash attention, cuDNN RNNs, a custom autograd.Function without
  jvp), H v = (v^T H)^T by reverse-over-reverse differentiation (torch.func.vjp of grad, a double backward),
  and where an op's backward has no derivative either (flash and memory-efficient attention kernels, cuDNN
  RNNs), by reverse-over-reverse with attention on SDPA's math kernel and cuDNN off (same function, composite
  ops). The first method that works is remembered per model (:func:`hvp_method`); later calls start there.
  A backward marked @once_differentiable, which torch's double backward silently treats as constant, is
  found in the graph before reverse-over-reverse is first used on a model, and refused with an error.
  Per-example gradients and the per-example Hessian-vector products run under torch.func.vmap, or in a loop
  over examples for a model vmap cannot run (fused RNN kernels, data-dependent control flow), also remembered.
  A loss normalised over the batch (the "token" weighting) is taken on each example alone there, so each
  gradient is scaled back to the example's loss within its half (``per_example.coupling.example_weights``).
- tr(H) by Hutchinson's estimator: E[v^T H v] = tr(H) for Rademacher v (entries +-1, E[v v^T] = I);
  its standard error is the sample standard deviation over probes / sqrt(num_probes).
- G^T H G: E[gbar^T H gbar] = G^T H G + tr(H Sigma)/B (because E[gbar gbar^T] = G G^T + Sigma/B), so the
  estimate subtracts the tr(H Sigma) estimate divided by B.
- tr(H Sigma) = E[d^T H d] with d = g_i - G; on m per-example gradients with their own mean gbar_m,
  sum_i (g_i - gbar_m)(g_i - gbar_m)^T/(m - 1) is the unbiased sample covariance (the mean uses one degree
  of freedom, hence m - 1 and not m), and tr(H .) is linear, so sum_i d_i^T H d_i/(m - 1) is unbiased.
- The empirical Fisher trace mean_i |g_i|^2 = tr(Sigma) + |G|^2 in expectation: a cheap proxy for tr(H)
  (equal to it for a well-specified likelihood at the optimum).

Finite population. A batch drawn without replacement from a dataset of N examples (an epoch's shuffled batches;
the truth is then the dataset's: G its mean gradient, H its mean Hessian, Sigma the covariance with divisor N) has
E[gbar gbar^T] = G G^T + Sigma (N - h)/(h (N - 1)) for a half of h examples, and the sample covariance has
E = Sigma N/(N - 1), as for B_simple (:mod:`noisescale.estimators`). The two halves are not independent either:
given the gradient half A, the Hessian half C is drawn from the N - h other examples, so E[H_C | A] =
(N H - h H_A)/(N - h), not H (H_A: the Hessian of A's mean loss). The same-example terms of gbar^T H_A gbar made
the halves necessary, but with ``population=N`` they are what makes the correction exact: the Hessian the
gradients are multiplied with is H' = ((N - h) H_C + h H_A)/N, whose E[H' | A] = H exactly, so that with T the
sum_i d_i^T H' d_i/(m - 1) and R = gbar^T H' gbar

    tr(H Sigma) ~ T (N - 1)/N,      G^T H G ~ R - T (N - h)/(h N),

unbiased for the dataset's values (the identities checked by enumerating every draw of a small dataset; the
halves' cross-covariance, Cov(gbar_A, gbar_C) = -Sigma/(N - 1), enters only through E[H_C | A]). It costs 1 + m
more Hessian-vector products, on the gradient half. Without the correction (``population=None``, the i.i.d.
formula) such batches read G^T H G low by about tr(H Sigma)/(N - 1), plus the halves' dependence: 0.117 against
0.372 on a 40-example regression with B = 16 (B_noise 57 against 18).

Independence: the batch Hessian H_hat is random and built from the same examples as the gradients, and the
same-example terms bias gbar^T H_hat gbar and d_i^T H_hat d_i by O(tr(H)/B) relative (e.g. (x_i^T g_i)^2
~ tr(D)^2 for linear regression). The batch is therefore split in two disjoint halves: the first half
gives gbar and the per-example gradients, the second half gives the Hessian those are multiplied with.
Hutchinson's tr(H) uses the whole batch. A batch too large for one pass is given as micro-batches
(:func:`micro_batch_hessian_noise_scale`): the first half of them gives gbar, the other half the Hessian, whose
products sum over its micro-batches (H = sum_k (b_k / b) H_k), one micro-batch's graph at a time.

Batches follow :mod:`noisescale.batches`: ``inputs`` is a tensor, a tuple of positional inputs or a mapping
of keyword inputs (``model(**inputs)``), ``targets`` a tensor, a pytree of tensors or None; every tensor holds
the batch in dim 0. ``loss_fn(outputs, targets)`` gets what the model returns (a HuggingFace ModelOutput too).

None of these calls changes the model or training: parameters and buffers enter torch.func.functional_call
as detached copies, no .grad is written, and the global RNG (dropout) runs inside torch.random.fork_rng.
Probes come from an explicit torch.Generator.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from noisescale._checks import check_int
from noisescale._compiled import eager
from noisescale._functional import functional_call
from noisescale._graph import autograd_nodes
from noisescale._rng import isolated_rng
from noisescale.batches import batch_size_of, call_arguments, concatenate_examples, select_examples, tensors_of
from noisescale.per_example.checkpointing import checkpointing_off
from noisescale.per_example.coupling import example_weights
from noisescale.per_example.layers import batch_statistics_path
from noisescale.per_example.vmap import quiet_torch_notes

__all__ = [
    "HessianNoiseScale",
    "HutchinsonTrace",
    "trainable_parameters",
    "hessian_vector_product",
    "hutchinson_trace",
    "hessian_noise_scale",
    "micro_batch_hessian_noise_scale",
    "mean_hessian_proxies",
    "hvp_method",
    "HVP_METHODS",
    "HESSIAN_NOISE_SCALE_MIN_BATCH",
]

LossFunction = Callable[[Any, Any], Tensor]  # (model outputs, targets) -> per-example losses (B,)
HESSIAN_NOISE_SCALE_MIN_BATCH = 4  # two halves (gradient, Hessian) of at least two examples each
Parameters = dict[str, Tensor]
HVP_METHODS = ("forward-over-reverse", "reverse-over-reverse", "reverse-over-reverse, composite kernels")
_DIFFERENTIATION = re.compile(r"forward[- ]?(mode )?AD|derivative|double backward|jvp", re.IGNORECASE)
_NOT_IMPLEMENTED = re.compile(r"not (been )?implemented|not supported|does not support|must implement", re.IGNORECASE)


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
    g_h_g: float  # unbiased G^T H G: gbar^T H gbar - tr(H Sigma)/gradient_batch_size (finite population: docstring)
    trace_h_sigma: float
    fisher_trace: float  # mean_i |g_i|^2 over the per-example subsample
    gradient_batch_size: int
    num_sigma_examples: int

    @property
    def b_noise(self) -> float:
        """tr(H Sigma)/(G^T H G) of this batch; +inf when the G^T H G estimate is <= 0, NaN when both are exactly 0
        (every per-example gradient 0: 0/0, as ``NoiseScaleEstimate.b_simple``)."""
        if self.g_h_g == 0 and self.trace_h_sigma == 0:
            return math.nan
        if self.g_h_g <= 0:
            return math.inf
        return self.trace_h_sigma / self.g_h_g


def mean_hessian_proxies(parts: Sequence[HessianNoiseScale]) -> HessianNoiseScale:
    """The mean of independent estimates of the Hessian proxies at the same parameters (micro-batches of one step,
    the ranks of a DDP step, each with its own probes): tr(H), G^T H G, tr(H Sigma) and the Fisher trace average,
    unbiased as each part is; the standard error of the mean tr(H) is sqrt(sum_k se_k^2) / K. The example counts
    stay those of the first part (g_h_g's correction, with or without a population, holds part by part)."""
    if not parts:
        raise ValueError("mean_hessian_proxies needs at least one estimate")
    if len(parts) == 1:
        return parts[0]
    count = len(parts)
    return HessianNoiseScale(
        trace_h=sum(part.trace_h for part in parts) / count,
        trace_h_stderr=math.sqrt(sum(part.trace_h_stderr**2 for part in parts)) / count,
        g_h_g=sum(part.g_h_g for part in parts) / count,
        trace_h_sigma=sum(part.trace_h_sigma for part in parts) / count,
        fisher_trace=sum(part.fisher_trace for part in parts) / count,
        gradient_batch_size=parts[0].gradient_batch_size,
        num_sigma_examples=parts[0].num_sigma_examples,
    )


@dataclass
class _Methods:
    """How torch.func runs on one model, learnt from its first failures (module docstring)."""

    hvp: int = 0  # index into HVP_METHODS
    vmap_examples: bool = True  # per-example gradients under vmap, else a loop
    vmap_vectors: bool = True  # Hessian-vector products of several vectors under vmap, else a loop
    twice_differentiable: set[int] = field(default_factory=set)  # reverse-over-reverse methods checked


_methods_of_model: weakref.WeakKeyDictionary[nn.Module, _Methods] = weakref.WeakKeyDictionary()


def _methods_of(model: nn.Module) -> _Methods:
    return _methods_of_model.setdefault(model, _Methods())


def hvp_method(model: nn.Module) -> str | None:
    """The entry of HVP_METHODS that Hessian-vector products on ``model`` use; None before the first one."""
    methods = _methods_of_model.get(model)
    return None if methods is None else HVP_METHODS[methods.hvp]


def _missing_derivative(error: Exception) -> bool:
    """Whether torch raised ``error`` for an op without a forward derivative or a twice-differentiable backward."""
    message = str(error)
    return isinstance(error, (NotImplementedError, RuntimeError)) and bool(
        _DIFFERENTIATION.search(message) and _NOT_IMPLEMENTED.search(message))


def trainable_parameters(model: nn.Module) -> Parameters:
    """Detached copies of the parameters that require grad, by name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"model {type(model).__name__} has no parameter with requires_grad=True")
    return params


def _mean_loss_function(model: nn.Module, loss_fn: LossFunction) -> Callable[[Parameters, Any, Any], Tensor]:
    """params, inputs, targets -> mean per-example loss; each call works on fresh copies of the buffers.

    Copying inside the transformed function lets BatchNorm in training mode update its running statistics
    (on the copy) without torch.func rejecting the mutation of a captured tensor.
    """
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def mean_loss(params: Parameters, inputs: Any, targets: Any) -> Tensor:
        buffer_copies = {name: b.clone() for name, b in buffers.items()}
        args, kwargs = call_arguments(inputs)
        # torch.func does not differentiate through compiled graphs, nor through activation checkpointing
        with eager(), checkpointing_off(model):
            outputs = functional_call(model, {**params, **buffer_copies}, args, kwargs)
        losses = loss_fn(outputs, targets)
        batch_size = batch_size_of(inputs)
        if not isinstance(losses, Tensor) or losses.shape != (batch_size,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn must return per-example losses of shape ({batch_size},) (use "
                             f"reduction='none'), got {shape}")
        return losses.mean()

    return mean_loss


def _check_batch(inputs: Any, targets: Any, minimum: int) -> tuple[Any, int]:
    """The inputs (a mapping as a plain dict) and the batch size B taken from them, validated against targets."""
    if isinstance(inputs, Mapping):
        inputs = dict(inputs)  # a BatchEncoding or other Mapping: a dict that torch's pytrees walk
    batch_size = batch_size_of(inputs)
    target_shapes = [tuple(t.shape) for t in tensors_of(targets)]
    if any(len(shape) == 0 or shape[0] != batch_size for shape in target_shapes):
        raise ValueError(f"inputs and targets need the same leading batch dimension, got input shapes "
                         f"{[tuple(t.shape) for t in tensors_of(inputs)]} and target shapes {target_shapes}")
    if batch_size < minimum:
        raise ValueError(f"this estimate needs a batch of at least {minimum} examples, got {batch_size}")
    return inputs, batch_size


def _dot(left: Parameters, right: Parameters) -> Tensor:
    return sum((left[name] * right[name]).sum() for name in left)


def _stack(rows: list[Parameters]) -> Parameters:
    return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}


def _unstack(batched: Parameters) -> list[Parameters]:
    count = next(iter(batched.values())).shape[0]
    return [{name: value[k] for name, value in batched.items()} for k in range(count)]


@contextlib.contextmanager
def _kernels(method: int):
    """For the last of HVP_METHODS: attention on SDPA's math kernel and cuDNN off, whose ops are twice
    differentiable; no change for the others."""
    if HVP_METHODS[method] != "reverse-over-reverse, composite kernels":
        yield
        return
    with sdpa_kernel(SDPBackend.MATH), torch.backends.cudnn.flags(enabled=False):
        yield


def _check_twice_differentiable(mean_loss, params: Parameters, inputs: Any, targets: Any) -> None:
    """Raise where a backward in the model is not differentiable (a custom autograd.Function whose backward is
    marked @once_differentiable): double backward would silently drop its second derivative, not raise."""
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    with torch.enable_grad():
        gradient = torch.autograd.grad(mean_loss(leaves, inputs, targets), list(leaves.values()),
                                       create_graph=True, allow_unused=True)
    for node in autograd_nodes(g.grad_fn for g in gradient if g is not None):
        if node.name().endswith("Error"):
            raise RuntimeError("the derivative of a backward in this model is not implemented (a custom "
                               "autograd.Function whose backward is marked @once_differentiable): double backward "
                               "would drop its second derivative")


class _HessianOperator:
    """v -> H v for the Hessian H of the mean loss on one batch at ``params``, by the model's first working method.

    Reverse-over-reverse builds the pullback of the gradient once (one forward and backward kept for double
    backward) and applies it to each vector; before its first use on a model, the double-backward graph is
    checked for backwards that are not differentiable. A method that fails for a missing derivative is given
    up for the model, and the call retried with the next one.
    """

    def __init__(self, model: nn.Module, mean_loss, params: Parameters, inputs: Any, targets: Any):
        self.model_type, self.methods, self.params = type(model).__name__, _methods_of(model), params
        self.batch = (mean_loss, inputs, targets)
        self.gradient = lambda p: grad(mean_loss)(p, inputs, targets)
        self._pullback: tuple[int, Callable] | None = None  # (method, pullback of the gradient)

    def _product_function(self, method: int) -> Callable[[Parameters], Parameters]:
        if HVP_METHODS[method] == "forward-over-reverse":
            return lambda vector: jvp(self.gradient, (self.params,), (vector,))[1]
        if self._pullback is None or self._pullback[0] != method:
            with _kernels(method):
                if method not in self.methods.twice_differentiable:
                    mean_loss, inputs, targets = self.batch
                    _check_twice_differentiable(mean_loss, self.params, inputs, targets)
                    self.methods.twice_differentiable.add(method)
                self._pullback = (method, vjp(self.gradient, self.params)[1])
        pullback = self._pullback[1]

        def product(vector: Parameters) -> Parameters:
            with _kernels(method):
                return pullback(vector)[0]  # v^T H = (H v)^T, H symmetric

        return product

    def __call__(self, vector: Parameters) -> Parameters:
        while True:
            method = self.methods.hvp
            try:
                return self._product_function(method)(vector)
            except (NotImplementedError, RuntimeError) as error:
                if not _missing_derivative(error):
                    raise
                if method + 1 == len(HVP_METHODS):
                    raise RuntimeError(
                        f"no Hessian-vector product method works for this {self.model_type}: tried "
                        f"{', '.join(HVP_METHODS)}; the last failed with: {error}. Give the op a forward "
                        "derivative (jvp) or a differentiable backward, or measure B_simple only (hessian_every=0)"
                    ) from error
                self.methods.hvp = method + 1  # remembered: later calls on this model start there

    def batched(self, vectors: Parameters, chunk_size: int | None) -> Parameters:
        """H v_k for the vectors stacked in dim 0 of ``vectors``: under vmap, else (remembered) in a loop."""
        vmap_failed = False
        if self.methods.vmap_vectors:
            try:
                product = self._product_function(self.methods.hvp)
                return vmap(product, randomness="same", chunk_size=chunk_size)(vectors)
            except (NotImplementedError, RuntimeError) as error:
                vmap_failed = not _missing_derivative(error)  # a missing derivative is resolved by __call__
        products = _stack([self(vector) for vector in _unstack(vectors)])
        if vmap_failed:
            self.methods.vmap_vectors = False  # vmap cannot run the model where the loop can: remembered
        return products


def hessian_vector_product(model: nn.Module, loss_fn: LossFunction, inputs: Any, targets: Any,
                           vector: Parameters) -> Parameters:
    """H v for the Hessian H of the mean loss over the batch; ``vector`` maps trainable names to tensors."""
    inputs, _ = _check_batch(inputs, targets, minimum=1)
    params = trainable_parameters(model)
    if set(vector) != set(params) or any(vector[n].shape != params[n].shape for n in params):
        expected = [(name, tuple(p.shape)) for name, p in params.items()]
        raise ValueError(f"vector must have the trainable parameters' names and shapes {expected}")
    with isolated_rng(params.values()):
        return _HessianOperator(model, _mean_loss_function(model, loss_fn), params, inputs, targets)(vector)


def _rademacher_like(params: Parameters, generator: torch.Generator) -> Parameters:
    return {
        name: (torch.randint(0, 2, p.shape, generator=generator, device=generator.device) * 2 - 1).to(p)
        for name, p in params.items()
    }


def _probe_products(hvp: _HessianOperator, params: Parameters, num_probes: int,
                    generator: torch.Generator) -> Tensor:
    """v_p^T H v_p for ``num_probes`` Rademacher probes v_p drawn from ``generator``."""
    samples = []
    for _ in range(num_probes):
        probe = _rademacher_like(params, generator)
        samples.append(_dot(probe, hvp(probe)))
    return torch.stack(samples).double()


def _hutchinson(values: Tensor, num_probes: int) -> HutchinsonTrace:
    """tr(H) as the mean of the probes' v^T H v, and its standard error."""
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
    inputs: Any,
    targets: Any,
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
        hvp = _HessianOperator(model, _mean_loss_function(model, loss_fn), params, inputs, targets)
        return _hutchinson(_probe_products(hvp, params, num_probes, generator), num_probes)


def _reject_batch_statistics(model: nn.Module) -> None:
    path = batch_statistics_path(model)
    if path is not None:
        raise ValueError(
            f"per-example gradients are undefined for a BatchNorm that normalises with batch statistics "
            f"(module {path!r}, {type(model.get_submodule(path)).__name__}: train mode or track_running_stats=False); "
            "call model.eval() around hessian_noise_scale, or use running statistics"
        )


def _per_example_gradients(methods: _Methods, mean_loss, params: Parameters, inputs: Any, targets: Any,
                           chunk_size: int | None) -> Parameters:
    """grad of each example's loss, stacked in dim 0: under vmap, else (remembered) in a loop over examples."""
    if methods.vmap_examples:
        leaves, spec = tree_flatten((inputs, targets))
        batched = [k for k, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]

        def example_loss(p: Parameters, example_tensors: list[Tensor]) -> Tensor:
            example_leaves = list(leaves)
            for k, tensor in zip(batched, example_tensors):
                example_leaves[k] = tensor.unsqueeze(0)
            return mean_loss(p, *tree_unflatten(example_leaves, spec))

        try:
            return vmap(grad(example_loss), in_dims=(None, 0), randomness="different", chunk_size=chunk_size)(
                params, [leaves[k] for k in batched])
        except (NotImplementedError, RuntimeError):  # an op vmap cannot run (fused RNN kernels, control flow)
            pass
    gradients = _stack([grad(mean_loss)(params, select_examples(inputs, slice(k, k + 1)),
                                        select_examples(targets, slice(k, k + 1)))
                        for k in range(batch_size_of(inputs))])
    methods.vmap_examples = False  # vmap failed where the loop works: remembered for this model
    return gradients


def hessian_noise_scale(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Any,
    targets: Any,
    *,
    num_probes: int = 8,
    num_sigma_examples: int = 8,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    population: int | None = None,
) -> HessianNoiseScale:
    """tr(H), unbiased G^T H G, tr(H Sigma) and the empirical Fisher trace from one batch (module docstring).

    The first half of the batch gives the mean gradient gbar and ``num_sigma_examples`` per-example
    gradients (a random subsample drawn with ``generator``); the second half gives the Hessian. Cost:
    num_probes + num_sigma_examples + 1 Hessian-vector products; ``chunk_size`` bounds the vmap batch.
    ``inputs``: the model's input tensor, a tuple of its positional inputs or a mapping of keyword inputs;
    ``targets``: a tensor, a pytree of tensors or None (every tensor with the batch in dim 0).
    ``population``: N, for a batch drawn without replacement from a dataset of N >= B examples: the estimates are
    then unbiased for that dataset's G^T H G and tr(H Sigma) (module docstring, "Finite population"; 1 +
    ``num_sigma_examples`` more Hessian-vector products); None for i.i.d. draws.
    """
    inputs, batch_size = _check_batch(inputs, targets, minimum=HESSIAN_NOISE_SCALE_MIN_BATCH)
    half = batch_size // 2
    gradient_half = (select_examples(inputs, slice(half)), select_examples(targets, slice(half)))
    curvature_half = (select_examples(inputs, slice(half, None)), select_examples(targets, slice(half, None)))
    return _noise_scale_of_halves(model, loss_fn, [(inputs, targets)], [gradient_half], [curvature_half],
                                  num_probes=num_probes, num_sigma_examples=num_sigma_examples, generator=generator,
                                  chunk_size=chunk_size, population=population)


def micro_batch_hessian_noise_scale(
    model: nn.Module,
    loss_fn: LossFunction,
    micro_batches: Sequence[tuple[Any, Any]],
    *,
    num_probes: int = 8,
    num_sigma_examples: int = 8,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    population: int | None = None,
) -> HessianNoiseScale:
    """:func:`hessian_noise_scale` of a batch given as (inputs, targets) micro-batches, holding one micro-batch's
    graph at a time: the micro-batches up to the boundary nearest half the examples are the gradient half (at
    least 2 examples), the others the Hessian half (each Hessian-vector product is the b_k / b weighted sum of the
    micro-batches' own). With an even number of equal micro-batches this is the estimate of their concatenation,
    to float rounding. A single micro-batch, or micro-batches with no such boundary (sizes 1 and 3), are taken
    as one batch split in two as :func:`hessian_noise_scale` splits it. ``population``: as
    :func:`hessian_noise_scale`'s, N of the dataset the whole batch is drawn from without replacement."""
    if not micro_batches:
        raise ValueError("micro_batch_hessian_noise_scale needs at least one (inputs, targets) micro-batch")
    options = {"num_probes": num_probes, "num_sigma_examples": num_sigma_examples, "generator": generator,
               "chunk_size": chunk_size, "population": population}
    parts = [(_check_batch(inputs, targets, minimum=1)[0], targets) for inputs, targets in micro_batches]
    sizes = [batch_size_of(inputs) for inputs, _ in parts]
    if sum(sizes) < HESSIAN_NOISE_SCALE_MIN_BATCH:
        raise ValueError(f"this estimate needs a batch of at least {HESSIAN_NOISE_SCALE_MIN_BATCH} examples, got "
                         f"micro-batches of {sizes}")
    ends = list(itertools.accumulate(sizes))
    boundaries = [k for k in range(1, len(parts)) if ends[k - 1] >= 2]
    if not boundaries:   # (one micro-batch is taken as it is, without a copy)
        inputs, targets = parts[0] if len(parts) == 1 else map(concatenate_examples, zip(*parts))
        return hessian_noise_scale(model, loss_fn, inputs, targets, **options)
    middle = min(boundaries, key=lambda k: abs(2 * ends[k - 1] - ends[-1]))
    return _noise_scale_of_halves(model, loss_fn, parts, parts[:middle], parts[middle:], **options)


Batches = list[tuple[Any, Any]]


def _weighted(parts: Batches) -> list[tuple[float, tuple[Any, Any]]]:
    """(b_k / b, part) for each part: the mean loss of their union is sum_k (b_k / b) mean loss_k."""
    sizes = [batch_size_of(inputs) for inputs, _ in parts]
    return [(size / sum(sizes), part) for size, part in zip(sizes, parts)]


def _weighted_sum(terms: list[tuple[float, Any]]) -> Any:
    """sum_k w_k x_k of tensors or of parameter dicts; a single term is returned as it is (the unsplit value)."""
    if len(terms) == 1:
        return terms[0][1]
    if isinstance(terms[0][1], dict):
        return {name: sum(weight * value[name] for weight, value in terms) for name in terms[0][1]}
    return sum(weight * value for weight, value in terms)


def _noise_scale_of_halves(model: nn.Module, loss_fn: LossFunction, whole: Batches, gradient_half: Batches,
                           curvature_half: Batches, *, num_probes: int, num_sigma_examples: int,
                           generator: torch.Generator | None, chunk_size: int | None,
                           population: int | None) -> HessianNoiseScale:
    """The estimators of the module docstring on a batch given as parts: tr(H) on ``whole``, gbar and the
    per-example gradients on ``gradient_half``, the Hessian they are multiplied with on ``curvature_half`` (with
    ``population`` N, on both halves: ((N - h) H_curvature + h H_gradient)/N, module docstring).
    One part's Hessian operator (with reverse-over-reverse, its kept graph) lives at a time; every part sees the
    same Hutchinson probes (the generator is rewound for each), so the products add up to those of the union."""
    check_int(num_probes, "num_probes", 2)
    check_int(num_sigma_examples, "num_sigma_examples", 2)
    generator = _default_generator(generator)
    _reject_batch_statistics(model)
    params = trainable_parameters(model)
    mean_loss = _mean_loss_function(model, loss_fn)
    half = sum(batch_size_of(inputs) for inputs, _ in gradient_half)
    num_sigma_examples = min(num_sigma_examples, half)
    curvature_weights = _weighted(curvature_half)
    if population is not None:
        population = check_int(population, "population", sum(batch_size_of(inputs) for inputs, _ in whole))
        # H' = ((N - h) H_curvature + h H_gradient)/N: E[H' | gradient half] = the dataset's H
        curvature_weights = ([(weight * (population - half) / population, part) for weight, part in curvature_weights]
                             + [(weight * half / population, part) for weight, part in _weighted(gradient_half)])

    with isolated_rng(params.values()), quiet_torch_notes():   # torch's notes on its own internals
        probes_start, products = generator.get_state(), []
        for weight, (inputs, targets) in _weighted(whole):
            generator.set_state(probes_start)
            hvp = _HessianOperator(model, mean_loss, params, inputs, targets)
            products.append((weight, _probe_products(hvp, params, num_probes, generator)))
        trace_h = _hutchinson(_weighted_sum(products), num_probes)
        mean_gradient = _weighted_sum([(weight, grad(mean_loss)(params, inputs, targets))
                                       for weight, (inputs, targets) in _weighted(gradient_half)])
        subsample = torch.randperm(half, generator=generator, device=generator.device)[:num_sigma_examples]
        per_example = _per_example_gradients_of(_methods_of(model), mean_loss, model, loss_fn, params,
                                                gradient_half, subsample, chunk_size)
        deviations = {name: g - g.mean(dim=0, keepdim=True) for name, g in per_example.items()}
        raw_terms, sigma_terms = [], []
        for weight, (inputs, targets) in curvature_weights:
            curvature_hvp = _HessianOperator(model, mean_loss, params, inputs, targets)
            raw_terms.append((weight, _dot(mean_gradient, curvature_hvp(mean_gradient))))
            curvature_of_deviations = curvature_hvp.batched(deviations, chunk_size)
            sigma_terms.append((weight, sum((deviations[n] * curvature_of_deviations[n]).flatten(1).sum(1)
                                            for n in params).sum()))
        raw_g_h_g = _weighted_sum(raw_terms).item()
        trace_h_sigma = _weighted_sum(sigma_terms).item() / (num_sigma_examples - 1)
        fisher_trace = sum(g.flatten(1).pow(2).sum(1) for g in per_example.values()).mean().item()
    if population is None:
        g_h_g = raw_g_h_g - trace_h_sigma / half
    else:   # E[T] = tr(H Sigma) N/(N - 1), E[R] = G^T H G + tr(H Sigma)(N - h)/(h (N - 1)) (module docstring)
        g_h_g = raw_g_h_g - trace_h_sigma * (population - half) / (half * population)
        trace_h_sigma = trace_h_sigma * (population - 1) / population
    return HessianNoiseScale(
        trace_h=trace_h.estimate,
        trace_h_stderr=trace_h.stderr,
        g_h_g=g_h_g,
        trace_h_sigma=trace_h_sigma,
        fisher_trace=fisher_trace,
        gradient_batch_size=half,
        num_sigma_examples=num_sigma_examples,
    )


def _per_example_gradients_of(methods: _Methods, mean_loss, model: nn.Module, loss_fn: LossFunction,
                              params: Parameters, parts: Batches, subsample: Tensor,
                              chunk_size: int | None) -> Parameters:
    """The per-example gradients of the examples ``subsample`` (indices into the concatenated ``parts``), stacked
    part by part, in the subsample's order within each part; each example's loss as it is within its part (a loss
    normalised over the batch, scaled by ``coupling.example_weights``), so that their mean over a part is
    the gradient of the part's mean loss."""
    ends = torch.tensor([batch_size_of(inputs) for inputs, _ in parts]).cumsum(0).tolist()
    pieces = []
    for start, end, (inputs, targets) in zip([0, *ends], ends, parts):
        local = subsample[(subsample >= start) & (subsample < end)] - start
        if local.numel():
            weights = example_weights(loss_fn, model, inputs, targets)
            piece = _per_example_gradients(methods, mean_loss, params, select_examples(inputs, local),
                                           select_examples(targets, local), chunk_size)
            if weights is not None:
                scale = weights[local.to(weights.device)]
                piece = {name: g * scale.to(g).view(-1, *[1] * (g.dim() - 1)) for name, g in piece.items()}
            pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else {name: torch.cat([piece[name] for piece in pieces])
                                               for name in pieces[0]}
