"""``torch.func.functional_call`` that leaves the module as it found it.

torch (2.13) puts the original tensors back in the order it swapped the given ones in. A module registered under
two names (``self.a = self.b = block``) has its slot swapped twice, so the second restore writes back the first
swap's tensor: the model keeps a detached copy of its parameter, the optimizer's parameter no longer takes part in
the forward, and its ``.grad`` stays None. Here every parameter and buffer slot of such a module tree is put back
after the call.

An RNN/LSTM/GRU keeps the weights of its latest forward in ``_flat_weights`` (and weak references to them), which
its forward inside the call set to the given tensors and the restore left so. The next forward of the training
then found them changed and set them again: one evaluation of a parametrized weight fewer than a plain step's
(spectral norm's power iteration in train mode: its buffers, then p.grad, moved off a plain step's, 1.5e-6 after
two steps), a re-flattening of the weights on CUDA, and the call's copies held meanwhile. They are put back too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["functional_call"]


def _has_aliases(module: nn.Module) -> bool:
    """Whether a submodule is reachable under two names (the case torch's restore gets wrong): one walk."""
    seen = set()
    for _, submodule in module.named_modules(remove_duplicate=False):
        if id(submodule) in seen:
            return True
        seen.add(id(submodule))
    return False


def functional_call(module: nn.Module, tensors: dict[str, Tensor] | tuple[dict[str, Tensor], ...], args: Any = (),
                    kwargs: dict[str, Any] | None = None, **options: Any) -> Any:
    """``torch.func.functional_call(module, tensors, args, kwargs, **options)``; the module's own parameters and
    buffers are in place again afterwards, also where a submodule has two names."""
    recurrent = [(rnn, list(rnn._flat_weights), list(rnn._flat_weight_refs)) for rnn in module.modules()
                 if isinstance(rnn, nn.RNNBase) and hasattr(rnn, "_flat_weight_refs")]
    slots = [] if not _has_aliases(module) else [
        (table, name, tensor) for owner in module.modules()
        for table in (owner._parameters, owner._buffers) for name, tensor in table.items()]
    try:
        return torch.func.functional_call(module, tensors, args, kwargs, **options)
    finally:
        for table, name, tensor in slots:
            if table.get(name) is not tensor:
                table[name] = tensor
        for rnn, weights, references in recurrent:
            rnn._flat_weights, rnn._flat_weight_refs = weights, references
