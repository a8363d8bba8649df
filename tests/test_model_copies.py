"""A copy of a model being measured (``torch.save(model)``, ``copy.deepcopy(model)`` for an EMA model): the
hooks it carries do nothing, and the monitored model goes on as before. Pickling raised (the hooks held the engine,
with its weak references), and a deep copy carried a copy of the engine."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

from noisescale.per_example import PerExampleGradNorms, per_example_sqnorms


class Net(nn.Module):
    """Rule layers, an nn.MultiheadAttention (the per-module fallback) and a parameter read directly."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head((h * self.gate).mean(1))


def _loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def _grads(model, inputs, targets):
    model.zero_grad(set_to_none=True)
    _loss(model(inputs), targets).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_saved_and_deep_copied_models_are_plain_and_the_measurement_goes_on():
    torch.manual_seed(0)
    model = Net().double()
    inputs, targets = torch.randn(8, 4, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    plain = copy.deepcopy(model)   # before any hook
    norms = PerExampleGradNorms(model, _loss)
    norms(inputs, targets)

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [torch.load(buffer, weights_only=False), copy.deepcopy(model)]
    expected = _grads(plain, inputs, targets)
    for twin in copies:
        for got, want in zip(_grads(twin, inputs, targets), expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)

    model.zero_grad(set_to_none=True)
    result = norms(inputs, targets)   # the measured model, as before the copies
    torch.testing.assert_close(result.sqnorms, per_example_sqnorms(plain, _loss, inputs, targets).sqnorms,
                               rtol=1e-10, atol=0)
    assert set(result.backend_of.values()) == {"ghost", "module"}
    norms.close()


def test_a_copy_taken_in_the_middle_of_an_observed_step_is_plain_and_the_step_is_measured():
    """An EMA or checkpoint callback copying the model between the forward and the backward of an observed step
    (Lightning's hooks run there): deepcopy raised (the outputs' hooks held autograd nodes) and torch.save raised
    (a local function), and a copy taken before the forward carried the original's hooks. Reference: the loop."""
    torch.manual_seed(0)
    model = Net().double()
    inputs, targets = torch.randn(8, 4, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    plain = copy.deepcopy(model)
    norms = PerExampleGradNorms(model, _loss)
    with norms.observe(len(inputs)) as observed:
        before = copy.deepcopy(model)
        outputs = model(inputs)
        after = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        _loss(outputs, targets).mean().backward()
    torch.testing.assert_close(observed.sqnorms, per_example_sqnorms(plain, _loss, inputs, targets).sqnorms,
                               rtol=1e-10, atol=0)
    buffer.seek(0)
    expected = _grads(plain, inputs, targets)
    for twin in (before, after, torch.load(buffer, weights_only=False)):
        for got, want in zip(_grads(twin, inputs, targets), expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    norms.close()
