"""The check that each example's loss reads that example alone (``noisescale/per_example/coupling.py``): coupled
losses are refused with p.grad as it was, whichever examples they read; independent ones, with dropout, random
masks laid out over the batch, buffers and several calls, are measured as before, with the training's random
streams and buffers unchanged by the check. Under ``observe`` the outputs that couple the examples are warned
about, and the caller's step is left as it was."""

from __future__ import annotations

import copy
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescale.integrations.observer import NoiseScaleOptions, ObservingNoiseScaleMonitor
from noisescale.per_example import PerExampleGradNorms
from test_per_example import assert_grads_as_before, assert_relclose, generator, grads_of, naive_per_example


class TwoTowers(nn.Module):
    """Image and text towers with dropout, as a contrastive model has."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 4))
        self.text = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x, t):
        return self.image(x), self.text(t)


def contrastive_loss(outputs, targets):
    """CLIP's loss, per image row: each example's loss reads every text embedding of the batch."""
    image, text = (F.normalize(e, dim=-1) for e in outputs)
    logits = 5.0 * image @ text.T
    return F.cross_entropy(logits, torch.arange(len(image)), reduction="none")


def own_pair_loss(outputs, targets):
    """The same towers with a loss per example: the cosine of its own image and text."""
    image, text = (F.normalize(e, dim=-1) for e in outputs)
    return -(image * text).sum(-1)


def _towers_batch(size=6):
    return (torch.randn(size, 6, dtype=torch.float64, generator=generator(1)),
            torch.randn(size, 5, dtype=torch.float64, generator=generator(2)))


def test_a_contrastive_loss_is_refused_and_leaves_p_grad_as_it_was():
    torch.manual_seed(0)
    model = TwoTowers().double()
    inputs = _towers_batch()
    own_pair_loss(model(*inputs), None).mean().backward()   # gradients accumulated before the call
    before = grads_of(model)
    engine = PerExampleGradNorms(model, contrastive_loss)
    with pytest.raises(ValueError, match="per-example losses are coupled.*contrastive loss"):
        engine(inputs, None)
    assert_grads_as_before(model, before)


def test_coupling_inside_the_model_is_refused():
    """A model that centres its features over the batch: each example's output reads the others."""
    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x):
            h = self.layer(x)
            return h - h.mean(0)

    model = Centred().double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=generator(3))
    y = torch.randn(5, 3, dtype=torch.float64, generator=generator(4))
    with pytest.raises(ValueError, match="coupled"):
        PerExampleGradNorms(model, lambda out, target: (out - target).square().sum(1))(x, y)
    assert all(p.grad is None for p in model.parameters())


def test_check_independence_false_measures_the_decomposition():
    torch.manual_seed(0)
    model = TwoTowers().double()
    result = PerExampleGradNorms(model, contrastive_loss, check_independence=False)(_towers_batch(), None)
    assert result.sqnorms.shape == (6,) and bool((result.sqnorms > 0).all())


def test_an_independent_loss_is_measured_as_without_the_check_with_the_training_unchanged():
    """With dropout in train mode: the same norms, the same p.grad and the same random stream afterwards as with
    the check switched off, and exact against the loop in eval mode."""
    torch.manual_seed(0)
    model = TwoTowers().double()
    inputs = _towers_batch()
    runs = []
    for check in (True, False):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        result = PerExampleGradNorms(model, own_pair_loss, check_independence=check)(inputs, None)
        runs.append((result.sqnorms, [p.grad.clone() for p in model.parameters()], torch.rand(3)))
    (norms, grads, draws), (norms_off, grads_off, draws_off) = runs
    assert torch.equal(norms, norms_off) and torch.equal(draws, draws_off)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_off))
    model.eval()
    expected = naive_per_example(model, own_pair_loss, inputs, torch.zeros(6))
    result = PerExampleGradNorms(model, own_pair_loss, by_parameter=True)(inputs, None)
    for name, values in expected.items():
        assert_relclose(result.by_parameter[name], values)


