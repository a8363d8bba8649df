"""Batches as users hold them: tensors, positional tuples and keyword mappings (noisescale.batches)."""

import math

import pytest
import torch

from noisescale.batches import (
    batch_size_of, call_arguments, call_model, concatenate_examples, describe_nonfinite_counts, nonfinite_counts,
    select_examples, split_examples, tensors_of, to_device,
)


class KeywordModel(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, scale=1.0):
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return (input_ids * mask).sum(1) * scale


def test_call_forms_give_the_same_call():
    ids, mask = torch.arange(6.).view(3, 2), torch.tensor([[1., 0.], [1., 1.], [0., 1.]])
    model = KeywordModel()
    expected = model(ids, mask)
    assert torch.equal(call_model(model, (ids, mask)), expected)
    assert torch.equal(call_model(model, {"input_ids": ids, "attention_mask": mask}), expected)
    assert torch.equal(call_model(model, ids), model(ids))
    assert call_arguments({"input_ids": ids, "scale": 2.0})[1]["scale"] == 2.0


def test_batch_size_checks_every_tensor_and_names_the_shapes():
    assert batch_size_of({"a": torch.zeros(4, 3), "b": torch.zeros(4), "flag": True}) == 4
    with pytest.raises(ValueError, match=r"same batch size.*\(4, 3\).*\(5,\)"):
        batch_size_of({"a": torch.zeros(4, 3), "b": torch.zeros(5)})
    with pytest.raises(ValueError, match="no tensor"):
        batch_size_of({"flag": True})
    with pytest.raises(ValueError, match="empty batch"):
        batch_size_of(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="tensor, a tuple"):
        batch_size_of([torch.zeros(2)])


def test_a_mapping_the_pytree_does_not_open_and_graphs_merged_into_rows_are_refused_naming_the_remedy():
    """A new user's sentence-transformers features (a BatchEncoding, a UserDict) in a tuple: "inputs hold no
    tensor"; a torch_geometric batch of graphs (nodes as rows): no word of how to pass it."""
    from collections import UserDict
    features = UserDict({"input_ids": torch.zeros(4, 3, dtype=torch.long)})
    with pytest.raises(TypeError, match=r"UserDict inside a tuple.*dict\(\.\.\.\) of it"):
        batch_size_of((features, features))
    assert batch_size_of((dict(features), dict(features))) == 4
    with pytest.raises(ValueError, match="to_dense_batch"):
        batch_size_of((torch.zeros(20, 6), torch.zeros(2, 40, dtype=torch.long), torch.zeros(20, dtype=torch.long),
                       torch.zeros(5)))


@pytest.mark.parametrize("timestep", [torch.tensor(7), torch.tensor([7])])
def test_a_value_shared_by_the_examples_is_refused_naming_what_to_pass_instead(timestep):
    """A diffusion model's timestep for the whole batch, as a 0-d or (1,) tensor (a new user's diffusers UNet)."""
    with pytest.raises(ValueError, match=r"Python number.*t\.expand\(batch_size\)"):
        batch_size_of({"sample": torch.zeros(4, 3, 8, 8), "timestep": timestep})


def test_select_and_split_keep_non_tensors_and_cover_every_example():
    batch = {"x": torch.arange(10).view(5, 2), "y": (torch.arange(5), None), "flag": "keep"}
    parts = split_examples(batch, [2, 3])
    assert [batch_size_of({"x": p["x"]}) for p in parts] == [2, 3]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert parts[1]["flag"] == "keep" and parts[1]["y"][1] is None
    picked = select_examples(batch, [4, 0])
    assert torch.equal(picked["y"][0], torch.tensor([4, 0]))
    assert torch.equal(select_examples(torch.arange(5), torch.tensor([1, 3])), torch.tensor([1, 3]))
    assert len(tensors_of(batch)) == 2
    joined = concatenate_examples(parts)   # the inverse of split_examples
    assert torch.equal(joined["x"], batch["x"]) and torch.equal(joined["y"][0], batch["y"][0])
    assert joined["y"][1] is None and joined["flag"] == "keep"
    assert concatenate_examples([None, None]) is None


def test_to_device_moves_every_tensor():
    moved = to_device({"x": torch.zeros(2, dtype=torch.float64), "n": 3}, "cpu")
    assert moved["x"].device.type == "cpu" and moved["n"] == 3


def test_nonfinite_values_of_micro_batches_padded_to_different_lengths_are_counted_together():
    """A collator pads each micro-batch to its own length, so they cannot be concatenated (torch.cat fails): each
    tensor's counts are summed over the micro-batches; integer ids are not read."""
    short = {"embeds": torch.zeros(2, 3, 4), "ids": torch.zeros(2, 3, dtype=torch.long)}
    long = {"embeds": torch.zeros(2, 5, 4), "ids": torch.zeros(2, 5, dtype=torch.long)}
    short["embeds"][0, 1] = float("nan")   # 4 NaNs
    long["embeds"][1, 4, 0] = float("nan")
    long["embeds"][1, 4, 1] = float("inf")   # Inf in the inputs can be meant (a mask's -inf): not counted
    targets = torch.zeros(2, 5, dtype=torch.float64)
    targets[0, 0] = float("nan")
    targets[1, 2] = float("-inf")             # in the targets it is counted
    def describe_nonfinite(*micro_batches):
        return describe_nonfinite_counts(nonfinite_counts(*micro_batches))

    assert describe_nonfinite((short, torch.zeros(2, 3)), (long, targets)) == (
        "NaN in its inputs['embeds'] (5 values) and NaN and Inf in its targets (2 values)")
    assert describe_nonfinite((short, None)) == "NaN in its inputs['embeds'] (4 values)"
    assert describe_nonfinite((long["ids"], None)) is None and describe_nonfinite() is None
    assert describe_nonfinite(({"mask": torch.full((2, 3), -math.inf)}, None)) is None
