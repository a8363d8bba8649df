from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from noisescale.sharpness import SharpnessResult, epsilon_sharpness, random_subspace


class DiagonalQuadratic(nn.Module):
    """Per-example loss 1/2 sum_j h_j (theta_j - c_ij)^2; the inputs are the centres c_i."""

    def __init__(self, theta: torch.Tensor, curvature: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())
        self.register_buffer("curvature", curvature.clone())

    def forward(self, centres: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.curvature * (self.theta - centres) ** 2).sum(1)


def per_example_outputs_are_losses(outputs, targets):
    return outputs


def quadratic_mean_loss(theta: np.ndarray, centres: np.ndarray, curvature: np.ndarray) -> float:
    """Reference f in numpy: mean over examples of 1/2 sum_j h_j (theta_j - c_ij)^2."""
    return float(np.mean(0.5 * ((theta - centres) ** 2 * curvature).sum(1)))


def brute_force_box_maximum(loss, x: np.ndarray, direction: np.ndarray, bound: np.ndarray) -> float:
    """max of loss(x + direction @ y) over the corners y of the box |y_k| <= bound_k (a convex loss peaks at one)."""
    corners = (np.array(signs) * bound for signs in itertools.product((-1.0, 1.0), repeat=len(bound)))
    return max(loss(x + direction @ corner) for corner in corners)


def make_quadratic_problem(n: int, offset_scale: float, seed: int):
    generator = np.random.default_rng(seed)
    centres = generator.normal(size=(8, n))
    curvature = generator.uniform(0.5, 3.0, size=n)
    x = centres.mean(0) + offset_scale * generator.choice([-1.0, 1.0], size=n)
    model = DiagonalQuadratic(torch.tensor(x), torch.tensor(curvature))
    loss = lambda theta: quadratic_mean_loss(theta, centres, curvature)  # noqa: E731
    return model, torch.tensor(centres), loss, x, centres, curvature


@pytest.mark.parametrize("offset_scale", [0.0, 3.0], ids=["at-minimum", "far-from-minimum"])
def test_full_space_quadratic_reaches_corner_maximum(offset_scale):
    epsilon = 0.1
    model, centres, loss, x, centre_values, curvature = make_quadratic_problem(6, offset_scale, seed=1)
    bound = epsilon * (np.abs(x) + 1)
    # Each coordinate is a convex parabola in z_j with vertex at z_j = cbar_j - x_j: at the minimum both box
    # ends are equally high; far from it the vertex lies outside the box, so the one maximum is unique.
    assert offset_scale == 0.0 or np.all(np.abs(centre_values.mean(0) - x) > bound)
    expected_max = brute_force_box_maximum(loss, x, np.eye(6), bound)
    expected_loss = loss(x)

    result = epsilon_sharpness(
        model, per_example_outputs_are_losses, centres, torch.zeros(8), epsilon=epsilon, max_iterations=200
    )

    assert isinstance(result, SharpnessResult)
    assert result.loss == pytest.approx(expected_loss, rel=1e-12)
    assert result.max_loss == pytest.approx(expected_max, rel=1e-6)
    expected_sharpness = 100 * (expected_max - expected_loss) / (1 + expected_loss)
    assert result.sharpness == pytest.approx(expected_sharpness, rel=1e-6)
    assert (result.epsilon, result.subspace_dim, result.parameter_count) == (epsilon, None, 6)
    assert 1 <= result.iterations <= 200


def test_random_subspace_matches_brute_force_over_the_subspace_box():
    epsilon, dim = 0.05, 2
    model, centres, loss, x, centre_values, curvature = make_quadratic_problem(5, 3.0, seed=2)
    subspace = random_subspace(5, dim, generator=torch.Generator().manual_seed(7)).numpy()
    bound = epsilon * (np.abs(np.linalg.pinv(subspace) @ x) + 1)
    # f(x + A y) is convex in y; its gradient A^T H (x + A y - cbar) keeps its sign over the box (checked at the
    # corners, it is affine in y), so the maximum is a unique corner and a local search must find it.
    gradient_signs = {
        tuple(np.sign(subspace.T @ (curvature * (x + subspace @ (np.array(s) * bound) - centre_values.mean(0)))))
        for s in itertools.product((-1.0, 1.0), repeat=dim)
    }
    assert len(gradient_signs) == 1
    expected_max = brute_force_box_maximum(loss, x, subspace, bound)

    result = epsilon_sharpness(
        model,
        per_example_outputs_are_losses,
        centres,
        torch.zeros(8),
        epsilon=epsilon,
        subspace=torch.tensor(subspace),
        max_iterations=100,
    )

    assert result.max_loss == pytest.approx(expected_max, rel=1e-6)
    assert result.subspace_dim == dim


