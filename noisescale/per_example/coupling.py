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

Under ``observe`` the loss is the caller's and cannot be run again: the check's forward runs after the pass, on the
draws and buffers the model's call had, and compares the model's outputs instead (``FirstCallOutputs``). An output
whose other examples' rows moved couples the examples (CLIP's logits pair every image with every text); whether
the caller's loss reads it is not known, so this is a warning, not an error.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_map

from noisescale._rng import host_rng_state, isolated_rng, rng_state, set_host_rng_state, set_rng_state
from noisescale.batches import call_model, map_tensors, tensors_of
from noisescale.per_example.layers import rounding_tolerance

__all__ = ["FirstCallOutputs", "LossesWithReplacedExample", "differing_example", "replaced_example_losses"]


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
    losses = _replaced_forward(model, inputs, batch_size, k, parameters, lambda outputs: loss_fn(outputs, targets))
    if not isinstance(losses, Tensor) or losses.shape != (batch_size,) or not losses.is_floating_point():
        return None
    return LossesWithReplacedExample(losses.detach(), k, _tolerance(losses, parameters))


class FirstCallOutputs:
    """For ``observe``, whose loss is the caller's: the random state and buffers before the model's first call
    with grad in the pass, and that call's outputs, so that the check's forward can run after the pass on the
    same draws and compare the outputs rather than the losses (``coupled_outputs``)."""

    def __init__(self, module: nn.Module, device: torch.device | None, own_pass: Callable[[], bool]):
        self.rng: dict | None = None
        self.host_rng: tuple | None = None
        self.buffers: list[Tensor] = []
        self.outputs: Any = None
        self._versions: list[tuple[Tensor, int]] = []
        self._device, self._own_pass = device, own_pass
        self._handles = [module.register_forward_pre_hook(self._before),
                         module.register_forward_hook(self._after)]

    def _before(self, module: nn.Module, args: tuple) -> None:
        if self.rng is None and torch.is_grad_enabled() and not self._own_pass():
            self.rng, self.host_rng = rng_state(self._device), host_rng_state()
            self.buffers = [b.detach().clone() for b in module.buffers()]
            self._versions = [(p, p._version) for p in module.parameters()]

    def weights_changed(self) -> bool:
        """Whether a parameter was changed in place since the call (an optimizer step inside the block): the
        call cannot be run again as it was."""
        return any(p._version != version for p, version in self._versions)

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.rng is not None and self.outputs is None and not self._own_pass():
            self.outputs = _detached(output)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def coupled_outputs(self, module: nn.Module, inputs: Any, batch_size: int, k: int,
                        parameters: list[Tensor]) -> dict[str, float]:
        """The outputs holding the examples in dim 0 whose rows of other examples than 0 moved beyond the rounding
        (path -> the largest change relative to the output's largest value) when the call is run again with
        example 0's inputs replaced by example ``k``'s, on the draws and buffers the call had."""
        replaced = _replaced_forward(module, inputs, batch_size, k, parameters, _detached,
                                     (self.rng, self.host_rng), self.buffers)
        moved = {}
        for (path, before), after in zip(tree_flatten_with_path(self.outputs)[0], tree_flatten(replaced)[0]):
            if (isinstance(before, Tensor) and isinstance(after, Tensor) and before.is_floating_point()
                    and before.dim() and before.shape[0] == batch_size and after.shape == before.shape):
                scale = before.abs().max().clamp_min(torch.finfo(before.dtype).tiny)
                change = float(((after[1:] - before[1:]).abs().max() / scale).item())
                if not change <= _tolerance(before, parameters):
                    moved[keystr(path)] = change
        return moved


def _detached(outputs: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, outputs)


def _replaced_forward(model: nn.Module, inputs: Any, batch_size: int, k: int, parameters: list[Tensor],
                      run: Callable[[Any], Any], rng: tuple | None = None, buffers: list[Tensor] | None = None) -> Any:
    """``run(model(inputs with example 0's replaced by example k's))`` with grad on (the real pass's kernels and
    draws), drawing from a copy of the random streams (torch's, Python's and NumPy's: ``rng`` = (``rng_state``,
    ``host_rng_state``) where given) and with the buffers at ``buffers`` (default: as they are), which are put
    back afterwards."""
    own = list(model.buffers())
    saved = [b.clone() for b in own]   # running averages, counters: put back after
    try:
        with torch.no_grad():
            for buffer, value in zip(own, buffers or []):
                buffer.copy_(value)
        with torch.enable_grad(), isolated_rng(parameters):
            if rng is not None:
                set_rng_state(rng[0], next((p.device for p in parameters if p.device.type == "cuda"), None))
                set_host_rng_state(rng[1])
            return run(call_model(model, _with_example_replaced(inputs, batch_size, k)))
    finally:
        with torch.no_grad():
            for buffer, value in zip(own, saved):
                buffer.copy_(value)


def _holds_examples(t: Tensor, batch_size: int) -> bool:
    """An input with the examples in dim 0; others (a count, position ids (1, T) shared by all) stay as they are."""
    return t.dim() > 0 and t.shape[0] == batch_size


def _with_example_replaced(inputs: Any, batch_size: int, k: int) -> Any:
    index = torch.arange(batch_size)
    index[0] = k
    return map_tensors(lambda t: t[index.to(t.device)] if _holds_examples(t, batch_size) else t, inputs)


def differing_example(inputs: Any, batch_size: int) -> int | None:
    """The first example k >= 1 whose input tensors differ from example 0's, or None (nothing to replace it with)."""
    if batch_size < 2:
        return None
    differs = torch.zeros(batch_size, dtype=torch.bool)
    for t in tensors_of(inputs):
        if not _holds_examples(t, batch_size):
            continue
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
