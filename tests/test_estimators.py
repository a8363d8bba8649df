"""Tests of noisescale.estimators against exact enumeration, naive references and Monte-Carlo coverage."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from scipy import stats

from noisescale.estimators import (
    ExponentialMovingNoiseScale,
    ExponentialMovingRatio,
    NoiseScaleEstimate,
    fieller_interval,
    micro_batch_noise_scale,
    noise_scale_across_runs,
    simple_noise_scale,
    two_batch_noise_scale,
)


def _population(seed: int = 0, size: int = 5, dim: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(size, dim)) + np.array([0.7, -0.3, 0.2])[:dim]


def _population_truth(population: np.ndarray) -> tuple[float, float]:
    """|G|^2 and tr(Sigma) of one example drawn uniformly (with replacement) from the population."""
    mean = population.mean(axis=0)
    trace_sigma = float(((population - mean) ** 2).sum(axis=1).mean())
    return float(mean @ mean), trace_sigma


def test_per_example_estimates_are_exactly_unbiased_over_all_batches():
    population = _population()
    true_grad_sqnorm, true_trace_sigma = _population_truth(population)
    batch_size = 3
    estimates = []
    for indices in itertools.product(range(len(population)), repeat=batch_size):  # all equally likely batches
        gradients = population[list(indices)]
        sqnorms = (gradients**2).sum(axis=1)
        mean_gradient = gradients.mean(axis=0)
        estimates.append(simple_noise_scale(sqnorms, mean_gradient @ mean_gradient))
    assert np.mean([e.grad_sqnorm for e in estimates]) == pytest.approx(true_grad_sqnorm, rel=1e-12)
    assert np.mean([e.trace_sigma for e in estimates]) == pytest.approx(true_trace_sigma, rel=1e-12)
    # the ratio of unbiased estimates is not unbiased (documented): its mean differs from the truth
    finite_ratios = [e.b_simple for e in estimates if e.grad_sqnorm > 0]
    assert np.mean(finite_ratios) != pytest.approx(true_trace_sigma / true_grad_sqnorm, rel=0.05)


def test_two_batch_estimates_are_exactly_unbiased_over_all_batches():
    population = _population(seed=1, size=4)
    true_grad_sqnorm, true_trace_sigma = _population_truth(population)
    micro_batch, num_micro_batches = 2, 2
    grad_sqnorms, trace_sigmas = [], []
    for indices in itertools.product(range(len(population)), repeat=micro_batch * num_micro_batches):
        gradients = population[list(indices)].reshape(num_micro_batches, micro_batch, -1)
        micro_means = gradients.mean(axis=1)
        big_mean = micro_means.mean(axis=0)
        estimate = two_batch_noise_scale((micro_means**2).sum(axis=1), micro_batch, big_mean @ big_mean,
                                         micro_batch * num_micro_batches)
        grad_sqnorms.append(estimate.grad_sqnorm)
        trace_sigmas.append(estimate.trace_sigma)
    assert np.mean(grad_sqnorms) == pytest.approx(true_grad_sqnorm, rel=1e-12)
    assert np.mean(trace_sigmas) == pytest.approx(true_trace_sigma, rel=1e-12)


@pytest.mark.parametrize("sizes", [(1, 2), (3, 1, 1), (2, 2)])
def test_micro_batch_estimates_of_any_sizes_are_exactly_unbiased_over_all_batches(sizes):
    """(sum_k b_k |g_k|^2 - B |g_B|^2) / (K - 1) and |g_B|^2 - tr(Sigma)/B, averaged over every batch drawn with
    replacement from a population of 4 gradients, equal the population's tr(Sigma) and |G|^2."""
    population = _population(seed=3, size=4)
    true_grad_sqnorm, true_trace_sigma = _population_truth(population)
    ends = np.cumsum((0,) + sizes)
    grad_sqnorms, trace_sigmas = [], []
    for indices in itertools.product(range(len(population)), repeat=int(ends[-1])):
        gradients = population[list(indices)]
        micro_means = [gradients[start:end].mean(axis=0) for start, end in zip(ends[:-1], ends[1:])]
        big_mean = gradients.mean(axis=0)
        estimate = micro_batch_noise_scale([m @ m for m in micro_means], list(sizes), big_mean @ big_mean)
        assert estimate.trace_sigma >= -1e-12   # |g_B|^2 is at most the b_k/B-weighted mean of the |g_k|^2
        grad_sqnorms.append(estimate.grad_sqnorm)
        trace_sigmas.append(estimate.trace_sigma)
    assert np.mean(grad_sqnorms) == pytest.approx(true_grad_sqnorm, rel=1e-12)
    assert np.mean(trace_sigmas) == pytest.approx(true_trace_sigma, rel=1e-12)