def test_the_check_runs_once_per_plan_and_puts_buffers_back():
    """Two forwards on the first call (and after the plan changes: train to eval), none on later calls; buffers the
    forward updates in place (a counter) or assigns anew (a moving average, ``self.mean = 0.9 * self.mean + ...``,
    which a copy into the old tensor missed: a review's finding) move with the real forwards only."""
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 2)
            self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
            self.register_buffer("mean", torch.zeros(3, dtype=torch.float64))

        def forward(self, x):
            self.calls += 1
            self.mean = 0.9 * self.mean + 0.1 * x.mean(0)
            return self.layer(x)

    forwards = []

    def loss(outputs, targets):
        forwards.append(len(outputs))
        return (outputs - targets).square().sum(1)

    model = Counting().double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=generator(5))
    y = torch.randn(4, 2, dtype=torch.float64, generator=generator(6))
    engine = PerExampleGradNorms(model, loss)
    for _ in range(3):
        engine(x, y)
    assert len(forwards) == 5 and int(model.calls) == 3
    torch.testing.assert_close(model.mean, (1 - 0.9 ** 3) * x.mean(0), rtol=1e-12, atol=0)
    model.eval()
    engine(x, y)
    assert len(forwards) == 8 and int(model.calls) == 4 and not model.training


def test_a_forward_advancing_a_counter_its_output_reads_is_not_taken_for_coupling():
    """A temperature annealed by a step count the forward advances (in every mode): the check's second forward saw
    the counter one step on, its losses all moved, and the independent loss was refused as coupled (an audit's
    finding). Each of the two forwards now starts from the same buffers. Reference: the loop over examples."""
    class Annealed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 2)
            self.register_buffer("steps", torch.zeros((), dtype=torch.float64))

        def forward(self, x):
            self.steps += 1
            return self.layer(x) / (1 + 0.1 * self.steps)

    def loss(outputs, targets):
        return (outputs - targets).square().sum(1)

    model = Annealed().double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=generator(7))
    y = torch.randn(5, 2, dtype=torch.float64, generator=generator(8))
    result = PerExampleGradNorms(model, loss)(x, y)
    assert int(model.steps) == 1
    model.steps.zero_()   # the loop's forwards from the same count as the measured one
    expected = []
    for i in range(5):
        expected.append(sum(g.square().sum() for g in torch.autograd.grad(
            loss(model(x[i:i + 1]), y[i:i + 1]).sum(), list(model.parameters()))))
        model.steps.zero_()
    assert_relclose(result.sqnorms, torch.stack(expected))


def test_identical_examples_leave_the_check_to_a_later_batch():
    """With every example's inputs the same, there is nothing to replace example 0 with: that call is not checked
    (and raises nothing for a coupled loss), and the next call, whose examples differ, is."""
    torch.manual_seed(0)
    model = TwoTowers().double()
    x, t = _towers_batch()
    engine = PerExampleGradNorms(model, contrastive_loss)
    engine((x[:1].expand(6, -1).clone(), t[:1].expand(6, -1).clone()), None)
    with pytest.raises(ValueError, match="coupled"):
        engine((x, t), None)


class PairScores(nn.Module):
    """Two towers and their (B, B) scores, every example against every other, as CLIP's logits; a call counter
    in a buffer."""

    def __init__(self):
        super().__init__()
        self.towers = TwoTowers()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x, t):
        self.calls += 1
        image, text = (F.normalize(e, dim=-1) for e in self.towers(x, t))
        return {"scores": 5.0 * image @ text.T, "image": image}


def _observe(model, loss, inputs, **options):
    """One observed step: the caller's own forward and backward of the mean loss; returns the norms and the
    warnings raised."""
    engine = PerExampleGradNorms(model, lambda outputs, targets: None, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with engine.observe(len(inputs[0]), model_inputs=inputs) as observed:
            loss(model(*inputs)).mean().backward()
    return observed, [w for w in caught if "couples the examples" in str(w.message)]


def test_observe_warns_about_outputs_that_couple_the_examples():
    """The caller's loss is unknown to observe: the outputs are compared instead, and the (B, B) scores named;
    the per-example outputs are not. The caller's step is left as it was: p.grad, the random stream, the
    buffers (one call counted)."""
    torch.manual_seed(0)
    model = PairScores().double()
    plain = copy.deepcopy(model)
    inputs = _towers_batch()

    def contrastive(outputs):
        return F.cross_entropy(outputs["scores"], torch.arange(6), reduction="none")

    torch.manual_seed(5)
    contrastive(plain(*inputs)).mean().backward()
    expected_draws = torch.rand(3)
    torch.manual_seed(5)
    _, caught = _observe(model, contrastive, inputs)
    assert torch.equal(torch.rand(3), expected_draws)
    assert len(caught) == 1 and "['scores']" in str(caught[0].message) and "['image']" not in str(caught[0].message)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), plain.parameters()))
    assert int(model.calls) == 1


class KeylessOutput(dict):
    """An output type registered as a pytree node without key paths, as diffusers registers its ``BaseOutput``
    (``UNet2DOutput``, ``Transformer2DModelOutput``, ...)."""


torch.utils._pytree.register_pytree_node(
    KeylessOutput, torch.utils._pytree._dict_flatten,
    lambda values, context: KeylessOutput(torch.utils._pytree._dict_unflatten(values, context)))


