"""Per-example gradients of nn.RNN / nn.LSTM / nn.GRU from one unrolled re-run, instead of one run per example.

The fused kernels cannot be vmapped, so the per-module fallback would run the layer once per example. Here the
recorded call is re-run once on the whole batch, unrolled in time with the cell's own equations (PyTorch's gate
order and formulas), keeping the two affine maps of every step, u_t = W_ih x_t + b_ih and v_t = W_hh h_{t-1} + b_hh.
One backward of the recorded output gradients gives du_t/dv_t, and then, for each example i (as for a Linear
applied at every step):

    dl_i/dW_ih = sum_t du_{i,t} x_{i,t}^T,   dl_i/dW_hh = sum_t dv_{i,t} h_{i,t-1}^T,   biases: sum_t du / dv.

Cells (gates in PyTorch's order):  RNN h' = act(u + v);  LSTM (i, f, g, o): c' = f c + i g, h' = o tanh(c');
GRU (r, z, n): n = tanh(u_n + r v_n), h' = (1 - z) n + z h. Layers are stacked, a reverse direction runs on the
reversed sequence. Not covered (the module goes to the generic fallback): proj_size > 0, dropout between layers
in train mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.per_example.layers import LinearFactors

__all__ = ["unrolled_supported", "unrolled_per_example_grads"]


def unrolled_supported(module: nn.Module) -> bool:
    return (any(type(module).forward is base.forward for base in (nn.RNN, nn.LSTM, nn.GRU))
            and module.mode in ("RNN_TANH", "RNN_RELU", "LSTM", "GRU") and getattr(module, "proj_size", 0) == 0
            and not (module.training and module.dropout > 0 and module.num_layers > 1))


def _cell(mode: str, u: Tensor, v: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if mode == "LSTM":
        i, f, g, o = (u + v).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        u_r, u_z, u_n = u.chunk(3, dim=-1)
        v_r, v_z, v_n = v.chunk(3, dim=-1)
        r, z = torch.sigmoid(u_r + v_r), torch.sigmoid(u_z + v_z)
        n = torch.tanh(u_n + r * v_n)
        return (1 - z) * n + z * h, None
    return (torch.tanh(u + v) if mode == "RNN_TANH" else torch.relu(u + v)), None


def unrolled_per_example_grads(module: nn.RNNBase, arguments: dict, grads: list[Tensor | None],
                               names: list[str]) -> dict[str, Tensor | LinearFactors]:
    """(B, *shape) per-example gradients (weights as LinearFactors) of ``names`` from the call's ``arguments``
    (input, hx) and the output gradients ``grads`` (output, h_n[, c_n]; None where no gradient arrived), in the
    module's own layouts."""
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
    # leaves that require grad, so that every u_t and v_t is a node of the graph whose gradient can be asked for
    x, h0 = x.detach().requires_grad_(), h0.detach().clone().requires_grad_()
    c0 = None if c0 is None else c0.detach().clone().requires_grad_()
    kept: dict[str, tuple[Tensor, Tensor]] = {}   # parameter suffix -> (affine outputs (B, T, G), their inputs)
    with torch.enable_grad():
        layer_input, last_h, last_c = x, [], []
        for layer in range(module.num_layers):
            direction_outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh = getattr(module, "weight_ih" + suffix), getattr(module, "weight_hh" + suffix)
                b_ih, b_hh = (getattr(module, "bias_ih" + suffix), getattr(module, "bias_hh" + suffix)) \
                    if module.bias else (None, None)
                sequence = layer_input.flip(1) if direction else layer_input
                u = F.linear(sequence, w_ih.detach(), None if b_ih is None else b_ih.detach())
                index = layer * directions + direction
                h, c = h0[index], None if c0 is None else c0[index]
                states, vs, previous = [], [], []
                for t in range(length):
                    previous.append(h)
                    v = F.linear(h, w_hh.detach(), None if b_hh is None else b_hh.detach())
                    vs.append(v)
                    h, c = _cell(module.mode, u[:, t], v, h, c)
                    states.append(h)
                outputs = torch.stack(states, 1)
                direction_outputs.append(outputs.flip(1) if direction else outputs)
                last_h.append(h)
                last_c.append(c)
                kept["ih" + suffix] = (u, sequence)
                kept["hh" + suffix] = (vs, previous)
            layer_input = torch.cat(direction_outputs, -1) if directions == 2 else direction_outputs[0]
        produced = [layer_input if module.batch_first else layer_input.transpose(0, 1), torch.stack(last_h)]
        if module.mode == "LSTM":
            produced.append(torch.stack(last_c))
        pairs = [(out, g) for out, g in zip(produced, grads) if g is not None]
        targets = []
        for key, (affine, _) in kept.items():
            targets.extend([affine] if key.startswith("ih") else affine)
        found = torch.autograd.grad([p for p, _ in pairs], targets, [g for _, g in pairs], allow_unused=True)
    result: dict[str, Tensor | LinearFactors] = {}
    position = 0
    for key, (affine, inputs) in kept.items():
        if key.startswith("ih"):
            d_affine, position = found[position], position + 1
            a = inputs
        else:
            d_affine = torch.stack([g if g is not None else torch.zeros_like(v) for g, v in
                                    zip(found[position:position + length], affine)], 1)
            position += length
            a = torch.stack(inputs, 1)
        if d_affine is None:
            d_affine = torch.zeros_like(affine)
        kind, suffix = key[:2], key[2:]
        if f"weight_{kind}{suffix}" in names:
            result[f"weight_{kind}{suffix}"] = LinearFactors([(a.detach(), d_affine)])
        if f"bias_{kind}{suffix}" in names:
            result[f"bias_{kind}{suffix}"] = d_affine.sum(1)
    return result