def test_micro_batch_estimator_reduces_to_the_per_example_and_two_batch_ones():
    rng = np.random.default_rng(4)
    gradients = rng.normal(size=(12, 5)) + 0.3
    big = gradients.mean(axis=0) @ gradients.mean(axis=0)
    per_example = simple_noise_scale((gradients**2).sum(axis=1), big)
    as_units = micro_batch_noise_scale((gradients**2).sum(axis=1), [1] * 12, big)
    micro = gradients.reshape(3, 4, 5).mean(axis=1)
    two_batch = two_batch_noise_scale((micro**2).sum(axis=1), 4, big, 12)
    as_micro = micro_batch_noise_scale((micro**2).sum(axis=1), [4, 4, 4], big)
    for expected, actual in ((per_example, as_units), (two_batch, as_micro)):
        assert actual.trace_sigma == pytest.approx(expected.trace_sigma, rel=1e-12)
        assert actual.grad_sqnorm == pytest.approx(expected.grad_sqnorm, rel=1e-12)
        assert actual.batch_size == 12
    with pytest.raises(ValueError, match="at least 2"):
        micro_batch_noise_scale([1.0], [4], 0.5)
    with pytest.raises(ValueError, match="one count per micro-batch"):
        micro_batch_noise_scale([1.0, 2.0], [4, 4, 4], 0.5)
    with pytest.raises(ValueError, match="exceeds"):
        micro_batch_noise_scale([1.0, 1.0], [4, 4], 2.0)


def test_per_example_estimator_matches_closed_form_and_accepts_tensors():
    rng = np.random.default_rng(2)
    gradients = rng.normal(size=(6, 4))
    sqnorms = (gradients**2).sum(axis=1)
    mean_gradient = gradients.mean(axis=0)
    # tr(Sigma) estimate = trace of the unbiased sample covariance
    expected_trace = np.trace(np.cov(gradients, rowvar=False, ddof=1))
    estimate = simple_noise_scale(torch.tensor(sqnorms), torch.tensor(mean_gradient @ mean_gradient))
    assert estimate.batch_size == 6
    assert estimate.trace_sigma == pytest.approx(expected_trace, rel=1e-12)
    assert estimate.grad_sqnorm == pytest.approx(mean_gradient @ mean_gradient - expected_trace / 6, rel=1e-12)
    assert estimate.b_simple == pytest.approx(estimate.trace_sigma / estimate.grad_sqnorm)


def test_b_simple_is_infinite_when_gradient_estimate_not_positive():
    assert NoiseScaleEstimate(grad_sqnorm=-0.1, trace_sigma=2.0, batch_size=4).b_simple == math.inf
    assert math.isnan(NoiseScaleEstimate(grad_sqnorm=math.nan, trace_sigma=2.0, batch_size=4).b_simple)


