"""Tests of noisescale.hessian against the explicit Hessian (torch.autograd.functional) and naive loops."""

from __future__ import annotations

import copy
import functools
import itertools
import math
from collections import UserDict

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

import noisescale.hessian as hessian_module
from noisescale.batches import batch_size_of, call_arguments, select_examples
from noisescale.hessian import (hessian_noise_scale, hessian_vector_product, hutchinson_trace, hvp_method,
                                micro_batch_hessian_noise_scale, trainable_parameters)
from noisescale.models import CausalSelfAttention, TinyTransformer, sequence_cross_entropy, tiny_transformer

from _two_inputs import TwoInputs


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def _problem(seed: int = 0, batch_size: int = 12):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs = torch.randn(batch_size, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (batch_size,))
    return model, inputs, targets


def _flat_loss(model, inputs, targets, loss_fn=_cross_entropy, mean: bool = True):
    """Mean loss (or the (B,) losses) as a function of one flat parameter vector, for torch.autograd.functional."""
    params = trainable_parameters(model)
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    args, kwargs = call_arguments(inputs)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = dict(zip(names, (c.reshape(s) for c, s in zip(flat.split(sizes), shapes))))
        losses = loss_fn(functional_call(model, pieces, args, kwargs), targets)
        return losses.mean() if mean else losses

    flat = torch.cat([p.flatten() for p in params.values()])
    return loss, flat, names, shapes, sizes


def _explicit_hessian(model, inputs, targets, loss_fn=_cross_entropy) -> torch.Tensor:
    loss, flat, *_ = _flat_loss(model, inputs, targets, loss_fn)
    return torch.autograd.functional.hessian(loss, flat)


def _per_example_gradients(model, inputs, targets, loss_fn=_cross_entropy) -> torch.Tensor:
    """Naive loop: one autograd.grad per example, flattened (B, P)."""
    rows = []
    for k in range(batch_size_of(inputs)):
        example = slice(k, k + 1)
        loss, flat, *_ = _flat_loss(model, select_examples(inputs, example), select_examples(targets, example),
                                    loss_fn)
        flat.requires_grad_(True)
        rows.append(torch.autograd.grad(loss(flat), flat)[0])
    return torch.stack(rows)


def _gradients_within_the_batch(model, inputs, targets, loss_fn) -> torch.Tensor:
    """(B, P): the gradient of each l_i of one forward of the whole batch, for a loss normalised over it."""
    losses, flat, *_ = _flat_loss(model, inputs, targets, loss_fn, mean=False)
    return torch.autograd.functional.jacobian(losses, flat)


def _naive_curvature(model, inputs, targets, half: int, loss_fn=_cross_entropy,
                     per_example_gradients=_per_example_gradients) -> dict[str, float]:
    """tr(H Sigma), unbiased G^T H G and the Fisher trace with every example of the first half, from the dense
    Hessian of the second half and a loop of per-example gradients (the quantities of hessian_noise_scale)."""
    per_example = per_example_gradients(model, select_examples(inputs, slice(half)),
                                        select_examples(targets, slice(half)), loss_fn)
    mean_gradient = per_example.mean(dim=0)
    curvature = _explicit_hessian(model, select_examples(inputs, slice(half, None)),
                                  select_examples(targets, slice(half, None)), loss_fn)
    deviations = per_example - mean_gradient
    trace_h_sigma = torch.einsum("ip,pq,iq->", deviations, curvature, deviations).item() / (half - 1)
    return {"trace_h_sigma": trace_h_sigma,
            "g_h_g": (mean_gradient @ curvature @ mean_gradient).item() - trace_h_sigma / half,
            "fisher_trace": per_example.pow(2).sum(dim=1).mean().item()}


def _random_vector(model, generator_seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(generator_seed)
    return {name: torch.randn(p.shape, generator=generator, dtype=p.dtype)
            for name, p in trainable_parameters(model).items()}


def _flat(vector: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.flatten() for value in vector.values()])


def _assert_same_results(got, expected, rel: float = 1e-9):
    for field, value in vars(expected).items():
        assert getattr(got, field) == pytest.approx(value, rel=rel), field


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
    for field, value in _naive_curvature(model, inputs, targets, half).items():
        assert getattr(result, field) == pytest.approx(value, rel=1e-9), field
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