def test_integer_subspace_draws_a_standard_normal_matrix_then_the_start_point():
    model, centres, _, _, _, _ = make_quadratic_problem(5, 3.0, seed=3)
    drawn = epsilon_sharpness(
        model, per_example_outputs_are_losses, centres, torch.zeros(8), subspace=3,
        generator=torch.Generator().manual_seed(11),
    )
    generator = torch.Generator().manual_seed(11)
    explicit_matrix = random_subspace(5, 3, generator=generator)
    explicit = epsilon_sharpness(
        model, per_example_outputs_are_losses, centres, torch.zeros(8), subspace=explicit_matrix, generator=generator
    )
    assert drawn == explicit
    other_seed = epsilon_sharpness(
        model, per_example_outputs_are_losses, centres, torch.zeros(8), subspace=3,
        generator=torch.Generator().manual_seed(12),
    )
    assert other_seed.max_loss != drawn.max_loss


def test_one_dimensional_subspace_of_a_network_matches_a_dense_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    inputs, targets = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    direction = random_subspace(sum(p.numel() for p in model.parameters()), 1, generator=torch.Generator().manual_seed(1))
    epsilon = 0.5
    result = epsilon_sharpness(
        model, loss_fn, inputs, targets, epsilon=epsilon, subspace=direction, max_iterations=50, batch_size=7
    )

    x = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bound = epsilon * (abs((torch.linalg.pinv(direction) @ x).item()) + 1)
    # Reference: the network written out by hand, evaluated at 2001 points y of the interval at once.
    grid = torch.linspace(-bound, bound, 2001, dtype=torch.float64)
    parameters = x + grid[:, None] * direction[:, 0]
    w1, b1, w2, b2 = parameters.split([24, 6, 18, 3], dim=1)
    hidden = torch.tanh(torch.einsum("bi,ghi->gbh", inputs, w1.reshape(-1, 6, 4)) + b1[:, None, :])
    logits = torch.einsum("gbh,gch->gbc", hidden, w2.reshape(-1, 3, 6)) + b2[:, None, :]
    losses = torch.logsumexp(logits, dim=2) - logits.gather(2, targets.expand(len(grid), -1)[..., None])[..., 0]
    grid_losses = losses.mean(1).tolist()
    assert result.loss == pytest.approx(grid_losses[1000], rel=1e-12)
    assert result.max_loss <= max(grid_losses) * (1 + 1e-9)  # never outside the box
    assert result.max_loss == pytest.approx(max(grid_losses), rel=1e-6)


def test_chunked_evaluation_equals_one_batch():
    model, centres, _, _, _, _ = make_quadratic_problem(6, 0.5, seed=4)
    whole = epsilon_sharpness(model, per_example_outputs_are_losses, centres, torch.zeros(8))
    chunked = epsilon_sharpness(model, per_example_outputs_are_losses, centres, torch.zeros(8), batch_size=3)
    assert chunked.loss == pytest.approx(whole.loss, rel=1e-12)
    assert chunked.max_loss == pytest.approx(whole.max_loss, rel=1e-9)