def test_b_simple_is_undefined_where_every_per_example_gradient_is_zero_and_infinite_where_only_the_mean_is():
    """Every per-example gradient 0 gives tr(Sigma) = |G|^2 = 0: B_simple is 0/0, NaN (before, inf, read as "the
    mean gradient is lost in the noise"), per batch and in the moving averages (B_noise's too). A zero mean gradient
    with noise (g_i = +-1) stays +inf: its |G|^2 estimate is negative, the true ratio infinite."""
    zero = simple_noise_scale(np.zeros(8), 0.0, population=40)
    assert (zero.trace_sigma, zero.grad_sqnorm) == (0.0, 0.0) and math.isnan(zero.b_simple)
    assert math.isnan(micro_batch_noise_scale([0.0, 0.0, 0.0], [2, 3, 3], 0.0).b_simple)
    noisy = simple_noise_scale(np.ones(4), 0.0)   # g_i = +1, -1, +1, -1: gbar = 0, tr(Sigma) > 0
    assert noisy.trace_sigma > 0 and noisy.b_simple == math.inf
    average, ratio = ExponentialMovingNoiseScale(0.9), ExponentialMovingRatio(0.8)
    for _ in range(5):
        average.update_estimate(zero)
        ratio.update(0.0, 0.0)
    assert math.isnan(average.b_simple) and math.isnan(ratio.ratio) and average.all_zero
    average.update_estimate(noisy)
    assert average.b_simple == math.inf and not average.all_zero
    assert NoiseScaleEstimate(grad_sqnorm=0.0, trace_sigma=2.0, batch_size=4).b_simple == math.inf


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: simple_noise_scale([1.0, -2.0], 0.5), "sqnorms"),
        (lambda: simple_noise_scale([[1.0, 2.0]], 0.5), "1-D"),
        (lambda: simple_noise_scale([1.0, 2.0], -0.5), "grad_sqnorm"),
        (lambda: simple_noise_scale([1.0, 2.0], [0.5, 0.5]), "scalar"),
        (lambda: simple_noise_scale([1.0], 0.5), "at least 2"),
        (lambda: simple_noise_scale([1.0, 2.0], 0.5, on_small_batch="ignore"), "on_small_batch"),
        (lambda: simple_noise_scale([1.0, 2.0], 6.0), "summed instead of averaged"),
        (lambda: simple_noise_scale("abc", 1.0), "sqnorms"),
        (lambda: two_batch_noise_scale([1.0, 2.0], 4, 0.5, 4), "b_big must exceed"),
        (lambda: two_batch_noise_scale([1.0, 2.0], 2.0, 0.5, 4), "b_small must be an int"),
        (lambda: two_batch_noise_scale([], 2, 0.5, 4), "non-empty"),
        (lambda: ExponentialMovingRatio(decay=1.0), "decay"),
        (lambda: ExponentialMovingRatio(decay="0.9"), "decay"),
        (lambda: ExponentialMovingRatio(nonnegative=1), "nonnegative must be a bool"),
        (lambda: ExponentialMovingRatio().interval(confidence=1.5), "confidence"),
        (lambda: ExponentialMovingNoiseScale().update_estimate((1.0, 2.0)), "NoiseScaleEstimate"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_single_example_batch_can_return_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="at least 2"):
        estimate = simple_noise_scale([1.0], 0.5, on_small_batch="nan")
    assert math.isnan(estimate.trace_sigma) and math.isnan(estimate.grad_sqnorm)


def test_nan_inputs_give_nan_estimates_and_are_skipped_by_the_average():
    estimate = simple_noise_scale([1.0, math.nan], 0.5)
    assert math.isnan(estimate.trace_sigma)
    assert not math.isfinite(simple_noise_scale([1.0, 2.0], math.inf).grad_sqnorm)
    average = ExponentialMovingNoiseScale(decay=0.9)
    average.update(3.0, 1.0)
    state_before = average.state_dict()
    assert average.update_estimate(estimate) is False
    assert average.update(math.inf, 1.0) is False
    assert average.num_skipped == 2
    state_after = average.state_dict()
    assert state_after.pop("num_skipped") == 2 and state_before.pop("num_skipped") == 0
    assert state_after == state_before


