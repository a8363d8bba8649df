"""Whether a layer's input rows are the examples in the batch's order, where its autograd graph cannot say.

The hooks take row i of a layer's input for example i, and follow reorderings through the autograd graph (rows
picked, sorted or unsorted after the first layer). A forward that reorders the model's raw inputs before the first
layer (token ids sorted by length, ``x.flip(0)``, ``x[order]``) leaves no graph: each layer's norms would be
credited to other examples, silently (a review measured per-example norms 0.13 to 0.95 off; their sum, and with it
tr(Sigma) and B_simple, unchanged). The independence check's two forwards (``coupling.coupled_losses``: the batch,
and the batch with examples replaced, target <- source) show it: where a call's rows follow the examples, the
replaced examples' rows become their sources' rows and no other row moves. Each call's input rows are compared by a
fingerprint (three sums per row, in float64).

Where the forwards draw random numbers (noise added to the raw inputs in any mode), a replaced example's row holds
its source's inputs with its own draw, not its source's row: there only whether a row other than the replaced
examples' changed is compared (a replaced example's row may stay as it was: a layer reading a class label that the
example shares with its source). A session's review found such a model taken for one that reorders its inputs,
so its norms went to the whole-model vmap, of another draw of the noise, up to 0.48 off an example's, and
backend='ghost' refused it. A reordering that maps the replaced examples onto each other (a flip, which swaps the
first and the last) is then not seen.
"""

from __future__ import annotations

import torch
from torch import Tensor

from noisescale.per_example.layers import rounding_tolerance

__all__ = ["row_fingerprint", "rows_reordered"]


def row_fingerprint(x: object, batch_size: int) -> Tensor | None:
    """(layouts, batch_size, 4): the sum, a weighted sum and the sum of absolute values of each of x's rows, in
    float64, and the rounding of x's dtype (0 for integers); where dim 1 also has ``batch_size`` entries, the same
    of each of its columns as a second layout (a sequence-first layer's (T, B, d) at T == B holds the examples
    there, token ids (B, T) at T == B in dim 0). None where x does not have ``batch_size`` rows in dim 0."""
    if (not isinstance(x, Tensor) or x.is_nested or x.is_sparse or x.is_complex() or x.dim() == 0
            or x.shape[0] != batch_size):
        return None
    layouts = [x] + ([x.transpose(0, 1)] if x.dim() > 1 and x.shape[1] == batch_size else [])
    return torch.stack([_sums(layout.detach(), batch_size) for layout in layouts])


def rows_reordered(before: Tensor | None, after: Tensor | None, replaced: dict[int, int],
                   random: bool = False) -> bool:
    """Whether a call's input rows, fingerprinted (``row_fingerprint``) in the batch's forward (``before``) and in
    the forward with examples replaced (``after``, target <- source), are not the examples in the batch's order in
    any layout: a row other than a replaced example's moved, or a replaced example's row is not its source's (with
    ``random``, forwards that drew random numbers: a row other than the replaced examples' changed; theirs may
    change or not, as a layer that reads an input their sources share with them, a class label, leaves them). A
    layout none of whose rows moved (positions, a table shared by the examples) is not judged."""
    if before is None or after is None or before.shape != after.shape or not replaced:
        return False
    return all(_layout_reordered(a, b, replaced, random) for a, b in zip(before, after))


def _sums(x: Tensor, batch_size: int) -> Tensor:
    rows = x.reshape(batch_size, -1).to(torch.float64)
    weights = torch.cos(torch.arange(rows.shape[1], dtype=torch.float64, device=rows.device))
    rounding = torch.full((batch_size,), rounding_tolerance(x.dtype) if x.is_floating_point() else 0.0,
                          dtype=torch.float64, device=rows.device)
    return torch.stack([rows.sum(1), rows @ weights, rows.abs().sum(1), rounding], 1)


def _layout_reordered(before: Tensor, after: Tensor, replaced: dict[int, int], random: bool) -> bool:
    kept = _close(before, after)
    if bool(kept.all()):
        return False
    targets, sources = (torch.tensor(list(indices), device=before.device) for indices in zip(*replaced.items()))
    if random:   # a replaced example's row may be left as it was (its source's row equal to its own there)
        elsewhere = ~kept
        elsewhere[targets] = False
        return bool(elsewhere.any())
    expected = before.clone()
    expected[targets] = before[sources]
    return not bool(_close(expected, after).all())


def _close(a: Tensor, b: Tensor) -> Tensor:
    """(B,) whether two fingerprints' rows agree within the rounding, relative to the rows' absolute sums; a row
    with an inf or a NaN agrees where its sums are the same (an input row with an inf, left as it was, had been taken
    for a row moved: the whole model went to the whole-model vmap in every later call, and ghost refused it)."""
    allowed = torch.maximum(a[:, 3], b[:, 3]) * torch.maximum(a[:, 2], b[:, 2])
    same = (a[:, :2] == b[:, :2]) | (a[:, :2].isnan() & b[:, :2].isnan())
    return (same | ((a[:, :2] - b[:, :2]).abs() <= allowed[:, None])).all(1)
