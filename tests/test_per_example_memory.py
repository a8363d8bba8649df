"""Nothing of a measured step outlives it: the hooks a pass puts on its tensors and autograd nodes are removed after
the pass. A hook held the pass's records, which hold tensors of the graph, through the C++ autograd node, where
Python's garbage collector cannot see the cycle: every step's layer inputs stayed in memory (4.2 MB a step on the
benchmark's 2-layer transformer, B = 32).

Reference: the same steps without noisescale, whose live tensors stay as many from step to step."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from noisescale.integrations.observer import NoiseScaleOptions, ObservingNoiseScaleMonitor
from noisescale.models import tiny_transformer, sequence_cross_entropy
from noisescale.monitor import NoiseScaleMonitor
from noisescale.per_example import PerExampleGradNorms


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


class Gated(nn.Module):
    """A parameter read directly: the per-module fallback captures its uses."""

    def __init__(self, d: int):
        super().__init__()
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.gate


class Mixed(nn.Module):
    """Rule layers, a captured module, an nn.MultiheadAttention (its projections captured) and an LSTM (re-run)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.gated = Gated(d)
        self.attention = nn.MultiheadAttention(d, 2, batch_first=True)
        self.rnn = nn.LSTM(d, d, batch_first=True)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.gated(torch.tanh(self.inp(x)))
        h = h + self.attention(h, h, h, need_weights=False)[0]
        h = self.rnn(h)[0]
        return self.out(h.mean(1))


def _classification(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def _mixed_problem():
    torch.manual_seed(0)
    return Mixed(), _classification, torch.randn(6, 5, 4), torch.randint(0, 3, (6,))


def _transformer_problem():
    torch.manual_seed(0)
    model = tiny_transformer(vocab_size=17, d_model=16, n_heads=2, n_layers=1, block_size=8)
    tokens = torch.randint(0, 17, (4, 8))
    return model, sequence_cross_entropy, tokens, tokens


def _hooks_on(model: nn.Module) -> int:
    return sum(len(p._backward_hooks or {}) for p in model.parameters())


def _counts(model: nn.Module, step, steps: int = 6) -> list[tuple[int, int]]:
    """(live tensors, hooks on the parameters) after each step but the first two."""
    counts = []
    for _ in range(steps):
        step()
        counts.append((_live_tensors(), _hooks_on(model)))
    return counts[2:]


@pytest.mark.parametrize("problem", [_mixed_problem, _transformer_problem], ids=["mixed", "transformer"])
@pytest.mark.parametrize("backend", ["auto", "vmap"])
def test_repeated_calls_keep_nothing_of_earlier_steps(problem, backend):
    model, loss_fn, inputs, targets = problem()

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).mean().backward()

    baseline = _counts(model, plain)
    assert len(set(baseline)) == 1, baseline   # the reference itself keeps nothing

    norms = PerExampleGradNorms(model, loss_fn, backend=backend)
    result = []

    def measured():
        model.zero_grad(set_to_none=True)
        result[:] = [norms(inputs, targets)]

    counts = _counts(model, measured)
    assert len(set(counts)) == 1, counts
    norms.close()
    assert _hooks_on(model) == 0
    if backend == "auto" and problem is _mixed_problem:
        assert set(result[0].backend_of.values()) == {"ghost", "module"}


def test_observed_and_monitored_steps_keep_nothing_of_earlier_steps():
    model, loss_fn, inputs, targets = _mixed_problem()
    norms = PerExampleGradNorms(model, loss_fn)

    def observed():
        model.zero_grad(set_to_none=True)
        with norms.observe(len(inputs)) as seen:
            loss_fn(model(inputs), targets).mean().backward()
        assert seen.sqnorms is not None

    counts = _counts(model, observed)
    assert len(set(counts)) == 1, counts
    norms.close()
    monitor = NoiseScaleMonitor(model, loss_fn)

    def monitored():
        model.zero_grad(set_to_none=True)
        monitor(inputs, targets)

    counts = _counts(model, monitored)
    assert len(set(counts)) == 1, counts
    monitor.close()
    assert _hooks_on(model) == 0


def test_an_observed_step_keeps_its_micro_batches_until_it_ends_or_the_monitor_closes():
    """The integrations' monitor holds each micro-batch (a reference, to name NaN or Inf in it on a non-finite
    step) while its step is open: the step's end lets it go, and so does close() on a step left unfinished (an
    exception in training), or a micro-batch begun but never ended (dropped)."""
    model, loss_fn, inputs, targets = _mixed_problem()
    monitor = ObservingNoiseScaleMonitor(model, NoiseScaleOptions())

    def micro_batch(end: bool = True) -> weakref.ref:
        batch = (inputs.clone(), targets)
        monitor.begin_micro_batch(len(inputs), batch=batch)
        if end:
            loss_fn(model(batch[0]), batch[1]).mean().backward()
            monitor.end_micro_batch(0.0)
        return weakref.ref(batch[0])

    def collected(kept: weakref.ref) -> bool:
        gc.collect()
        return kept() is None

    kept = micro_batch()
    assert not collected(kept)   # held while its step is open
    monitor.end_step()
    assert collected(kept)
    dropped = micro_batch(end=False)   # begun, never ended: dropped by the next micro-batch's begin
    kept = micro_batch()
    assert collected(dropped) and not collected(kept)
    monitor.close()   # the step left unfinished
    assert collected(kept)
