"""A forward that reorders the model's raw inputs before its first layer (noisescale.per_example.row_order).

A review (session 30) found such models silently wrong under backend="auto" and "ghost": token ids sorted by length,
``x.flip(0)``, ``x[order]`` leave no autograd graph, so the hooks took row i of the first layer's input for example
i and credited each layer's norms to other examples (per-example norms 0.13 to 0.95 off; their sum unchanged). The
independence check's two forwards now show it, and such a model is measured by the whole-model vmap (exact), or
refused under backend="ghost". The reference is a loop over single examples in float64.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from noisescale.per_example import PerExampleGradNorms
from noisescale.per_example.row_order import row_fingerprint, rows_reordered

B, D = 5, 4


def _naive(model, loss_fn, inputs, targets):
    """(B,) |dl_i/dtheta|^2 per parameter, one forward and backward per example on a copy of the model."""
    model = copy.deepcopy(model)
    parameters = dict(model.named_parameters())
    rows = {name: [] for name in parameters}
    for i in range(B):
        loss = loss_fn(model(*(t[i:i + 1] for t in inputs)), targets[i:i + 1]).sum()
        for name, grad in zip(parameters, torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)):
            rows[name].append(torch.zeros((), dtype=torch.float64) if grad is None else grad.square().sum())
    return {name: torch.stack(values) for name, values in rows.items()}


class Reordering(nn.Module):
    """Two layers; the rows of the raw input reordered before the first (``kind``) and put back after it, or
    (``after_first_layer``) reordered after the first layer, where the graph shows it."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.first, self.second = kind, nn.Linear(D, D), nn.Linear(D, 2)

    def forward(self, x, lengths):
        order = lengths.argsort(descending=True, stable=True)
        if self.kind == "flip":
            return self.second(torch.tanh(self.first(x.flip(0))).flip(0))
        if self.kind == "sort_by_length":
            return self.second(torch.tanh(self.first(x[order]))[order.argsort()])
        if self.kind == "index_copy_back":
            hidden = torch.tanh(self.first(x[order]))
            return self.second(torch.empty_like(hidden).index_copy(0, order, hidden))
        hidden = torch.tanh(self.first(x))   # "after_first_layer"
        return self.second(torch.tanh(hidden[order])[order.argsort()])


class SortedTagger(nn.Module):
    """Token ids sorted by length before the embedding, packed for an LSTM (the per-module fallback), unsorted."""

    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(7, D), nn.LSTM(D, D, batch_first=True), nn.Linear(D, 2)

    def forward(self, tokens, lengths):
        order = lengths.argsort(descending=True, stable=True)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens[order]), lengths[order], batch_first=True)
        _, (hidden, _) = self.rnn(packed)
        return self.head(hidden[-1][order.argsort()])


def _squared_error(outputs, targets):
    return (outputs - targets).square().sum(1)


def _cross_entropy(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def _case(kind: str):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([2, 5, 3, 1, 4])
    torch.manual_seed(0)
    if kind.startswith("sorted_tagger"):   # sequences of 6, or as long as the batch (T == B)
        tokens = torch.randint(1, 7, (B, B if kind.endswith("batch") else 6), generator=generator)
        return SortedTagger().double(), _cross_entropy, (tokens, lengths), torch.randint(0, 2, (B,),
                                                                                        generator=generator)
    inputs = torch.randn(B, D, generator=generator, dtype=torch.float64)
    if kind.endswith("requiring_grad"):   # an input-gradient method's: a graph of inputs alone, no parameter
        kind, inputs = "sort_by_length", inputs.requires_grad_()
    return Reordering(kind).double(), _squared_error, (inputs, lengths), torch.randn(B, 2, generator=generator,
                                                                                   dtype=torch.float64)


@pytest.mark.parametrize("kind", ["flip", "sort_by_length", "index_copy_back", "sorted_tagger",
                                  "sorted_tagger_as_long_as_the_batch", "sort_by_length_of_inputs_requiring_grad"])
def test_a_forward_that_reorders_its_raw_inputs_is_measured_by_the_whole_model_vmap(kind):
    """Under auto: every parameter by the whole-model vmap, equal to the loop (it was 0.13 to 0.82 off, silently),
    said once over two calls, p.grad that of a plain backward. Under ghost: refused, p.grad left as it was."""
    model, loss_fn, inputs, targets = _case(kind)
    expected = _naive(model, loss_fn, inputs, targets)
    plain = copy.deepcopy(model)
    loss_fn(plain(*inputs), targets).mean().backward()
    engine = PerExampleGradNorms(model, loss_fn, by_parameter=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            result = engine(inputs, targets)
            assert set(result.backend_of.values()) == {"vmap"}
            for name, values in expected.items():
                torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-10, atol=1e-14, msg=name)
    said = [str(w.message) for w in caught if "in another order than the batch's" in str(w.message)]
    assert len(said) == 1 and ("'embed'" if kind.startswith("sorted_tagger") else "'first'") in said[0]
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0, msg=name)

    if not kind.startswith("sorted_tagger"):   # (ghost has no rule for the LSTM)
        model.zero_grad(set_to_none=True)
        with pytest.raises(ValueError, match="in another order than the batch's.*backend='ghost' cannot measure it"):
            PerExampleGradNorms(model, loss_fn, backend="ghost")(inputs, targets)
        assert all(p.grad is None for p in model.parameters())


