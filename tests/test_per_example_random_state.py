"""Model code that draws from Python's ``random`` or NumPy's global generator (a random augmentation, HF Wav2Vec2's
time masking) draws again whenever noisescale re-runs it: the per-module fallback's re-runs, the whole-model vmap,
``observe``. None of that may move the caller's streams. Reference: the same step without noisescale."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from noisescale.per_example import PerExampleGradNorms, per_example_sqnorms


class Draws(nn.Module):
    """A parameter read directly (the per-module fallback) by a forward that draws from ``source`` and, with
    ``used``, scales its output by the draw."""

    def __init__(self, source: str, used: bool):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.source, self.used = source, used

    def forward(self, x):
        draw = random.random() if self.source == "python" else float(np.random.rand())
        return self.inp(x) * self.scale * (1 + 0.1 * draw if self.used else 1.0)


def _loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def _next_draws() -> tuple[float, float]:
    return random.random(), float(np.random.rand())


def _step(source: str, used: bool, measure):
    torch.manual_seed(0)
    model = Draws(source, used)
    inputs, targets = torch.randn(6, 4), torch.randint(0, 5, (6,))
    random.seed(1)
    np.random.seed(1)
    backend = measure(model, inputs, targets)
    return _next_draws(), backend


def _plain(model, inputs, targets):
    _loss(model(inputs), targets).mean().backward()


def _called(backend):
    def measure(model, inputs, targets):
        return per_example_sqnorms(model, _loss, inputs, targets, backend=backend,
                                   check_independence=False).backend_of["scale"]
    return measure


def _observed(model, inputs, targets):
    with PerExampleGradNorms(model, _loss).observe(len(inputs)) as observed:
        _loss(model(inputs), targets).mean().backward()
    return observed.backend_of["scale"]


@pytest.mark.parametrize("source", ["python", "numpy"])
@pytest.mark.parametrize("used, measure, backend", [
    (False, _called("auto"), "module"),    # re-run per example, exact
    (True, _called("auto"), "vmap"),       # the re-run's draw differs, its sums miss: the whole-model vmap
    (True, _called("vmap"), "vmap"),
    (False, _observed, "module"),
], ids=["fallback", "fallback-to-vmap", "vmap", "observe"])
def test_measuring_leaves_the_callers_python_and_numpy_streams(source, used, measure, backend):
    expected, _ = _step(source, used, _plain)
    draws, measured_by = _step(source, used, measure)
    assert measured_by == backend
    assert draws == expected