# Models where forward-over-reverse or vmap cannot run: the fallbacks give the same numbers.

class _TanhWithoutForwardAD(torch.autograd.Function):
    """tanh with a (twice differentiable) backward and no jvp: forward-mode AD raises NotImplementedError."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, gradient):
        (output,) = ctx.saved_tensors
        return gradient * (1 - output * output)


class _TanhWithoutBatchingRule(_TanhWithoutForwardAD):
    """tanh that torch.func.vmap refuses (no vmap rule), with forward-mode AD."""

    generate_vmap_rule = False

    @staticmethod
    def jvp(ctx, tangent):
        (output,) = ctx.saved_tensors
        return tangent * (1 - output * output)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)


class _Activation(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function.apply(x)


@pytest.mark.parametrize("function", [_TanhWithoutForwardAD, _TanhWithoutBatchingRule])
def test_model_without_forward_ad_or_vmap_gives_what_its_plain_twin_gives(function):
    model, inputs, targets = _problem(seed=6, batch_size=12)
    twin = nn.Sequential(model[0], _Activation(function), model[2])
    generator_seed = 3
    expected = hessian_noise_scale(model, _cross_entropy, inputs, targets, num_probes=4, num_sigma_examples=5,
                                   generator=torch.Generator().manual_seed(generator_seed))
    for _ in range(2):  # the second call starts from the remembered method and loops
        got = hessian_noise_scale(twin, _cross_entropy, inputs, targets, num_probes=4, num_sigma_examples=5,
                                  generator=torch.Generator().manual_seed(generator_seed))
        _assert_same_results(got, expected, rel=1e-10)
    assert hvp_method(model) == "forward-over-reverse"
    assert hvp_method(twin) == ("reverse-over-reverse" if function is _TanhWithoutForwardAD
                                else "forward-over-reverse")
    vector = _random_vector(twin)
    torch.testing.assert_close(_flat(hessian_vector_product(twin, _cross_entropy, inputs, targets, vector)),
                               _explicit_hessian(model, inputs, targets) @ _flat(vector))


def test_spectral_norm_in_train_mode_falls_back_to_reverse_over_reverse():
    """Its power iteration's ``normalize(out=...)`` has no forward-mode derivative ("Trying to use forward AD with
    div_out that does not support it", which the fallback's pattern missed: the Hessian proxies raised). Reference:
    double backward through a copy of the model in the same state; the model's power-iteration buffers are kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(6, 6)), nn.Tanh(),
                          nn.Linear(6, 3)).double().train()
    inputs, targets = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    twin, buffers = copy.deepcopy(model), {name: b.clone() for name, b in model.named_buffers()}
    vector = _random_vector(model)

    got = hessian_vector_product(model, _cross_entropy, inputs, targets, vector)

    parameters = dict(twin.named_parameters())
    grads = torch.autograd.grad(_cross_entropy(twin(inputs), targets).mean(), list(parameters.values()),
                                create_graph=True)
    expected = torch.autograd.grad(sum((g * vector[name]).sum() for name, g in zip(parameters, grads)),
                                   list(parameters.values()))
    torch.testing.assert_close(_flat(got), torch.cat([e.flatten() for e in expected]), rtol=1e-10, atol=1e-12)
    assert hvp_method(model) == "reverse-over-reverse"
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name


