"""Ground truth: estimators on linear regression with Gaussian inputs, where G, H and Sigma are closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from _reference_linear_regression import random_problem
from noisescale.estimators import ExponentialMovingNoiseScale, simple_noise_scale, two_batch_noise_scale
from noisescale.hessian import hessian_noise_scale
from noisescale.monitor import measure

DIM = 6


def _squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs.squeeze(-1) - targets) ** 2


def _torch_model(problem) -> nn.Linear:
    model = nn.Linear(DIM, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(problem.weights)[None])
    return model


def _assert_within_standard_errors(samples, truth, num_errors=3.0):
    samples = np.asarray(samples)
    standard_error = samples.std(ddof=1) / np.sqrt(len(samples))
    assert abs(samples.mean() - truth) < num_errors * standard_error, (samples.mean(), truth, standard_error)


def test_closed_form_sigma_matches_monte_carlo():
    problem = random_problem(seed=0, dim=4)
    gradients = problem.per_example_gradients(*problem.sample(np.random.default_rng(1), 200_000))
    count = len(gradients)
    mean = gradients.mean(axis=0)
    assert np.all(np.abs(mean - problem.gradient) < 4.5 * gradients.std(axis=0) / np.sqrt(count))
    centred = gradients - mean
    products = centred[:, :, None] * centred[:, None, :]  # per-sample contributions to the covariance
    sample_covariance = products.mean(axis=0)
    standard_error = products.std(axis=0) / np.sqrt(count)
    assert np.all(np.abs(sample_covariance - problem.gradient_covariance) < 4.5 * standard_error)
    # the closed form is not trivially close: dropping the D r r^T D term must be detected
    isotropic_part = problem.gradient_covariance - np.outer(problem.gradient, problem.gradient)
    assert np.any(np.abs(sample_covariance - isotropic_part) > 4.5 * standard_error)


def test_scalar_closed_forms_match_the_matrix_expressions():
    problem = random_problem(seed=12, dim=DIM, offset_scale=1.0)
    covariance, sigma, gradient = problem.covariance, problem.gradient_covariance, problem.gradient
    assert problem.trace_sigma == pytest.approx(np.trace(sigma), rel=1e-12)
    assert problem.grad_sqnorm == pytest.approx(gradient @ gradient, rel=1e-12)
    assert problem.trace_h_sigma == pytest.approx(np.trace(problem.hessian @ sigma), rel=1e-12)
    assert problem.g_h_g == pytest.approx(gradient @ covariance @ gradient, rel=1e-12)


def test_analytic_per_example_gradients_match_the_torch_model():
    problem = random_problem(seed=2, dim=DIM)
    inputs, targets = problem.sample(np.random.default_rng(3), 5)
    model = _torch_model(problem)
    for example_input, example_target, analytic in zip(inputs, targets, problem.per_example_gradients(inputs, targets)):
        model.zero_grad()
        loss = _squared_error(model(torch.from_numpy(example_input)[None]), torch.tensor([example_target]))
        loss.sum().backward()
        np.testing.assert_allclose(model.weight.grad[0].numpy(), analytic, rtol=1e-12)


def test_moving_average_b_simple_within_five_percent():
    problem = random_problem(seed=4, dim=DIM)
    true_b_simple = np.trace(problem.gradient_covariance) / (problem.gradient @ problem.gradient)
    rng = np.random.default_rng(5)
    average = ExponentialMovingNoiseScale(decay=0.998)
    for _ in range(3000):
        gradients = problem.per_example_gradients(*problem.sample(rng, 32))
        mean_gradient = gradients.mean(axis=0)
        average.update_estimate(simple_noise_scale((gradients**2).sum(axis=1), mean_gradient @ mean_gradient))
    assert average.b_simple == pytest.approx(true_b_simple, rel=0.05)


def test_two_batch_estimator_agrees_with_per_example_estimator_on_the_same_data():
    problem = random_problem(seed=6, dim=DIM)
    rng = np.random.default_rng(7)
    micro_batch, num_micro_batches, num_batches = 8, 4, 2000
    per_example, two_batch = [], []
    for _ in range(num_batches):
        gradients = problem.per_example_gradients(*problem.sample(rng, micro_batch * num_micro_batches))
        mean_gradient = gradients.mean(axis=0)
        per_example.append(simple_noise_scale((gradients**2).sum(axis=1), mean_gradient @ mean_gradient))
        micro_means = gradients.reshape(num_micro_batches, micro_batch, DIM).mean(axis=1)
        two_batch.append(two_batch_noise_scale((micro_means**2).sum(axis=1), micro_batch,
                                               mean_gradient @ mean_gradient, micro_batch * num_micro_batches))
    for field, truth in [("trace_sigma", np.trace(problem.gradient_covariance)),
                         ("grad_sqnorm", problem.gradient @ problem.gradient)]:
        per_example_values = np.array([getattr(e, field) for e in per_example])
        two_batch_values = np.array([getattr(e, field) for e in two_batch])
        _assert_within_standard_errors(per_example_values - two_batch_values, 0.0)  # paired: same batches
        _assert_within_standard_errors(two_batch_values, truth)
        _assert_within_standard_errors(per_example_values, truth)


def test_hessian_quantities_match_closed_forms():
    problem = random_problem(seed=8, dim=DIM, offset_scale=1.0)
    covariance, sigma = problem.covariance, problem.gradient_covariance
    model = _torch_model(problem)
    rng, generator = np.random.default_rng(9), torch.Generator().manual_seed(10)
    results = []
    for _ in range(150):  # the ratio of the means has a relative standard error of about 3% here
        inputs, targets = (torch.from_numpy(a) for a in problem.sample(rng, 128))
        results.append(hessian_noise_scale(model, _squared_error, inputs, targets, num_probes=2,
                                           num_sigma_examples=64, generator=generator))
    trace_h_sigma = np.array([r.trace_h_sigma for r in results])
    g_h_g = np.array([r.g_h_g for r in results])
    true_g_h_g = problem.gradient @ covariance @ problem.gradient
    true_trace_h_sigma = np.trace(covariance @ sigma)
    assert trace_h_sigma.mean() / g_h_g.mean() == pytest.approx(true_trace_h_sigma / true_g_h_g, rel=0.10)
    _assert_within_standard_errors([r.trace_h for r in results], np.trace(covariance))
    _assert_within_standard_errors(g_h_g, true_g_h_g)
    _assert_within_standard_errors(trace_h_sigma, true_trace_h_sigma)
    _assert_within_standard_errors([r.fisher_trace for r in results], np.trace(sigma) + problem.gradient @ problem.gradient)
    for result in results[:5]:  # the probe standard error is a per-batch quantity, present and positive
        assert result.trace_h_stderr > 0


def _ratio_of_means_relative_stderr(numerators, denominators) -> float:
    """Delta-method relative standard error of mean(numerators)/mean(denominators) over independent batches."""
    numerators, denominators = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    ratio = numerators.mean() / denominators.mean()
    residual_sd = np.std(numerators - ratio * denominators, ddof=1)
    return residual_sd / np.sqrt(len(numerators)) / abs(denominators.mean()) / abs(ratio)


def test_monitor_b_simple_and_b_noise_at_fixed_weights_match_closed_forms():
    """The monitor itself (through the offline ``measure``: many independent batches at the same w, no optimizer
    step, gradients zeroed between batches) against the closed forms tr(Sigma)/|G|^2 and tr(H Sigma)/(G^T H G)."""
    problem = random_problem(seed=15, dim=DIM, offset_scale=1.0)
    # B_simple ~ 9.9 and B_noise ~ 14.2 here: they differ by ~44 %, so reporting one for the other fails both checks
    assert abs(problem.b_noise / problem.b_simple - 1) > 0.25
    model = _torch_model(problem)
    weights_before = model.weight.detach().clone()
    rng = np.random.default_rng(13)
    num_batches, batch_size, hessian_every = 400, 256, 2
    batches = [tuple(torch.from_numpy(a) for a in problem.sample(rng, batch_size)) for _ in range(num_batches)]
    # Averaging windows: the parameters do not move, so the right average is the plain mean over all batches. With
    # decay 0.9999 the EMA weights decay^(t-k) over t = 400 batches (200 Hessian steps) all lie in [0.96, 1]: Kish's
    # effective sample size is > 99.9 % of the number of updates, i.e. the monitor's averages are the means over all
    # batches up to < 0.1 % reweighting. Their sampling errors, computed below from the per-batch estimates in the
    # history, come out at ~0.7 % for B_simple (limit 5 %) and ~2.6 % for B_noise (limit 10 %; 128 per-example
    # deviations and a 128-example Hessian half per Hessian step); the test asserts both are below a third of the
    # limit, so a deviation beyond the limit is a > 3-sigma event, not sampling noise.
    monitor = measure(model, _squared_error, batches, progress=False, ema_decay=0.9999, hessian_every=hessian_every,
                      hessian_ema_decay=0.9999, hessian_examples=batch_size // 2, hessian_probes=2, seed=14)
    summary, history = monitor.summary(), monitor.history

    assert torch.equal(model.weight.detach(), weights_before) and model.weight.grad is None  # fixed w, no step
    assert summary.steps == num_batches and summary.examples_seen == num_batches * batch_size
    hessian_rows = history.dropna(subset=["g_h_g"])
    assert len(hessian_rows) == num_batches // hessian_every
    assert monitor.average.effective_sample_size > 0.999 * num_batches
    assert monitor.hessian_average.effective_sample_size > 0.999 * len(hessian_rows)

    b_simple_stderr = _ratio_of_means_relative_stderr(history["trace_sigma"], history["grad_sqnorm"])
    b_noise_stderr = _ratio_of_means_relative_stderr(hessian_rows["trace_h_sigma"], hessian_rows["g_h_g"])
    assert b_simple_stderr < 0.05 / 3 and b_noise_stderr < 0.10 / 3, (b_simple_stderr, b_noise_stderr)

    # the monitor's final moving-average B_simple (summary and last history row agree) within 5 %
    assert history["b_simple"].iloc[-1] == summary.b_simple
    assert summary.b_simple == pytest.approx(problem.b_simple, rel=0.05)
    # its moving-average B_noise within 10 %
    assert hessian_rows["b_noise"].iloc[-1] == summary.b_noise
    assert summary.b_noise == pytest.approx(problem.b_noise, rel=0.10)
    # the monitor's Hutchinson tr(H) within 3 standard errors of tr(D)
    _assert_within_standard_errors(hessian_rows["trace_h"], np.trace(problem.covariance))