@pytest.mark.parametrize("subspace", [None, 4])
def test_model_parameters_buffers_grads_and_rng_state_unchanged(subspace):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    model.train()  # batch norm would update its running statistics, dropout would draw from the global RNG
    model[0].weight.grad = torch.randn_like(model[0].weight)
    inputs, targets = torch.randn(16, 5), torch.randint(0, 3, (16,))
    parameters_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers_before = {name: b.clone() for name, b in model.named_buffers()}
    grad_before = model[0].weight.grad.clone()
    rng_before = torch.get_rng_state()

    result = epsilon_sharpness(model, nn.CrossEntropyLoss(reduction="none"), inputs, targets, subspace=subspace)

    assert result.max_loss >= result.loss
    assert torch.equal(torch.get_rng_state(), rng_before)
    for name, p in model.named_parameters():
        assert torch.equal(p, parameters_before[name]) and p.requires_grad
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers_before[name])
    assert torch.equal(model[0].weight.grad, grad_before)
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")
    assert model.training


class _KeywordClassifier(nn.Module):
    """net(cat(x, z)) by keyword, returning the per-example cross-entropy itself when ``labels`` are given."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *, x, z, labels=None):
        logits = self.net(torch.cat([x, z], dim=1))
        return logits if labels is None else nn.functional.cross_entropy(logits, labels, reduction="none")


def test_keyword_tuple_and_pytree_batches_give_what_the_tensor_batch_gives():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    keyword_model = _KeywordClassifier(model)
    inputs, targets = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    cross_entropy = nn.CrossEntropyLoss(reduction="none")
    keywords = {"x": inputs[:, :2], "z": inputs[:, 2:]}
    expected = epsilon_sharpness(model, cross_entropy, inputs, targets, subspace=3, batch_size=4)
    for call_inputs, call_targets, loss_fn in [
        (keywords, {"labels": targets}, lambda outputs, t: cross_entropy(outputs, t["labels"])),
        ({**keywords, "labels": targets}, None, per_example_outputs_are_losses),
    ]:
        got = epsilon_sharpness(keyword_model, loss_fn, call_inputs, call_targets, subspace=3, batch_size=4)
        assert got.loss == pytest.approx(expected.loss, rel=1e-12)
        assert got.max_loss == pytest.approx(expected.max_loss, rel=1e-9)
        assert (got.iterations, got.parameter_count) == (expected.iterations, expected.parameter_count)
    with pytest.raises(ValueError, match=r"same positive length \(examples in dim 0\), got input shapes "
                                         r"\[\(10, 2\), \(10, 3\)\] and target shapes \[\(9,\)\]"):
        epsilon_sharpness(keyword_model, cross_entropy, keywords, targets[:9])
    with pytest.raises(TypeError, match="tuple of positional inputs or a mapping of keyword inputs, got list"):
        epsilon_sharpness(model, cross_entropy, [inputs], targets)


def _quadratic_call(**overrides):
    model, centres, _, _, _, _ = make_quadratic_problem(4, 0.0, seed=5)
    arguments = {"model": model, "loss_fn": per_example_outputs_are_losses, "inputs": centres,
                 "targets": torch.zeros(8), **overrides}
    return epsilon_sharpness(**arguments)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"epsilon": 0.0}, ValueError, "epsilon must be a positive"),
        ({"epsilon": -1e-3}, ValueError, "epsilon must be a positive"),
        ({"epsilon": float("nan")}, ValueError, "epsilon must be a positive"),
        ({"subspace": 5}, ValueError, r"subspace dim must lie in 1\.\.4 \(the parameter count\), got 5"),
        ({"subspace": 0}, ValueError, "subspace dim must lie in"),
        ({"subspace": torch.zeros(3, 2)}, ValueError, r"shape \(4, p\)"),
        ({"subspace": True}, TypeError, "subspace must be"),
        ({"max_iterations": 0}, ValueError, "max_iterations"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"targets": torch.zeros(7)}, ValueError, "same positive length"),
        ({"loss_fn": lambda outputs, targets: outputs.mean()}, ValueError, r"per-example losses of shape \(8,\)"),
    ],
)
def test_bad_arguments_raise_clear_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        _quadratic_call(**overrides)


def test_model_without_trainable_parameters_is_rejected():
    model = DiagonalQuadratic(torch.zeros(3), torch.ones(3)).requires_grad_(False)
    with pytest.raises(ValueError, match="DiagonalQuadratic has no parameter with requires_grad=True"):
        epsilon_sharpness(model, per_example_outputs_are_losses, torch.zeros(2, 3), torch.zeros(2))