@pytest.mark.parametrize("function", [None, _TanhWithoutForwardAD])
def test_micro_batches_give_the_estimate_of_their_concatenation(function):
    """Four micro-batches of 4 (the first two the gradient half, the others the Hessian half) give what the batch
    of 16 gives, to float64 rounding, with forward-over-reverse and with the reverse-over-reverse fallback (one
    micro-batch's kept graph at a time); one micro-batch is split in two as the batch is. Unequal ones split at the
    boundary nearest half the examples and match the naive computation with that gradient half."""
    model, inputs, targets = _problem(seed=5, batch_size=16)
    if function is not None:
        model = nn.Sequential(model[0], _Activation(function), model[2])
    options = {"num_probes": 4, "num_sigma_examples": 5}

    def generator():
        return torch.Generator().manual_seed(11)

    expected = hessian_noise_scale(model, _cross_entropy, inputs, targets, generator=generator(), **options)
    parts = list(zip(inputs.split(4), targets.split(4)))
    got = micro_batch_hessian_noise_scale(model, _cross_entropy, parts, generator=generator(), **options)
    _assert_same_results(got, expected, rel=1e-12)
    assert (got.gradient_batch_size, got.num_sigma_examples) == (8, 5)
    assert hvp_method(model) == ("forward-over-reverse" if function is None else "reverse-over-reverse")
    single = micro_batch_hessian_noise_scale(model, _cross_entropy, [(inputs, targets)], generator=generator(),
                                             **options)
    assert single == expected
    unequal = micro_batch_hessian_noise_scale(model, _cross_entropy, list(zip(inputs.split([6, 5, 5]),
                                                                             targets.split([6, 5, 5]))),
                                              num_probes=4, num_sigma_examples=6, generator=generator())
    for field, value in _naive_curvature(model, inputs, targets, half=6).items():
        assert getattr(unequal, field) == pytest.approx(value, rel=1e-9), field
    # (1, 15): no boundary leaves 2 examples for the gradient half, so the batch is split whole (a new user's
    # Lightning run with a first micro-batch of 1 crashed); (1, 3, 12): the boundary after 4 examples
    ones = micro_batch_hessian_noise_scale(model, _cross_entropy, [(inputs[:1], targets[:1]), (inputs[1:], targets[1:])],
                                           generator=generator(), **options)
    assert ones == expected
    uneven = micro_batch_hessian_noise_scale(model, _cross_entropy, list(zip(inputs.split([1, 3, 12]),
                                                                            targets.split([1, 3, 12]))),
                                             num_probes=4, num_sigma_examples=4, generator=generator())
    assert uneven.gradient_batch_size == 4
    for field, value in _naive_curvature(model, inputs, targets, half=4).items():
        assert getattr(uneven, field) == pytest.approx(value, rel=1e-9), field
    with pytest.raises(ValueError, match="at least 4 examples, got micro-batches of \\[2, 1\\]"):
        micro_batch_hessian_noise_scale(model, _cross_entropy, [(inputs[:2], targets[:2]), (inputs[2:3], targets[2:3])])


class _TanhDifferentiableOnce(_TanhWithoutForwardAD):
    """tanh without jvp whose backward is marked @once_differentiable: no method gives its second derivative."""

    @staticmethod
    @once_differentiable
    def backward(ctx, gradient):
        (output,) = ctx.saved_tensors
        return gradient * (1 - output * output)


def test_model_with_a_once_differentiable_backward_raises_rather_than_dropping_curvature():
    """torch's double backward silently treats such a backward as constant (a wrong H v, no error)."""
    model, inputs, targets = _problem(seed=6, batch_size=12)
    twin = nn.Sequential(model[0], _Activation(_TanhDifferentiableOnce), model[2])
    with pytest.raises(RuntimeError, match=r"no Hessian-vector product method works for this Sequential: tried "
                                           r"forward-over-reverse, reverse-over-reverse, reverse-over-reverse, "
                                           r"composite kernels; the last failed with: .*@once_differentiable"):
        hessian_vector_product(twin, _cross_entropy, inputs, targets, _random_vector(twin))


def test_forced_fallback_agrees_with_forward_over_reverse_and_is_not_retried(monkeypatch):
    """jvp and vmap made to fail as torch does for a missing forward derivative and a missing batching rule:
    reverse-over-reverse and the loops give the jvp/vmap path's numbers, and jvp is tried once per model."""
    model, inputs, targets = _problem(seed=7, batch_size=12)
    expected = hessian_noise_scale(model, _cross_entropy, inputs, targets, num_probes=4, num_sigma_examples=6,
                                   generator=torch.Generator().manual_seed(0))
    vector = _random_vector(model)
    expected_product = hessian_vector_product(model, _cross_entropy, inputs, targets, vector)
    attempts = []

    def jvp_without_forward_ad(*args, **kwargs):
        attempts.append("jvp")
        raise NotImplementedError("Trying to use forward AD with some_op that does not support it because it has "
                                  "not been implemented yet.")

    def vmap_without_batching_rule(*args, **kwargs):
        def refuse(*inner_args, **inner_kwargs):
            attempts.append("vmap")
            raise RuntimeError("output with shape [1, 4] doesn't match the broadcast shape [6, 1, 4]")
        return refuse

    monkeypatch.setattr(hessian_module, "jvp", jvp_without_forward_ad)
    monkeypatch.setattr(hessian_module, "vmap", vmap_without_batching_rule)
    fresh = _problem(seed=7, batch_size=12)[0]  # the same function, no remembered method
    got = hessian_noise_scale(fresh, _cross_entropy, inputs, targets, num_probes=4, num_sigma_examples=6,
                              generator=torch.Generator().manual_seed(0))
    _assert_same_results(got, expected, rel=1e-10)
    assert attempts == ["jvp", "vmap", "vmap"]  # per-example gradients, then Hessian-vector products
    assert hvp_method(fresh) == "reverse-over-reverse"
    product = hessian_vector_product(fresh, _cross_entropy, inputs, targets, vector)
    hessian_noise_scale(fresh, _cross_entropy, inputs, targets, num_probes=2, generator=torch.Generator())
    assert attempts == ["jvp", "vmap", "vmap"]  # remembered: neither is tried again on this model
    for name in vector:
        torch.testing.assert_close(product[name], expected_product[name], rtol=1e-10, atol=1e-12)