def test_average_matches_explicitly_weighted_mean_with_bias_correction():
    rng = np.random.default_rng(3)
    numerators, denominators = rng.normal(5.0, 1.0, size=12), rng.normal(2.0, 0.3, size=12)
    decay = 0.8
    average = ExponentialMovingRatio(decay=decay)
    for numerator, denominator in zip(numerators, denominators):
        average.update(numerator, denominator)
    weights = (1 - decay) * decay ** np.arange(11, -1, -1)
    assert average.numerator == pytest.approx(np.average(numerators, weights=weights), rel=1e-12)
    assert average.denominator == pytest.approx(np.average(denominators, weights=weights), rel=1e-12)
    assert average.ratio == pytest.approx(average.numerator / average.denominator)
    assert average.effective_sample_size == pytest.approx(weights.sum() ** 2 / (weights**2).sum(), rel=1e-12)
    low, high = average.interval(0.9)
    assert low < average.ratio < high


def test_average_before_updates_and_with_unresolved_signal():
    average = ExponentialMovingRatio()
    assert math.isnan(average.ratio) and average.effective_sample_size == 0.0
    assert all(math.isnan(bound) for bound in average.interval())
    average.update(1.0, -0.5)
    assert average.ratio == math.inf


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(4)
    values = rng.normal(3.0, 1.0, size=(20, 2))
    original = ExponentialMovingNoiseScale(decay=0.9)
    for numerator, denominator in values[:10]:
        original.update(numerator, denominator)
    original.update(math.nan, 1.0)
    restored = ExponentialMovingNoiseScale(decay=0.9)
    restored.load_state_dict(original.state_dict())
    for numerator, denominator in values[10:]:
        original.update(numerator, denominator)
        restored.update(numerator, denominator)
    assert restored.state_dict() == original.state_dict()
    assert restored.b_simple == original.b_simple and restored.interval() == original.interval()
    with pytest.raises(ValueError, match=r"this average has decay 0.5: .*\(a monitor's ema_decay or "
                                         r"hessian_ema_decay\); give decay=0.9$"):
        ExponentialMovingNoiseScale(decay=0.5).load_state_dict(original.state_dict())
    with pytest.raises(ValueError, match="misses keys"):
        restored.load_state_dict({"decay": 0.9})


@pytest.mark.parametrize(("decay", "num_steps"), [(0.9, 60), (0.95, 25)])  # steady state; start-up phase
def test_interval_coverage_by_simulation(decay, num_steps):
    """Nominal 90% intervals must cover the true B_simple in 85-95% of independent simulated runs."""
    rng = np.random.default_rng(5)
    dim, batch_size, num_runs = 50, 16, 400
    per_example_sd = np.sqrt(np.linspace(0.5, 1.5, dim))  # Sigma = diag(per_example_sd^2)
    true_gradient = np.full(dim, 0.25)
    true_b_simple = (per_example_sd**2).sum() / (true_gradient @ true_gradient)
    covered = 0
    for _ in range(num_runs):
        average = ExponentialMovingNoiseScale(decay=decay)
        gradients = true_gradient + per_example_sd * rng.standard_normal((num_steps, batch_size, dim))
        sqnorms = (gradients**2).sum(axis=-1)
        grad_sqnorms = (gradients.mean(axis=1) ** 2).sum(axis=-1)
        for step in range(num_steps):
            average.update_estimate(simple_noise_scale(sqnorms[step], grad_sqnorms[step]))
        low, high = average.interval(0.9)
        covered += low <= true_b_simple <= high
    assert 0.85 <= covered / num_runs <= 0.95


# ---------------------------------------------------------------- Fieller's interval of the ratio


def _fed_average(pairs: np.ndarray, decay: float, nonnegative: bool = True) -> ExponentialMovingRatio:
    average = ExponentialMovingRatio(decay=decay, nonnegative=nonnegative)
    for numerator, denominator in pairs:
        average.update(numerator, denominator)
    return average


