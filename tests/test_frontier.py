"""Steps and examples to a target for runs whose batch size changes, and their position relative to a fitted front."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from noisescale.frontier import (
    examples_at_step, front_band, front_position, steps_and_examples_to_target, train_to_target,
)
from noisescale.tradeoff import fit_tradeoff


def test_examples_at_step_interpolates_the_cumulative_examples_between_whole_steps():
    sizes = [8, 8, 16, 32]  # cumulative 0, 8, 16, 32, 64 after 0..4 steps
    assert examples_at_step(sizes, 0) == 0
    assert examples_at_step(sizes, 3) == 32
    assert examples_at_step(sizes, 2.25) == 16 + 0.25 * 16
    assert examples_at_step(sizes, 4) == 64
    assert examples_at_step([64] * 50, 37.5) == 37.5 * 64  # a fixed batch: E = S B, as in the sweep
    with pytest.raises(ValueError, match="step must lie in"):
        examples_at_step(sizes, 4.5)
    with pytest.raises(ValueError, match="positive batch sizes"):
        examples_at_step([8, 0], 1)


def test_steps_and_examples_to_target_on_a_hand_computed_varying_batch_run():
    # evaluations every 10 steps; centred 3-average: [nan, .60, .70, .76, .82, nan]
    eval_steps = [0, 10, 20, 30, 40, 50]
    accuracy = [0.50, 0.60, 0.70, 0.80, 0.78, 0.88]
    # smoothed at step 20 is 0.70, at step 30 is (0.70 + 0.80 + 0.78) / 3 = 0.76: target 0.75 is crossed at
    # 20 + 10 * (0.75 - 0.70) / (0.76 - 0.70) = 28.333... steps
    batch_sizes = [16] * 20 + [32] * 10 + [64] * 20  # B = 16 for steps 1-20, 32 for 21-30, 64 for 31-50
    steps, examples = steps_and_examples_to_target(eval_steps, accuracy, batch_sizes, target=0.75,
                                                   higher_is_better=True, window=3)
    expected_steps = 20 + 10 * 0.05 / 0.06
    assert steps == pytest.approx(expected_steps, rel=1e-12)
    # 20 steps at 16 = 320 examples, then 8.333... steps at 32
    assert examples == pytest.approx(320 + (expected_steps - 20) * 32, rel=1e-12)
    never = steps_and_examples_to_target(eval_steps, accuracy, batch_sizes, target=0.95, higher_is_better=True,
                                         window=3)
    assert all(math.isnan(value) for value in never)


def _known_fit():
    """A fit to exact data on S = 100 (1 + 50 / B), B = 8 ... 2048, with a little fixed scatter."""
    batch_sizes = 2.0 ** np.arange(3, 12)
    scatter = np.exp(0.05 * np.array([1, -1, 1, -1, 0, 1, -1, 1, -1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fit_tradeoff(batch_sizes, 100 * (1 + 50 / batch_sizes) * scatter, n_bootstrap=400, seed=0)


def test_front_band_contains_the_fit_and_widens_towards_e_min():
    fit = _known_fit()
    examples = fit.e_min * np.array([1.5, 2.0, 4.0, 20.0])
    band = front_band(fit, examples)
    np.testing.assert_allclose(band["steps"], fit.s_min * examples / (examples - fit.e_min), rtol=1e-12)
    assert np.all(band["steps_low"] <= band["steps"]) and np.all(band["steps"] <= band["steps_high"])
    relative_width = (band["steps_high"] - band["steps_low"]) / band["steps"]
    assert relative_width.iloc[0] > relative_width.iloc[-1]
    # below every replicate's E_min no fixed batch reaches the target: the front is infinite
    assert np.isinf(front_band(fit, [1.0])["steps_high"].iloc[0])


def test_front_position_on_inside_and_beyond_a_known_front():
    fit = _known_fit()
    examples = fit.e_min * np.array([2.0, 2.0, 2.0, 3.0, 0.5])
    on_front = fit.s_min * examples / (examples - fit.e_min)
    steps = on_front * np.array([1.0, 2.0, 0.5, 1.0, 1.0])
    steps[-1] = 10.0  # fewer examples than E_min: beyond whatever the steps
    result = front_position(fit, examples, steps)
    assert result["position"].tolist() == ["on", "inside", "beyond", "on", "beyond"]
    np.testing.assert_allclose(result["steps_ratio"][:4], [1.0, 2.0, 0.5, 1.0], rtol=1e-12)
    assert result["steps_ratio"].iloc[-1] == 0.0
    with pytest.raises(ValueError, match="same shape"):
        front_position(fit, examples, steps[:2])


class _ScriptedTrainer:
    """A stand-in with the trainer's step / steps / history / seconds: the batch size doubles every 10 steps."""

    def __init__(self):
        self.steps, self.seconds, self._rows = 0, 0.0, []

    def step(self):
        row = {"batch_size": 8 * 2 ** (self.steps // 10), "learning_rate": 0.1, "loss": 1.0}
        self._rows.append(row)
        self.steps += 1
        return row

    @property
    def history(self):
        import pandas as pd

        return pd.DataFrame(self._rows)


def test_train_to_target_stops_like_a_sweep_cell_one_evaluation_after_the_crossing():
    trainer = _ScriptedTrainer()
    curve = iter([0.1, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])  # smoothed after 10, 20, 30 steps: .433, .667, .8
    result = train_to_target(trainer, lambda: next(curve), target=0.75, eval_every=10, window=3)
    assert result["outcome"] == "reached"
    assert result["steps_trained"] == 40  # the crossing is seen at the evaluation after step 30's
    smoothed_20, smoothed_30 = (0.5 + 0.7 + 0.8) / 3, (0.7 + 0.8 + 0.9) / 3
    expected = 20 + 10 * (0.75 - smoothed_20) / (smoothed_30 - smoothed_20)
    assert result["steps"] == pytest.approx(expected)
    assert result["examples"] == pytest.approx(10 * 8 + 10 * 16 + (expected - 20) * 32)
    assert result["examples_trained"] == 10 * (8 + 16 + 32 + 64)
    censored = train_to_target(_ScriptedTrainer(), lambda: 0.1, target=0.75, eval_every=10, window=3, max_steps=30)
    assert censored["outcome"] == "censored" and math.isnan(censored["steps"])
    assert censored["steps_trained"] == 40
    # an examples budget as in the sweep: 8 * 10 + 16 * 10 = 240 examples are spent after step 20
    curve = iter([0.1, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    limited = train_to_target(_ScriptedTrainer(), lambda: next(curve), target=0.75, eval_every=10, window=3,
                              max_examples=240)
    assert limited["outcome"] == "censored" and limited["steps_trained"] == 30
    started = _ScriptedTrainer()
    started.step()
    with pytest.raises(ValueError, match="fresh trainer"):
        train_to_target(started, lambda: 0.1, target=0.75)


def test_a_crossing_after_the_last_evaluation_before_the_budget_and_within_it_is_reached():
    # smoothed (window 3) at 30 and 40 steps: 0.6 and 0.833, so 0.65 is met at 32.14 steps, within max_steps = 35;
    # the run stopped at 45 steps, before the evaluation at 50 that the smoothed value at 40 needs: censored
    values = [0.1, 0.2, 0.3, 0.6, 0.9, 1.0, 1.0]
    curve = iter(values)
    result = train_to_target(_ScriptedTrainer(), lambda: next(curve), target=0.65, eval_every=10, window=3,
                             max_steps=35)
    assert result["outcome"] == "reached" and result["steps_trained"] == 50
    assert result["steps"] == pytest.approx(30 + 10 * (0.65 - 0.6) / (2.5 / 3 - 0.6), rel=1e-12)
    curve = iter(values)
    later = train_to_target(_ScriptedTrainer(), lambda: next(curve), target=0.65, eval_every=10, window=3,
                            max_steps=31)
    assert later["outcome"] == "censored" and math.isnan(later["steps"]) and later["steps_trained"] == 50


def test_train_to_target_refuses_a_target_met_before_any_step():
    with pytest.raises(ValueError, match=r"target 0.75 is met before any training step \(the metric at step 0 is 0.9"):
        train_to_target(_ScriptedTrainer(), lambda: 0.9, target=0.75, eval_every=10, window=1)


def test_train_to_target_refuses_its_window_and_a_target_met_at_step_0_before_training():
    """An even window failed only at the first smoothing, after eval_every steps (smooth_centered's check), and a
    target met at step 0 with window 1 was refused after the first eval_every steps: both before any step now."""
    for window in (2, 0):
        trainer = _ScriptedTrainer()
        with pytest.raises(ValueError, match="window must be"):
            train_to_target(trainer, lambda: 0.1, target=0.75, eval_every=10, window=window)
        assert trainer.steps == 0
    trainer = _ScriptedTrainer()
    with pytest.raises(ValueError, match=r"target 0.75 is met before any training step"):
        train_to_target(trainer, lambda: 0.9, target=0.75, eval_every=10, window=1)
    assert trainer.steps == 0
    with pytest.raises(TypeError, match="eval_every must be an int"):
        train_to_target(_ScriptedTrainer(), lambda: 0.1, target=0.75, eval_every=10.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_train_to_target_refuses_a_batch_holding_nan_rather_than_calling_the_run_diverged():
    """Before, the first step whose batch held NaN ended the run as "diverged"."""
    from noisescale.losses import per_example_cross_entropy
    from noisescale.training import AdaptiveTrainer

    torch.manual_seed(0)
    inputs = torch.randn(64, 5, dtype=torch.float64)
    targets = (inputs[:, 0] > 0).long()
    inputs[20, 3] = math.nan
    model = torch.nn.Linear(5, 2).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with AdaptiveTrainer(model, per_example_cross_entropy, optimizer, TensorDataset(inputs, targets), batch_size=8,
                         progress=False) as trainer:
        step = next(k for k, batch in enumerate(type(trainer.sampler)(64, 8, seed=0)) if 20 in batch)
        with pytest.raises(ValueError, match=rf"^step {step}: the batch holds NaN in its inputs \(1 value\): "
                           "check the data"):
            train_to_target(trainer, lambda: 0.1, target=0.75, eval_every=100)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_train_to_target_refuses_a_loss_that_is_not_finite_at_the_first_step():
    """Before, a loss that is not finite for some examples from the first step on (a division by a count that is 0
    for class 0) ended the run as "diverged", though no optimizer step had been taken."""
    from noisescale.losses import per_example_cross_entropy
    from noisescale.training import AdaptiveTrainer

    torch.manual_seed(0)
    inputs = torch.randn(64, 5, dtype=torch.float64)
    targets = (inputs[:, 0] > 0).long()
    model = torch.nn.Linear(5, 2).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with AdaptiveTrainer(model, lambda outputs, y: per_example_cross_entropy(outputs, y) / (y != 0), optimizer,
                         TensorDataset(inputs, targets), batch_size=8, progress=False) as trainer:
        with pytest.raises(ValueError, match=r"^step 0: the loss of \d of its 8 examples is not finite \(ind.*, on "
                                             "finite data and before any optimizer step: .* this is no divergence$"):
            train_to_target(trainer, lambda: 0.1, target=0.75, eval_every=100)


def test_train_to_target_with_a_real_adaptive_trainer_counts_the_examples_it_trained():
    from noisescale.controller import NoiseScaleBatchPolicy
    from noisescale.losses import per_example_cross_entropy
    from noisescale.training import AdaptiveTrainer

    torch.manual_seed(0)
    inputs = torch.randn(256, 5)
    targets = (inputs[:, 0] > 0).long()
    model = torch.nn.Linear(5, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    policy = NoiseScaleBatchPolicy(4, min_batch_size=4, max_batch_size=64, kappa=4.0, hold_steps=2)
    with AdaptiveTrainer(model, per_example_cross_entropy, optimizer, TensorDataset(inputs, targets), policy=policy,
                         progress=False) as trainer:
        def accuracy():
            with torch.no_grad():
                return (model(inputs).argmax(1) == targets).float().mean().item()

        result = train_to_target(trainer, accuracy, target=0.9, eval_every=5, window=3, max_steps=200)
    assert result["outcome"] == "reached"
    sizes = trainer.history["batch_size"].to_numpy()
    assert len(set(sizes)) > 1  # the batch size did change
    assert result["examples_trained"] == sizes.sum() == trainer.sampler.examples_seen
    assert result["examples"] == pytest.approx(examples_at_step(sizes, result["steps"]))