class _ExplicitCausalSelfAttention(CausalSelfAttention):
    """The same attention written out, softmax(Q K^T/sqrt(d) + causal mask) V: plain ops that jvp and vmap run."""

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        y = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        return self.projection(y.transpose(1, 2).reshape(batch, length, width))


def _with_explicit_attention(model: TinyTransformer) -> TinyTransformer:
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        explicit = _ExplicitCausalSelfAttention(block.attention.qkv.in_features, block.attention.n_heads).double()
        explicit.load_state_dict(block.attention.state_dict())
        block.attention = explicit
    return twin


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_tiny_transformer_with_flash_attention_matches_explicit_attention_and_dense_hessian():
    torch.manual_seed(8)
    model = tiny_transformer(vocab_size=7, d_model=4, n_heads=2, n_layers=1, block_size=4).double()
    twin = _with_explicit_attention(model)
    tokens, next_tokens = torch.randint(0, 7, (8, 4)), torch.randint(0, 7, (8, 4))
    torch.testing.assert_close(model(tokens), twin(tokens), rtol=1e-12, atol=1e-12)  # the same function
    results = [hessian_noise_scale(m, sequence_cross_entropy, tokens, next_tokens, num_probes=3,
                                   num_sigma_examples=4, generator=torch.Generator().manual_seed(0))
               for m in (model, twin)]
    assert hvp_method(model) == "reverse-over-reverse, composite kernels"  # CPU flash attention: neither AD
    assert hvp_method(twin) == "forward-over-reverse"
    _assert_same_results(*results)
    for field, value in _naive_curvature(twin, tokens, next_tokens, 4, sequence_cross_entropy).items():
        assert getattr(results[0], field) == pytest.approx(value, rel=1e-9), field
    vector = _random_vector(model)
    torch.testing.assert_close(
        _flat(hessian_vector_product(model, sequence_cross_entropy, tokens, next_tokens, vector)),
        _explicit_hessian(twin, tokens, next_tokens, sequence_cross_entropy) @ _flat(vector))


class _RecurrentClassifier(nn.Module):
    """A recurrent layer over batch-first sequences (transposed to time-first for batch_first=False), the last
    step's state to logits."""

    def __init__(self, layer: type[nn.Module], batch_first: bool):
        super().__init__()
        self.recurrent = layer(3, 4, batch_first=batch_first)
        self.head = nn.Linear(4, 2)

    def forward(self, sequences):
        batch_first = self.recurrent.batch_first
        outputs, _ = self.recurrent(sequences if batch_first else sequences.transpose(0, 1))
        return self.head(outputs[:, -1] if batch_first else outputs[-1])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layer", [nn.LSTM, nn.GRU])