def test_observe_checks_outputs_of_a_pytree_type_without_key_paths():
    """Before, torch's flatten with key paths raised on such an output, and observe only warned that it could not
    check (every diffusers model; a UNet whose output subtracts the batch mean went unnoticed). Its entries are now
    named by key."""
    class KeylessScores(PairScores):
        def forward(self, x, t):
            return KeylessOutput(super().forward(x, t))

    torch.manual_seed(0)
    model = KeylessScores().double()
    with pytest.raises(ValueError, match="flatten_with_keys_fn"):   # what the check met before
        torch.utils._pytree.tree_flatten_with_path(model(*_towers_batch()))

    def contrastive(outputs):
        return F.cross_entropy(outputs["scores"], torch.arange(6), reduction="none")

    _, caught = _observe(model, contrastive, _towers_batch())
    assert len(caught) == 1 and "['scores']" in str(caught[0].message) and "['image']" not in str(caught[0].message)


def test_observe_of_independent_outputs_does_not_warn_and_is_exact():
    torch.manual_seed(0)
    model = TwoTowers().double().eval()
    inputs = _towers_batch()
    observed, caught = _observe(model, lambda outputs: own_pair_loss(outputs, None), inputs)
    assert not caught
    expected = naive_per_example(model, own_pair_loss, inputs, torch.zeros(6))
    assert_relclose(observed.sqnorms, sum(expected.values()))
    _, caught = _observe(PairScores().double(), lambda outputs: outputs["scores"].diagonal(), inputs,
                         check_independence=False)
    assert not caught


def _observed_steps(model, loss, inputs, steps=2):
    """``steps`` optimizer steps of an integration's monitor fed by the caller's own passes (SGD); returns the
    monitor and the coupling warnings."""
    monitor = ObservingNoiseScaleMonitor(model, NoiseScaleOptions())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            optimizer.zero_grad()
            monitor.begin_micro_batch(len(inputs[0]), model_inputs=inputs)
            value = loss(model(*inputs)).mean()
            value.backward()
            monitor.end_micro_batch(value)
            monitor.end_step()
            optimizer.step()
    return monitor, [w for w in caught if "couples the examples" in str(w.message)]


def test_the_summary_and_the_logged_metrics_of_a_monitor_keep_the_coupling_found():
    """After observe's warning the monitor goes on (observe cannot see the loss), and what it reports says why
    its numbers may be no noise scale: the summary's ``coupling`` and text, ``coupled_outputs`` in the logs; none
    of it for outputs that keep the examples apart."""
    torch.manual_seed(0)
    inputs = _towers_batch()
    monitor, caught = _observed_steps(
        PairScores().double(), lambda outputs: F.cross_entropy(outputs["scores"], torch.arange(6), reduction="none"),
        inputs)
    summary = monitor.summary()
    assert len(caught) == 1 and summary.steps == 2
    assert "['scores']" in summary.coupling and monitor.norms.coupling == summary.coupling
    assert "warning: the model couples the examples" in str(summary) and "B_simple =" in str(summary)
    assert monitor.logged_metrics()["noise_scale/coupled_outputs"] == 1.0

    monitor, caught = _observed_steps(TwoTowers().double(), lambda outputs: own_pair_loss(outputs, None), inputs)
    summary = monitor.summary()
    assert not caught and summary.coupling is None and "couples" not in str(summary)
    assert "noise_scale/coupled_outputs" not in monitor.logged_metrics()
    assert "noise_scale/trace_sigma" in monitor.logged_metrics()


