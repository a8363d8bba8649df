"""A submodule registered under two names (``self.a = self.b = block``): every pass that re-runs the model through
torch.func's functional_call must leave the model's own parameters in place (torch 2.13 restores them in the wrong
order there and the model kept a detached copy: p.grad stayed None after the next backward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisescale.hessian import hessian_noise_scale, hutchinson_trace
from noisescale.per_example import per_example_sqnorms
from noisescale.sharpness import epsilon_sharpness


class Scaled(nn.Module):
    """A layer without a rule (a parameter read directly), holding one Linear under two names: the per-module
    fallback re-runs it with functional_call."""

    def __init__(self, shared: nn.Linear):
        super().__init__()
        self.first, self.again = shared, shared
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, shared.out_features))

    def forward(self, x):
        return self.again(torch.tanh(self.first(x))) * self.scale


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Linear(4, 4)
        self.a, self.b = shared, shared
        self.block = Scaled(nn.Linear(4, 4))
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.block(self.b(torch.tanh(self.a(x)))))


def _loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def _problem():
    torch.manual_seed(0)
    model = Aliased().double()
    inputs = torch.randn(8, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (8,))
    return model, inputs, targets


def _loop_sqnorms(model, inputs, targets):
    norms = []
    for i in range(len(inputs)):
        grads = torch.autograd.grad(_loss(model(inputs[i:i + 1]), targets[i:i + 1]).sum(), list(model.parameters()))
        norms.append(sum(float(g.pow(2).sum()) for g in grads))
    return torch.tensor(norms, dtype=torch.float64)


def _assert_model_intact(model, parameters, inputs, targets):
    assert all(p is q for p, q in zip(model.parameters(), parameters)), "a parameter of the model was replaced"
    assert model.a.weight is model.b.weight and model.block.first.weight is model.block.again.weight
    model.zero_grad(set_to_none=True)
    _loss(model(inputs), targets).mean().backward()
    assert all(p.grad is not None for p in parameters)


@pytest.mark.parametrize("backend", ["vmap", "auto"])
def test_per_example_norms_keep_an_aliased_module(backend):
    model, inputs, targets = _problem()
    parameters = list(model.parameters())
    expected = _loop_sqnorms(model, inputs, targets)
    _loss(model(inputs), targets).mean().backward()
    plain = [p.grad.clone() for p in parameters]
    model.zero_grad(set_to_none=True)

    result = per_example_sqnorms(model, _loss, inputs, targets, backend=backend)

    torch.testing.assert_close(result.sqnorms, expected, rtol=1e-10, atol=0)
    for p, g in zip(parameters, plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)
    if backend == "auto":
        assert result.backend_of["block.scale"] == "module"
    _assert_model_intact(model, parameters, inputs, targets)


@pytest.mark.parametrize("measure", [
    lambda m, x, y: hutchinson_trace(m, _loss, x, y, num_probes=2, generator=torch.Generator().manual_seed(0)),
    lambda m, x, y: hessian_noise_scale(m, _loss, x, y, num_probes=2, num_sigma_examples=2,
                                        generator=torch.Generator().manual_seed(0)),
    lambda m, x, y: epsilon_sharpness(m, _loss, x, y, max_iterations=2, generator=torch.Generator().manual_seed(0)),
], ids=["hutchinson", "hessian_noise_scale", "sharpness"])
def test_curvature_passes_keep_an_aliased_module(measure):
    model, inputs, targets = _problem()
    parameters = list(model.parameters())
    measure(model, inputs, targets)
    _assert_model_intact(model, parameters, inputs, targets)