def test_recurrent_models_match_dense_hessian(layer, batch_first):
    torch.manual_seed(9)
    model = _RecurrentClassifier(layer, batch_first).double()
    sequences, labels = torch.randn(8, 5, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    result = hessian_noise_scale(model, _cross_entropy, sequences, labels, num_probes=16, num_sigma_examples=4,
                                 generator=torch.Generator().manual_seed(0))
    for field, value in _naive_curvature(model, sequences, labels, 4).items():
        assert getattr(result, field) == pytest.approx(value, rel=1e-9), field
    hessian = _explicit_hessian(model, sequences, labels)
    assert abs(result.trace_h - torch.trace(hessian).item()) < 3 * result.trace_h_stderr
    vector = _random_vector(model)
    torch.testing.assert_close(_flat(hessian_vector_product(model, _cross_entropy, sequences, labels, vector)),
                               hessian @ _flat(vector))


# Keyword inputs and pytree targets (noisescale.batches), and a HuggingFace model called with them.

class _KeywordModel(nn.Module):
    """net(cat(x, z)) * scale by keyword, or the per-example cross-entropy itself when ``labels`` are given."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *, x, z, scale=1.0, labels=None):
        logits = self.net(torch.cat([x, z], dim=1)) * scale
        return logits if labels is None else {"loss": _cross_entropy(logits, labels)}


def test_keyword_inputs_and_pytree_or_no_targets_give_what_the_tensor_batch_gives():
    model, inputs, targets = _problem(seed=11, batch_size=12)
    keyword_model = _KeywordModel(model)
    keywords = {"x": inputs[:, :3], "z": inputs[:, 3:], "scale": 1.0}  # a non-tensor value goes to every call
    calls = [  # (inputs, targets, loss_fn)
        (keywords, targets, _cross_entropy),
        (UserDict(keywords), {"labels": targets}, lambda outputs, t: _cross_entropy(outputs, t["labels"])),
        ({**keywords, "labels": targets}, None, lambda outputs, _: outputs["loss"]),
    ]
    expected = hessian_noise_scale(model, _cross_entropy, inputs, targets, num_probes=4, num_sigma_examples=5,
                                   generator=torch.Generator().manual_seed(0))
    expected_trace = hutchinson_trace(model, _cross_entropy, inputs, targets, num_probes=4,
                                      generator=torch.Generator().manual_seed(0))
    vector = _random_vector(model)
    expected_product = _flat(hessian_vector_product(model, _cross_entropy, inputs, targets, vector))
    for call_inputs, call_targets, loss_fn in calls:
        got = hessian_noise_scale(keyword_model, loss_fn, call_inputs, call_targets, num_probes=4,
                                  num_sigma_examples=5, generator=torch.Generator().manual_seed(0))
        _assert_same_results(got, expected, rel=1e-12)
        got_trace = hutchinson_trace(keyword_model, loss_fn, call_inputs, call_targets, num_probes=4,
                                     generator=torch.Generator().manual_seed(0))
        assert got_trace.estimate == pytest.approx(expected_trace.estimate, rel=1e-12)
        keyword_vector = {f"net.{name}": value for name, value in vector.items()}
        product = hessian_vector_product(keyword_model, loss_fn, call_inputs, call_targets, keyword_vector)
        torch.testing.assert_close(_flat(product), expected_product, rtol=1e-12, atol=1e-14)
    assert hvp_method(keyword_model) == "forward-over-reverse"
    with pytest.raises(ValueError, match=r"same leading batch dimension, got input shapes \[\(12, 3\), \(12, 1\)\] "
                                         r"and target shapes \[\(5,\)\]"):
        hessian_noise_scale(keyword_model, _cross_entropy, keywords, targets[:5])
    with pytest.raises(ValueError, match=r"per-example losses of shape \(12,\).*got \(\)"):
        hutchinson_trace(keyword_model, lambda outputs, _: outputs["loss"].sum(), {**keywords, "labels": targets},
                         None)


def _tiny_gpt2(attn_implementation: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=31, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0, attn_implementation=attn_implementation)
    torch.manual_seed(12)
    return transformers.GPT2LMHeadModel(config).double()


def _masked_token_loss(outputs, targets):
    """Per-example mean next-token cross-entropy over the unpadded positions (``outputs`` a ModelOutput)."""
    labels, mask = targets["labels"], targets["mask"].to(torch.float64)
    tokens = nn.functional.cross_entropy(outputs.logits.flatten(0, 1), labels.flatten(), reduction="none")
    return (tokens.view(labels.shape) * mask).sum(dim=1) / mask.sum(dim=1)


def test_gpt2_with_keyword_inputs_and_sdpa_matches_eager_attention_and_double_backward():
    model = _tiny_gpt2("sdpa")  # transformers' default; CPU flash attention: neither jvp nor double backward
    eager = _tiny_gpt2("eager")
    eager.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 31, (8, 6))
    mask = torch.ones(8, 6, dtype=torch.long)
    mask[0, 4:] = mask[5, 3:] = 0  # right padding
    inputs = {"input_ids": tokens, "attention_mask": mask}
    targets = {"labels": torch.randint(0, 31, (8, 6)), "mask": mask}
    results = [hessian_noise_scale(m, _masked_token_loss, inputs, targets, num_probes=3, num_sigma_examples=3,
                                   generator=torch.Generator().manual_seed(0)) for m in (model, eager)]
    _assert_same_results(*results)
    assert hvp_method(model) == "reverse-over-reverse, composite kernels"
    assert hvp_method(eager) == "forward-over-reverse"

    vector = _random_vector(model)
    parameters = [p for p in eager.parameters() if p.requires_grad]
    loss = _masked_token_loss(eager(**inputs), targets).mean()
    gradient = torch.autograd.grad(loss, parameters, create_graph=True)
    reference = torch.autograd.grad(gradient, parameters, grad_outputs=list(vector.values()))
    product = hessian_vector_product(model, _masked_token_loss, inputs, targets, vector)
    torch.testing.assert_close(_flat(product), torch.cat([r.flatten() for r in reference]))


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_float32_lstm_on_the_onednn_kernel_matches_the_float64_dense_hessian():
    """In float32 on CPU, nn.LSTM runs oneDNN's mkldnn_rnn_layer, which has no forward derivative."""
    torch.manual_seed(13)
    reference = _RecurrentClassifier(nn.LSTM, batch_first=True).double()
    model = copy.deepcopy(reference).float()
    sequences, labels = torch.randn(6, 5, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    vector = _random_vector(reference)
    product = hessian_vector_product(model, _cross_entropy, sequences.float(), labels,
                                     {name: value.float() for name, value in vector.items()})
    torch.testing.assert_close(_flat(product).double(), _explicit_hessian(reference, sequences, labels) @ _flat(vector),
                               rtol=1e-4, atol=1e-5)
    result = hessian_noise_scale(model, _cross_entropy, sequences.float(), labels, num_probes=2,
                                 num_sigma_examples=3, generator=torch.Generator().manual_seed(0))
    for field, value in _naive_curvature(reference, sequences, labels, 3).items():
        assert getattr(result, field) == pytest.approx(value, rel=1e-4, abs=1e-6), field


@pytest.mark.parametrize("kind", ["reentrant", "non-reentrant", "composable"])
def test_a_model_with_activation_checkpointing_gives_the_plain_models_hessian_proxies(kind):
    """torch.utils.checkpoint inside the model, or torch.distributed's composable checkpoint(module): the
    Hessian-vector products (torch.func jvp of grad) raised ("don't yet support saved tensor hooks"; "must override
    the setup_context staticmethod"). The passes now run the checkpointed blocks plainly: the same figures as the
    model without checkpointing, from the same random probes."""
    from torch.distributed._composable import checkpoint as checkpoint_module
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.inner, self.out = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.checkpointed = kind != "composable"

        def forward(self, x):
            block, h = (lambda h: torch.tanh(self.inner(h))), self.embed(x)
            if self.checkpointed:
                return self.out(checkpoint(block, h, use_reentrant=kind == "reentrant"))
            return self.out(block(h))

    torch.manual_seed(0)
    model = Checkpointed().double()
    plain = copy.deepcopy(model)
    plain.checkpointed = False
    if kind == "composable":
        checkpoint_module(model.inner)
    inputs = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))
    got, expected = (hessian_noise_scale(m, _cross_entropy, inputs, targets, num_probes=3, num_sigma_examples=4,
                                         generator=torch.Generator().manual_seed(3)) for m in (model, plain))
    for name in ("trace_h", "g_h_g", "trace_h_sigma", "fisher_trace"):
        assert getattr(got, name) == pytest.approx(getattr(expected, name), rel=1e-12), name