class NumpyMasked(nn.Module):
    """Zeroes features drawn from NumPy's global generator in train mode, as HF Wav2Vec2's time masking does."""

    def __init__(self):
        super().__init__()
        self.layer, self.head = nn.Linear(5, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.layer(x)
        keep = torch.as_tensor(np.random.rand(*h.shape) > 0.3, dtype=h.dtype)
        return self.head(h * keep)


def test_draws_from_python_and_numpy_generators_are_replayed_and_left_as_they_were():
    """The check's two forwards draw the same NumPy mask (no false coupling), and the training's NumPy and Python
    streams are those of a run without the check."""
    torch.manual_seed(0)
    model = NumpyMasked().double()
    x = torch.randn(6, 5, dtype=torch.float64, generator=generator(7))
    y = torch.randn(6, 2, dtype=torch.float64, generator=generator(8))
    draws = []
    for check in (True, False):
        np.random.seed(3)
        random.seed(3)
        model.zero_grad(set_to_none=True)
        result = PerExampleGradNorms(model, lambda out, t: (out - t).square().sum(1),
                                     check_independence=check)(x, y)
        draws.append((result.sqnorms, np.random.rand(), random.random()))
        np.random.seed(3)
        random.seed(3)
        _, caught = _observe(model, lambda out: (out - y).square().sum(1), (x,), check_independence=check)
        assert not caught
        draws.append((np.random.rand(), random.random()))
    assert torch.equal(draws[0][0], draws[2][0]) and draws[0][1:] == draws[2][1:] and draws[1] == draws[3]


def test_a_refused_loss_is_refused_again_and_one_reading_its_neighbour_is_refused():
    """A refusal does not spend the check (a caller that catches the error and calls again was measured silently:
    a review's finding); a loss that reads the next example, never example 0, is caught through the last one."""
    torch.manual_seed(0)
    model = TwoTowers().double()
    engine = PerExampleGradNorms(model, contrastive_loss)
    for _ in range(2):
        with pytest.raises(ValueError, match="coupled"):
            engine(_towers_batch(), None)

    def next_one(outputs, targets):
        image, text = outputs
        return (image * torch.cat([text[1:], text[:1] * 0])).sum(1)   # l_i reads example i + 1; the last none

    with pytest.raises(ValueError, match="coupled"):
        PerExampleGradNorms(model, next_one)(_towers_batch(), None)


class UnpaddedDropout(nn.Module):
    """Dropout on the examples' unpadded positions only, gathered over the whole batch: one example's length moves
    every later example's mask (a review's false coupling of 0.19; HF Wav2Vec2's time masks do the same)."""

    def __init__(self):
        super().__init__()
        self.layer, self.dropout = nn.Linear(3, 3), nn.Dropout(0.5)

    def forward(self, x, mask):
        h = self.layer(x)
        kept = mask.bool()
        h = h.masked_scatter(kept[..., None], self.dropout(h[kept]))
        return (h * mask[..., None]).sum(1)


def test_random_masks_laid_out_over_the_batch_are_no_coupling_and_a_nan_loss_is_not_a_verdict():
    torch.manual_seed(0)
    model = UnpaddedDropout().double()
    x = torch.randn(4, 5, 3, dtype=torch.float64, generator=generator(9))
    mask = torch.ones(4, 5, dtype=torch.int64)
    mask[0, 2:], mask[2, 4:] = 0, 0
    engine = PerExampleGradNorms(model, lambda out, t: out.square().sum(1))
    engine((x, mask), None)   # train mode: the masks differ, the eval-mode check's losses do not
    nan_first = PerExampleGradNorms(model, lambda out, t: out.square().sum(1) * t, check_independence=True)
    targets = torch.ones(4, dtype=torch.float64)
    targets[0] = float("nan")
    nan_first((x, mask), targets)   # a loss that is not finite tells nothing: the next call checks
    assert not nan_first._independence_checked


def test_observe_under_autocast_does_not_warn_about_its_own_rounding():
    """The check runs after the caller's pass, outside its autocast: both of its forwards in one precision (a
    review saw a false warning, 4e-3 against 1e-5, when one ran in bfloat16 and the other did not)."""
    torch.manual_seed(0)

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(5, 3)

        def forward(self, x):
            return self.layer(x).float()

    model, x = Logits(), torch.randn(6, 5, generator=generator(10))
    engine = PerExampleGradNorms(model, lambda outputs, targets: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with engine.observe(6, model_inputs=(x,)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x).square().sum(1).mean().backward()
    assert not [w for w in caught if "couples the examples" in str(w.message)]
    assert engine._independence_checked


def test_observe_finds_the_examples_in_any_dim_of_the_batch_s_size():
    """An output held sequence-first, (T, B, d) with T == B (XLNet's memories at length 4 = B): its rows are
    positions, each reading every example, but the examples' columns keep the changes to the replaced examples, so
    no warning (a first version warned); CLIP's (B, B) logits keep them along neither dim and are warned about."""
    torch.manual_seed(0)

    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x):   # x (B, T, 3) with T == B
            h = self.layer(x)
            return {"pooled": h.sum(1), "memory": h.transpose(0, 1)}

    x = torch.randn(4, 4, 3, dtype=torch.float64, generator=generator(11))
    _, caught = _observe(SequenceFirst().double(), lambda outputs: outputs["pooled"].square().sum(1), (x,))
    assert not caught
    _, caught = _observe(PairScores().double(), lambda outputs: outputs["scores"].diagonal(), _towers_batch())
    assert len(caught) == 1 and "['scores']" in str(caught[0].message)


class RoutedClassifier(nn.Module):
    """T positions routed over 3 experts and a head. Like HF's MoE models given labels, it returns its logits and
    the loss it computed: the mean cross-entropy plus, when ``balance`` > 0, a load-balancing term over the whole
    batch's rows (3 sum_e mean_rows(p_e)^2, a differentiable form of Switch Transformer's)."""

    def __init__(self, balance: float):
        super().__init__()
        self.body, self.router, self.head = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)
        self.balance = balance

    def forward(self, x, labels):
        h = torch.tanh(self.body(x))
        router_logits = self.router(h.flatten(0, 1))    # (B T, 3): rows, not examples
        probabilities = router_logits.softmax(-1)
        logits = self.head(h * probabilities.max(-1).values.view(*h.shape[:2], 1)).mean(1)
        loss = F.cross_entropy(logits, labels)
        if self.balance:
            loss = loss + self.balance * 3 * probabilities.mean(0).square().sum()
        return {"logits": logits, "loss": loss, "router_logits": router_logits}


