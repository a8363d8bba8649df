"""Per-example gradients of nn.MultiheadAttention from one re-run of the recorded call, at the cost of one
attention forward and backward instead of one per example.

The recorded call is re-run on the whole batch with the projections written out (Vaswani et al. 2017):
q = W_q x_q + b_q, k = W_k x_k + b_k, v = W_v x_v + b_v, c = softmax(q k^T / sqrt(d_head) + mask) v per head,
y = W_o c + b_o. One backward of the recorded output gradient g_y gives g_q, g_k, g_v, and each weight is a
Linear applied at every position, so for example i

    dl_i/dW_q = sum_t g_{q,i,t} x_{q,i,t}^T (same for k, v),   dl_i/dW_o = sum_t g_{y,i,t} c_{i,t}^T,
    biases: the sums over positions of the same gradients.

Covered: packed in_proj (query, key and value of the embedding size), with or without biases, key_padding_mask,
a 2-D attn_mask, is_causal, either layout, dropout 0 or eval mode, attention weights not differentiated. Other
configurations go to the generic per-module fallback.

First, without any re-run (``LinearCapture``): F.multi_head_attention_forward computes every projection with
torch.nn.functional's module-level ``linear``. While the module's own forward runs, that name is wrapped: each
call whose weight is one of the module's parameters, or a block of its rows, is recorded with its input and its
output's gradient is hooked (calls with any other weight pass through untouched). Those (input, output gradient)
pairs of the real pass are all the Linear formula needs, so ``captured_per_example_grads`` gives every projection's
per-example gradients with no second attention pass (any dropout, any mask, separate key/value sizes). It declines
(None: the re-run above) when a parameter is not covered or the layout does not match the module's own output
gradient. (A TorchFunctionMode cannot do this: F.multi_head_attention_forward is itself overridable, so a mode
sees that one call and not the projections inside it.) The wrapped name is process-wide while the call runs: another
thread calling F.linear meanwhile goes through the wrapper, which passes any weight not of this module through.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.per_example.factors import LinearFactors
from noisescale.per_example.used import used_parameter

__all__ = ["attention_supported", "attention_per_example_grads", "LinearCapture", "capturable",
           "captured_per_example_grads"]


def capturable(module: nn.Module) -> bool:
    """nn.MultiheadAttention running its own forward without parameters used outside F.linear (bias_k/bias_v)."""
    return type(module).forward is nn.MultiheadAttention.forward and module.bias_k is None


class LinearCapture:
    """Between ``start()`` and ``stop()`` (one call of the module's forward), records each call of
    torch.nn.functional's ``linear`` whose weight is one of the module's parameters, or a block of its rows (the
    packed in_proj split for cross-attention), as [weight name, first row, bias (name, first row) or None, input,
    [output gradient]], the gradient filled by a hook, whose handle goes to ``hooks`` (removed after the pass)."""

    def __init__(self, module: nn.Module, hooks: list):
        self._names = {id(p): name for name, p in module.named_parameters()}
        self.blocks: list[list] = []
        self._hooks = hooks
        self._original = self._wrapper = None

    def start(self, args: tuple = (), kwargs: dict | None = None) -> None:
        """Wrap F.linear until ``stop()`` (the call's arguments are not needed)."""
        self._original, self._wrapper = F.linear, self._linear   # one bound method, to recognise it in stop()
        F.linear = self._wrapper

    def stop(self) -> None:
        if self._original is not None and F.linear is self._wrapper:
            F.linear = self._original
        self._original = self._wrapper = None

    def _locate(self, t: Tensor | None) -> tuple[str, int] | None:
        if t is None:
            return None
        if id(t) in self._names:
            return self._names[id(t)], 0
        base = t._base
        if base is None or id(base) not in self._names or t.stride() != base.stride() or t.shape[1:] != base.shape[1:]:
            return None
        offset = t.storage_offset() - base.storage_offset()
        return (self._names[id(base)], offset // base.stride(0)) if offset % base.stride(0) == 0 else None

    def _linear(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        output = self._original(input, weight, bias)
        located = self._locate(weight)
        if located is not None and output.requires_grad:
            block = [*located, self._locate(bias), input.detach(), [None]]
            self.blocks.append(block)
            self._hooks.append(output.register_hook(partial(_keep_first, block[4])))
        return output


def _keep_first(holder: list, grad: Tensor) -> None:
    holder[0] = grad


def _examples_first(t: Tensor, batch: int) -> Tensor | None:
    """Inside nn.MultiheadAttention's forward tensors are sequence-first, (T, B, E), or flattened t-major,
    (T * B, E); returns (B, T, E), or None for another shape."""
    if t.dim() == 3 and t.shape[1] == batch:
        return t.transpose(0, 1)
    if t.dim() == 2 and t.shape[0] % batch == 0:
        return t.view(-1, batch, t.shape[1]).transpose(0, 1)
    return None


def _in_row_order(pieces: list[tuple[int, int, object]], rows: int) -> list | None:
    """The values of the pieces (first row, row count, value) in row order when they cover rows 0..rows-1 exactly
    once, else None."""
    start, ordered = 0, []
    for first, count, value in sorted(pieces, key=lambda piece: piece[0]):
        if first != start:
            return None
        start += count
        ordered.append(value)
    return ordered if start == rows else None


def captured_per_example_grads(module: nn.Module, blocks: list[list], output_grad: Tensor, names: list[str],
                               batch: int) -> dict[str, Tensor | LinearFactors] | None:
    """Per-example gradients (weights as LinearFactors) of ``names`` from the projections ``LinearCapture``
    recorded in the real pass; None when they do not cover every name or the layout check fails."""
    pieces: dict[str, list[tuple[int, int, object]]] = {}   # name -> (first row, rows, (a, g) or bias gradients)
    out_proj_grad = None
    for weight_name, first_row, bias, x, (grad,) in blocks:
        a = _examples_first(x, batch)
        g = None if grad is None else _examples_first(grad, batch)
        if a is None or g is None:
            return None
        pieces.setdefault(weight_name, []).append((first_row, g.shape[-1], (a, g)))
        if bias is not None:
            pieces.setdefault(bias[0], []).append((bias[1], g.shape[-1], g.sum(1)))
        if weight_name == "out_proj.weight":
            out_proj_grad = g
    expected = output_grad if module.batch_first else output_grad.transpose(0, 1)
    if out_proj_grad is None or not torch.equal(out_proj_grad, expected):
        return None   # not the layout this code knows: re-run instead
    rows = {name: p.shape[0] for name, p in module.named_parameters()}
    result: dict[str, Tensor | LinearFactors] = {}
    for name in names:
        ordered = _in_row_order(pieces.get(name, []), rows[name])
        if ordered is None:
            return None
        result[name] = LinearFactors(ordered) if isinstance(ordered[0], tuple) else torch.cat(ordered, 1)
    return result


def attention_supported(module: nn.Module, arguments: dict, grads: list) -> bool:
    mask = arguments.get("attn_mask")
    return (type(module).forward is nn.MultiheadAttention.forward and module._qkv_same_embed_dim
            and module.bias_k is None and not module.add_zero_attn
            and (module.dropout == 0 or not module.training)
            and (mask is None or mask.dim() == 2) and all(g is None for g in grads[1:]))


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not attended) as -inf additions, a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def attention_per_example_grads(module: nn.MultiheadAttention, arguments: dict, grads: list,
                                names: list[str], copies: dict[str, Tensor] | None = None
                                ) -> dict[str, Tensor | LinearFactors]:
    """(B, *shape) per-example gradients (weights as LinearFactors) of ``names`` (in_proj_weight, in_proj_bias,
    out_proj.weight, out_proj.bias) from the call's ``arguments`` and the gradient of its attention output,
    ``grads[0]``; ``copies``: the parameters the call used, under FSDP (``used_parameter``)."""
    batch_first = module.batch_first

    def examples_first(t: Tensor) -> Tensor:
        return t.detach() if batch_first else t.detach().transpose(0, 1)

    query, key, value = (examples_first(arguments[name]) for name in ("query", "key", "value"))
    g_y = examples_first(grads[0])
    batch, length, embed = query.shape
    heads, head_dim = module.num_heads, embed // module.num_heads
    w_q, w_k, w_v = used_parameter(module, "in_proj_weight", copies).chunk(3)
    in_bias = used_parameter(module, "in_proj_bias", copies)
    b_q, b_k, b_v = (None, None, None) if in_bias is None else in_bias.chunk(3)
    bias = _additive(arguments.get("attn_mask"), query.dtype)
    padding = _additive(arguments.get("key_padding_mask"), query.dtype)
    if bias is None and arguments.get("is_causal", False):
        bias = torch.full((length, key.shape[1]), float("-inf"), dtype=query.dtype, device=query.device).triu(1)
    with torch.enable_grad():
        q = F.linear(query, w_q, b_q).requires_grad_()
        k = F.linear(key, w_k, b_k).requires_grad_()
        v = F.linear(value, w_v, b_v).requires_grad_()

        def heads_first(t: Tensor) -> Tensor:
            return t.view(batch, t.shape[1], heads, head_dim).transpose(1, 2)

        scores = heads_first(q) @ heads_first(k).transpose(-2, -1) / math.sqrt(head_dim)
        if bias is not None:
            scores = scores + bias
        if padding is not None:
            scores = scores + padding.view(batch, 1, 1, -1)
        context = (scores.softmax(-1) @ heads_first(v)).transpose(1, 2).reshape(batch, length, embed)
        g_q, g_k, g_v = torch.autograd.grad(context, [q, k, v], g_y @ used_parameter(module, "out_proj.weight", copies))
    result: dict[str, Tensor | LinearFactors] = {}
    if "in_proj_weight" in names:
        result["in_proj_weight"] = LinearFactors([(query, g_q), (key, g_k), (value, g_v)])
    if "in_proj_bias" in names:
        result["in_proj_bias"] = torch.cat([g_q.sum(1), g_k.sum(1), g_v.sum(1)], 1)
    if "out_proj.weight" in names:
        result["out_proj.weight"] = LinearFactors([(context.detach(), g_y)])
    if "out_proj.bias" in names:
        result["out_proj.bias"] = g_y.sum(1)
    return result
