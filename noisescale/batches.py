"""Batches as users hold them: how noisescale calls a model on ``inputs`` and splits, selects and moves them.

``inputs`` (what the model is called with) may be

- a tensor: ``model(inputs)``;
- a tuple of positional arguments: ``model(*inputs)`` (tokens and a mask, say);
- a mapping of keyword arguments: ``model(**inputs)`` (a HuggingFace batch: ``input_ids``, ``attention_mask``,
  ``labels``, ...).

Every tensor in ``inputs`` holds the batch in dim 0 (B examples); values that are not tensors (``use_cache=False``,
``return_dict=True``) are passed unchanged to every call. ``targets`` is anything the per-example loss takes
(a tensor, a tuple or mapping of tensors, or None); its tensors, too, hold the batch in dim 0.
Nested tuples, lists and dicts are walked as pytrees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_leaves, tree_map
from torch.utils.data import Dataset, TensorDataset, default_collate

__all__ = ["call_arguments", "call_model", "batch_size_of", "select_examples", "split_examples",
           "concatenate_examples", "to_device", "tensors_of", "collate_examples", "fetch_examples", "map_tensors",
           "NonFiniteValues", "nonfinite_values", "nonfinite_counts", "merge_nonfinite_counts",
           "describe_nonfinite_counts"]


def call_arguments(inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of the model call for ``inputs`` (a tensor, a tuple of positional inputs or a mapping)."""
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, tuple):
        return inputs, {}
    if isinstance(inputs, Mapping):
        if not all(isinstance(key, str) for key in inputs):
            raise TypeError(f"keyword inputs need string keys, got {[type(k).__name__ for k in inputs]}")
        return (), dict(inputs)
    hint = (": a DataLoader's [inputs, targets] list is two arguments, monitor(*batch) or monitor(inputs, targets); a "
            "list of the model's positional inputs, tuple(inputs)") if isinstance(inputs, list) else ""
    raise TypeError(f"inputs must be a tensor, a tuple of positional inputs or a mapping of keyword inputs, got "
                    f"{type(inputs).__name__}{hint}")


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)`` (module docstring)."""
    args, kwargs = call_arguments(inputs)
    return model(*args, **kwargs)


def tensors_of(value: Any) -> list[Tensor]:
    """The tensors in a pytree (a tensor, tuples, lists, dicts), in flattening order."""
    leaves = tree_leaves(dict(value) if isinstance(value, Mapping) else value)
    return [leaf for leaf in leaves if isinstance(leaf, Tensor)]


def batch_size_of(inputs: Any) -> int:
    """B, the size of dim 0 shared by every tensor in ``inputs``; a clear error when they disagree or there is none."""
    call_arguments(inputs)  # validates the container
    leaves = tree_leaves(dict(inputs) if isinstance(inputs, Mapping) else inputs)
    closed = next((leaf for leaf in leaves if isinstance(leaf, Mapping)), None)
    if closed is not None:   # a HuggingFace BatchEncoding in a tuple: its tensors would not be split into examples
        raise TypeError(f"inputs hold a {type(closed).__name__} inside a tuple or list, a mapping torch's pytree does "
                        "not open, so its tensors could not be split into examples; pass dict(...) of it instead")
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    if not tensors:
        raise ValueError("inputs hold no tensor: noisescale needs at least one tensor with the batch in dim 0")
    shared = ("; a value shared by every example (a diffusion timestep, a scale) may be passed as a Python number, "
              "or repeated for each example, e.g. t.expand(batch_size), since the batch is split into examples and "
              "micro-batches")
    if any(t.dim() == 0 for t in tensors):
        raise ValueError(f"every input tensor needs the batch in dim 0; got a 0-dimensional tensor among shapes "
                         f"{[tuple(t.shape) for t in tensors]}{shared}")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        rows = ("; where the examples are not rows of one tensor, pad them to tensors that hold them in dim 0: "
                "graphs merged into one, as a torch_geometric Batch (torch_geometric.utils.to_dense_batch and "
                "to_dense_adj); an nn.EmbeddingBag's flat input with offsets (give it a (B, L) tensor of bags "
                "padded with its padding_idx, which the bag's sum or mean leaves out)")
        raise ValueError(f"all input tensors need the same batch size in dim 0, got shapes "
                         f"{[tuple(t.shape) for t in tensors]}{shared if 1 in sizes else rows}")
    size = sizes.pop()
    if size == 0:
        raise ValueError("empty batch: inputs have 0 examples in dim 0")
    return size


def map_tensors(function, value: Any) -> Any:
    """``value`` with ``function`` applied to every tensor (a Mapping becomes a plain dict)."""
    if isinstance(value, Mapping) and not isinstance(value, dict):
        value = dict(value)  # a BatchEncoding or other Mapping: a plain dict of the same items
    return tree_map(lambda leaf: function(leaf) if isinstance(leaf, Tensor) else leaf, value)


def select_examples(value: Any, index: slice | Tensor | Sequence[int]) -> Any:
    """The examples ``index`` of every tensor in ``value`` (inputs or targets), other leaves unchanged."""
    if isinstance(index, Sequence) and not isinstance(index, Tensor):
        index = torch.as_tensor(index, dtype=torch.long)

    def rows(t: Tensor) -> Tensor:
        return t[index.to(t.device)] if isinstance(index, Tensor) else t[index]

    return map_tensors(rows, value)


def split_examples(value: Any, sizes: Sequence[int]) -> list[Any]:
    """``value`` (inputs or targets) cut along dim 0 into consecutive parts of ``sizes`` examples."""
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [select_examples(value, slice(start, start + size)) for start, size in zip(starts, sizes)]


def concatenate_examples(parts: Sequence[Any]) -> Any:
    """The inverse of :func:`split_examples`: the parts' tensors concatenated along dim 0 (other leaves, equal in
    every part, taken from the first)."""
    parts = [dict(part) if isinstance(part, Mapping) else part for part in parts]
    return tree_map(lambda first, *rest: torch.cat([first, *rest]) if isinstance(first, Tensor) else first, *parts)


def to_device(value: Any, device: torch.device | str) -> Any:
    """Every tensor of ``value`` on ``device`` (no copy when already there)."""
    return map_tensors(lambda t: t.to(device), value)


def collate_examples(items: Sequence[Any]) -> tuple[Any, Any]:
    """(inputs, targets) of a list of (inputs, targets) examples; tuple inputs stay tuples (``default_collate``
    makes them lists, which a model would receive as one argument). A TypeError where an item is no pair, a
    ValueError where the examples' tensors differ in shape, each naming what to do."""
    first = items[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        kind = (f"a dict with keys {sorted(map(str, first))}" if isinstance(first, Mapping) else
                f"a {type(first).__name__} of {len(first)}" if isinstance(first, (tuple, list)) else
                f"a {type(first).__name__}")
        raise TypeError(f"each example of the dataset must be an (inputs, targets) pair, and item 0 is {kind}: "
                        "return (inputs, targets) from its __getitem__ (inputs may be a dict of a model's keyword "
                        "inputs, as a HuggingFace model takes them)")
    try:
        inputs, targets = default_collate(list(items))
    except RuntimeError as error:
        if "equal size" not in str(error):
            raise
        raise ValueError(f"the examples' tensors differ in shape ({error}); a batch is stacked from the dataset's "
                         "items with no collate_fn, since its size changes from step to step: pad them to one shape "
                         "in the dataset (sequences to one length, with an attention mask, or labels of -100 for the "
                         "padding)") from error
    return (tuple(inputs) if isinstance(inputs, list) else inputs), targets


def fetch_examples(dataset: Dataset, indices: Sequence[int] | Tensor) -> tuple[Any, Any]:
    """The examples ``indices`` of a map-style dataset of (inputs, targets) pairs as one batch: a single indexing
    call for a two-tensor TensorDataset, else the items collated by :func:`collate_examples`."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        inputs, targets = dataset[torch.as_tensor(indices, dtype=torch.long)]
        return inputs, targets
    return collate_examples([dataset[int(index)] for index in indices])


class NonFiniteValues(NamedTuple):
    """NaN or Inf values in one floating tensor of a batch (:func:`nonfinite_values`)."""

    part: str                 # "inputs" or "targets"
    tensor: str               # where the tensor is in the part: "" (the part itself), "[1]", "['pixel_values']"
    nans: int
    infs: int
    first: tuple[int, ...]    # the index of the first one: (example, then its position inside the example)

    def __str__(self) -> str:
        kinds = " and ".join(kind for kind, count in (("NaN", self.nans), ("Inf", self.infs)) if count)
        count = self.nans + self.infs
        return f"{kinds} in its {self.part}{self.tensor} ({count} value{'s' if count != 1 else ''})"


def nonfinite_values(inputs: Any, targets: Any) -> list[NonFiniteValues]:
    """The floating (or complex) tensors of a batch that hold NaN, or in its targets NaN or Inf; empty when none
    does. Inf in the inputs is left alone: it can be meant (an additive attention mask's -inf), NaN cannot.

    It reads every value (and synchronises with the device), so the monitor and the trainer call it only on a
    step whose loss or gradient is already non-finite: to tell bad data from a training that diverged."""
    found = []
    for part, value, is_bad in (("inputs", inputs, torch.isnan), ("targets", targets, lambda t: ~torch.isfinite(t))):
        leaves, _ = tree_flatten_with_path(dict(value) if isinstance(value, Mapping) else value)
        for path, tensor in leaves:
            if not (isinstance(tensor, Tensor) and (tensor.is_floating_point() or tensor.is_complex())):
                continue
            bad = is_bad(tensor)
            if bool(bad.any()):
                nans = int(torch.isnan(tensor).sum())
                first = tuple(int(i) for i in bad.nonzero()[0]) if tensor.dim() else ()
                found.append(NonFiniteValues(part, keystr(path), nans, int(bad.sum()) - nans, first))
    return found


NonFiniteCounts = dict[tuple[str, str], tuple[int, int]]   # (part, tensor) -> (NaNs, Infs)


def nonfinite_counts(*micro_batches: tuple[Any, Any]) -> NonFiniteCounts:
    """The NaN and Inf counts of each tensor (:func:`nonfinite_values`) of the batch made of ``micro_batches``, each
    (inputs, targets) of the same structure, summed over them: they need not be concatenable (a collator pads each
    one to its own length)."""
    return merge_nonfinite_counts([{(found.part, found.tensor): (found.nans, found.infs)
                                    for found in nonfinite_values(inputs, targets)}
                                   for inputs, targets in micro_batches])


def merge_nonfinite_counts(parts: Sequence[NonFiniteCounts]) -> NonFiniteCounts:
    """The counts of several parts of a batch (micro-batches, or DDP ranks' shares) summed per tensor."""
    totals: NonFiniteCounts = {}
    for counts in parts:
        for key, (nans, infs) in counts.items():
            total_nans, total_infs = totals.get(key, (0, 0))
            totals[key] = (total_nans + nans, total_infs + infs)
    return totals


def describe_nonfinite_counts(counts: NonFiniteCounts) -> str | None:
    """"NaN in its inputs['pixel_values'] (5 values)", joined by "and" for several tensors; None for no count."""
    return " and ".join(str(NonFiniteValues(part, tensor, nans, infs, ()))
                        for (part, tensor), (nans, infs) in sorted(counts.items())) or None
