"""Per-example gradients of HuggingFace's mixture-of-experts layers from one re-run on the whole batch, instead of
one run per example.

transformers' experts modules (``use_experts_implementation``: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and the other
models that decorate their experts with it) hold every expert's weights in 3D tensors, W_up (E, R, C) as
``gate_up_proj`` (or ``up_proj`` without a gate) and W_down (E, C, I), and take N token rows x_n (the B examples'
in blocks of N / B), the experts ``index[n, j]`` each token is routed to and their weights ``w[n, j]``. Whatever
implementation runs the layer (an eager loop over experts, ``grouped_mm``, ``batched_mm``), each pair (n, j) with
e = index[n, j] computes

    u = W_up[e] x_n,   h = gate(u) (the layer's own ``_apply_gate``: act(u_gate) * u_up; act(u) without a gate),
    o = W_down[e] h,   out_n = sum_j w[n, j] o,

so that, with g_n the output gradient, dl/do = w[n, j] g_n, dl/dh = W_down[e]^T dl/do and dl/du is the gate's vjp
of dl/dh. Example i's gradient of W_down[e] is sum over its pairs routed to e of (dl/do) h^T, that of W_up[e] the
sum of (dl/du) x_n^T: a Linear per expert over the example's pairs routed to it. They are kept as factors
(``LinearFactors``, expert e's block at rows e R of the weight flattened to (E R, C)), whose norms take the ghost or
the materialised form per expert; the biases' (``has_bias``) are summed per expert. Cost: the up projection, the gate
and the down projection's input gradient once more for the batch. Not covered (the generic fallback runs): a norm
after each expert (``has_post_expert_norm``), expert parallelism, other parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import vjp

from noisescale.per_example.factors import LinearFactors, full_precision
from noisescale.per_example.padding import Padding, bounds
from noisescale.per_example.used import used_parameter

__all__ = ["experts_supported", "experts_per_example_grads"]


def _up_name(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def experts_supported(module: nn.Module, inputs: list, grads: list, names: list[str], rows: int) -> bool:
    """Whether ``module`` is a transformers experts layer this path covers, called on ``rows`` token rows (the
    examples' blocks) with ``inputs`` (hidden states, expert indices, expert weights: its forward's first three
    arguments) and one output, for parameters ``names``."""
    if not all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm",
                                                  "num_experts")):
        return False
    up = _up_name(module)
    allowed = {up, "down_proj"} | ({f"{up}_bias", "down_proj_bias"} if module.has_bias else set())
    return (not module.has_post_expert_norm and not getattr(module, "_is_expert_parallel", False)
            and set(names) <= allowed and len(inputs) == 3 and len(grads) == 1
            and all(isinstance(t, Tensor) for t in inputs) and inputs[0].dim() == 2 and inputs[0].shape[0] == rows
            and inputs[1].dim() == 2 and inputs[1].shape == inputs[2].shape and inputs[1].shape[0] == rows
            and isinstance(getattr(module, up, None), Tensor) and getattr(module, up).dim() == 3)


def experts_per_example_grads(module: nn.Module, inputs: list[Tensor], grads: list[Tensor | None], names: list[str],
                              batch: int, copies: dict[str, Tensor] | None = None
                              ) -> dict[str, Tensor | LinearFactors]:
    """Per-example gradients of ``names`` (3D weights as ``LinearFactors`` over the weight flattened to (E R, C),
    biases (B, E, R)) from the call's ``inputs`` (hidden states (N, C), indices and weights (N, k)), its output
    gradient ``grads[0]`` (N, C) and the B examples' rows in N / B blocks; ``copies``: the parameters the call used,
    under FSDP (``used_parameter``)."""
    x, index, weights = (t.detach() for t in inputs)
    g = grads[0]
    if g is None:
        return {}
    if getattr(getattr(module, "config", None), "_experts_implementation", None) == "grouped_mm":
        dtype = used_parameter(module, _up_name(module), copies).dtype
        with full_precision():   # grouped_mm is not autocast: it computes in the weights' dtype, and so does this
            return _per_example_grads(module, x.to(dtype), index, weights, g.to(dtype), names, batch, copies)
    return _per_example_grads(module, x, index, weights, g, names, batch, copies)


def _per_example_grads(module: nn.Module, x: Tensor, index: Tensor, weights: Tensor, g: Tensor, names: list[str],
                       batch: int, copies: dict[str, Tensor] | None) -> dict[str, Tensor | LinearFactors]:
    up_name = _up_name(module)
    w_up, w_down = used_parameter(module, up_name, copies), used_parameter(module, "down_proj", copies)
    b_up = used_parameter(module, f"{up_name}_bias", copies) if module.has_bias else None
    experts, per = w_up.shape[0], x.shape[0] // batch
    # the (token, expert) pairs sorted by expert, then token (so by example): a sentinel index >= E routes nowhere
    pair_expert = index.reshape(-1)
    order = torch.argsort(pair_expert, stable=True)
    order = order[pair_expert[order] < experts]
    expert = pair_expert[order]
    tokens = order // index.shape[1]
    counts = torch.diff(bounds(expert, experts)).tolist()
    x_p = x[tokens]
    u = torch.cat([_product(module, rows, w_up[e]) + (0 if b_up is None else b_up[e])
                   for e, rows in enumerate(x_p.split(counts))])
    h, gate_vjp = vjp(module._apply_gate if module.has_gate else module.act_fn, u)
    d_o = g[tokens] * weights.reshape(-1)[order].unsqueeze(-1).to(g.dtype)
    d_h = torch.cat([_product(module, rows, w_down[e], transpose=True) for e, rows in enumerate(d_o.split(counts))])
    (d_u,) = gate_vjp(d_h.to(h.dtype))
    padding = Padding(expert, tokens // per, experts, batch)
    x_e, h_e, d_u_e, d_o_e = (padding.blocks(t) for t in (x_p, h, d_u, d_o))
    pairs = {up_name: list(zip(x_e, d_u_e)), "down_proj": list(zip(h_e, d_o_e))}
    result = {}
    for name in names:
        weight = name.removesuffix("_bias")
        if name != weight:
            result[name] = torch.stack([grad.sum(1) for _, grad in pairs[weight]], 1)   # (B, E, R)
        else:   # expert e's gradient sum_t g_t a_t^T: rows e R of the weight as (E R, C); (E C, R) transposed
            result[name] = LinearFactors([(g_, a) if module.is_transposed else (a, g_) for a, g_ in pairs[weight]])
    return result


def _product(module: nn.Module, rows: Tensor, weight: Tensor, transpose: bool = False) -> Tensor:
    """rows W^T for an expert's weight W (R, C) as stored, rows W where ``is_transposed`` (C, R); with ``transpose``
    the product with the other side (an input gradient: rows W, or rows W^T)."""
    return rows @ weight if module.is_transposed != transpose else rows @ weight.T