def _t_test_accepts(pairs: np.ndarray, decay: float, ratios: np.ndarray, confidence: float) -> np.ndarray:
    """Independent reference: the ratios R for which a t-test of mean(num - R den) = 0 over the EMA-weighted
    steps does not reject (weighted mean and variance of the step values num - R den, Kish's n_eff)."""
    weights = decay ** np.arange(len(pairs) - 1, -1, -1)
    n_eff = weights.sum() ** 2 / (weights**2).sum()
    contrasts = pairs[:, :1] - ratios[None, :] * pairs[:, 1:]  # (steps, ratios)
    mean = np.average(contrasts, axis=0, weights=weights)
    variance = np.average((contrasts - mean) ** 2, axis=0, weights=weights) * n_eff / (n_eff - 1)
    quantile = stats.t.ppf(0.5 + confidence / 2, df=n_eff - 1)
    return mean**2 <= quantile**2 * variance / n_eff


@pytest.mark.parametrize(
    ("mean_denominator", "sd_denominator", "nonnegative", "expected"),
    [
        (2.0, 1.5, False, "bounded"),  # denominator resolved from 0
        (0.3, 3.0, True, "ray"),  # not resolved, numerator resolved: [r2, inf)
        (0.3, 3.0, False, "whole line"),  # the same two rays, reported by their hull
        (0.0, 3.0, True, "ray"),
    ],
)
def test_fieller_interval_is_the_set_a_t_test_does_not_reject(mean_denominator, sd_denominator, nonnegative, expected):
    rng = np.random.default_rng(6)
    decay, confidence = 0.9, 0.9
    pairs = np.array([10.0, 0.0]) + rng.standard_normal((40, 2)) * [3.0, sd_denominator]
    weights = decay ** np.arange(39, -1, -1)
    pairs[:, 1] += mean_denominator - np.average(pairs[:, 1], weights=weights)  # the averaged denominator, exactly
    low, high = _fed_average(pairs, decay, nonnegative).interval(confidence)
    grid = np.linspace(-200.0, 200.0, 100_001)
    accepted = grid[_t_test_accepts(pairs, decay, grid, confidence)]
    spacing = grid[1] - grid[0]
    if expected == "bounded":
        assert math.isfinite(low) and math.isfinite(high)
        assert (low, high) == (pytest.approx(accepted.min(), abs=spacing), pytest.approx(accepted.max(), abs=spacing))
        assert np.all(np.diff(accepted) < 1.5 * spacing)  # one interval
    elif expected == "ray":
        assert high == math.inf
        positive = accepted[accepted >= 0]
        assert positive.max() == grid[-1]  # the accepted set runs off to +inf
        assert low == pytest.approx(positive.min(), abs=spacing) and low > 0
    else:
        assert (low, high) == (-math.inf, math.inf)
        assert accepted.min() == grid[0] and accepted.max() == grid[-1]


def test_fieller_interval_closed_form_cases():
    # bounded: var_den = 0 gives a / b -+ t sd(a) / b exactly
    assert fieller_interval(6.0, 2.0, 1.0, 0.0, 0.0, 2.0) == pytest.approx((2.0, 4.0))
    # bounded but partly below 0: clipped only when the ratio is known to be non-negative
    assert fieller_interval(1.0, 2.0, 4.0, 0.0, 0.0, 1.0) == pytest.approx((-0.5, 1.5))
    assert fieller_interval(1.0, 2.0, 4.0, 0.0, 0.0, 1.0, nonnegative=True) == pytest.approx((0.0, 1.5))
    # denominator not resolved (b^2 < t^2 v_dd), numerator resolved: q(R) = -3 R^2 - 6 R + 8 <= 0 for R >= (-3 + sqrt(33))/3
    low, high = fieller_interval(3.0, 1.0, 1.0, 4.0, 0.0, 1.0, nonnegative=True)
    assert high == math.inf and low == pytest.approx((-3.0 + math.sqrt(9.0 + 24.0)) / 3.0)
    # neither resolved: the whole line, or [0, inf) for a non-negative ratio
    assert fieller_interval(0.5, 0.1, 1.0, 1.0, 0.0, 2.0) == (-math.inf, math.inf)
    assert fieller_interval(0.5, 0.1, 1.0, 1.0, 0.0, 2.0, nonnegative=True) == (0.0, math.inf)
    # a denominator resolved below 0 contradicts a non-negative ratio: nothing is resolved
    assert fieller_interval(5.0, -2.0, 0.01, 0.01, 0.0, 2.0, nonnegative=True) == (0.0, math.inf)
    assert fieller_interval(5.0, -2.0, 0.01, 0.01, 0.0, 2.0)[1] < 0