def test_observe_warns_about_a_term_over_the_batch_in_the_model_s_own_loss():
    """A loss computed inside the model with a term over the whole batch's rows (an MoE's router load-balancing
    loss, HF's output_router_logits=True): the logits keep the examples apart, so the output comparison finds
    nothing, but the graph from the model's scalar loss reaches the parameters other than through the logits.
    Warned about and kept in ``coupling`` (the monitor logs coupled_outputs), the step left as it was (p.grad as a
    plain backward's). Before, nothing was said and the norms were those of no per-example loss (here 1.8 % off the
    loop of the model's loss on each example alone). Without the term: no warning, equal to the loop."""
    inputs = (torch.randn(6, 5, 4, dtype=torch.float64, generator=generator(1)), torch.arange(6) % 3)
    for balance in (0.5, 0.0):
        torch.manual_seed(0)
        model = RoutedClassifier(balance).double()
        plain = copy.deepcopy(model)
        plain(*inputs)["loss"].backward()
        engine = PerExampleGradNorms(model, lambda outputs, targets: None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with engine.observe(6, model_inputs=inputs) as observed:
                model(*inputs)["loss"].backward()
        found = [str(w.message) for w in caught if "term over the whole batch" in str(w.message)]
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), plain.parameters()))
        expected = sum(naive_per_example(plain, lambda outputs, _: outputs["loss"], inputs, inputs[1]).values())
        if balance:
            assert len(found) == 1 and "output of shape ()" in found[0] and "router" in found[0]
            assert "output of shape ()" in engine.coupling
            assert not torch.allclose(observed.sqnorms, expected, rtol=0.01)   # why it is warned about
        else:
            assert not found and engine.coupling is None
            assert_relclose(observed.sqnorms, expected)

    monitor, _ = _observed_steps(RoutedClassifier(0.5).double(), lambda outputs: outputs["loss"], inputs)
    assert monitor.logged_metrics()["noise_scale/coupled_outputs"] == 1.0
    assert "holds that term" in str(monitor.summary())


class _OnlyItsLoss(nn.Module):
    """``RoutedClassifier`` returning its loss alone, as many a model of one's own does (no logits among the
    outputs: the walk stops at the tensors with the examples in dim 0 inside the graph)."""

    def __init__(self, balance: float):
        super().__init__()
        self.inner = RoutedClassifier(balance)

    def forward(self, x, labels):
        return self.inner(x, labels)["loss"]


@pytest.mark.parametrize("balance", [0.5, 0.0], ids=["router_term", "plain"])
def test_a_model_returning_only_its_loss_is_warned_about_only_for_a_term_over_the_batch(balance):
    """A first version warned about every model that returns its loss alone (the walk stopped only at outputs
    with the examples, and there were none): a review's six models, exact norms, each flagged as coupled. Now: the
    router-like term warned about, the plain loss not, and equal to the loop."""
    inputs = (torch.randn(6, 5, 4, dtype=torch.float64, generator=generator(1)), torch.arange(6) % 3)
    torch.manual_seed(0)
    model = _OnlyItsLoss(balance).double()
    plain = copy.deepcopy(model)
    engine = PerExampleGradNorms(model, lambda outputs, targets: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with engine.observe(6, model_inputs=inputs) as observed:
            model(*inputs).backward()
    found = [w for w in caught if "term over the whole batch" in str(w.message)]
    assert len(found) == (1 if balance else 0) and (engine.coupling is not None) == bool(balance)
    if not balance:
        assert_relclose(observed.sqnorms, sum(naive_per_example(plain, lambda loss, _: loss, inputs,
                                                                 inputs[1]).values()))