def _token_loss_of_ones_own(outputs, labels):
    return sequence_cross_entropy(outputs, labels, weighting="token")


@pytest.mark.parametrize("token", [functools.partial(sequence_cross_entropy, weighting="token"),
                                   _token_loss_of_ones_own], ids=["partial", "own function"])
def test_the_token_weighting_gives_each_example_its_gradient_within_the_half(token):
    # l_i = b sum_t c_it / N with N the half's token count: the per-example gradients (taken one example at a time)
    # are scaled by b n_i / N, so that their mean is the half's mean gradient (a new user's GPT-2: no scaling before)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 7)).double()
    tokens = torch.randint(0, 7, (8, 5), generator=torch.Generator().manual_seed(4))
    labels = torch.randint(0, 7, (8, 5), generator=torch.Generator().manual_seed(5))
    labels[0, 1:] = labels[2, :3] = labels[5, 2:] = -100   # 1, 2 and 2 counted tokens; the others 5
    result = hessian_noise_scale(model, token, tokens, labels, num_probes=4, num_sigma_examples=4,
                                 generator=torch.Generator().manual_seed(0))
    expected = _naive_curvature(model, tokens, labels, 4, token, _gradients_within_the_batch)
    for field, value in expected.items():
        assert getattr(result, field) == pytest.approx(value, rel=1e-9), field
    alone = _naive_curvature(model, tokens, labels, 4, token)   # what each example alone would give
    assert alone["fisher_trace"] != pytest.approx(expected["fisher_trace"], rel=0.05)


