"""Per-example losses l_i (shape (B,)) whose mean is the training loss, for classifiers and sequence models.

The noise-scale estimators need the gradient of each example's loss, so a loss here never reduces over the batch.
Both functions accept the logits themselves or a model output that holds them (a HuggingFace ``ModelOutput`` or
a dict with a ``"logits"`` entry), so they can be passed as ``loss_fn(outputs, targets)`` directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["example_weights_in_batch", "logits_of", "normalised_over_the_batch", "per_example_cross_entropy",
           "sequence_cross_entropy", "weighted_alone", "WEIGHTINGS"]

WEIGHTINGS = ("example", "token")
IGNORE_INDEX = -100   # the label of a token that counts for nothing, as in HuggingFace


def logits_of(outputs: Any) -> Tensor:
    """The logits tensor of a model output: the tensor itself, ``outputs.logits`` or ``outputs["logits"]``."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if not isinstance(logits, Tensor):
        raise TypeError(f"expected logits as a tensor or a model output with a 'logits' tensor, got "
                        f"{type(outputs).__name__}")
    return logits


def _check_labels(labels: Any, name: str) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a tensor of class indices, got {type(labels).__name__}; pass the batch's "
                        f"labels as the targets (for a HuggingFace batch that holds them: targets=batch['labels'])")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be class indices of an integer dtype, got {labels.dtype}; convert them with "
                        f"{name}.long() (class probabilities need a loss of your own: F.cross_entropy(logits, probs, "
                        "reduction='none'))")


def per_example_cross_entropy(outputs: Any, targets: Tensor) -> Tensor:
    """Classification: l_i = -log softmax(z_i)[y_i] for logits (B, C) and class indices (B,) -> (B,)."""
    _check_labels(targets, "targets")
    logits = logits_of(outputs)
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (B, C) and targets (B,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}; for sequences use sequence_cross_entropy")
    return F.cross_entropy(logits, targets, reduction="none")


def sequence_cross_entropy(outputs: Any, labels: Tensor, *, ignore_index: int = IGNORE_INDEX, shift: bool = False,
                           weighting: str = "example") -> Tensor:
    """Per-example loss of a sequence model from token cross-entropies c_it, logits (B, T, V) and labels (B, T).

    Tokens whose label is ``ignore_index`` (padding, prompt tokens; -100 as in HuggingFace) count for nothing.
    ``shift=True`` predicts token t+1 from position t (logits[:, :-1] against labels[:, 1:]), as HuggingFace's
    causal-LM models do when given ``labels`` equal to the input ids. With n_i the counted tokens of example i and
    N = sum_i n_i:

    - ``weighting="example"``: l_i = sum_t c_it / n_i, each example's mean token loss (0 for an example without
      counted tokens); the training loss mean_i l_i weighs examples equally.
    - ``weighting="token"``: l_i = B sum_t c_it / N, so that mean_i l_i = sum_{i,t} c_it / N is exactly the
      token-mean loss HuggingFace models train on; l_i then depends on the batch through N, a constant of the
      labels, so dl_i/dtheta is still example i's own gradient (scaled by B n_i / N). Where a loss is taken one
      example at a time (the whole-model ``backend="vmap"``, the Hessian proxies' per-example gradients), the
      example alone sees B = 1 and N = n_i, and its gradient is scaled by :func:`example_weights_in_batch`.
    """
    _check_labels(labels, "labels")
    logits = logits_of(outputs)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="none")
    counted = _counted(labels, ignore_index)
    totals = tokens.view(labels.shape).sum(1)
    if weighting == "example":
        return totals / counted.sum(1).clamp_min(1).to(totals.dtype)
    return totals * labels.shape[0] / counted.sum().clamp_min(1).to(totals.dtype)


def normalised_over_the_batch(loss_fn: Callable) -> bool:
    """Whether ``loss_fn`` normalises each example's loss by a count over the whole batch it is given: the "token"
    weighting of :func:`sequence_cross_entropy`, called directly or through ``functools.partial``, or a callable
    with ``normalised_over_the_batch = True``. Its losses on parts of a batch (accumulated micro-batches, DDP
    shards) are normalised by each part's own count, so their steps do not add up to the batch's."""
    if isinstance(loss_fn, functools.partial) and loss_fn.func is sequence_cross_entropy:
        return loss_fn.keywords.get("weighting") == "token"
    return bool(getattr(loss_fn, "normalised_over_the_batch", False))


def _counted(labels: Tensor, ignore_index: int) -> Tensor:
    """Which tokens :func:`sequence_cross_entropy` counts: those whose label (after any shift) is not ignored."""
    return labels != ignore_index


def weighted_alone(loss_fn: Callable) -> bool:
    """Whether ``loss_fn`` is known to weight each example on its own: :func:`per_example_cross_entropy`,
    :func:`sequence_cross_entropy` with the "example" weighting (called directly or through ``functools.partial``),
    or a callable declared ``normalised_over_the_batch = False``."""
    if normalised_over_the_batch(loss_fn):
        return False
    if getattr(loss_fn, "normalised_over_the_batch", None) is False:
        return True
    func = loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn
    return func is per_example_cross_entropy or func is sequence_cross_entropy


def example_weights_in_batch(loss_fn: Callable, targets: Any) -> Tensor | None:
    """(B,) w_i with l_i = w_i l_i^alone: example i's loss in the batch over its loss as a batch of its own, for the
    passes that take the loss one example at a time (the whole-model vmap, the Hessian proxies' per-example
    gradients), whose gradients are then scaled by w_i. For :func:`sequence_cross_entropy` with
    ``weighting="token"`` (a ``functools.partial``), w_i = B n_i / N (its docstring), from the labels alone; None for
    any other loss (``per_example.coupling.observed_example_weights`` reads them from a forward's outputs)."""
    if not (isinstance(loss_fn, functools.partial) and normalised_over_the_batch(loss_fn)):
        return None
    labels = targets
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise ValueError(f"sequence_cross_entropy's labels must be a (B, T) tensor, got {type(labels).__name__}"
                         + (f" of shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else ""))
    if loss_fn.keywords.get("shift", False):
        labels = labels[:, 1:]
    counts = _counted(labels, loss_fn.keywords.get("ignore_index", IGNORE_INDEX)).sum(1).double()
    return labels.shape[0] * counts / counts.sum().clamp_min(1)