@pytest.mark.parametrize(
    ("mean_denominator", "sd_denominator", "correlation", "decay", "num_steps"),
    [
        (2.0, 1.0, 0.5, 0.9, 60),  # well resolved, positively correlated, steady state
        (2.0, 1.0, -0.5, 0.95, 10),  # well resolved, negatively correlated, start-up (n_eff about 5)
        (0.5, 1.5, 0.3, 0.9, 60),  # weakly resolved: many intervals are unbounded above
    ],
)
def test_fieller_coverage_by_simulation(mean_denominator, sd_denominator, correlation, decay, num_steps):
    """Coverage of the true ratio over independent runs of i.i.d. normal (numerator, denominator) steps is
    the nominal 90% within 3 Monte-Carlo standard errors; no interval goes below 0."""
    rng = np.random.default_rng(7)
    num_runs, confidence = 2000, 0.9
    sds = np.array([3.0, sd_denominator])
    covariance = np.outer(sds, sds) * np.array([[1.0, correlation], [correlation, 1.0]])
    true_ratio = 10.0 / mean_denominator
    draws = rng.multivariate_normal([10.0, mean_denominator], covariance, size=(num_runs, num_steps))
    intervals = np.array([_fed_average(pairs, decay).interval(confidence) for pairs in draws])
    coverage = np.mean((intervals[:, 0] <= true_ratio) & (true_ratio <= intervals[:, 1]))
    standard_error = math.sqrt(confidence * (1 - confidence) / num_runs)
    assert abs(coverage - confidence) <= 3 * standard_error, coverage
    assert np.all(intervals[:, 0] >= 0)
    unbounded = np.mean(intervals[:, 1] == math.inf)
    assert (unbounded > 0.3) if mean_denominator < sd_denominator else (unbounded == 0)


def test_unresolved_denominator_gives_an_interval_unbounded_above():
    """|G|^2 = 0 in truth: the interval must be unbounded above except in about 1 - confidence of runs."""
    rng = np.random.default_rng(8)
    num_runs = 1000
    draws = np.array([10.0, 0.0]) + rng.standard_normal((num_runs, 60, 2)) * [3.0, 1.5]
    intervals = np.array([_fed_average(pairs, 0.9).interval(0.9) for pairs in draws])
    assert np.mean(intervals[:, 1] == math.inf) >= 0.9 - 3 * math.sqrt(0.09 / num_runs)
    assert np.all(intervals[:, 0] >= 0)


def test_interval_of_values_past_float_range_when_squared_does_not_raise():
    """A diverging float64 run's estimates near 1e200: their squares overflow to inf, which Python's ``x**2`` raised
    on (OverflowError from a monitor's summary instead of its report that the run diverged)."""
    average = ExponentialMovingRatio(decay=0.9)
    for numerator, denominator in [(1e200, 3e199), (2e200, 1e199), (5e199, 4e199)]:
        assert average.update(numerator, denominator)
    low, high = average.interval(0.9)
    assert not (low > high)   # no claim about its width: the variances overflowed


def test_noise_scale_interval_is_clipped_at_zero():
    """B_simple's average clips at 0; a generic ratio's average does not."""
    rng = np.random.default_rng(9)
    pairs = np.column_stack([rng.normal(0.0, 3.0, 30), rng.normal(1.0, 0.2, 30)])
    pairs[:, 0] += 1.0 - np.average(pairs[:, 0], weights=0.9 ** np.arange(29, -1, -1))  # not resolved from 0
    noise_scale = ExponentialMovingNoiseScale(decay=0.9)
    for numerator, denominator in pairs:
        noise_scale.update(numerator, denominator)
    generic = _fed_average(pairs, 0.9, nonnegative=False)
    low, high = noise_scale.interval(0.9)
    generic_low, generic_high = generic.interval(0.9)
    assert generic_low < 0 and low == 0.0 and high == generic_high