def _population_truth(model, inputs, targets) -> tuple[float, float]:
    """G^T H G and tr(H Sigma) of the whole dataset: H its exact mean Hessian, G and Sigma (divisor N) from a loop
    of per-example gradients."""
    hessian = _explicit_hessian(model, inputs, targets)
    per_example = _per_example_gradients(model, inputs, targets)
    mean = per_example.mean(dim=0)
    deviations = per_example - mean
    sigma = deviations.T @ deviations / per_example.shape[0]
    return (mean @ hessian @ mean).item(), (hessian * sigma).sum().item()


def _every_draw(population: int, half: int, rest: int):
    """Every batch drawn without replacement as (gradient half, Hessian half), each set of examples once (the
    estimates do not depend on the order within a half when every example of the gradient half is used)."""
    for first in itertools.combinations(range(population), half):
        others = [k for k in range(population) if k not in first]
        for second in itertools.combinations(others, rest):
            yield list(first) + list(second)


@pytest.mark.parametrize("half, rest, sizes", [(2, 2, None), (2, 3, None), (2, 2, [1, 1, 2])])
def test_population_correction_is_exact_over_every_draw_without_replacement(half, rest, sizes):
    """Over every batch of N = 6 examples drawn without replacement, the mean of the estimates with population=N is
    the dataset's G^T H G and tr(H Sigma) (exact Hessian, float64) to 1e-10 relative, for halves 2 + 2 and 2 + 3
    and for micro-batches [1, 1, 2] (gradient half: the first two). The i.i.d. formula is biased here: its mean
    G^T H G is 0.036 and its tr(H Sigma) 0.419, against the dataset's 0.103 and 0.529 (the missing correction and
    the halves' dependence)."""
    population = 6
    model, inputs, targets = _problem(seed=3, batch_size=population)
    g_h_g, trace_h_sigma = _population_truth(model, inputs, targets)
    options = {"num_probes": 2, "num_sigma_examples": half, "generator": torch.Generator().manual_seed(0)}
    corrected, iid = [], []
    for order in _every_draw(population, half, rest):
        x, y = inputs[order], targets[order]
        if sizes is None:
            corrected.append(hessian_noise_scale(model, _cross_entropy, x, y, population=population, **options))
            iid.append(hessian_noise_scale(model, _cross_entropy, x, y, **options))
        else:
            parts = list(zip(x.split(sizes), y.split(sizes)))
            corrected.append(micro_batch_hessian_noise_scale(model, _cross_entropy, parts, population=population,
                                                             **options))
            assert corrected[-1].gradient_batch_size == half
    mean = {field: sum(getattr(e, field) for e in corrected) / len(corrected) for field in ("g_h_g", "trace_h_sigma")}
    assert mean["g_h_g"] == pytest.approx(g_h_g, rel=1e-10)
    assert mean["trace_h_sigma"] == pytest.approx(trace_h_sigma, rel=1e-10)
    if iid:
        assert abs(sum(e.g_h_g for e in iid) / len(iid) - g_h_g) > 0.1 * abs(g_h_g)


def test_population_of_a_batch_larger_than_it_is_refused():
    model, inputs, targets = _problem(seed=3, batch_size=8)
    with pytest.raises(ValueError, match="population must be >= 8"):
        hessian_noise_scale(model, _cross_entropy, inputs, targets, population=7)
