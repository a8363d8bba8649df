"""Models compiled by ``torch.compile``: the measured passes run the model eagerly (``noisescale._compiled``), so the
norms, the Hessian proxies and p.grad are those of the uncompiled model, and the unmeasured steps still run compiled.

The compiler backend is ``aot_eager``: Dynamo and AOTAutograd, where the hooks and the graphs meet, without
inductor's C++ code generation (a compiler at run time, and seconds a graph)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescale.monitor import NoiseScaleMonitor
from noisescale.per_example import PerExampleGradNorms

BACKEND = "aot_eager"


def per_example_loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()


def batches(sizes):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (size,), generator=generator)) for size in sizes]


def compiled(model: nn.Module, how: str) -> nn.Module:
    """``torch.compile(model)`` (an OptimizedModule around the model) or ``model.compile()`` (in place)."""
    torch._dynamo.reset()
    if how == "wrapped":
        return torch.compile(model, backend=BACKEND)
    model.compile(backend=BACKEND)
    return model


def naive_sqnorms(model: nn.Module, inputs, targets) -> torch.Tensor:
    """|g_i|^2 one example at a time, on the eager model."""
    parameters = list(model.parameters())
    rows = []
    for i in range(inputs.shape[0]):
        loss = per_example_loss(model(inputs[i:i + 1]), targets[i:i + 1]).sum()
        rows.append(sum(g.square().sum() for g in torch.autograd.grad(loss, parameters)))
    return torch.stack(rows)


@pytest.mark.parametrize("how", ["wrapped", "in_place"])
@pytest.mark.parametrize("backend", ["ghost", "auto", "vmap"])
def test_the_norms_of_a_compiled_model_are_the_eager_models(how, backend):
    """Before, ghost found no layer call (the compiled graph ran without the hooks: "their module's forward was
    never called") and auto failed inside Dynamo, which traced its hooks."""
    model = mlp()
    target = compiled(model, how)
    (inputs, targets), = batches([6])
    loss = per_example_loss(target(inputs), targets).mean()   # compiled before the hooks are installed
    loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with PerExampleGradNorms(target, per_example_loss, backend=backend) as norms:
        for _ in range(3):   # Dynamo recompiles with dynamic shapes after the first calls
            model.zero_grad()
            result = norms(inputs, targets)
            for p, expected in zip(model.parameters(), reference):
                torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0)
            torch.testing.assert_close(result.sqnorms, naive_sqnorms(model, inputs, targets), rtol=1e-10, atol=0)
            model.zero_grad()
            per_example_loss(target(inputs), targets).mean().backward()   # a plain compiled step, hooks installed
            for p, expected in zip(model.parameters(), reference):
                torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0)
            if backend == "vmap":   # observe reads the hooks, which backend="vmap" has none of
                continue
            model.zero_grad()
            with norms.observe(inputs.shape[0]) as observed:   # the caller's own pass of the compiled model
                per_example_loss(target(inputs), targets).mean().backward()
            torch.testing.assert_close(observed.sqnorms, result.sqnorms, rtol=1e-12, atol=0)
            for p, expected in zip(model.parameters(), reference):
                torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0)


def test_observe_refuses_backend_vmap_on_a_compiled_model_as_on_any_other():
    target = compiled(mlp(), "wrapped")
    with PerExampleGradNorms(target, per_example_loss, backend="vmap") as norms:
        with pytest.raises(ValueError, match="backend='vmap' has none"):
            with norms.observe(6):
                pass


@pytest.mark.parametrize("how", ["wrapped", "in_place"])
def test_a_monitor_of_a_compiled_model_records_what_it_records_uncompiled(how):
    """measure_every=2 and hessian_every=2: the measured and Hessian steps run eagerly, the others compiled, with
    the monitor's hooks installed (and idle); float64, so the compiled steps round as the eager ones here."""
    def run(compile_as):
        model = mlp()
        target = model if compile_as is None else compiled(model, compile_as)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = NoiseScaleMonitor(target, per_example_loss, measure_every=2, hessian_every=2,
                                    hessian_examples=4, optimizer=optimizer)
        for inputs, targets in batches([6] * 6 + [5, 4]):   # a last batch smaller: shapes change
            optimizer.zero_grad()
            monitor(inputs, targets)
            optimizer.step()
        return model, monitor.history

    eager_model, eager_history = run(None)
    model, history = run(how)
    assert history["grad_sqnorm"].notna().sum() == 4 and history["g_h_g"].notna().sum() == 4
    for column in ("loss", "grad_sqnorm", "trace_sigma", "trace_h", "g_h_g", "trace_h_sigma", "fisher_trace"):
        torch.testing.assert_close(torch.tensor(history[column].to_numpy()),
                                   torch.tensor(eager_history[column].to_numpy()),
                                   rtol=1e-12, atol=0, equal_nan=True, msg=column)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
