"""Per-example gradients of nn.RNN / nn.LSTM / nn.GRU from one re-run of the recorded call, instead of one run per
example.

Every step of a layer holds two affine maps, u_t = W_ih x_t + b_ih and v_t = W_hh h_{t-1} + b_hh, and for each
example i (as for a Linear applied at every step):

    dl_i/dW_ih = sum_t du_{i,t} x_{i,t}^T,   dl_i/dW_hh = sum_t dv_{i,t} h_{i,t-1}^T,   biases: sum_t du / dv.

The gradients du_t come from torch's own fused recurrent kernel, re-run one layer and direction at a time on
u itself as its input with an identity input weight (u I = u exactly), so that the gradient with respect to that
input is du: one backward of the recorded output gradients gives du_t for every step and layer, at the speed of
the kernel rather than of a loop over steps. The cells (gates in PyTorch's order) give dv from du:
RNN h' = act(u + v) and LSTM (i, f, g, o) act on u + v, so dv = du; GRU (r, z, n) has n = tanh(u_n + r v_n),
so dv = (du_r, du_z, r du_n), with r recomputed from the kept states. Stacked layers feed each other, a reverse
direction runs on the reversed sequence. Not covered (the module goes to the generic fallback): proj_size > 0,
dropout between layers in train mode, weights computed by a forward pre-hook (the older
``torch.nn.utils.weight_norm`` and ``spectral_norm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.per_example.factors import LinearFactors
from noisescale.per_example.used import used_parameter

__all__ = ["unrolled_supported", "unrolled_per_example_grads", "recurrent_weights"]


def unrolled_supported(module: nn.Module) -> bool:
    """Whether the re-run covers ``module``: torch's own RNN forward and modes, and parameters of its own only
    among its weights' names (the hook-based ``torch.nn.utils.weight_norm`` registers ``weight_hh_l0_g`` and
    ``_v`` and computes the weight before each call, which the re-run would leave at zero norms, silently)."""
    return (any(type(module).forward is base.forward for base in (nn.RNN, nn.LSTM, nn.GRU))
            and module.mode in ("RNN_TANH", "RNN_RELU", "LSTM", "GRU") and getattr(module, "proj_size", 0) == 0
            and not (module.training and module.dropout > 0 and module.num_layers > 1)
            and set(module._parameters) <= set(module._flat_weights_names))


_KERNELS = {"LSTM": torch._VF.lstm, "GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh,
            "RNN_RELU": torch._VF.rnn_relu}


def _one_layer(mode: str, u: Tensor, w_hh: Tensor, b_hh: Tensor | None, h: Tensor, c: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Torch's fused kernel for one unidirectional batch-first layer on input u (B, T, G) with input weight I:
    (outputs (B, T, H), h_n (B, H), c_n or None)."""
    identity = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    weights = [identity, w_hh] if b_hh is None else [identity, w_hh, torch.zeros_like(b_hh), b_hh]
    hx = (h.unsqueeze(0), c.unsqueeze(0)) if mode == "LSTM" else h.unsqueeze(0)
    outputs, *states = _KERNELS[mode](u, hx, weights, b_hh is not None, 1, 0.0, False, False, True)
    if mode == "LSTM":
        return outputs, states[0][0], states[1][0]
    return outputs, states[0][0], None


def recurrent_weights(module: nn.Module) -> dict[str, Tensor] | None:
    """An RNN's weights by name as its latest call ran with them, read in its forward hook: torch's RNN forward
    keeps them in ``_flat_weights``. For a parametrized weight that is the parametrization's output of that call;
    reading the attribute again in the re-run evaluated the parametrization once more (a spectral norm's power
    iteration in train mode then moved its buffers off a plain step's, and gave another weight than the call's), and
    reading ``_flat_weights`` in the backward gave an RNN called twice the second call's weights for both. None for
    other modules."""
    if not isinstance(module, nn.RNNBase):
        return None
    return dict(zip(module._flat_weights_names, module._flat_weights))


