"""Tests of noisescale.hessian against the explicit Hessian (torch.autograd.functional) and naive loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from noisescale.hessian import hessian_noise_scale, hessian_vector_product, hutchinson_trace, trainable_parameters

from _two_inputs import TwoInputs


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def _problem(seed: int = 0, batch_size: int = 12):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs = torch.randn(batch_size, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (batch_size,))
    return model, inputs, targets


def _flat_loss(model, inputs, targets):
    """Mean loss as a function of one flat parameter vector, for torch.autograd.functional.hessian."""
    params = trainable_parameters(model)
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = dict(zip(names, (c.reshape(s) for c, s in zip(flat.split(sizes), shapes))))
        return _cross_entropy(functional_call(model, pieces, (inputs,)), targets).mean()

    flat = torch.cat([p.flatten() for p in params.values()])
    return loss, flat, names, shapes, sizes


def _explicit_hessian(model, inputs, targets) -> torch.Tensor:
    loss, flat, *_ = _flat_loss(model, inputs, targets)
    return torch.autograd.functional.hessian(loss, flat)


def _per_example_gradients(model, inputs, targets) -> torch.Tensor:
    """Naive loop: one autograd.grad per example, flattened (B, P)."""
    rows = []
    for example_input, example_target in zip(inputs, targets):
        loss, flat, *_ = _flat_loss(model, example_input[None], example_target[None])
        flat.requires_grad_(True)
        rows.append(torch.autograd.grad(loss(flat), flat)[0])
    return torch.stack(rows)


def test_hessian_vector_product_matches_explicit_hessian():
    model, inputs, targets = _problem()
    hessian = _explicit_hessian(model, inputs, targets)
    _, _, names, shapes, sizes = _flat_loss(model, inputs, targets)
    flat_vector = torch.randn(hessian.shape[0], dtype=torch.float64)
    vector = dict(zip(names, (c.reshape(s) for c, s in zip(flat_vector.split(sizes), shapes))))
    product = hessian_vector_product(model, _cross_entropy, inputs, targets, vector)
    torch.testing.assert_close(torch.cat([product[n].flatten() for n in names]), hessian @ flat_vector)


def test_hutchinson_trace_within_three_standard_errors_and_seeded():
    model, inputs, targets = _problem(seed=1)
    exact_trace = torch.trace(_explicit_hessian(model, inputs, targets)).item()
    estimate = hutchinson_trace(model, _cross_entropy, inputs, targets, num_probes=32,
                                generator=torch.Generator().manual_seed(0))
    assert estimate.stderr > 0
    assert abs(estimate.estimate - exact_trace) < 3 * estimate.stderr
    again = hutchinson_trace(model, _cross_entropy, inputs, targets, num_probes=32,
                             generator=torch.Generator().manual_seed(0))
    assert again == estimate


def test_hessian_noise_scale_matches_naive_computation_on_the_same_batch():
    model, inputs, targets = _problem(seed=2, batch_size=12)
    half = 6
    result = hessian_noise_scale(model, _cross_entropy, inputs, targets, num_probes=4, num_sigma_examples=half,
                                 generator=torch.Generator().manual_seed(0))
    per_example = _per_example_gradients(model, inputs[:half], targets[:half])
    mean_gradient = per_example.mean(dim=0)
    curvature = _explicit_hessian(model, inputs[half:], targets[half:])
    deviations = per_example - mean_gradient
    trace_h_sigma = torch.einsum("ip,pq,iq->", deviations, curvature, deviations).item() / (half - 1)
    assert result.trace_h_sigma == pytest.approx(trace_h_sigma, rel=1e-9)
    assert result.g_h_g == pytest.approx((mean_gradient @ curvature @ mean_gradient).item() - trace_h_sigma / half,
                                         rel=1e-9)
    assert result.fisher_trace == pytest.approx(per_example.pow(2).sum(dim=1).mean().item(), rel=1e-9)
    assert result.b_noise == pytest.approx(result.trace_h_sigma / result.g_h_g)
    assert (result.gradient_batch_size, result.num_sigma_examples) == (half, half)


def test_calls_leave_model_gradients_buffers_and_global_rng_unchanged():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
    inputs, targets = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    _cross_entropy(model(inputs), targets).mean().backward()  # a .grad from "training" that must survive
    state = {name: value.clone() for name, value in model.state_dict().items()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    rng_state = torch.get_rng_state()
    generator = torch.Generator().manual_seed(0)
    hutchinson_trace(model, _cross_entropy, inputs, targets, num_probes=3, generator=generator)  # BatchNorm training
    model.eval()
    hessian_noise_scale(model, _cross_entropy, inputs, targets, num_probes=3, generator=generator)
    model.train()
    assert torch.equal(torch.get_rng_state(), rng_state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    with pytest.raises(ValueError, match=r"normalises with batch statistics \(module '1', BatchNorm1d: train mode"):
        hessian_noise_scale(model, _cross_entropy, inputs, targets, generator=generator)
    no_running_statistics = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False),
                                          nn.Linear(6, 3)).double().eval()  # batch statistics even in eval mode
    with pytest.raises(ValueError, match=r"batch statistics \(module '1'"):
        hessian_noise_scale(no_running_statistics, _cross_entropy, inputs, targets, generator=generator)


def test_dropout_in_training_mode_is_supported():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3))
    inputs, targets = torch.randn(16, 4), torch.randint(0, 3, (16,))
    result = hessian_noise_scale(model, _cross_entropy, inputs, targets, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor([result.trace_h, result.trace_h_sigma, result.g_h_g])).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, x, y: hutchinson_trace(m, lambda o, t: _cross_entropy(o, t).mean(), x, y), "per-example losses"),
        (lambda m, x, y: hutchinson_trace(m, _cross_entropy, x, y[:5]), "leading batch dimension"),
        (lambda m, x, y: hutchinson_trace(m, _cross_entropy, x, y, num_probes=1), "num_probes"),
        (lambda m, x, y: hutchinson_trace(m, _cross_entropy, x, y, generator=0), "generator"),
        (lambda m, x, y: hutchinson_trace("model", _cross_entropy, x, y), "torch.nn.Module"),
        (lambda m, x, y: hessian_noise_scale(m, _cross_entropy, x[:3], y[:3]), "at least 4"),
        (lambda m, x, y: hessian_noise_scale(m, _cross_entropy, x, y, num_sigma_examples=1), "num_sigma_examples"),
        (lambda m, x, y: hessian_vector_product(m, _cross_entropy, x, y, {"0.weight": torch.ones(5, 4)}), "names"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    model, inputs, targets = _problem()
    with pytest.raises((ValueError, TypeError), match=message):
        call(model, inputs, targets)


def test_model_without_trainable_parameters_is_rejected():
    model, inputs, targets = _problem()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=True"):
        hutchinson_trace(model, _cross_entropy, inputs, targets)


def test_tuple_inputs_give_what_the_concatenated_tensor_gives():
    model, inputs, targets = _problem(seed=5, batch_size=12)
    two_inputs = TwoInputs(model)
    parts = (inputs[:, :3], inputs[:, 3:])
    for function in (hutchinson_trace, hessian_noise_scale):
        expected = function(model, _cross_entropy, inputs, targets, num_probes=4,
                            generator=torch.Generator().manual_seed(0))
        got = function(two_inputs, _cross_entropy, parts, targets, num_probes=4,
                       generator=torch.Generator().manual_seed(0))
        for field, value in vars(expected).items():
            assert getattr(got, field) == pytest.approx(value, rel=1e-12), field
    with pytest.raises(ValueError, match=r"same batch size in dim 0, got shapes \[\(12, 3\), \(5, 1\)\]"):
        hessian_noise_scale(two_inputs, _cross_entropy, (parts[0], parts[1][:5]), targets)
    with pytest.raises(TypeError, match="tuple of positional inputs or a mapping of keyword inputs, got list"):
        hessian_noise_scale(two_inputs, _cross_entropy, [parts[0], parts[1]], targets)
