"""Runs whose batch size changes, placed on the steps-examples front of a fixed-batch sweep.

McCandlish et al. (2018, sec. 2.3) fit the runs of a fixed-batch sweep with (S / S_min - 1)(E / E_min - 1) = 1:
steps S and examples E to a target lie on a hyperbola, S = S_min (1 + B_crit / B), E = E_min (1 + B / B_crit).
In the (E, S) plane the front is

    S_front(E) = S_min E / (E - E_min)   for E > E_min   (no fixed batch reaches the target with E <= E_min),

and they argue that a batch size that grows with the noise scale during training can land *beyond* it: fewer
steps at equal examples than any fixed batch. This module measures an adaptive run exactly like a sweep cell
(:func:`noisescale.sweep.first_crossing`: evaluation every k steps, centred moving average, linear
interpolation of the crossing step) and classifies where it lands relative to the front and its bootstrap band.

Examples to the target of a run with batch sizes B_1, B_2, ...: the crossing step s is real; the examples are
the cumulative examples interpolated linearly between whole steps,

    E(s) = sum_{t <= floor(s)} B_t + (s - floor(s)) B_{floor(s) + 1},

which is s B for a fixed batch, the sweep's E = S B.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from noisescale._checks import check_int
from noisescale.sweep import _checked_window, _refuse_crossing_at_start, _stop_step, first_crossing
from noisescale.tradeoff import TradeoffFit, _parametric_bootstrap

__all__ = [
    "FRONT_POSITIONS",
    "examples_at_step",
    "front_band",
    "front_position",
    "steps_and_examples_to_target",
    "train_to_target",
]

FRONT_POSITIONS = ("beyond", "on", "inside")


def examples_at_step(batch_sizes: Sequence[int], step: float) -> float:
    """Cumulative examples after ``step`` (real, >= 0) optimizer steps whose batch sizes are ``batch_sizes``
    (step t used batch_sizes[t - 1]), linear between whole steps (module docstring)."""
    sizes = np.asarray(batch_sizes, dtype=float)
    if sizes.ndim != 1 or np.any(~np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ValueError(f"batch_sizes must be a 1-D sequence of positive batch sizes, got {batch_sizes!r}")
    if not (math.isfinite(step) and 0 <= step <= sizes.size):
        raise ValueError(f"step must lie in [0, {sizes.size}] (the steps the batch sizes cover), got {step!r}")
    cumulative = np.concatenate([[0.0], np.cumsum(sizes)])
    return float(np.interp(step, np.arange(cumulative.size), cumulative))


def steps_and_examples_to_target(
    eval_steps: Sequence[float], eval_values: Sequence[float], batch_sizes: Sequence[int], *, target: float,
    higher_is_better: bool, window: int,
) -> tuple[float, float]:
    """(steps, examples) at which the centred ``window``-evaluation moving average of the evaluations first
    meets ``target`` (:func:`noisescale.sweep.first_crossing`), or (NaN, NaN) if it never does."""
    steps = first_crossing(eval_steps, eval_values, target, higher_is_better=higher_is_better, window=window)
    if math.isnan(steps):
        return math.nan, math.nan
    return steps, examples_at_step(batch_sizes, steps)


def train_to_target(
    trainer: Any, evaluate: Callable[[], float], *, target: float, higher_is_better: bool = True,
    eval_every: int = 10, window: int = 3, max_steps: int = 4000, max_examples: int = 0,
) -> dict[str, Any]:
    """Step a fresh ``trainer`` (an :class:`~noisescale.training.AdaptiveTrainer`) until the target is met, evaluating
    ``evaluate()`` after 0, k, 2k, ... steps, with the stopping rule of a sweep cell: stop at the first
    evaluation at which the smoothed curve has crossed (``window // 2`` evaluations after the crossing one),
    or window // 2 evaluations after the first evaluation at or past the budget (whose smoothed value decides a
    crossing up to the budget): max_steps steps or, if ``max_examples`` > 0, the step at which the examples trained
    reach max_examples (the sweep's min(max_steps, max_examples // B)).
    A crossing past either budget is censored.

    A step whose batch holds NaN or Inf (the row's ``nonfinite_data``, which the trainer skipped) raises a
    ValueError naming it: bad data is no divergence, and the steps to the target would count a step that trained
    nothing. So does a first step whose loss is not finite on finite data: no optimizer step has moved the
    parameters yet, so the model or the loss computes a non-finite value (the row's ``nonfinite_examples`` names
    the examples where others are finite). A target met at step 0 (``window`` 1 and a target the untrained model
    meets) is a ValueError too, before any step: there are no steps to the target to measure. ``window`` must be a
    positive odd int, checked before any step.

    Returns the outcome ("reached", "censored", or "diverged" at a non-finite training loss), steps and
    examples to the target (NaN unless reached), the evaluations, the batch size of every
    step, the steps and examples trained, the trainer's seconds (training and measurement) and the seconds
    spent in ``evaluate``.
    """
    if trainer.steps != 0:
        raise ValueError(f"train_to_target needs a fresh trainer (its steps and examples count from 0); this one has "
                         f"taken {trainer.steps} steps")
    check_int(eval_every, "eval_every", 1)
    check_int(max_steps, "max_steps", 1)
    check_int(max_examples, "max_examples", 0)
    _checked_window(window)   # (smooth_centered's check, before any step is trained)
    eval_steps, eval_values, eval_seconds = [0], [], 0.0
    started = time.perf_counter()
    eval_values.append(float(evaluate()))
    eval_seconds += time.perf_counter() - started
    if window == 1:   # the step-0 evaluation alone decides a crossing at step 0
        _refuse_crossing_at_start(first_crossing(eval_steps, eval_values, target, higher_is_better=higher_is_better,
                                                 window=1), eval_values[0], target)
    steps = examples = math.nan
    outcome = "censored"
    budget_steps, examples_trained = max_steps, 0
    while trainer.steps < _stop_step(budget_steps, eval_every, window):
        row = trainer.step()
        if isinstance(row.get("nonfinite_data"), str):
            raise ValueError(f"step {row['step']}: the batch holds {row['nonfinite_data']}: check the data (remove or "
                             "fix those values); this is no divergence, and the steps to the target need every step "
                             "to train")
        if not math.isfinite(row["loss"]):
            if row["step"] == 0:
                found = row.get("nonfinite_examples") or "the loss is not finite"
                raise ValueError(f"step 0: {found}, on finite data and before any optimizer step: the model or the "
                                 "loss computes a non-finite value on this data (a softmax over a row masked entirely "
                                 "by -inf, log(0), 0/0); this is no divergence")
            outcome = "diverged"
            break
        examples_trained += row["batch_size"]
        if max_examples and examples_trained >= max_examples:
            budget_steps = min(budget_steps, trainer.steps)
        if trainer.steps % eval_every:
            continue
        started = time.perf_counter()
        eval_values.append(float(evaluate()))
        eval_seconds += time.perf_counter() - started
        eval_steps.append(trainer.steps)
        steps, examples = steps_and_examples_to_target(eval_steps, eval_values, trainer.history["batch_size"],
                                                       target=target, higher_is_better=higher_is_better,
                                                       window=window)
        _refuse_crossing_at_start(steps, eval_values[0], target)
        if math.isfinite(steps):
            within = steps <= max_steps and (not max_examples or examples <= max_examples)
            outcome = "reached" if within else "censored"
            break
    if outcome != "reached":
        steps = examples = math.nan
    history = trainer.history
    return {
        "outcome": outcome, "steps": steps, "examples": examples,
        "eval_steps": eval_steps, "eval_values": eval_values,
        "batch_sizes": history["batch_size"].to_numpy(), "learning_rates": history["learning_rate"].to_numpy(),
        "steps_trained": trainer.steps, "examples_trained": int(history["batch_size"].sum()),
        "train_seconds": trainer.seconds, "eval_seconds": eval_seconds,
    }


def _front_steps(s_min: np.ndarray, e_min: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """S_front(E) = S_min E / (E - E_min), inf where E <= E_min; broadcasts."""
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = s_min * examples / (examples - e_min)
    return np.where(examples > e_min, steps, np.inf)


def front_band(fit: TradeoffFit, examples: Any, *, n_bootstrap: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The fitted front S_front(E) at each of ``examples`` with its pointwise ``fit.confidence`` band.

    The band is the central percentile range of S_front(E) over the fit's parametric bootstrap replicates of
    (S_min, E_min) (the scheme of :func:`noisescale.tradeoff.fit_tradeoff`: noise of the residual sd, itself
    drawn from its chi-square distribution, added to the fitted log S and refitted). A replicate with
    E_min >= E contributes S = inf, so below the smallest replicate E_min the band's high edge is inf.
    Columns: examples, steps (the fit's front), steps_low, steps_high.
    """
    examples = np.atleast_1d(np.asarray(examples, dtype=float))
    if examples.ndim != 1 or np.any(~np.isfinite(examples)) or np.any(examples <= 0):
        raise ValueError(f"examples must be positive and finite, got {examples!r}")
    if not (fit.s_min > 0 and 0 < fit.e_min < np.inf):
        raise ValueError("the fit is at a limit of the model (B_crit 0 or inf): it has no finite front to compare "
                         "with; sample batch sizes on both sides of the bend")
    log_batch_sizes = np.log(fit.batch_sizes)
    fitted = np.log(fit.predict_steps(fit.batch_sizes))
    replicates = _parametric_bootstrap(log_batch_sizes, fitted, fit.log_residual_std, fit.steps.size - 2,
                                       n_bootstrap or fit.n_bootstrap, np.random.default_rng(seed))
    with np.errstate(over="ignore"):
        s_min, e_min = np.exp(replicates[:, 0]), np.exp(replicates[:, 2])
    curves = _front_steps(s_min[:, None], e_min[:, None], examples[None, :])  # (replicates, points)
    tail = (1.0 - fit.confidence) / 2.0
    low, high = np.quantile(curves, [tail, 1.0 - tail], axis=0, method="inverted_cdf")
    return pd.DataFrame({"examples": examples, "steps": _front_steps(fit.s_min, fit.e_min, examples),
                         "steps_low": low, "steps_high": high})


def front_position(
    fit: TradeoffFit, examples: Any, steps: Any, *, n_bootstrap: int | None = None, seed: int = 0,
) -> pd.DataFrame:
    """Where runs at (examples, steps) land relative to the fitted front at their own examples E.

    ``beyond``: fewer steps than the band's low edge (what no fixed batch achieves, within the fit's
    uncertainty); ``inside``: more steps than its high edge (worse than the best fixed batch at equal
    examples); ``on``: within the band. ``steps_ratio`` = S / S_front(E) (0 where E <= E_min, the front
    being infinite there). Columns: examples, steps, front_steps, front_low, front_high, steps_ratio, position.
    """
    examples = np.atleast_1d(np.asarray(examples, dtype=float))
    steps = np.atleast_1d(np.asarray(steps, dtype=float))
    if examples.shape != steps.shape:
        raise ValueError(f"examples and steps must have the same shape, got {examples.shape} and {steps.shape}")
    if np.any(~np.isfinite(steps)) or np.any(steps <= 0):
        raise ValueError(f"steps must be positive and finite (runs that reached the target), got {steps!r}")
    band = front_band(fit, examples, n_bootstrap=n_bootstrap, seed=seed)
    position = np.where(steps < band["steps_low"], "beyond",
                        np.where(steps > band["steps_high"], "inside", "on"))
    return pd.DataFrame({"examples": examples, "steps": steps, "front_steps": band["steps"].to_numpy(),
                         "front_low": band["steps_low"].to_numpy(), "front_high": band["steps_high"].to_numpy(),
                         "steps_ratio": steps / band["steps"].to_numpy(), "position": position})
