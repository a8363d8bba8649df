"""Per-layer rules for per-example gradients, one rule per module type in a registry (as BackPACK does).

A rule turns what the ghost engine recorded for one call of a module -- its input ``x`` (batch first) and the
gradient ``g`` of the *per-example* losses with respect to its output -- into, per parameter,

- ``per_example_sqnorms``: the (B,) squared norms |dl_i/dtheta|^2, without materialising per-example gradients
  where that is cheaper ("ghost norms", Goodfellow 2015; Li et al. 2021, arXiv:2110.05679), and
- ``per_example_grads``: the (B, *theta.shape) per-example gradients, and
- ``per_example_factors``: those gradients or their factors (``factors.py``), for a parameter used by several
  calls (tied weights, a module applied twice), whose norm is that of the sum over its calls.

For a weight applied position-wise, W a_t = z_t at positions t of example i, dl_i/dW = sum_t g_t a_t^T and

    |dl_i/dW|^2 = sum_{t,t'} (a_t . a_t')(g_t . g_t')                    (Gram form, cost T^2 (d_in + d_out))
                = |G_i^T A_i|_F^2                                          (materialised, cost T d_in d_out)

The cheaper one is chosen per layer and per call; for T = 1 it is |a|^2 |g|^2.
"""

from __future__ import annotations

import inspect
import re
import weakref
from math import prod
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.per_example.factors import (IndexFactors, LinearFactors, common_dtype, compute_dtype, gram_preferred,
                                             per_example_sqnorm, position_weight_sqnorms)

# A convolution's im2col patches are built over chunks of examples of at most this many times the layer
# input's size, which bounds the extra memory of its ghost norm (the patches of a 5x5 kernel are 25x the input).
_PATCH_MEMORY_FACTOR = 4

# ConvRule's grouped-convolution kernel gradients from this many input channels per group: on one CPU thread, where
# im2col materialises them, they took 0.15 to 1.13 times (medians 0.53 to 0.72) its time from 8 channels on, and up to
# 3.3x it with 1 or 3 (3x3 and 5x5 kernels, 8x8 to 32x32 maps, B = 64: analysis/bench_conv_rule.py, two runs in
# data/bench/conv_rule_run*.csv)
_GROUPED_MIN_CHANNELS = 8
# ... and where im2col would take the Gram form for memory, from this ratio of that form's multiply-adds to
# materialising's on (128 channels on 16x16 maps: 2.2, the grouped convolution 0.54 its time); below it the Gram
# form's bmm was about as fast or faster (64 channels on 8x8 maps, 5x5 kernels: at 1.04, the grouped convolution 1.15
# and 1.17 its time), and where the gradients take more memory than that form (8 input and 1024 output channels on
# 9x9 maps: 3.9 times, and 1.3x the time) the Gram form stays
_GRAM_MARGIN = 1.2
# ... on as many examples a call as hold at most this many gradient elements: 128 channels on 16x16 maps took 62 to
# 67 ms at 4 to 16 examples a call and 117 ms at 64, 64 channels on 32x32 maps 63 ms at 32 and 88 ms at 64; small
# layers are slower split (a call's fixed cost) (a one-off measurement this session, one CPU thread, B = 64)
_GROUPED_CHUNK_ELEMENTS = 2 ** 21

__all__ = [
    "LayerRule",
    "LinearRule",
    "ConvRule",
    "ConvTransposeRule",
    "EmbeddingRule",
    "AffineNormRule",
    "TransposedLinearRule",
    "ThirdPartyRMSNormRule",
    "ScaledEmbeddingRule",
    "NormActivationRule",
    "LowRankAdapterRule",
    "StandardisedConvRule",
    "CentredPatchConvRule",
    "RULES",
    "STRUCTURAL_RULES",
    "register_rule",
    "rule_for",
    "position_weight_sqnorms",
    "per_example_sqnorm",
]