def test_rows_reordered_after_the_first_layer_stay_with_the_hooks():
    """The reordering the autograd graph shows (the AllenNLP idiom: sort the first layer's outputs) is followed by
    the hooks, as before: no warning, the first layer by its rule, exact."""
    model, loss_fn, inputs, targets = _case("after_first_layer")
    expected = _naive(model, loss_fn, inputs, targets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = PerExampleGradNorms(model, loss_fn, by_parameter=True)(inputs, targets)
    assert not [w for w in caught if "in another order" in str(w.message)]
    assert result.backend_of["first.weight"] == "ghost"
    for name, values in expected.items():
        torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("permutation, expected", [
    ([0, 1, 2, 3, 4], False), ([4, 3, 2, 1, 0], True), ([1, 2, 3, 4, 0], True), ([0, 2, 1, 3, 4], True),
])
def test_rows_reordered_against_a_layer_input_reordered_by_hand(permutation, expected):
    """The rows of a layer's input are the batch's rows permuted; examples 0 and 4 replaced by example 1's (the
    check's swaps): the identity is not reordered, any other permutation is, the flip too, though it maps the two
    replaced examples' rows onto each other. A table whose rows do not move with the examples is not judged."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(B, 3, 2, generator=generator)
    replaced = {0: 1, 4: 1}
    swapped = batch.clone()
    swapped[[0, 4]] = batch[1]
    before, after = (row_fingerprint(x[permutation], B) for x in (batch, swapped))
    assert rows_reordered(before, after, replaced) is expected
    table = torch.randn(B, 3, generator=generator)
    assert not rows_reordered(row_fingerprint(table, B), row_fingerprint(table.clone(), B), replaced)
    square = torch.randn(B, B, generator=generator)   # T == B: examples in dim 0 (token ids) or 1 (sequence-first)
    square_swapped = square.clone()
    square_swapped[[0, 4]] = square[1]
    assert not rows_reordered(row_fingerprint(square, B), row_fingerprint(square_swapped, B), replaced)
    assert rows_reordered(row_fingerprint(square[permutation], B), row_fingerprint(square_swapped[permutation], B),
                          replaced) is expected
    assert not rows_reordered(row_fingerprint(square.T, B), row_fingerprint(square_swapped.T, B), replaced)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_an_input_row_that_is_not_finite_is_not_taken_for_a_reordering(value):
    """An inf in one example's input (the tanh after the first layer keeps the losses finite) left its row's
    fingerprint unequal to itself: the model was said to reorder its inputs and went to the whole-model vmap in
    every later call, and ghost refused it. Its rows are now compared as they are: no warning, the rules, the
    next, finite batch exact."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 2)).double()
    x = torch.randn(B, D, generator=generator, dtype=torch.float64)
    targets = torch.randn(B, 2, generator=generator, dtype=torch.float64)
    bad = x.clone()
    bad[1, 0] = value
    assert not rows_reordered(row_fingerprint(bad, B), row_fingerprint(bad.clone(), B), {0: 2})
    engine = PerExampleGradNorms(model, _squared_error, by_parameter=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine((bad,), targets)
        result = engine((x,), targets)
    assert not [w for w in caught if "in another order" in str(w.message)]
    assert set(result.backend_of.values()) == {"ghost"}
    for name, values in _naive(model, _squared_error, (x,), targets).items():
        torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-10, atol=1e-14, msg=name)
    PerExampleGradNorms(model, _squared_error, backend="ghost")((bad,), targets)


class Noisy(nn.Module):
    """Noise added to the raw inputs in every forward (in eval mode too), then ``model``; the last draw is kept."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, *rest):
        self.noise = torch.randn_like(x)
        return self.model(x + 0.5 * self.noise, *rest)


def test_noise_drawn_into_the_raw_inputs_is_not_taken_for_a_reordering():
    """The check's two forwards draw the same noise, so a replaced example's row holds its source's inputs with its
    own noise, not its source's row: such a model was taken for one that reorders its inputs and measured by the
    whole-model vmap, which draws other noise (0.0077 to 0.48 off each example's norm, against the loop with the
    step's noise, on this model), and refused under ghost. Only which rows changed is compared now: by the rules,
    exact, no warning. A reordering the noise hides less well (rows sorted by length) is still seen."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Noisy(nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 2))).double()
    x = torch.randn(B, D, generator=generator, dtype=torch.float64)
    targets = torch.randn(B, 2, generator=generator, dtype=torch.float64)
    for backend in ("auto", "ghost"):
        measured = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = PerExampleGradNorms(measured, _squared_error, backend=backend, by_parameter=True)((x,), targets)
        assert set(result.backend_of.values()) == {"ghost"}
        noise = measured.noise   # the real pass's draw (the check's forwards put the random state back)
        for i in range(B):
            single = copy.deepcopy(model.model)
            loss = _squared_error(single(x[i:i + 1] + 0.5 * noise[i:i + 1]), targets[i:i + 1]).sum()
            grads = torch.autograd.grad(loss, list(single.parameters()))
            for (name, _), grad in zip(single.named_parameters(), grads):
                torch.testing.assert_close(result.by_parameter["model." + name][i], grad.square().sum(),
                                           rtol=1e-10, atol=1e-14)

    model, loss_fn, inputs, targets = _case("sort_by_length")
    with pytest.warns(RuntimeWarning, match="in another order than the batch's"):
        result = PerExampleGradNorms(Noisy(model), loss_fn)(inputs, targets)
    assert set(result.backend_of.values()) == {"vmap"}


class Conditioned(nn.Module):
    """A layer on the inputs and an embedding of a class label, added: ``Noisy(Conditioned())(x, label)``."""

    def __init__(self):
        super().__init__()
        self.layer, self.label, self.head = nn.Linear(D, D), nn.Embedding(3, D), nn.Linear(D, 2)

    def forward(self, x, label):
        return self.head(torch.tanh(self.layer(x) + self.label(label)))


def test_noise_drawn_with_a_replaced_example_whose_label_is_its_source_s():
    """With noise drawn in the forwards, a replaced example's row was also required to change: the embedding of a
    class label that example 0 shares with its source (example 1) keeps its row, and the model was taken for one
    that reorders its inputs (measured by the whole-model vmap, of another draw of the noise, and refused under
    ghost). Only rows other than the replaced examples' must be kept: by the rules, exact against a loop over
    single examples with the pass's noise, no warning."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Noisy(Conditioned()).double()
    x = torch.randn(B, D, generator=generator, dtype=torch.float64)
    label = torch.tensor([1, 1, 0, 2, 0])
    targets = torch.randn(B, 2, generator=generator, dtype=torch.float64)
    for backend in ("auto", "ghost"):
        measured = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = PerExampleGradNorms(measured, _squared_error, backend=backend, by_parameter=True)((x, label),
                                                                                                       targets)
        assert set(result.backend_of.values()) == {"ghost"}
        noise = measured.noise
        for i in range(B):
            single = copy.deepcopy(model.model)
            loss = _squared_error(single(x[i:i + 1] + 0.5 * noise[i:i + 1], label[i:i + 1]), targets[i:i + 1]).sum()
            grads = torch.autograd.grad(loss, list(single.parameters()))
            for (name, _), grad in zip(single.named_parameters(), grads):
                torch.testing.assert_close(result.by_parameter["model." + name][i], grad.square().sum(),
                                           rtol=1e-10, atol=1e-14)
