"""Patterns of LLM libraries (torchtune, x-transformers) that went to a slower path: exact against the loop and
measured by the cheap path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from noisescale.per_example import PerExampleGradNorms
from tests.test_parameter_uses import counted_reruns
from tests.test_per_example import naive_per_example

B, T, D = 5, 6, 8


class ScaleRMSNorm(nn.Module):
    """torchtune.modules.RMSNorm: its parameter is ``scale``, the norm runs in float32 by F.rms_norm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.normalized_shape, self.eps = (dim,), eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), normalized_shape=self.normalized_shape, weight=self.scale,
                          eps=self.eps).to(x.dtype)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(D, D), ScaleRMSNorm(D), nn.Linear(D, 3)

    def forward(self, x):
        return self.out(self.norm(self.inp(x)))


def sequence_mse(outputs, targets):
    return ((outputs - targets) ** 2).mean(dim=(1, 2))


def test_an_rms_norm_whose_weight_is_named_scale_has_the_ghost_rule():
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.norm.scale.normal_()
    x, y = torch.randn(B, T, D), torch.randn(B, T, 3)
    expected = naive_per_example(model, sequence_mse, x, y)
    result = PerExampleGradNorms(model, sequence_mse, by_parameter=True)(x, y)
    assert result.backend_of["norm.scale"] == "ghost"
    for name, values in expected.items():   # float32 throughout: float32's rounding
        torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-5, atol=1e-12, msg=name)


class MemoryTokens(nn.Module):
    """x-transformers' memory tokens: a parameter repeated to the batch, its shape read (einops.pack), reshaped
    to (b, -1, d) and packed before the sequence."""

    def __init__(self):
        super().__init__()
        self.memory = nn.Parameter(torch.randn(2, D))
        self.body = nn.Linear(D, D)

    def forward(self, x):
        mem = self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)
        shapes = [mem.shape, x.shape]   # einops.pack reads the shapes of what it packs
        assert shapes[0][0] == shapes[1][0]
        h = torch.cat([mem.reshape(x.shape[0], -1, D), x.reshape(x.shape[0], -1, D)], dim=1)
        return self.body(h)[:, 2:]


def test_a_parameter_expanded_to_the_batch_whose_shape_is_read_is_captured_not_re_run(monkeypatch):
    torch.manual_seed(0)
    model = MemoryTokens().double()
    x, y = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    expected = naive_per_example(model, sequence_mse, x, y)
    norms = PerExampleGradNorms(model, sequence_mse, by_parameter=True)
    norms(x, y)   # the first capture is confirmed by a re-run
    reruns = counted_reruns(monkeypatch)
    result = norms(x, y)
    assert not reruns
    assert result.backend_of["memory"] == "module"
    for name, values in expected.items():
        torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-9, atol=1e-15, msg=name)
