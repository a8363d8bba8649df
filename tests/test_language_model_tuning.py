"""analysis/language_model.py's learning-rate search (``tuned_runs``) and its straight-line ramp, with training
replaced by a known loss of the factor: the search must find the grid's minimum, widen past an edge, refine by
sqrt(2), run the winner on every seed, reuse finished runs and hand a resumable table to ``save``."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def language_model():
    spec = importlib.util.spec_from_file_location("language_model", ROOT / "analysis" / "language_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_training(optimum: dict, calls: list):
    """train_arm's stand-in: one final row whose loss is (log2 factor - log2 optimum[arm])^2 + seed / 1000."""
    def train_arm(config, corpus, device, arm, seed, make_schedule, factor=1.0):
        calls.append((arm, seed, factor))
        loss = (math.log2(factor) - math.log2(optimum[arm])) ** 2 + seed / 1000
        return [{"arm": arm, "seed": seed, "lr_factor": factor, "step": 10, "examples_seen": 100,
                 "validation_loss": loss}]
    return train_arm


def test_the_search_finds_each_arms_best_factor_and_runs_it_on_every_seed(language_model, monkeypatch):
    config = language_model.experiment(quick=True)
    arms = list(language_model.tuned_candidates(config))
    assert arms == ["fixed_8", "fixed_12", "fixed_16", "fixed_20", "fixed_24", "fixed_32", "fixed_40", "fixed_64",
                    "ramp_16", "adaptive"]
    # each arm's true best: on the grid, between its points, past the upper edge (widened 3 times), past the lower
    # edge, between the widened points
    optimum = dict(zip(arms, [2 ** log2 for log2 in (0.1, 0, 0.4, 3, -2, -0.6, 1, 2.3, -0.4, 1.6)]))
    # the factor the search can find: the grid's, or one refinement of sqrt(2) from the grid's best
    best = dict(zip(arms, [2 ** log2 for log2 in (0, 0, 0.5, 3, -2, -0.5, 1, 2.5, -0.5, 1.5)]))
    calls, saved = [], []
    monkeypatch.setattr(language_model, "train_arm", fake_training(optimum, calls))
    grid = language_model.tuned_runs(config, None, "cpu", save=saved.append)
    assert len(calls) == len(set(calls)) == len(saved)   # no run twice; a table saved after each
    summary = language_model.tuned_summary(grid).set_index("arm")
    for arm, factor in best.items():
        assert summary.loc[arm, "lr_factor"] == pytest.approx(factor, rel=1e-12)
        assert summary.loc[arm, "seeds"] == len(config["tune_seeds"]) and not summary.loc[arm, "at_edge"]
    assert (summary.index[-2:] == ["ramp_16", "adaptive"]).all()

    # resumed from the last table saved before the final run: only that run is trained again
    calls.clear()
    again = language_model.tuned_runs(config, None, "cpu", done=saved[-2])
    assert calls == [("adaptive", config["tune_seeds"][-1], pytest.approx(best["adaptive"]))]
    pd.testing.assert_frame_equal(again.reset_index(drop=True), grid.reset_index(drop=True), check_dtype=False)


def test_the_ramp_is_a_straight_line_in_examples_seen(language_model):
    batch_size, backward = language_model.linear_ramp(8, 80, 19_200)(model=None)
    assert backward is None
    assert [batch_size(seen) for seen in (0, 4_800, 9_600, 19_200)] == [8, 26, 44, 80]
    # the step count that the experiment's ramp_end was chosen for: about the online policy's 610
    seen = steps = 0
    while seen < 19_200:
        seen, steps = seen + batch_size(seen), steps + 1
    assert abs(steps - 19_200 / 72 * math.log(10)) < 10


def test_the_fixed_front_gives_the_steps_a_tuned_fixed_batch_needs_for_a_loss(language_model):
    summary = pd.DataFrame({"arm": ["fixed_8", "fixed_16", "fixed_24", "fixed_32", "adaptive"],
                            "steps_mean": [2400.0, 1200.0, 800.0, 600.0, 575.0],
                            "validation_loss_mean": [1.61, 1.6, 1.8, 2.0, 1.7]})   # fixed_8: off the front
    steps = language_model.front_steps(summary, [1.7, 1.9, 1.6, 1.5, 2.1])
    assert steps[:3].tolist() == pytest.approx([1000.0, 700.0, 1200.0])
    assert math.isnan(steps[3]) and math.isnan(steps[4])   # beyond the front: no extrapolation
    ramps = pd.DataFrame({"arm": ["ramp_40", "ramp_80", "fixed_16"], "steps_mean": [960.0, 610.0, 1200.0],
                          "validation_loss_mean": [1.64, 1.67, 1.6]})
    assert language_model.front_steps(ramps, [1.65], "ramp").tolist() == pytest.approx([960 - 350 / 3])
