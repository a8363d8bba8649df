"""``torch.func.functional_call`` that leaves the module as it found it.

torch (2.13) puts the original tensors back in the order it swapped the given ones in. A module registered under
two names (``self.a = self.b = block``) has its slot swapped twice, so the second restore writes back the first
swap's tensor: the model keeps a detached copy of its parameter, the optimizer's parameter no longer takes part in
the forward, and its ``.grad`` stays None. Here every parameter and buffer slot of such a module tree is put back
after the call.

An RNN/LSTM/GRU keeps the weights of its latest forward in ``_flat_weights``, and weak references to them, by
which its next forward tells whether they changed (``_weights_have_changed``: it stops at the first changed one,
and evaluates a parametrized weight twice on the way). Its forward inside the call set them to the given tensors,
and the restore left them so: the next forward of the training found them changed at once and evaluated a
parametrized weight fewer times than a plain step's (spectral norm's power iteration in train mode: its buffers,
then p.grad, moved off a plain step's, 1.5e-6 after two steps), re-flattened the weights on CUDA, and the call's
copies were held meanwhile. They are put back after the call. During the call, the cached parameters the
training's forward found unchanged are the tensors given in their place, with their references, so that the
call's forward takes the same branches and evaluates a parametrized weight as often as the training's did (the
whole-model vmap differentiates the weight of the pass: 1.1e-4 off for a spectral-normed LSTM otherwise), and
runs with the given tensors (a first version retargeted the references alone: an RNN without a parametrization
then ran with its own parameters, not the given ones, and its Hessian-vector products were wrong).
"""

from __future__ import annotations

import weakref
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
    recurrent = [(path, rnn, list(rnn._flat_weights), list(rnn._flat_weight_refs))
                 for path, rnn in module.named_modules() if isinstance(rnn, nn.RNNBase)
                 and hasattr(rnn, "_flat_weight_refs")]
    slots = [] if not _has_aliases(module) else [
        (table, name, tensor) for owner in module.modules()
        for table in (owner._parameters, owner._buffers) for name, tensor in table.items()]
    given = {key: tensor for part in (tensors if isinstance(tensors, tuple) else (tensors,))
             for key, tensor in part.items()} if recurrent else {}
    for path, rnn, weights, references in recurrent:
        cached = [_given_in_place(rnn, path, name, weight, reference, given)
                  for name, weight, reference in zip(rnn._flat_weights_names, weights, references)]
        rnn._flat_weights = [weight for weight, _ in cached]
        rnn._flat_weight_refs = [reference for _, reference in cached]
    try:
        return torch.func.functional_call(module, tensors, args, kwargs, **options)
    finally:
        for table, name, tensor in slots:
            if table.get(name) is not tensor:
                table[name] = tensor
        for _, rnn, weights, references in recurrent:
            rnn._flat_weights, rnn._flat_weight_refs = weights, references


def _given_in_place(rnn: nn.RNNBase, path: str, name: str, weight: Tensor | None, reference: weakref.ref | None,
                    given: dict[str, Tensor]) -> tuple[Tensor | None, weakref.ref | None]:
    """The RNN's cached weight ``name`` and its reference for the call: the tensor given in place of the parameter
    (and a reference to it), where the cache holds the parameter itself (the training's forward found it
    unchanged), so that the call's forward finds it unchanged too and runs with the given tensor; else as they
    are (a parametrized weight, evaluated anew)."""
    key, parameter = f"{path}.{name}" if path else name, rnn._parameters.get(name)
    if weight is not parameter or reference is None or reference() is not parameter or key not in given:
        return weight, reference
    return given[key], weakref.ref(given[key])
