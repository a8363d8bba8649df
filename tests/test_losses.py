"""Per-example losses against plain F.cross_entropy on each example or on the whole batch."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from noisescale.losses import (example_weights_in_batch, per_example_cross_entropy, sequence_cross_entropy,
                               weighted_alone)
from noisescale.per_example.coupling import example_weights


def _sequence_batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 7, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 7, (4, 6), generator=generator)
    labels[1, 3:] = -100        # right padding
    labels[2, :2] = -100        # a masked prompt
    labels[3, :] = -100         # no counted token at all
    return logits, labels


def test_classification_is_cross_entropy_per_example_and_reads_model_outputs():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 3, (5,), generator=generator)
    expected = torch.stack([F.cross_entropy(logits[i], targets[i]) for i in range(5)])
    torch.testing.assert_close(per_example_cross_entropy(logits, targets), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(per_example_cross_entropy({"logits": logits}, targets), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"logits \(B, C\)"):
        per_example_cross_entropy(logits, targets[:4])
    with pytest.raises(TypeError, match="logits"):
        per_example_cross_entropy({"scores": logits}, targets)


def test_class_indices_of_a_float_dtype_are_refused_naming_the_conversion():
    """Labels read as floats (a CSV, a NumPy array): torch's own message was 'expected target dtype to be Long or
    Byte, but got Float', naming neither the targets nor the fix."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 3, (5,), generator=generator)
    with pytest.raises(TypeError, match=r"targets must be class indices of an integer dtype, got torch.float32; "
                                        r"convert them with targets.long\(\)"):
        per_example_cross_entropy(logits, targets.float())
    with pytest.raises(TypeError, match=r"labels must be class indices .* got torch.float64; .*labels.long\(\)"):
        sequence_cross_entropy(logits[None], targets[None].double())
    torch.testing.assert_close(per_example_cross_entropy(logits, targets.to(torch.uint8)),
                               per_example_cross_entropy(logits, targets), rtol=0, atol=0)


def test_example_weighting_is_each_examples_mean_over_its_counted_tokens():
    logits, labels = _sequence_batch()
    losses = sequence_cross_entropy(logits, labels)
    for i in range(3):
        counted = labels[i] != -100
        torch.testing.assert_close(losses[i], F.cross_entropy(logits[i][counted], labels[i][counted]),
                                   rtol=1e-12, atol=0)
    assert losses[3] == 0


@pytest.mark.parametrize("shift", [False, True])
def test_token_weighting_means_to_the_batch_token_mean_loss(shift):
    logits, labels = _sequence_batch()
    losses = sequence_cross_entropy(logits, labels, weighting="token", shift=shift)
    if shift:  # what a HuggingFace causal LM computes from labels = input ids
        logits, labels = logits[:, :-1], labels[:, 1:]
    batch_token_mean = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(losses.mean(), batch_token_mean, rtol=1e-12, atol=0)
    totals = [F.cross_entropy(logits[i], labels[i], ignore_index=-100, reduction="sum") for i in range(4)]
    torch.testing.assert_close(losses, torch.stack(totals) * 4 / (labels != -100).sum(), rtol=1e-12, atol=0)


def test_sequence_loss_rejects_bad_shapes_and_weightings():
    logits, labels = _sequence_batch()
    with pytest.raises(ValueError, match="weighting"):
        sequence_cross_entropy(logits, labels, weighting="batch")
    with pytest.raises(ValueError, match=r"logits \(B, T, V\)"):
        sequence_cross_entropy(logits[0], labels[0])


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_an_examples_token_weighted_loss_is_its_weight_times_its_loss_alone(shift, ignore_index):
    logits, labels = _sequence_batch()
    labels = labels.masked_fill(labels == -100, ignore_index)
    loss = functools.partial(sequence_cross_entropy, shift=shift, ignore_index=ignore_index, weighting="token")
    weights = example_weights_in_batch(loss, labels)
    alone = torch.cat([loss(logits[i:i + 1], labels[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(loss(logits, labels), weights * alone, rtol=1e-12, atol=0)
    assert weights.sum() == pytest.approx(4) and weights[3] == 0   # w_i = B n_i / N; no counted token: 0
    assert example_weights_in_batch(functools.partial(sequence_cross_entropy, shift=shift), labels) is None
    assert example_weights_in_batch(per_example_cross_entropy, labels[:, 0]) is None


class _NeverRun(torch.nn.Module):
    def forward(self, inputs):
        raise AssertionError("no forward is needed for the shipped losses")


def test_token_weights_read_from_a_forwards_outputs_equal_the_known_ones_and_an_unreadable_one_is_refused():
    logits, labels = _sequence_batch()
    token = functools.partial(sequence_cross_entropy, shift=True, weighting="token")

    def my_token_loss(outputs, labels):   # the same loss, not recognisable from its arguments
        return sequence_cross_entropy(outputs, labels, shift=True, weighting="token")

    assert example_weights_in_batch(my_token_loss, labels) is None
    outputs = torch.nn.Identity()   # the "model" whose forward of the inputs gives the logits
    torch.testing.assert_close(example_weights(my_token_loss, outputs, logits, labels),
                               example_weights_in_batch(token, labels), rtol=1e-12, atol=0)
    ones = torch.ones(4, dtype=torch.float64)
    for alone in (functools.partial(sequence_cross_entropy, shift=True), sequence_cross_entropy):   # no forward run
        assert weighted_alone(alone) and example_weights(alone, _NeverRun(), logits, labels) is None
    assert not weighted_alone(token) and not weighted_alone(my_token_loss)
    example = functools.partial(sequence_cross_entropy, shift=True)
    assert torch.equal(example_weights(lambda outputs, y: example(outputs, y), outputs, logits, labels), ones)

    def my_example_loss(outputs, y):   # declared each example's own: taken alone, no forward
        return example(outputs, y)
    my_example_loss.normalised_over_the_batch = False
    assert weighted_alone(my_example_loss) and example_weights(my_example_loss, _NeverRun(), logits, labels) is None
    contradicted = functools.partial(sequence_cross_entropy, shift=True, weighting="token")
    contradicted.normalised_over_the_batch = False   # the weighting says otherwise, and wins
    assert not weighted_alone(contradicted)
    my_token_loss.normalised_over_the_batch = True   # declared: a batch of equal counts has weights 1, not an error
    full = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(example_weights(my_token_loss, outputs, logits, full), ones, rtol=1e-12, atol=0)

    scores = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    def own_score(scores, y):   # a CLIP-like score of each example with itself: rows alone are not the examples
        return (scores.diagonal() - y).square()
    assert torch.equal(example_weights(own_score, outputs, scores, torch.zeros(4, dtype=torch.float64)), ones)

    def fixed_size_loss(outputs, labels):   # declared, but cannot be computed on parts of the batch
        if outputs.shape[0] != 4:
            raise RuntimeError("this loss takes batches of 4")
        return my_token_loss(outputs, labels)
    fixed_size_loss.normalised_over_the_batch = True
    with pytest.raises(ValueError, match="fixed_size_loss is declared normalised over the batch .* functools.partial"):
        example_weights(fixed_size_loss, outputs, logits, labels)
    with pytest.raises(ValueError, match=r"labels must be a \(B, T\) tensor, got Tensor of shape \(4,\)"):
        example_weights_in_batch(token, labels[:, 0])
