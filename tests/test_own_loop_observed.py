"""A training loop of one's own that keeps its forward, backward, accumulation, clipping and optimizer, observed by
``ObservingNoiseScaleMonitor`` (docs/own-loop.md, "Keeping your own backward"): each step's estimate against a loop
over single examples, in float64, and the training unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from noisescale.estimators import simple_noise_scale
from noisescale.integrations import NoiseScaleOptions, ObservingNoiseScaleMonitor

MICRO_BATCHES, MICRO_BATCH = 2, 4


def small_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.LayerNorm(8),
                               torch.nn.Linear(8, 3)).double()


def step_batches(steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    return [[(torch.randn(MICRO_BATCH, 6, generator=generator, dtype=torch.float64),
              torch.randint(0, 3, (MICRO_BATCH,), generator=generator)) for _ in range(MICRO_BATCHES)]
            for _ in range(steps)]


def reference_estimate(model: torch.nn.Module, micro_batches) -> tuple[float, float]:
    """(tr(Sigma), |G|^2) of the step's whole batch from each example's own gradient, one example at a time."""
    model = copy.deepcopy(model)
    inputs = torch.cat([x for x, _ in micro_batches])
    targets = torch.cat([y for _, y in micro_batches])
    grads = []
    for i in range(len(inputs)):
        model.zero_grad()
        F.cross_entropy(model(inputs[i:i + 1]), targets[i:i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    grads = torch.stack(grads)
    estimate = simple_noise_scale((grads * grads).sum(1), grads.mean(0).square().sum())
    return estimate.trace_sigma, estimate.grad_sqnorm


def train(steps: int, observed: bool, *, loss_factor: float = 1.0 / MICRO_BATCHES, scale: float = 1.0,
          unscale_first: bool = False):
    """The loop: each micro-batch's mean loss times ``loss_factor`` (1/K: the batch's mean loss; 1: their sum)
    and a constant loss scale (an fp16 GradScaler's), unscaled before clipping and AdamW's step (``unscale_first``:
    before ``end_step``, told by grad_scale=1). Returns the model, the rows and the reference estimates."""
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    monitor = (ObservingNoiseScaleMonitor(model, NoiseScaleOptions(population_size=None)) if observed else None)
    rows, references = [], []
    for micro_batches in step_batches(steps):
        if observed:
            references.append(reference_estimate(model, micro_batches))
        for x, y in micro_batches:
            if observed:
                monitor.begin_micro_batch(len(x), batch=(x, y))
            loss = F.cross_entropy(model(x), y) * loss_factor
            (loss * scale).backward()
            if observed:
                monitor.end_micro_batch(loss)
        if unscale_first:
            for p in model.parameters():
                p.grad /= scale
        if observed:   # after the last backward, before clipping
            rows.append(monitor.end_step(contribution_scale=scale, grad_scale=1.0 if unscale_first else scale,
                                         loss_weight=loss_factor * MICRO_BATCHES))
        if not unscale_first:
            for p in model.parameters():
                p.grad /= scale
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
    return model, rows, references


@pytest.mark.parametrize("loss_factor, scale, unscale_first", [
    (1.0 / MICRO_BATCHES, 1.0, False), (1.0, 1.0, False), (1.0 / MICRO_BATCHES, 1024.0, False),
    (1.0 / MICRO_BATCHES, 1024.0, True)],
    ids=["mean over the batch", "sum of micro-batch means", "loss scale 1024", "unscaled before end_step"])
def test_each_step_is_the_per_example_loops_estimate_and_training_is_unchanged(loss_factor, scale, unscale_first):
    model, rows, references = train(3, True, loss_factor=loss_factor, scale=scale, unscale_first=unscale_first)
    assert [row["batch_size"] for row in rows] == [MICRO_BATCHES * MICRO_BATCH] * 3
    for row, (trace_sigma, grad_sqnorm) in zip(rows, references):
        assert row["measured"]
        assert row["trace_sigma"] == pytest.approx(trace_sigma, rel=1e-10)
        assert row["grad_sqnorm"] == pytest.approx(grad_sqnorm, rel=1e-9, abs=1e-12)
    plain, _, _ = train(3, False, loss_factor=loss_factor, scale=scale, unscale_first=unscale_first)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


def observed_step(model: torch.nn.Module, monitor: ObservingNoiseScaleMonitor, micro_batches) -> dict:
    """One step of the loop, each micro-batch's mean loss over the K micro-batches, observed; its row."""
    for x, y in micro_batches:
        monitor.begin_micro_batch(len(x), batch=(x, y))
        loss = F.cross_entropy(model(x), y) / len(micro_batches)
        loss.backward()
        monitor.end_micro_batch(loss)
    return monitor.end_step()


@pytest.mark.parametrize("next_call", ["begin_micro_batch", "end_step"])
def test_a_backward_left_without_end_micro_batch_is_refused_and_the_step_dropped(next_call):
    """A loop that ran a micro-batch's backward but left out end_micro_batch had that micro-batch dropped as one the
    framework skipped, silently: a step of 8 examples was recorded as one of 4, its gradient in p.grad."""
    model = small_model()
    monitor = ObservingNoiseScaleMonitor(model, NoiseScaleOptions(population_size=None))
    (x1, y1), (x2, y2) = step_batches(1)[0]
    monitor.begin_micro_batch(len(x1), batch=(x1, y1))
    (F.cross_entropy(model(x1), y1) / 2).backward()
    monitor.end_micro_batch(0.0)
    monitor.begin_micro_batch(len(x2), batch=(x2, y2))
    (F.cross_entropy(model(x2), y2) / 2).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"{next_call} was called while the micro-batch begun last had run its "
                                         r"backward without end_micro_batch\(loss\)"):
        if next_call == "end_step":
            monitor.end_step()
        else:
            monitor.begin_micro_batch(len(x1), batch=(x1, y1))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert monitor.history.empty and monitor.end_step() is None
    # the next step is measured as usual
    model.zero_grad()
    row = observed_step(model, monitor, [(x1, y1), (x2, y2)])
    assert row["batch_size"] == 8 and row["measured"]
    assert row["trace_sigma"] == pytest.approx(reference_estimate(model, [(x1, y1), (x2, y2)])[0], rel=1e-10)


