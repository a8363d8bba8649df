"""Model code that draws from Python's ``random`` or NumPy's global generator (a random augmentation, HF Wav2Vec2's
time masking) draws again whenever noisescale re-runs it: the per-module fallback's re-runs, the whole-model vmap,
``observe``. None of that may move the caller's streams. Reference: the same step without noisescale."""

from __future__ import annotations

import copy
import random
import warnings

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


class OwnNoise(nn.Module):
    """Multiplicative noise drawn from a torch.Generator of the layer's own (in train mode), held as an attribute or
    in a list or dict attribute, on a parameter read directly: the per-module fallback re-runs it."""

    def __init__(self, held: str):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))
        generator = torch.Generator().manual_seed(123)
        self.held = {"attribute": generator, "list": [generator], "dict": {"noise": generator}}[held]

    @property
    def generator(self) -> torch.Generator:
        held = self.held
        return held[0] if isinstance(held, list) else held["noise"] if isinstance(held, dict) else held

    def forward(self, x):
        return torch.tanh(self.scale * x * torch.rand(x.shape, generator=self.generator, dtype=x.dtype))


def _own_noise_model(held: str) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), OwnNoise(held), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("held", ["attribute", "list", "dict"])
def test_a_layer_drawing_from_a_generator_of_its_own_is_measured_with_the_steps_draw_and_left_as_a_step_leaves_it(
        held):
    """A review's find (session 30): the check's two forwards, the per-module fallback's re-run and the whole-model
    vmap replayed the global streams only. A layer drawing from its own generator was refused as coupled (the two
    forwards drew differently); with check_independence=False its norms were 0.79 off (0.84 under the vmap, with no
    warning), and every call advanced the generator, changing the training's later draws. Now its generator is
    replayed and put back as the global ones are: under auto exact against each example's gradient from the batch's
    own graph (the same draw), through two calls; under backend='vmap' the redraw is warned; the generator after
    each call is where a plain step leaves it."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    for backend in ("auto", "vmap"):
        model, plain = _own_noise_model(held), _own_noise_model(held)
        engine = PerExampleGradNorms(model, _loss, backend=backend)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                losses = _loss(plain(x), y)   # the reference: the batch's graph, so the same draw
                expected = torch.stack([sum(g.square().sum() for g in torch.autograd.grad(
                    losses[i], list(plain.parameters()), retain_graph=True)) for i in range(6)])
                result = engine(x, y)
                assert torch.equal(model[1].generator.get_state(), plain[1].generator.get_state())
                if backend == "auto":
                    torch.testing.assert_close(result.sqnorms, expected, rtol=1e-10, atol=0)
        redrawn = [w for w in caught if "drew random numbers" in str(w.message)]
        assert (len(redrawn), len(caught)) == ((0, 0) if backend == "auto" else (1, 1))


class NoiseOfAFreshGenerator(nn.Module):
    """The generator made anew, seeded, by each forward and kept as an attribute: the first call's pass met it only
    after its start (a KeyError before the fix, with check_independence=False, whose check would have made it)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))

    def forward(self, x):
        self.generator = torch.Generator().manual_seed(7)
        return torch.tanh(self.scale * x * torch.rand(x.shape, generator=self.generator, dtype=x.dtype))


def test_a_generator_made_by_the_forward_is_replayed_from_its_first_call_on():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), NoiseOfAFreshGenerator(), nn.Linear(5, 3)).double()
    reference = copy.deepcopy(model)
    losses = _loss(reference(x), y)
    expected = torch.stack([sum(g.square().sum() for g in torch.autograd.grad(
        losses[i], list(reference.parameters()), retain_graph=True)) for i in range(6)])
    engine = PerExampleGradNorms(model, _loss, check_independence=False)
    for _ in range(2):
        torch.testing.assert_close(engine(x, y).sqnorms, expected, rtol=1e-10, atol=0)
