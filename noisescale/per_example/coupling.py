"""Whether each example's loss reads that example alone: the condition under which g_i = dl_i/dtheta are
per-example gradients at all.

The noise scale takes the g_i for independent draws of the gradient (McCandlish et al. 2018, appendix A). A loss
that couples the examples has no per-example gradient in that sense, and the norms measured from it are neither a
loop's over single examples nor independent: a contrastive loss over the batch (CLIP, SigLIP: each l_i reads every
example's embedding), in-batch negatives, statistics of the batch inside the model.

The check, on a pass's first call: one more forward, before the real one, of the batch with example 0's inputs
replaced by those of the first example k whose inputs differ, on a copy of the random stream the real forward then
draws from (the same dropout masks: the shapes are the same) and with the model's buffers put back afterwards.
Where l_i reads example i alone, every loss but l_0 is unchanged; the largest change among them, relative to the
largest loss, is the coupling. What it cannot see: a coupling smaller than the rounding (``_tolerance``), and one
through a batch-wide count in the targets (a loss over the batch's token count), which moves no gradient between
the examples.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from noisescale._rng import isolated_rng
from noisescale.batches import call_model, select_examples, tensors_of
from noisescale.per_example.layers import rounding_tolerance

__all__ = ["LossesWithReplacedExample", "differing_example", "replaced_example_losses"]


class LossesWithReplacedExample:
    """The losses of the batch with example 0's inputs replaced by example ``k``'s (``replaced_example_losses``)."""

    def __init__(self, losses: Tensor, k: int, tolerance: float):
        self.losses, self.k, self.tolerance = losses, k, tolerance

    def coupling(self, losses: Tensor) -> float:
        """max_{i != 0} |l'_i - l_i| / max_i |l_i| against the real pass's ``losses`` l_i."""
        reference = losses.detach()[1:].to(self.losses.dtype)
        scale = losses.detach().abs().max().clamp_min(torch.finfo(self.losses.dtype).tiny)
        return float(((self.losses[1:] - reference).abs().max() / scale).item())

    def check(self, losses: Tensor) -> None:
        """A ValueError naming the cause where the other examples' losses moved beyond the rounding."""
        coupling = self.coupling(losses)
        if not coupling <= self.tolerance:   # (nan too)
            raise ValueError(
                f"the per-example losses are coupled: replacing example 0's inputs by example {self.k}'s changed the "
                f"other examples' losses by up to {coupling:.2g} of the largest loss (rounding allows "
                f"{self.tolerance:.0e}). The loss or the model reads several examples for one example's loss (a "
                "contrastive loss such as CLIP's or SigLIP's, in-batch negatives, statistics of the batch), so "
                "dl_i/dtheta are not per-example gradients and a noise scale from them would be wrong. Measure it "
                "from independent micro-batches instead (noisescale.estimators.two_batch_noise_scale on the "
                "gradients of micro-batches that each compute their own loss), or pass check_independence=False (to "
                "PerExampleGradNorms, NoiseScaleMonitor, or AdaptiveTrainer's monitor_options) to measure this "
                "decomposition of the gradient anyway")


def replaced_example_losses(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: Any, targets: Any,
                            batch_size: int, k: int, parameters: list[Tensor]) -> LossesWithReplacedExample | None:
    """Run the check's forward (module docstring) with example 0's inputs replaced by example ``k``'s, right before
    the real one; None where the losses are not (B,) floats (the real pass then reports it). An error of the
    forward (out of memory, say) is the caller's, as the real forward's would be."""
    index = torch.arange(batch_size)
    index[0] = k
    buffers = [(b, b.clone()) for b in model.buffers()]   # running averages, counters: put back after
    try:
        with torch.enable_grad(), isolated_rng(parameters):   # grad on: the real pass's kernels and draws
            losses = loss_fn(call_model(model, select_examples(inputs, index)), targets)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    if not isinstance(losses, Tensor) or losses.shape != (batch_size,) or not losses.is_floating_point():
        return None
    return LossesWithReplacedExample(losses.detach(), k, _tolerance(losses, parameters))


def differing_example(inputs: Any, batch_size: int) -> int | None:
    """The first example k >= 1 whose input tensors differ from example 0's, or None (nothing to replace it with)."""
    if batch_size < 2:
        return None
    differs = torch.zeros(batch_size, dtype=torch.bool)
    for t in tensors_of(inputs):
        rows = t.reshape(batch_size, -1)
        differs |= (rows != rows[:1]).any(1).cpu()
    found = differs.nonzero()
    return int(found[0]) if len(found) else None


def _tolerance(losses: Tensor, parameters: list[Tensor]) -> float:
    """The rounding of the lowest precision the forward computes in: the parameters', the losses', half precision
    under autocast (``layers.rounding_tolerance``: 1e-10, 1e-5, 1e-2)."""
    dtypes = [p.dtype for p in parameters if p.is_floating_point()] + [losses.dtype]
    if torch.is_autocast_enabled(losses.device.type):
        dtypes.append(torch.bfloat16)
    return max(rounding_tolerance(dtype) for dtype in dtypes)