def unrolled_per_example_grads(module: nn.RNNBase, arguments: dict, grads: list[Tensor | None],
                               names: list[str], copies: dict[str, Tensor] | None = None
                               ) -> dict[str, Tensor | LinearFactors]:
    """(B, *shape) per-example gradients (weights as LinearFactors) of ``names`` from the call's ``arguments``
    (input, hx) and the output gradients ``grads`` (output, h_n[, c_n]; None where no gradient arrived), in the
    module's own layouts; ``copies``: the parameters the call used (under FSDP; else ``recurrent_weights``)."""
    x = arguments["input"].detach()
    x = x if module.batch_first else x.transpose(0, 1)                       # (B, T, H_in)
    batch, length = x.shape[:2]
    directions = 2 if module.bidirectional else 1
    hx = arguments.get("hx")
    zeros = x.new_zeros(module.num_layers * directions, batch, module.hidden_size)
    if module.mode == "LSTM":
        h0, c0 = (zeros, zeros) if hx is None else (hx[0].detach(), hx[1].detach())
    else:
        h0, c0 = (zeros if hx is None else hx.detach()), None
    # leaves that require grad, so that every u is a node of the graph whose gradient can be asked for
    x, h0 = x.detach().requires_grad_(), h0.detach().clone().requires_grad_()
    c0 = None if c0 is None else c0.detach().clone().requires_grad_()
    kept: dict[str, tuple] = {}   # suffix -> (u (B, T, G), the layer's input, h_{t-1} (B, T, H), W_hh, b_hh)
    with torch.enable_grad():
        layer_input, last_h, last_c = x, [], []
        for layer in range(module.num_layers):
            direction_outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh = (used_parameter(module, f"weight_{kind}{suffix}", copies) for kind in ("ih", "hh"))
                b_ih, b_hh = (used_parameter(module, f"bias_{kind}{suffix}", copies) for kind in ("ih", "hh")) \
                    if module.bias else (None, None)
                sequence = layer_input.flip(1) if direction else layer_input
                u = F.linear(sequence, w_ih, b_ih)
                index = layer * directions + direction
                outputs, h, c = _one_layer(module.mode, u, w_hh, b_hh, h0[index], None if c0 is None else c0[index])
                direction_outputs.append(outputs.flip(1) if direction else outputs)
                last_h.append(h)
                last_c.append(c)
                previous = torch.cat([h0[index].unsqueeze(1), outputs[:, :-1]], 1)
                kept[suffix] = (u, sequence, previous, w_hh, b_hh)
            layer_input = torch.cat(direction_outputs, -1) if directions == 2 else direction_outputs[0]
        produced = [layer_input if module.batch_first else layer_input.transpose(0, 1), torch.stack(last_h)]
        if module.mode == "LSTM":
            produced.append(torch.stack(last_c))
        pairs = [(out, g) for out, g in zip(produced, grads) if g is not None]
        found = torch.autograd.grad([p for p, _ in pairs], [u for u, *_ in kept.values()], [g for _, g in pairs],
                                    allow_unused=True)
    result: dict[str, Tensor | LinearFactors] = {}
    for (suffix, (u, sequence, previous, w_hh, b_hh)), du in zip(kept.items(), found):
        du = torch.zeros_like(u) if du is None else du
        previous = previous.detach()
        dv = du
        if module.mode == "GRU":
            du_r, du_z, du_n = du.chunk(3, dim=-1)
            reset = torch.sigmoid(u.detach().chunk(3, dim=-1)[0] + F.linear(previous, w_hh.chunk(3)[0],
                                                                            None if b_hh is None else b_hh.chunk(3)[0]))
            dv = torch.cat([du_r, du_z, reset * du_n], -1)
        for kind, d_affine, a in (("ih", du, sequence.detach()), ("hh", dv, previous)):
            if f"weight_{kind}{suffix}" in names:
                result[f"weight_{kind}{suffix}"] = LinearFactors([(a, d_affine)])
            if f"bias_{kind}{suffix}" in names:
                result[f"bias_{kind}{suffix}"] = d_affine.sum(1)
    return result