@pytest.mark.parametrize("population_size, batch_size", [(6, 3), (7, 2), (5, 5)])
def test_batches_drawn_without_replacement_are_unbiased_with_the_population_given(population_size, batch_size):
    """Every batch of B of a dataset of N per-example gradients, enumerated: the mean of the estimates with
    ``population=N`` is the dataset's tr(Sigma) (divisor N) and |G|^2 exactly; without it, |G|^2 is low by
    tr(Sigma)/(N-1) (a statistical audit's find, session 25: B_simple 5 % high on a logistic regression)."""
    gradients = np.random.default_rng(population_size).normal(size=(population_size, 3)) + [0.3, -0.2, 0.1]
    mean = gradients.mean(0)
    trace_sigma = float(((gradients - mean) ** 2).sum(1).mean())
    corrected, plain = [], []
    for batch in itertools.combinations(range(population_size), batch_size):
        rows = gradients[list(batch)]
        sqnorms, grad_sqnorm = (rows**2).sum(1), float((rows.mean(0) ** 2).sum())
        corrected.append(simple_noise_scale(sqnorms, grad_sqnorm, population=population_size))
        plain.append(simple_noise_scale(sqnorms, grad_sqnorm))
    assert np.mean([e.trace_sigma for e in corrected]) == pytest.approx(trace_sigma, rel=1e-12)
    assert np.mean([e.grad_sqnorm for e in corrected]) == pytest.approx(float(mean @ mean), rel=1e-12)
    assert np.mean([e.grad_sqnorm for e in plain]) == pytest.approx(
        float(mean @ mean) - trace_sigma / (population_size - 1), rel=1e-12)
    with pytest.raises(ValueError, match="population must be >= 3"):
        simple_noise_scale(np.ones(3), 0.5, population=2)


@pytest.mark.parametrize("sizes", [(2, 2), (3, 1), (1, 1, 1, 1)])
def test_micro_batches_drawn_without_replacement_are_unbiased_with_the_population_given(sizes):
    """Every ordered batch of 4 of a dataset of 6 per-example gradients, split into micro-batches of ``sizes``: the
    mean of micro_batch_noise_scale(population=6) is the dataset's tr(Sigma) and |G|^2 exactly (a review's find:
    without it, tr(Sigma) read high by N/(N-1) and |G|^2 low by tr(Sigma)/(N-1), as the per-example estimate did)."""
    gradients = np.random.default_rng(7).normal(size=(6, 3)) + [0.3, -0.2, 0.1]
    mean = gradients.mean(0)
    trace_sigma = float(((gradients - mean) ** 2).sum(1).mean())
    ends = np.cumsum((0,) + sizes)
    estimates = []
    for batch in itertools.permutations(range(6), sum(sizes)):
        rows = gradients[list(batch)]
        parts = [rows[start:end].mean(0) for start, end in zip(ends[:-1], ends[1:])]
        estimates.append(micro_batch_noise_scale([float(p @ p) for p in parts], sizes,
                                                 float(rows.mean(0) @ rows.mean(0)), population=6))
    assert np.mean([e.trace_sigma for e in estimates]) == pytest.approx(trace_sigma, rel=1e-12)
    assert np.mean([e.grad_sqnorm for e in estimates]) == pytest.approx(float(mean @ mean), rel=1e-12)


def test_the_interval_across_runs_covers_the_ratio_of_the_runs_means_at_its_confidence():
    """Runs whose averaged (tr(Sigma), |G|^2) are jointly normal around (T, G), correlated, with a spread of their
    own: Fieller's interval with Student's t at K - 1 degrees of freedom is exact there, so it covers T/G at the
    nominal 90 % (Monte-Carlo, 4000 groups of K = 3 and of K = 5; binomial sd 0.005)."""
    rng = np.random.default_rng(0)
    true_trace, true_grad = 150.0, 1.2
    spread = np.array([[20.0**2, 0.6 * 20.0 * 0.25], [0.6 * 20.0 * 0.25, 0.25**2]])
    for runs in (3, 5):
        draws = rng.multivariate_normal([true_trace, true_grad], spread, size=(4000, runs))
        covered = [low <= true_trace / true_grad <= high for low, high in (
            noise_scale_across_runs(group[:, 0], group[:, 1]).b_simple_interval for group in draws)]
        assert 0.88 <= np.mean(covered) <= 0.92, (runs, np.mean(covered))