class LayerRule:
    """A per-example gradient rule for one layer type: subclass it and register it with ``register_rule``.

    The contract. For each call of a module of that type, the engine hands the rule

    - ``module``: the layer itself (read its parameters and settings from it);
    - ``x``: the call's first input, with the B examples in dim 0;
    - ``g``: the gradient, with respect to the call's output (a tensor, examples in dim 0), of
      c * sum_i l_i for a known constant c (the engine rescales at the end, so a rule can ignore c);
    - ``names``: the local names of the parameters to handle (``"weight"``, ``"bias"``; frozen ones are left out),

    and the rule returns, per name, either the (B, *parameter.shape) per-example gradients (``per_example_grads``,
    required) or only their (B,) squared norms (``per_example_sqnorms``; the default squares the gradients,
    override it when the norms are cheaper than the gradients). Both run under ``torch.no_grad()`` and must not
    change ``x`` or ``g``. Example i's gradient must depend on x[i] and g[i] only.

    Optional: ``unsupported_reason(module)`` declines a configuration (the module then goes to the per-module
    fallback under backend="auto"); ``verify(module, x, output)`` is called on the first call of each module
    instance with the real output and returns False when the rule's formula does not reproduce it (again: the
    per-module fallback).

    ``rows_as_positions``: True where every dim between the examples and the layer's own trailing dims is a
    position the formula sums over (Linear, Embedding, LayerNorm, RMSNorm; not channels-first layers), so that
    rows flattened from (B, T, ...) to (B * T, ...) can be handed to the rule as (B, T, ...).

    ``parameter_names``: the local names of the parameters the rule can measure (None: all of the module's, as
    for a rule you register). Another parameter of a module of the type is left out of its calls, found in the
    pass's graph and measured by the whole-model vmap: the hook-based ``torch.nn.utils.weight_norm`` replaces a
    Linear's ``weight`` by ``weight_g`` and ``weight_v`` and computes the weight in a forward pre-hook, and pruning
    keeps a ``weight_orig`` (the built-in rules name theirs; such parameters got norms of 0 before).
    """

    rows_as_positions = False
    parameter_names: frozenset[str] | None = None
    recheck = False   # True: ``reproduces`` is checked on every call, not only the first (OverriddenForwardRule)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this configuration of ``module`` cannot be handled by the rule, or None when it can."""
        return None

    def verify(self, module: nn.Module, x: Tensor, output: Tensor) -> bool:
        """Whether the rule's formula reproduces ``output`` of this call (checked once per module instance)."""
        return True

    def per_example_grads(self, module: nn.Module, x: Tensor, g: Tensor, names: set[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def per_example_sqnorms(self, module: nn.Module, x: Tensor, g: Tensor, names: set[str]) -> dict[str, Tensor]:
        grads = self.per_example_grads(module, x, g, names)
        return {name: per_example_sqnorm(grad) for name, grad in grads.items()}

    def per_example_factors(self, module: nn.Module, x: Tensor, g: Tensor, names: set[str]) -> dict[str, Any]:
        """For a parameter used by several calls: per name, the per-example gradients or, cheaper to combine,
        their factors (``factors.LinearFactors`` / ``IndexFactors``). The default gives the gradients."""
        return self.per_example_grads(module, x, g, names)


class LinearRule(LayerRule):
    """nn.Linear on (B, d_in) or (B, *, d_in): weight by the position formula, bias |sum_t g_t|^2."""

    parameter_names = frozenset({"weight", "bias"})

    rows_as_positions = True

    @staticmethod
    def _positions(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        batch = x.shape[0]
        x, g = common_dtype(x, g)
        return x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1])

    def per_example_grads(self, module, x, g, names):
        a, g = self._positions(x, g)
        grads = {}
        if "weight" in names:
            grads["weight"] = torch.bmm(g.transpose(1, 2), a)
        if "bias" in names:
            grads["bias"] = g.sum(1)
        return grads

    def per_example_factors(self, module, x, g, names):
        a, g = self._positions(x, g)
        factors = {"weight": LinearFactors([(a, g)])} if "weight" in names else {}
        if "bias" in names:
            factors["bias"] = g.sum(1)
        return factors

    @staticmethod
    def _rows(t: Tensor) -> Tensor:
        """(B, d) of a tensor with one position per example, without a copy or a view where it is (B, d)."""
        t = compute_dtype(t)
        return t if t.dim() == 2 else t.reshape(t.shape[0], t.shape[-1])

    def per_example_sqnorms(self, module, x, g, names):
        if x.numel() == x.shape[0] * x.shape[-1]:  # one position: |g a^T|^2 = |a|^2 |g|^2, the bias's |g|^2
            a, g = self._rows(x), self._rows(g)
            bias = torch.linalg.vecdot(g, g)
            sqnorms = {"bias": bias} if "bias" in names else {}
            if "weight" in names:
                sqnorms["weight"] = torch.linalg.vecdot(a, a) * bias
            return sqnorms
        a, g = self._positions(x, g)
        sqnorms = {}
        if "weight" in names:
            sqnorms["weight"] = position_weight_sqnorms(a, g)
        if "bias" in names:
            total = g.sum(1)
            sqnorms["bias"] = torch.linalg.vecdot(total, total)
        return sqnorms


class ConvRule(LayerRule):
    """nn.Conv1d / Conv2d / Conv3d through im2col: a convolution is a Linear over its L output positions.

    Patches are strided views of the padded input (Tensor.unfold per spatial dim), copied once into
    (B, C_in * prod(k), L) -- much faster than F.unfold on CPU. Stride, padding (ints, "same", "valid", non-zero
    padding modes), dilation and groups are handled; each group is a separate Linear, folded into the batch.

    Where a group has at least _GROUPED_MIN_CHANNELS input channels and the per-example kernel gradients are
    materialised (for their norms: where ``takes_grouped_norms``), they come from one convolution's weight gradient
    with the examples as its groups instead (Rochette et al. 2019, "Efficient per-example gradient computations in
    convolutional neural networks"), without the patches; on CPU only, where it was measured
    (``analysis/bench_conv_rule.py``).
    """

    parameter_names = frozenset({"weight", "bias"})

    # subclasses whose patches are not the input's (``CentredPatchConvRule``) keep the im2col path
    grouped_kernels = True

    @staticmethod
    def _padded(module: nn.Module, x: Tensor) -> Tensor:
        if any(module._reversed_padding_repeated_twice):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        return x

    @staticmethod
    def _patches(module: nn.Module, x: Tensor) -> Tensor:
        """(B * groups, L, C_in / groups * prod(k)) input patches."""
        x = ConvRule._padded(module, compute_dtype(x))
        batch, spatial = x.shape[0], len(module.kernel_size)
        windows = x
        for dim, (size, stride, dilation) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
            windows = windows.unfold(2 + dim, (size - 1) * dilation + 1, stride)[..., ::dilation]
        # (B, C, out_1..out_n, k_1..k_n) -> (B, C, k_1..k_n, out_1..out_n)
        order = (0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial))
        patches = windows.permute(order).reshape(batch * module.groups, -1, prod(windows.shape[2:2 + spatial]))
        return patches.transpose(1, 2)

    @staticmethod
    def _output_grads(module: nn.Module, g: Tensor) -> Tensor:
        """(B * groups, L, C_out / groups) output gradients."""
        return compute_dtype(g).reshape(g.shape[0] * module.groups, g.shape[1] // module.groups, -1).transpose(1, 2)

    @staticmethod
    def _example_chunks(module: nn.Module, x: Tensor, g: Tensor, grouped: bool = False
                        ) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, g) split over examples so that what one chunk builds, its patches (im2col multiplies the input by about
        prod(kernel) / prod(stride)) or its ``grouped`` kernel gradients, holds at most _PATCH_MEMORY_FACTOR times
        the layer input's elements (and the grouped convolution's at most _GROUPED_CHUNK_ELEMENTS)."""
        kernel_elements = module.in_channels * prod(module.kernel_size)
        built = kernel_elements * (module.out_channels // module.groups if grouped else prod(g.shape[2:]))
        chunk = max(1, x.shape[0] * x[0].numel() * _PATCH_MEMORY_FACTOR // max(built, 1))
        if grouped:
            chunk = min(chunk, max(1, _GROUPED_CHUNK_ELEMENTS // built))
        return zip(x.split(chunk), g.split(chunk))

    def _by_grouped_convolution(self, module: nn.Module, x: Tensor) -> bool:
        return (self.grouped_kernels and x.device.type == "cpu"
                and module.in_channels // module.groups >= _GROUPED_MIN_CHANNELS)

    def takes_grouped_norms(self, module: nn.Module, x: Tensor, g: Tensor) -> bool:
        """Whether the kernel gradients' norms come from the grouped convolution (``_by_grouped_convolution``):
        where im2col's patches would give them materialised, or in the Gram form for memory although it costs at
        least _GRAM_MARGIN times the multiply-adds, L (n + C_out) against n C_out per position (n = C_in k / groups),
        and the gradients (n C_out per example) take no more memory than that form would (its patches L n and two
        Gram matrices L^2 each)."""
        n = module.in_channels // module.groups * prod(module.kernel_size)
        out, positions = module.out_channels // module.groups, prod(g.shape[2:])
        if not self._by_grouped_convolution(module, x):
            return False
        return not gram_preferred(positions, n, out) or (positions * (n + out) >= _GRAM_MARGIN * n * out
                                                         and n * out <= positions * (n + 2 * positions))

    @staticmethod
    def _kernel_grads(module: nn.Module, x: Tensor, g: Tensor) -> Tensor:
        """(B, C_out, C_in / groups, *k) per-example kernel gradients: the weight gradient of a convolution of the
        examples' channels side by side, (1, B C_in, ...), with B groups times the layer's (the examples'
        gradients are its blocks of C_out rows)."""
        batch, spatial = x.shape[0], len(module.kernel_size)
        x, g = common_dtype(ConvRule._padded(module, x), g)
        shape = (batch * module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        grads = torch.ops.aten.convolution_backward(
            g.reshape(1, -1, *g.shape[2:]), x.reshape(1, -1, *x.shape[2:]), g.new_empty(1).expand(shape), None,
            module.stride, (0,) * spatial, module.dilation, False, (0,) * spatial, batch * module.groups,
            (False, True, False))[1]
        return grads.view(batch, module.out_channels, *shape[1:])

    def per_example_grads(self, module, x, g, names):
        grads = {}
        if "weight" in names:
            grouped = self._by_grouped_convolution(module, x)
            grads["weight"] = torch.cat([
                self._kernel_grads(module, xc, gc) if grouped else
                torch.bmm(self._output_grads(module, gc).transpose(1, 2), self._patches(module, xc))
                .reshape(xc.shape[0], module.out_channels, module.in_channels // module.groups, *module.kernel_size)
                for xc, gc in self._example_chunks(module, x, g, grouped)
            ])
        if "bias" in names:
            grads["bias"] = self._output_grads(module, g).sum(1).reshape(x.shape[0], -1)
        return grads

    def per_example_sqnorms(self, module, x, g, names):
        sqnorms = {}
        if "weight" in names:
            grouped = self.takes_grouped_norms(module, x, g)
            sqnorms["weight"] = torch.cat([
                per_example_sqnorm(self._kernel_grads(module, xc, gc)) if grouped else
                position_weight_sqnorms(self._patches(module, xc), self._output_grads(module, gc))
                .view(xc.shape[0], -1).sum(1)
                for xc, gc in self._example_chunks(module, x, g, grouped)
            ])
        if "bias" in names:
            sqnorms["bias"] = per_example_sqnorm(self._output_grads(module, g).sum(1).view(x.shape[0], -1))
        return sqnorms


def functional_convolution(weight_shape: torch.Size, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                           groups: int = 1) -> Any:
    """What ``ConvRule`` reads of a convolution module, for a call F.conv{1,2,3}d(x, w, b, stride, padding,
    dilation, groups) with w of ``weight_shape`` (zero padding; "same" puts the odd pixel on the right, as nn.Conv
    does)."""
    spatial = len(weight_shape) - 2
    def per_dim(value: Any) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * spatial
    kernel, dilation = tuple(weight_shape[2:]), per_dim(dilation)
    if padding == "same":
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(dilation, kernel)]
    else:
        pads = [(p, p) for p in per_dim(0 if padding == "valid" else padding)]
    return SimpleNamespace(kernel_size=kernel, stride=per_dim(stride), dilation=dilation, groups=groups,
                           padding_mode="zeros", in_channels=weight_shape[1] * groups, out_channels=weight_shape[0],
                           _reversed_padding_repeated_twice=tuple(p for pair in reversed(pads) for p in pair))


class ConvTransposeRule(LayerRule):
    """nn.ConvTranspose1d / 2d / 3d, y = C_W^T x for the convolution C_W of the same settings: since
    <g, C_W^T x> = <C_W g, x>, the weight's per-example gradients are those of that convolution, weight (C_in,
    C_out / groups, *k), run on g with output gradient x: ``ConvRule``'s, in whichever form it takes. Where the
    output padding (or a call's ``output_size``) gives that convolution more output positions than x has, x is
    extended by zeros (the layer's output is the adjoint's on x so extended)."""

    parameter_names = frozenset({"weight", "bias"})

    _convolution = ConvRule()

    @staticmethod
    def _adjoint(module: nn.Module, x: Tensor, g: Tensor) -> tuple[Any, Tensor]:
        """The convolution whose adjoint the layer is (its settings, as ``ConvRule`` reads them), and x extended to
        its output's size."""
        shape = (module.in_channels, module.out_channels // module.groups, *module.kernel_size)
        convolution = functional_convolution(torch.Size(shape), module.stride, module.padding, module.dilation,
                                             module.groups)
        reach = [(size + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for size, pad, dilation, k, stride in
                 zip(g.shape[2:], module.padding, module.dilation, module.kernel_size, module.stride)]
        extension = [pad for size, full in zip(reversed(x.shape[2:]), reversed(reach)) for pad in (0, full - size)]
        return convolution, F.pad(x, extension) if any(extension) else x

    def per_example_grads(self, module, x, g, names):
        convolution, x = self._adjoint(module, x, g)
        grads = self._convolution.per_example_grads(convolution, g, x, names & {"weight"})
        if "bias" in names:
            grads["bias"] = compute_dtype(g).flatten(2).sum(2)
        return grads

    def per_example_sqnorms(self, module, x, g, names):
        convolution, x = self._adjoint(module, x, g)
        sqnorms = self._convolution.per_example_sqnorms(convolution, g, x, names & {"weight"})
        if "bias" in names:
            sqnorms["bias"] = per_example_sqnorm(compute_dtype(g).flatten(2).sum(2))
        return sqnorms


class EmbeddingRule(LayerRule):
    """nn.Embedding: row idx_t receives g_t, so |dl_i/dW|^2 = sum_{t,t'} [idx_t == idx_t'] (g_t . g_t').

    Rows hit several times in one example add up; positions holding ``padding_idx`` get no gradient. The Gram form
    costs T^2 d, the materialised (B, V, d) scatter V d per example; the cheaper is chosen per call. The formula
    reads the indices and the output gradient only, so ``sparse=True`` (a sparse p.grad) is measured alike.
    """

    parameter_names = frozenset({"weight"})

    rows_as_positions = True

    def unsupported_reason(self, module):
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True scales by counts over the whole batch, which couples the examples"
        return None

    @staticmethod
    def _indices_and_grads(module: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        batch = x.shape[0]
        indices = x.reshape(batch, -1)
        g = compute_dtype(g).reshape(batch, indices.shape[1], -1)
        if module.padding_idx is not None:
            g = g * (indices != module.padding_idx).unsqueeze(-1).to(g.dtype)
        return indices, g

    def _factors(self, module: nn.Module, x: Tensor, g: Tensor) -> IndexFactors:
        indices, g = self._indices_and_grads(module, x, g)
        return IndexFactors(indices, g, module.num_embeddings)

    def per_example_grads(self, module, x, g, names):
        return {"weight": self._factors(module, x, g).grads()}

    def per_example_sqnorms(self, module, x, g, names):
        return {"weight": self._factors(module, x, g).sqnorms()}

    def per_example_factors(self, module, x, g, names):
        return {"weight": self._factors(module, x, g)}


class AffineNormRule(LayerRule):
    """Elementwise affine of a normalisation layer, y = x_hat * weight + bias (LayerNorm, RMSNorm, GroupNorm,
    BatchNorm in eval mode): dl_i/dweight = sum over positions of g * x_hat, dl_i/dbias = sum over positions of g.
    These gradients are as small as the parameters, so they are always materialised. x_hat is recomputed from the
    kept input (the layer's own forward, without affine).

    ``channels_first``: the affine acts on dim 1 (GroupNorm, BatchNorm) rather than on the trailing dims.
    """

    parameter_names = frozenset({"weight", "bias"})

    def __init__(self, normalize: Callable[[nn.Module, Tensor], Tensor], channels_first: bool,
                 unsupported: Callable[[nn.Module], str | None] | None = None):
        self.normalize = normalize
        self.channels_first = channels_first
        self.rows_as_positions = not channels_first
        self.unsupported = unsupported

    def unsupported_reason(self, module):
        return None if self.unsupported is None else self.unsupported(module)

    def _shape(self, module: nn.Module, x: Tensor) -> torch.Size:
        """The affine's shape, from the input: never from module.weight (a shard under FSDP)."""
        return x.shape[1:2] if self.channels_first else torch.Size(module.normalized_shape)

    def _flat_grads(self, module: nn.Module, x: Tensor, g: Tensor, names: set[str]) -> dict[str, Tensor]:
        """name -> (B, affine size) per-example gradients, the sums over positions."""
        x, g = compute_dtype(x), compute_dtype(g)
        batch, size = x.shape[0], self._shape(module, x).numel()
        if self.channels_first:
            def over_positions(t: Tensor) -> Tensor:
                return t.reshape(batch, size, -1).sum(2)
        else:
            def over_positions(t: Tensor) -> Tensor:
                return t.reshape(batch, -1, size).sum(1)
        grads = {}
        if "weight" in names:
            grads["weight"] = over_positions(g * self.normalize(module, x))
        if "bias" in names:
            grads["bias"] = over_positions(g)
        return grads

    def per_example_grads(self, module, x, g, names):
        shape = self._shape(module, x)
        return {name: grad.view(x.shape[0], *shape) for name, grad in self._flat_grads(module, x, g, names).items()}

    def per_example_sqnorms(self, module, x, g, names):
        return {name: torch.linalg.vecdot(grad, grad) for name, grad in self._flat_grads(module, x, g, names).items()}


def _layer_norm_hat(module: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, module.normalized_shape, eps=module.eps)


def _rms_norm_hat(module: nn.Module, x: Tensor) -> Tensor:
    return F.rms_norm(x, module.normalized_shape, eps=module.eps)


def _group_norm_hat(module: nn.GroupNorm, x: Tensor) -> Tensor:
    return F.group_norm(x, module.num_groups, eps=module.eps)


def _batch_norm_eval_hat(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = module.running_mean.to(x.dtype), module.running_var.to(x.dtype)
    return (x - mean.view(view)) * torch.rsqrt(var.view(view) + module.eps)


def uses_batch_statistics(module: nn.Module) -> bool:
    """True for a BatchNorm that normalises with the statistics of the current batch (train mode, or no running
    statistics): the examples are then coupled and a per-example gradient is undefined."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None)


def batch_statistics_path(model: nn.Module) -> str | None:
    """The path of the first module of ``model`` that normalises with batch statistics (``uses_batch_statistics``;
    "" for the model itself), None if none does."""
    return next((path for path, module in model.named_modules() if uses_batch_statistics(module)), None)


def _batch_norm_unsupported(module: nn.Module) -> str | None:
    return "it normalises with batch statistics" if uses_batch_statistics(module) else None


_BATCH_NORM_RULE = AffineNormRule(_batch_norm_eval_hat, channels_first=True, unsupported=_batch_norm_unsupported)

RULES: dict[type, LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.ConvTranspose1d: ConvTransposeRule(),
    nn.ConvTranspose2d: ConvTransposeRule(),
    nn.ConvTranspose3d: ConvTransposeRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: AffineNormRule(_layer_norm_hat, channels_first=False),
    nn.GroupNorm: AffineNormRule(_group_norm_hat, channels_first=True),
    nn.BatchNorm1d: _BATCH_NORM_RULE,
    nn.BatchNorm2d: _BATCH_NORM_RULE,
    nn.BatchNorm3d: _BATCH_NORM_RULE,
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = AffineNormRule(_rms_norm_hat, channels_first=False)


# ------------------------------------------------------------------------ third-party layers, matched by structure

def rounding_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for two computations of the same values in ``dtype`` (half precision: 1e-2)."""
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)


def close_values(reconstruction: Tensor, output: Tensor) -> bool:
    """Equal up to the rounding of the output's dtype (a few rows of the first call are compared)."""
    tolerance = rounding_tolerance(output.dtype)
    if reconstruction.shape != output.shape:
        return False
    dtype = torch.promote_types(reconstruction.dtype, output.dtype)   # autocast: a float32 rebuild of bfloat16
    return torch.allclose(reconstruction.to(dtype), output.to(dtype), rtol=tolerance,
                          atol=tolerance * float(output.abs().max()))


VERIFY_ROWS = 2


class TransposedLinearRule(LinearRule):
    """A Linear that stores its weight transposed, y = x W + b with W of shape (d_in, d_out): HuggingFace GPT-2's
    ``Conv1D``. The norms are those of the Linear formula; the per-example weight gradients are transposed."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
                and getattr(module, "nx", None) == weight.shape[0] and getattr(module, "nf", None) == weight.shape[1]
                and (bias is None or (isinstance(bias, Tensor) and bias.shape == weight.shape[1:]))
                and not any(True for _ in module.children()))

    def verify(self, module, x, output):
        rows = x[:VERIFY_ROWS]
        reconstruction = rows @ module.weight
        if module.bias is not None:
            reconstruction = reconstruction + module.bias
        return close_values(reconstruction, output[:VERIFY_ROWS])

    def per_example_grads(self, module, x, g, names):
        grads = super().per_example_grads(module, x, g, names)
        if "weight" in grads:
            grads["weight"] = grads["weight"].transpose(1, 2)
        return grads

    def per_example_factors(self, module, x, g, names):
        factors = super().per_example_factors(module, x, g, names)
        if "weight" in factors:  # rows are the input's: gradient_i = sum_t a_t g_t^T
            (a, g), = factors["weight"].blocks
            factors["weight"] = LinearFactors([(g, a)])
        return factors


class _RMSNormVariant:
    """How a library computes y = (offset + w) * x_hat, x_hat = x / sqrt(mean(x^2) + eps) with the mean in
    float32 (as HuggingFace does): which dtype x_hat and the product have."""

    def __init__(self, name: str, offset: float):
        self.name, self.offset = name, offset

    def applies(self, weight: Tensor) -> bool:
        """torchtune's F.rms_norm on float32 takes a float32 weight (another dtype makes torch warn of the mismatch,
        as the check of a float64 T5LayerNorm did)."""
        return self.name != "rms_norm_float32" or weight.dtype == torch.float32

    def normalized(self, x: Tensor, eps: float) -> Tensor:
        if self.name == "rms_norm_float32":    # torchtune: F.rms_norm(x.float(), weight=scale).to(x.dtype)
            return F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps)
        x32 = x.to(torch.float32)
        inverse_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        if self.name == "cast_back":           # Llama, Mistral, Qwen: x_hat in float32, cast to x's dtype
            return (x32 * inverse_rms).to(x.dtype)
        if self.name == "mixed":               # T5: x times a float32 factor (promoted)
            return x * inverse_rms
        return x32 * inverse_rms               # Gemma: x_hat and the product in float32

    def output(self, module: nn.Module, x: Tensor, eps: float) -> Tensor:
        x_hat = self.normalized(x, eps)
        weight = _rms_parameter(module)[1]
        if self.name == "rms_norm_float32":
            return F.rms_norm(x.to(torch.float32), (x.shape[-1],), weight + self.offset if self.offset else weight,
                              eps=eps).to(x.dtype)
        if self.name == "float32_product":
            return (x_hat * (self.offset + weight.float())).type_as(x)
        if self.name == "mixed" and weight.dtype in (torch.float16, torch.bfloat16):
            x_hat = x_hat.to(weight.dtype)
        return (weight + self.offset if self.offset else weight) * x_hat


def _rms_parameter(module: nn.Module) -> tuple[str, Tensor]:
    """(name, the one (d,) parameter) of a third-party RMSNorm: ``weight``, or ``scale`` (torchtune's RMSNorm)."""
    return next(iter(module.named_parameters(recurse=False)))


_RMS_VARIANTS = [_RMSNormVariant(name, offset) for offset in (0.0, 1.0)
                 for name in ("cast_back", "mixed", "float32_product", "rms_norm_float32")]


class ThirdPartyRMSNormRule(LayerRule):
    """RMSNorm layers of other libraries (LlamaRMSNorm, T5LayerNorm, GemmaRMSNorm, ...): one weight of shape (d,),
    y = w * x_hat or (1 + w) * x_hat (Gemma), x_hat = x / sqrt(mean_d(x^2) + eps); dl_i/dw = sum over positions
    of g * x_hat. Matched by structure (class name, an ``eps`` or ``variance_epsilon``, a single (d,) parameter named
    ``weight``, or ``scale`` as in torchtune, no children); the first call of each instance picks the variant that
    reproduces its output (else the module goes to the per-module fallback)."""

    rows_as_positions = True
    parameter_names = frozenset({"weight", "scale"})

    _NAME = re.compile(r"rms_?norm|T5LayerNorm", re.IGNORECASE)

    def __init__(self):
        self._variant_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        own = dict(module.named_parameters(recurse=False))
        return (bool(cls._NAME.search(type(module).__name__)) and isinstance(cls._eps(module), float)
                and list(own) in (["weight"], ["scale"]) and next(iter(own.values())).dim() == 1
                and not any(True for _ in module.children()))

    @staticmethod
    def _eps(module: nn.Module) -> float | None:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        return float(eps) if isinstance(eps, (int, float)) else None

    def verify(self, module, x, output):
        rows, expected, eps = x[:VERIFY_ROWS], output[:VERIFY_ROWS], self._eps(module)
        weight = _rms_parameter(module)[1]
        if rows.shape[-1] != weight.shape[0]:
            return False
        candidates = [variant for variant in _RMS_VARIANTS
                      if variant.applies(weight) and close_values(variant.output(module, rows, eps), expected)]
        exact = [v for v in candidates if torch.equal(v.output(module, rows, eps), expected)]
        chosen = (exact or candidates or [None])[0]
        if chosen is not None:
            self._variant_of[module] = chosen
        return chosen is not None

    def per_example_grads(self, module, x, g, names):
        variant = self._variant_of[module]
        x_hat = variant.normalized(x, self._eps(module))
        product = compute_dtype(g).to(x_hat.dtype) * x_hat if variant.name == "float32_product" else \
            compute_dtype(g) * compute_dtype(x_hat)
        return {_rms_parameter(module)[0]: product.reshape(x.shape[0], -1, x.shape[-1]).sum(1)}


class ScaledEmbeddingRule(EmbeddingRule):
    """An nn.Embedding subclass whose forward multiplies the lookup by a constant ``embed_scale`` (HuggingFace's
    ``*ScaledWordEmbedding`` of BART, M2M100, Pegasus, Gemma 3 and others): the Embedding formula with the output
    gradient times the scale (in the weight's dtype, as the layer multiplies). Matched by structure and checked
    against the real output on each instance's first call."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        scale = getattr(module, "embed_scale", None)
        return (isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward
                and (isinstance(scale, (int, float)) or (isinstance(scale, Tensor) and scale.numel() == 1))
                and not any(True for _ in module.children()))

    @staticmethod
    def _scale(module: nn.Module) -> float | Tensor:
        """A Python number multiplies at full precision; a tensor (Gemma 3) in the weight's dtype, kept a 0-d tensor
        so that no call waits on the device for its value."""
        scale = module.embed_scale
        return scale.to(module.weight.dtype) if isinstance(scale, Tensor) else float(scale)

    def verify(self, module, x, output):
        rows = x[:VERIFY_ROWS]
        lookup = F.embedding(rows, module.weight, module.padding_idx)  # no max_norm: it renormalises in place
        return close_values(lookup * self._scale(module), output[:VERIFY_ROWS])

    def _indices_and_grads(self, module, x, g):
        indices, g = super()._indices_and_grads(module, x, g)
        return indices, g * self._scale(module)


def _one_argument(forward: Callable) -> bool:
    """Whether a module's ``forward`` takes one positional argument (no switch per call)."""
    try:
        arguments = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return len(arguments) == 1 and arguments[0].kind in (arguments[0].POSITIONAL_ONLY,
                                                        arguments[0].POSITIONAL_OR_KEYWORD)


class OverriddenForwardRule(LayerRule):
    """A subclass of a layer type with a rule that overrides ``forward`` but computes the same function (HF Falcon's
    ``FalconLinear``: x @ W.T + b, in two operations; the LayerNorm subclasses of many vision models): the base
    type's rule, checked against ``reference(module, x)`` (the base layer's functional form) on each instance's
    first call. A subclass that computes something else (ConvNeXt's channels-first LayerNorm) fails the check and
    goes to the per-module fallback."""

    parameter_names = frozenset({"weight", "bias"})

    def __init__(self, base: type, rule: LayerRule, reference: Callable[[nn.Module, Tensor], Tensor]):
        self.base, self.rule, self.reference = base, rule, reference
        self.rows_as_positions = rule.rows_as_positions

    def matches(self, module: nn.Module) -> bool:
        """A subclass with the base's weight and bias only, no buffers (a pruning mask) and a forward of one
        argument (no switch per call): its first call's check then holds for every call."""
        if not isinstance(module, self.base) or type(module).forward is self.base.forward:
            return False
        return (_one_argument(type(module).forward) and self._holds_only_its_own(module)
                and {name for name, _ in module.named_parameters(recurse=False)} <= {"weight", "bias"})

    def _holds_only_its_own(self, module: nn.Module) -> bool:
        """No children and no buffers."""
        return not any(True for _ in module.children()) and not any(True for _ in module.buffers())

    def unsupported_reason(self, module):
        return self.rule.unsupported_reason(module)

    recheck = True

    def verify(self, module, x, output):
        try:
            return close_values(self.reference(module, x[:VERIFY_ROWS]), output[:VERIFY_ROWS])
        except (RuntimeError, ValueError):   # not the base layer's shapes at all
            return False

    def reproduces(self, module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
        """The check of ``verify`` as a 0-d bool tensor, without waiting for the device: a subclass may change
        what it computes between calls (fake quantisation switched on after warm-up)."""
        rows, expected = x[:VERIFY_ROWS], output[:VERIFY_ROWS]
        reconstruction = self.reference(module, rows)
        if reconstruction.shape != expected.shape:
            return torch.zeros((), dtype=torch.bool, device=output.device)
        tolerance = rounding_tolerance(expected.dtype)
        finite = torch.isfinite(expected)   # an inf or NaN (a diverging step) is no change of what the layer computes
        scale = expected.abs().where(finite, 0)
        return ((reconstruction - expected).abs() <= tolerance * (scale + scale.max())).where(finite, True).all()

    def per_example_grads(self, module, x, g, names):
        return self.rule.per_example_grads(module, x, g, names)

    def per_example_sqnorms(self, module, x, g, names):
        return self.rule.per_example_sqnorms(module, x, g, names)

    def per_example_factors(self, module, x, g, names):
        return self.rule.per_example_factors(module, x, g, names)


_BATCH_NORM_BUFFERS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


class NormActivationRule(OverriddenForwardRule):
    """A normalisation layer that applies its own activation, y = act(drop(norm(x))), with ``drop`` and ``act``
    parameterless children (timm's ``BatchNormAct2d`` in eval mode, ``GroupNormAct``, ``LayerNormAct``): the norm's
    rule with the gradient at the norm's output, g_z = J_act(z)^T g for z = norm(x) recomputed from the kept input
    (one VJP of the elementwise activation). Checked against ``reference`` on every call, as the subclasses above.
    A child that may draw random numbers in train mode (a dropout, RReLU, an activation torch does not define)
    sends the layer to the per-module fallback, which replays the draws."""

    def __init__(self, base: type, rule: LayerRule, norm: Callable[[nn.Module, Tensor], Tensor],
                 buffers: frozenset = frozenset()):
        super().__init__(base, rule, lambda m, x: m.act(m.drop(norm(m, x))))
        self.norm, self.buffers = norm, buffers

    def _holds_only_its_own(self, module):
        children = dict(module.named_children())
        return (set(children) == {"drop", "act"}
                and not any(True for child in children.values() for _ in child.parameters())
                and not any(True for child in children.values() for _ in child.buffers())
                and {name for name, _ in module.named_buffers(recurse=False)} <= self.buffers)

    def unsupported_reason(self, module):
        random = next((child for child in (module.drop, module.act) if child.training and not (
            isinstance(child, nn.Identity) or (type(child).__module__ == nn.ReLU.__module__
                                               and not isinstance(child, nn.RReLU)))), None)
        if random is not None:
            return f"its {type(random).__name__} may draw random numbers in train mode"
        return self.rule.unsupported_reason(module)

    def _norm_output_grad(self, module: nn.Module, x: Tensor, g: Tensor) -> Tensor:
        with torch.enable_grad():
            z = self.norm(module, x.detach()).detach().requires_grad_()
            y = module.act(module.drop(z.clone()))   # clone: an in-place activation must not write into z
        return torch.autograd.grad(y, z, g)[0]

    def per_example_grads(self, module, x, g, names):
        return self.rule.per_example_grads(module, x, self._norm_output_grad(module, x, g), names)

    def per_example_sqnorms(self, module, x, g, names):
        return self.rule.per_example_sqnorms(module, x, self._norm_output_grad(module, x, g), names)

    def per_example_factors(self, module, x, g, names):
        return self.rule.per_example_factors(module, x, self._norm_output_grad(module, x, g), names)


class LowRankAdapterRule(OverriddenForwardRule):
    """litgpt's ``LoRALinear``: y = linear(x) + (drop(x) @ A^T @ B^T) * scaling, A (r, d_in) and B (d_out, r) the
    module's parameters and ``linear`` an nn.Linear child (measured by its own rule, frozen as a rule):
    dl_i/dB = scaling sum_t g_t (A x_t)^T and dl_i/dA = scaling sum_t (B^T g_t) x_t^T, as factors (ghost norms).
    Matched by structure (its ``lora_dropout`` a Dropout or ``lambda x: x``) and checked against the output on every
    call; a dropout in train mode, or another forward (its ``LoRAQKVLinear``), goes to the per-module fallback."""

    parameter_names = frozenset({"lora_A", "lora_B"})

    def __init__(self):
        super().__init__(nn.Module, RULES[nn.Linear], lambda m, x: F.linear(x, m.linear.weight, m.linear.bias) + (
            m.lora_dropout(x) @ m.lora_A.transpose(0, 1) @ m.lora_B.transpose(0, 1)) * m.scaling)

    def matches(self, module):
        own = dict(module.named_parameters(recurse=False))
        children = dict(module.named_children())
        return (set(own) == {"lora_A", "lora_B"} and own["lora_A"].dim() == own["lora_B"].dim() == 2
                and type(children.get("linear")) is nn.Linear and set(children) <= {"linear", "lora_dropout"}
                and isinstance(getattr(module, "scaling", None), (int, float))
                and (isinstance(module.lora_dropout, (nn.Dropout, nn.Identity)) or _returns_its_argument(
                    module.lora_dropout)))

    def unsupported_reason(self, module):
        drop = module.lora_dropout
        if isinstance(drop, nn.Module) and drop.training and not isinstance(drop, nn.Identity) and (
                not isinstance(drop, nn.Dropout) or drop.p > 0):
            return "its lora_dropout draws random numbers in train mode"
        return None

    def per_example_factors(self, module, x, g, names):
        x, g = compute_dtype(x), compute_dtype(g) * module.scaling
        a, g = x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
        factors = {}
        if "lora_B" in names:
            factors["lora_B"] = LinearFactors([(a @ module.lora_A.transpose(0, 1).to(a.dtype), g)])
        if "lora_A" in names:
            factors["lora_A"] = LinearFactors([(a, g @ module.lora_B.to(g.dtype))])
        return factors

    def per_example_grads(self, module, x, g, names):
        return {name: factors.grads().reshape(x.shape[0], *module.get_parameter(name).shape)
                for name, factors in self.per_example_factors(module, x, g, names).items()}

    def per_example_sqnorms(self, module, x, g, names):
        return {name: factors.sqnorms() for name, factors in self.per_example_factors(module, x, g, names).items()}


class CentredPatchConvRule(ConvRule):
    """The convolution rule on patches less their own mean: each example's kernel gradient less its mean per output
    channel, D_ic - mean(D_ic), without the cancellation of subtracting it after (images of raw pixel values)."""

    grouped_kernels = False

    @staticmethod
    def _patches(module: nn.Module, x: Tensor) -> Tensor:
        patches = ConvRule._patches(module, x)
        return patches - patches.mean(-1, keepdim=True)


class StandardisedConvRule(OverriddenForwardRule):
    """A convolution whose kernel is standardised per output channel before use (weight standardisation, Qiao et
    al. 2019: timm's ``StdConv2d`` of BiT; ``ScaledStdConv2d`` of NFNets, Brock et al. 2021, times its ``gain``
    and ``scale``): w_c = a_c s_c (v_c - mean(v_c)), s_c = 1 / sqrt(var(v_c) + eps), a_c = gain_c * scale (or 1),
    v the raw kernel, n its fan-in. With D_ic the per-example gradient of the used kernel's row c, D'_ic = D_ic -
    mean(D_ic) (``CentredPatchConvRule``) and w_hat_c = s_c (v_c - mean(v_c)), which has mean 0,

        dl_i/dv_c = a_c s_c [D'_ic - w_hat_c (w_hat_c . D'_ic) / n],
        |dl_i/dv_c|^2 = (a_c s_c)^2 [|D'_ic|^2 - (w_hat_c . D'_ic)^2 (2 / n - |w_hat_c|^2 / n^2)],
        dl_i/dgain_c = scale (w_hat_c . D'_ic),

    where sum_c (a_c s_c)^2 |D'_ic|^2 is the ghost norm on centred patches with g scaled per channel and w_hat_c .
    D'_ic is g times the centred patches projected on w_hat_c, summed over positions: no per-example kernel is
    materialised. Matched by structure and checked against the output on every call; another forward (timm's
    ``StdConv2dSame``, padding on the fly) goes to the per-module fallback."""

    parameter_names = frozenset({"weight", "bias", "gain"})

    def __init__(self):
        super().__init__(nn.modules.conv._ConvNd, CentredPatchConvRule(),
                         lambda m, x: m._conv_forward(x, self._standardised(m, m.weight)[0], m.bias))

    def matches(self, module):
        gain = getattr(module, "gain", None)
        return (isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode == "zeros"
                and type(module).forward not in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
                and _one_argument(type(module).forward) and isinstance(getattr(module, "eps", None), float)
                and {name for name, _ in module.named_parameters(recurse=False)} <= {"weight", "bias", "gain"}
                and self._holds_only_its_own(module)
                and (gain is None or (isinstance(getattr(module, "scale", None), float)
                                      and gain.numel() == module.out_channels)))

    @staticmethod
    def _standardised(module: nn.Module, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(the kernel used, w_hat (C, n), a_c s_c (C,)), from the raw ``weight``."""
        flat = weight.reshape(weight.shape[0], -1)
        mean, var = flat.mean(1, keepdim=True), flat.var(1, unbiased=False, keepdim=True)
        inverse_std = torch.rsqrt(var + module.eps)
        w_hat = (flat - mean) * inverse_std
        gain = getattr(module, "gain", None)
        a = torch.ones_like(inverse_std) if gain is None else gain.reshape(-1, 1).to(weight.dtype) * module.scale
        return (w_hat * a).reshape_as(weight), w_hat, (a * inverse_std).reshape(-1)

    def _per_chunk(self, module: nn.Module, x: Tensor, g: Tensor, w_hat: Tensor, a_s: Tensor | None) -> tuple:
        """(B, C) w_hat_c . D'_ic (g times the centred patches projected on w_hat_c, summed over positions) and, for
        ``a_s``, the (B,) ghost norms sum_c (a_c s_c)^2 |D'_ic|^2, from one build of each chunk's patches."""
        groups, channels = module.groups, module.out_channels
        kernels = w_hat.reshape(groups, channels // groups, -1)
        scales = None if a_s is None else a_s.reshape(1, groups, 1, channels // groups)
        dots, norms = [], []
        for xc, gc in self.rule._example_chunks(module, x, g):
            patches, grads = self.rule._patches(module, xc), self.rule._output_grads(module, gc)   # (b groups, L, .)
            projected = torch.bmm(patches, kernels.repeat(xc.shape[0], 1, 1).transpose(1, 2))
            dots.append((projected * grads).sum(1).reshape(xc.shape[0], channels))
            if scales is not None:
                scaled = (grads.reshape(xc.shape[0], groups, *grads.shape[1:]) * scales).flatten(0, 1)
                norms.append(position_weight_sqnorms(patches, scaled).view(xc.shape[0], -1).sum(1))
        return torch.cat(dots), None if scales is None else torch.cat(norms)

    def _parts(self, module: nn.Module, g: Tensor) -> tuple:
        """(g, w_hat, a s), in g's compute dtype."""
        g = compute_dtype(g)
        _, w_hat, a_s = self._standardised(module, module.weight.detach().to(g.dtype))
        return g, w_hat, a_s

    def per_example_sqnorms(self, module, x, g, names):
        g, w_hat, a_s = self._parts(module, g)
        sqnorms = self.rule.per_example_sqnorms(module, x, g, names & {"bias"})
        dots, centred = self._per_chunk(module, x, g, w_hat, a_s if "weight" in names else None)
        if "weight" in names:
            n = w_hat.shape[1]
            correction = a_s.square() * dots.square() * (2 / n - w_hat.square().sum(1) / n ** 2)
            sqnorms["weight"] = centred - correction.sum(1)
        if "gain" in names:
            sqnorms["gain"] = (module.scale * dots).square().sum(1)
        return sqnorms

    def per_example_grads(self, module, x, g, names):
        g, w_hat, a_s = self._parts(module, g)
        grads = self.rule.per_example_grads(module, x, g, names & {"bias"})
        if names & {"weight", "gain"}:
            centred = self.rule.per_example_grads(module, x, g, {"weight"})["weight"]
            u = centred.reshape(*centred.shape[:2], -1)                                  # (B, C, n): D'
            dots = (u * w_hat).sum(2)                                                    # w_hat_c . D'_ic
            if "weight" in names:
                u = u - w_hat * (dots / w_hat.shape[1]).unsqueeze(2)
                grads["weight"] = (u * a_s.view(1, -1, 1)).reshape_as(centred)
            if "gain" in names:
                grads["gain"] = (module.scale * dots).reshape(x.shape[0], *module.gain.shape)
        return grads

    def per_example_factors(self, module, x, g, names):
        return self.per_example_grads(module, x, g, names)


def _returns_its_argument(function: Callable) -> bool:
    """Whether ``function`` hands back what it is given (litgpt's ``lambda x: x`` in place of a dropout of rate 0)."""
    sentinel = object()
    try:
        return function(sentinel) is sentinel
    except Exception:   # noqa: BLE001 -- any other function fails on a plain object
        return False


def _layer_norm_output(module: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


STRUCTURAL_RULES: list = [
    TransposedLinearRule(), ThirdPartyRMSNormRule(), ScaledEmbeddingRule(),
    OverriddenForwardRule(nn.Linear, RULES[nn.Linear], lambda m, x: F.linear(x, m.weight, m.bias)),
    OverriddenForwardRule(nn.LayerNorm, RULES[nn.LayerNorm], _layer_norm_output),
    NormActivationRule(nn.modules.batchnorm._BatchNorm, _BATCH_NORM_RULE,
                       lambda m, x: F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps),
                       _BATCH_NORM_BUFFERS),
    NormActivationRule(nn.GroupNorm, RULES[nn.GroupNorm],
                       lambda m, x: F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)),
    NormActivationRule(nn.LayerNorm, RULES[nn.LayerNorm], _layer_norm_output),
    LowRankAdapterRule(), StandardisedConvRule(),
]


def register_rule(module_type: type, rule: LayerRule) -> None:
    """Measure every module of ``module_type`` (and of its subclasses that do not override ``forward``) by
    ``rule`` (see ``LayerRule`` for the contract); replaces the rule registered for that type before.

    For a layer y = x * w with w of shape (d,), dl_i/dw = sum over positions of g * x::

        class ScaleRule(LayerRule):
            def per_example_grads(self, module, x, g, names):
                return {"weight": (g * x).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}

        register_rule(Scale, ScaleRule())

    Without a rule such a layer is still measured exactly by the per-module fallback (backend "module"), at the
    cost of re-running it; a rule makes it as cheap as the layers above."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of torch.nn.Module, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"rule must be a LayerRule instance, got {type(rule).__name__}")
    RULES[module_type] = rule


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule of ``type(module)`` or of a base class whose ``forward`` it does not override; else a rule whose
    structure matches (third-party layers: ``STRUCTURAL_RULES``); None if none."""
    module_type = type(module)
    for base in module_type.__mro__:
        rule = RULES.get(base)
        if rule is not None:
            if module_type.forward is base.forward:
                return rule
            break
    for rule in STRUCTURAL_RULES:
        if rule.matches(module):
            return rule
    return None
