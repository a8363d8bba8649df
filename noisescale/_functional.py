"""``torch.func.functional_call`` that leaves the module as it found it.

torch (2.13) puts the original tensors back in the order it swapped the given ones in. A module registered under
two names (``self.a = self.b = block``) has its slot swapped twice, so the second restore writes back the first
swap's tensor: the model keeps a detached copy of its parameter, the optimizer's parameter no longer takes part in
the forward, and its ``.grad`` stays None. Here every parameter and buffer slot of such a module tree is put back
after the call.
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
    if not _has_aliases(module):
        return torch.func.functional_call(module, tensors, args, kwargs, **options)
    slots = [(table, name, tensor) for owner in module.modules()
             for table in (owner._parameters, owner._buffers) for name, tensor in table.items()]
    try:
        return torch.func.functional_call(module, tensors, args, kwargs, **options)
    finally:
        for table, name, tensor in slots:
            if table.get(name) is not tensor:
                table[name] = tensor