def test_the_bounds_across_runs_are_where_the_runs_t_test_of_the_ratio_reaches_its_quantile():
    """At each bound R of the interval, the one-sample t statistic of the runs' tr(Sigma)_k - R |G|^2_k (scipy's
    ttest_1samp, an independent computation) equals the t quantile in size: Fieller's interval is the set of R that
    this test does not reject. The value is the ratio of the means."""
    trace_sigmas, grad_sqnorms = np.array([140.0, 171.0, 152.0, 160.0]), np.array([1.1, 1.35, 1.05, 1.3])
    result = noise_scale_across_runs(trace_sigmas, grad_sqnorms, confidence=0.8)
    assert result.b_simple == pytest.approx(trace_sigmas.mean() / grad_sqnorms.mean(), rel=1e-15)
    assert (result.trace_sigma, result.grad_sqnorm, result.runs) == (trace_sigmas.mean(), grad_sqnorms.mean(), 4)
    quantile = stats.t.ppf(0.9, df=3)
    low, high = result.b_simple_interval
    assert 0 < low < result.b_simple < high < math.inf
    for bound in (low, high):
        statistic = stats.ttest_1samp(trace_sigmas - bound * grad_sqnorms, 0.0).statistic
        assert abs(statistic) == pytest.approx(quantile, rel=1e-9)
    assert str(result) == "B_simple = 129.8  (80% interval 122.9 .. 137.8) over 4 runs"   # sides 6.9, 8.0: 0.1


def test_the_interval_across_runs_is_unbounded_when_the_runs_mean_gradient_is_not_resolved_from_0():
    result = noise_scale_across_runs([150.0, 160.0, 140.0], [0.5, -0.4, 0.1])   # averages of unbiased |G|^2 go < 0
    assert result.b_simple_interval[1] == math.inf
    assert str(result).endswith(" .. unbounded: |G|^2 not resolved from 0) over 3 runs")


def test_bad_input_across_runs_is_refused_by_name():
    with pytest.raises(ValueError, match="needs at least 2 runs"):
        noise_scale_across_runs([150.0], [1.0])
    with pytest.raises(ValueError, match="one value per run"):
        noise_scale_across_runs([150.0, 140.0], [1.0, 1.1, 1.2])
    with pytest.raises(ValueError, match="must be finite: leave out a run that diverged"):
        noise_scale_across_runs([150.0, math.nan], [1.0, 1.1])
    with pytest.raises(ValueError, match="confidence must lie in"):
        noise_scale_across_runs([150.0, 140.0], [1.0, 1.1], confidence=90)


def test_the_interval_across_runs_scales_with_the_values_and_warns_on_identical_runs():
    """A review's finds: values near 1e200 overflowed np.cov's squares (nan .. inf); the interval scales exactly with
    the values now. Runs that agree exactly (no seed applied) get a zero-width interval and a warning. A numpy
    confidence is taken."""
    trace_sigmas, grad_sqnorms = np.array([100.0, 200.0, 150.0]), np.array([1.0, 1.2, 1.4])
    plain = noise_scale_across_runs(trace_sigmas, grad_sqnorms, confidence=np.float64(0.9))
    huge = noise_scale_across_runs(trace_sigmas * 1e198, grad_sqnorms * 1e197)
    assert huge.b_simple_interval == pytest.approx(tuple(10 * bound for bound in plain.b_simple_interval), rel=1e-12)
    with pytest.warns(RuntimeWarning, match="identical, so the interval has no width: were they given different"):
        assert noise_scale_across_runs([150.0, 150.0], [1.5, 1.5]).b_simple_interval == pytest.approx((100.0, 100.0))
