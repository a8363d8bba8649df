"""The norm of a sum of factored per-example gradients (tied and reused weights) against the materialised sum,
float64, with the cost rule sending each case down the path it should take."""

import copy

import pytest
import torch
from torch import nn

from noisescale.per_example import per_example_sqnorms
from noisescale.per_example.factors import IndexFactors, LinearFactors, per_example_sqnorm, sqnorm_of_sum

from test_per_example import assert_relclose, naive_per_example

B = 3


def _linear(rows_per_block, cols, positions, generator):
    return LinearFactors([(torch.randn(B, positions, cols, generator=generator, dtype=torch.float64),
                           torch.randn(B, positions, rows, generator=generator, dtype=torch.float64))
                          for rows in rows_per_block])


def _index(rows, cols, positions, generator):
    indices = torch.randint(0, rows, (B, positions), generator=generator)
    indices[:, 1] = indices[:, 0]            # a row hit twice in one example
    v = torch.randn(B, positions, cols, generator=generator, dtype=torch.float64)
    v[:, -1] = 0.0                           # a padding position: no gradient
    return IndexFactors(indices, v, rows)


def _materialised(parts):
    return per_example_sqnorm(sum(part.grads() for part in parts))


def _forbid_materialising(monkeypatch):
    def refuse(self):
        raise AssertionError("the factored path must not build (B, rows, cols) gradients")
    monkeypatch.setattr(LinearFactors, "grads", refuse)
    monkeypatch.setattr(IndexFactors, "grads", refuse)


@pytest.mark.parametrize("kinds", [("linear", "linear"), ("index", "linear"), ("linear", "index"),
                                   ("index", "index"), ("blocks", "index"), ("blocks", "linear", "index")])
def test_factored_norm_of_a_sum_equals_the_materialised_one(kinds, monkeypatch):
    generator = torch.Generator().manual_seed(len(kinds) + sum(map(len, kinds)))
    rows, cols = 400, 60   # a vocabulary-like weight: materialising costs more than the pairwise Grams
    makers = {"linear": lambda: _linear([rows], cols, 4, generator),
              "blocks": lambda: _linear([150, 50, 200], cols, 5, generator),   # fused projections, uneven rows
              "index": lambda: _index(rows, cols, 5, generator)}
    parts = [makers[kind]() for kind in kinds]
    expected = _materialised(parts)
    _forbid_materialising(monkeypatch)
    assert_relclose(sqnorm_of_sum(parts, None), expected)


def test_small_weights_are_materialised_and_a_dense_part_is_summed_in(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    parts = [_linear([4], 3, 50, generator), _linear([4], 3, 40, generator)]   # long sequences, tiny weight
    dense = torch.randn(B, 4, 3, generator=generator, dtype=torch.float64)
    expected = per_example_sqnorm(parts[0].grads() + parts[1].grads() + dense)
    expected_parts_only = _materialised(parts)
    monkeypatch.setattr("noisescale.per_example.factors._inner",
                        lambda *args: (_ for _ in ()).throw(AssertionError("should materialise")))
    assert_relclose(sqnorm_of_sum(parts, None), expected_parts_only)
    assert_relclose(sqnorm_of_sum(parts, dense.clone()), expected)


class TiedLanguageModel(nn.Module):
    """Token embedding tied to the output layer, a vocabulary much larger than the width."""

    def __init__(self, vocabulary=600, width=8):
        super().__init__()
        self.token = nn.Embedding(vocabulary, width, padding_idx=0)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.token.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.token(tokens))))


def test_tied_vocabulary_embedding_is_normed_without_its_per_example_gradients(monkeypatch):
    torch.manual_seed(0)
    model = TiedLanguageModel().double()
    tokens = torch.randint(0, 600, (4, 7))
    tokens[:, -2:] = 0                                  # padding: the embedding gets no gradient there
    targets = torch.randint(1, 600, (4, 7))

    def loss_fn(logits, targets):
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)

    expected = naive_per_example(model, loss_fn, tokens, targets)
    untied = copy.deepcopy(model)
    untied.head.weight = nn.Parameter(untied.token.weight.detach().clone())
    per_use = naive_per_example(untied, loss_fn, tokens, targets)
    assert not torch.allclose(per_use["token.weight"] + per_use["head.weight"], expected["token.weight"], rtol=1e-3)
    _forbid_materialising(monkeypatch)
    result = per_example_sqnorms(model, loss_fn, tokens, targets, backend="ghost", by_parameter=True)
    for name, values in expected.items():
        assert_relclose(result.by_parameter[name], values)


def test_result_of_a_tied_model_carries_no_autograd_graph():
    torch.manual_seed(0)
    model = TiedLanguageModel(vocabulary=40, width=8).double()
    tokens, targets = torch.randint(0, 40, (3, 5)), torch.randint(1, 40, (3, 5))

    def loss_fn(logits, targets):
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)

    result = per_example_sqnorms(model, loss_fn, tokens, targets, by_parameter=True)
    assert not result.sqnorms.requires_grad and result.sqnorms.grad_fn is None
    assert not any(values.requires_grad for values in result.by_parameter.values())


class _ShiftedEmbedding(nn.Embedding):
    """A forward no rule reproduces (the per-module fallback measures it: dense per-example gradients)."""

    def forward(self, tokens):
        return super().forward(tokens) + 0.5


def test_a_tied_weight_measured_partly_by_the_fallback_and_partly_by_a_rule():
    """Dense per-example gradients (fallback) and factors (the Linear head's rule) of one tied weight are summed
    before the norm."""
    torch.manual_seed(0)
    model = TiedLanguageModel(vocabulary=40, width=8).double()
    model.token = _ShiftedEmbedding(40, 8, padding_idx=0).double()
    model.head.weight = model.token.weight
    tokens, targets = torch.randint(0, 40, (4, 5)), torch.randint(1, 40, (4, 5))
    tokens[0, -1] = 0

    def loss_fn(logits, targets):
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)

    expected = naive_per_example(model, loss_fn, tokens, targets)
    result = per_example_sqnorms(model, loss_fn, tokens, targets, by_parameter=True)
    assert result.backend_of["token.weight"] == "module"
    for name, values in expected.items():
        assert_relclose(result.by_parameter[name], values)


def test_a_vocabulary_sized_output_layer_is_not_materialised_at_long_sequences():
    """GPT-2's output layer at its full context (V = 50257, d = 768, T = 1024): materialising costs fewer
    multiply-adds than the Gram form, but (V, d) per example is 20x the Gram matrices and over a quarter of what
    the layer's activations hold, so the Gram form is taken; at short sequences the cheaper materialised form is."""
    from noisescale.per_example.factors import prefer_factored
    vocabulary, width = 50257, 768
    for positions, factored in ((1024, True), (8192, False)):
        assert prefer_factored(positions * (vocabulary + width), vocabulary * width, 2 * positions ** 2,
                               vocabulary * width, positions * (vocabulary + width)) is factored
