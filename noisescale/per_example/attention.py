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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.per_example.factors import LinearFactors

__all__ = ["attention_supported", "attention_per_example_grads"]


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
                                names: list[str]) -> dict[str, Tensor | LinearFactors]:
    """(B, *shape) per-example gradients (weights as LinearFactors) of ``names`` (in_proj_weight, in_proj_bias,
    out_proj.weight, out_proj.bias) from the call's ``arguments`` and the gradient of its attention output,
    ``grads[0]``."""
    batch_first = module.batch_first

    def examples_first(t: Tensor) -> Tensor:
        return t.detach() if batch_first else t.detach().transpose(0, 1)

    query, key, value = (examples_first(arguments[name]) for name in ("query", "key", "value"))
    g_y = examples_first(grads[0])
    batch, length, embed = query.shape
    heads, head_dim = module.num_heads, embed // module.num_heads
    w_q, w_k, w_v = module.in_proj_weight.detach().chunk(3)
    b_q, b_k, b_v = (None, None, None) if module.in_proj_bias is None else module.in_proj_bias.detach().chunk(3)
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
        g_q, g_k, g_v = torch.autograd.grad(context, [q, k, v], g_y @ module.out_proj.weight.detach())
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