def test_a_forgotten_end_micro_batch_is_refused_for_a_model_measured_by_micro_batches():
    """A BatchNorm model in train mode is measured from its micro-batches' gradients (GradientSquaredNorm): dropping
    such an open micro-batch read a field only the per-example pass has (AttributeError)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).double()
    monitor = ObservingNoiseScaleMonitor(model, NoiseScaleOptions(population_size=None))
    (x1, y1), (x2, y2) = step_batches(1)[0]
    monitor.begin_micro_batch(len(x1), batch=(x1, y1))
    (F.cross_entropy(model(x1), y1) / 2).backward()
    with pytest.raises(ValueError, match=r"without end_micro_batch\(loss\)"):
        monitor.begin_micro_batch(len(x2), batch=(x2, y2))
    # a micro-batch begun and skipped (no backward: Lightning's training_step returning None) is dropped quietly
    model.zero_grad()
    monitor.begin_micro_batch(len(x1), batch=(x1, y1))
    row = observed_step(model, monitor, [(x1, y1), (x2, y2)])
    assert row["batch_size"] == 8 and row["micro_batches"] == 2


@pytest.mark.parametrize("mistake", ["no begin_micro_batch", "end_step after zero_grad", "no end_step",
                                     "end_step after clipping"])
def test_a_micro_batch_run_unseen_or_a_step_ended_without_gradients_is_refused(mistake):
    """A micro-batch run without begin_micro_batch had its gradient in p.grad and its examples left out: a step of
    16 examples read as 12, tr(Sigma) 5.03 against 9.15 (a new user's loop). end_step after zero_grad() failed
    with AttributeError: 'float' object has no attribute 'item'. A step left without end_step was merged into the
    next (one row of B = 32 against the last step's p.grad)."""
    model = small_model()
    monitor = ObservingNoiseScaleMonitor(model, NoiseScaleOptions(population_size=None))
    (x1, y1), (x2, y2) = step_batches(1)[0]
    monitor.begin_micro_batch(len(x1), batch=(x1, y1))
    loss = F.cross_entropy(model(x1), y1) / 2
    loss.backward()
    monitor.end_micro_batch(loss)
    if mistake == "no begin_micro_batch":
        loss = F.cross_entropy(model(x2), y2) / 2
        loss.backward()
        with pytest.raises(ValueError, match="end_micro_batch was called with no micro-batch begun"):
            monitor.end_micro_batch(loss)
    elif mistake == "end_step after clipping":   # |G|^2 -0.61 for 0.157 in a new user's loop, silently
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        with pytest.raises(ValueError, match=r"end_step found p.grad changed since the step's last backward"):
            monitor.end_step()
    elif mistake == "end_step after zero_grad":
        model.zero_grad()
        with pytest.raises(ValueError, match=r"end_step found no gradient in p.grad"):
            monitor.end_step()
    else:
        model.zero_grad()   # the optimizer step taken, end_step() forgotten
        with pytest.raises(ValueError, match=r"begin_micro_batch found p.grad cleared .* end_step\(\) was not"):
            monitor.begin_micro_batch(len(x2), batch=(x2, y2))
    assert monitor.history.empty and monitor.end_step() is None
    model.zero_grad()
    for x, y in ((x1, y1), (x2, y2)):
        monitor.begin_micro_batch(len(x), batch=(x, y))
        loss = F.cross_entropy(model(x), y) / 2
        loss.backward()
        monitor.end_micro_batch(loss)
    row = monitor.end_step()
    assert row["batch_size"] == 8
    assert row["trace_sigma"] == pytest.approx(reference_estimate(model, [(x1, y1), (x2, y2)])[0], rel=1e-10)


def test_drop_step_forgets_a_step_the_loop_skips():
    """A loop that catches an error in a micro-batch's backward and skips the step had no call to say so: the next
    begin_micro_batch refused the step left open, advising end_micro_batch."""
    model = small_model()
    monitor = ObservingNoiseScaleMonitor(model, NoiseScaleOptions(population_size=None))
    (x1, y1), (x2, y2) = step_batches(1)[0]
    monitor.begin_micro_batch(len(x1), batch=(x1, y1))
    (F.cross_entropy(model(x1), y1) / 2).backward()   # then, say, out of memory: the loop skips the step
    monitor.drop_step()
    model.zero_grad()
    row = observed_step(model, monitor, [(x1, y1), (x2, y2)])
    assert row["step"] == 0 and row["batch_size"] == 8 and len(monitor.history) == 1
    assert row["trace_sigma"] == pytest.approx(reference_estimate(model, [(x1, y1), (x2, y2)])[0], rel=1e-10)
