"""Per-example squared gradient norms by torch.func: vmap over the batch of grad of one example's loss.

Follows the torch.func per-sample-gradients recipe (functional_call + vmap(grad)), in chunks of ``chunk_size``
examples (each reduced to norms before the next) to bound the memory of the (chunk, *theta.shape)
per-example gradients. It runs its own forward, so it
must leave training untouched:

- the global RNG (CPU and initialised CUDA devices) is forked, so training's random stream is not consumed; the
  dropout masks drawn here (``randomness="different"``: one per example) differ from the training pass's, so with
  dropout the norms are those of another draw of the masks;
- buffers are passed as copies, so running statistics or counters of the module are not changed.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from noisescale._rng import isolated_rng
from noisescale.per_example.layers import per_example_sqnorm

__all__ = ["vmap_sqnorms"]


def vmap_sqnorms(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: tuple[Tensor, ...],
                 targets: Any, names: list[str], chunk_size: int | None = None) -> dict[str, Tensor]:
    """(B,) squared norms |dl_i/dtheta|^2 for each parameter named in ``names`` (names of model.named_parameters).

    Parameters not in ``names`` enter as constants. Tied parameters appear once in named_parameters and are
    tied again by functional_call, so their per-example gradients already sum all uses.
    """
    all_parameters = dict(model.named_parameters())
    trainable = {name: all_parameters[name].detach() for name in names}
    constants = {name: p.detach() for name, p in all_parameters.items() if name not in trainable}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def example_loss(parameters: dict[str, Tensor], example_inputs: tuple, example_targets: Any) -> Tensor:
        batch_of_one = tree_map(lambda t: t.unsqueeze(0), example_inputs)
        outputs = functional_call(model, (parameters, constants, buffers), batch_of_one)
        return loss_fn(outputs, tree_map(lambda t: t.unsqueeze(0), example_targets)).sum()

    per_example_grad = vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")
    batch_size = inputs[0].shape[0]
    step = batch_size if chunk_size is None else chunk_size
    chunks: dict[str, list[Tensor]] = {name: [] for name in names}
    with isolated_rng(trainable.values()):
        for start in range(0, batch_size, step):
            rows = slice(start, start + step)
            grads = per_example_grad(trainable, tree_map(lambda t: t[rows], inputs),
                                     tree_map(lambda t: t[rows], targets))
            for name, g in grads.items():
                chunks[name].append(per_example_sqnorm(g))
    return {name: torch.cat(parts) for name, parts in chunks.items()}
