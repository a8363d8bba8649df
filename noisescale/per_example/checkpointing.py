"""Activation checkpointing (torch.utils.checkpoint, HuggingFace's gradient checkpointing) in noisescale's passes.

``checkpointing_off``: noisescale's own passes under torch.func (the whole-model vmap, the Hessian-vector
products) run the model without checkpointing. Under torch.func a reentrant checkpoint hides the parameters inside
it from grad (their gradients zero: a tiny model's norms 44 % off, silently) and a non-reentrant one raises (on
the recomputed tensors' shapes, or "torch.func ... don't yet support saved tensor hooks" under jvp).

``CheckpointedInputs``: a rule layer's input inside a non-reentrant checkpointed block, kept as the checkpoint
keeps its own saved tensors. A ghost rule needs each call's input x at the backward. Held from the forward, the
inputs of every layer in a checkpointed block would stay alive, which is the memory checkpointing exists to free
(a tiny checkpointed Llama: 37.6 MiB at the peak against 25.1 MiB plain). Instead x is handed to the checkpoint's own pack hook in the forward,
which keeps a placeholder; the recomputation in the backward fills it again, and the rule reads it once.

The recomputation replays the block's operations in order, and torch matches each recomputed tensor to the
placeholder of the same rank. The forward hooks run in the replay too, so at a rule layer's call the replay's
next rank is one the forward saved this call's input at exactly when it saved one there: ``fill`` saves x then,
and only then, which keeps torch's count and order of saved tensors as they were, in every replay (a second
backward through the graph replays the block again, after the first has read the placeholders).

These read the checkpoint's private state (its hooks' closures); where they are not as expected (another torch
release), x is held from the forward as before.
"""
from __future__ import annotations

import inspect
import sys
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn


def _default_hooks() -> tuple[Callable, Callable] | None:
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def _closure(hook: Callable) -> dict[str, Any]:
    """The variables a hook's closure holds, read from its cells (about 3 us; inspect.getclosurevars, which also
    resolves the function's globals and builtins, took 15 us, at every rule layer's call in a checkpointed block
    and again in its replay). Empty cells are left out."""
    function = inspect.unwrap(hook)
    names, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None) or ()
    variables = {}
    for name, cell in zip(() if names is None else names.co_freevars, cells):
        try:
            variables[name] = cell.cell_contents
        except ValueError:   # a cell not yet assigned
            pass
    return variables


def _is(hook: Callable, kind: str) -> bool:
    return getattr(hook, "__qualname__", "").startswith(kind + ".")


def recomputing() -> bool:
    """Whether this forward call is non-reentrant checkpointing recomputing a block inside the backward: its calls
    were recorded in the real forward already, and the recomputed outputs get no gradient. (Reentrant
    checkpointing runs its first forward without grad, so its recomputation is the call to record.)"""
    hooks = _default_hooks()
    return hooks is not None and _is(hooks[0], "_recomputation_hook")


class _PlainCall:
    """Stands for torch.utils.checkpoint's CheckpointFunction: ``apply(function, preserve_rng_state, *args)``."""

    @staticmethod
    def apply(function: Callable, preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)


def _plain_generator(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Stands for torch.utils.checkpoint's non-reentrant generator: nothing before or after the function."""
    yield


# the names checkpointing is looked up by at each call: torch.utils.checkpoint's ``checkpoint`` and the composable
# ``checkpoint(module)`` of torch.distributed (FSDP2's companion, which imported the generator by name)
_PLAIN_PARTS = {
    "torch.utils.checkpoint": {"CheckpointFunction": _PlainCall,
                               "_checkpoint_without_reentrant_generator": _plain_generator},
    "torch.distributed._composable.checkpoint_activation": {
        "_checkpoint_without_reentrant_generator": _plain_generator},
}


@contextmanager
def checkpointing_off(model: nn.Module) -> Iterator[None]:
    """The model runs without activation checkpointing: HuggingFace layers' ``gradient_checkpointing`` flags are
    switched off and back on, and torch.utils.checkpoint's ``checkpoint`` (however it was imported) runs its
    function plainly, through the names of its module it looks up at each call (where they exist), and so does the
    composable ``torch.distributed._composable.checkpoint`` where it has been imported."""
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    replaced = [(module, name, getattr(module, name)) for module_name, parts in _PLAIN_PARTS.items()
                if (module := sys.modules.get(module_name)) is not None for name in parts if hasattr(module, name)]
    try:
        for m in switched:
            m.gradient_checkpointing = False
        for module, name, _ in replaced:
            setattr(module, name, _PLAIN_PARTS[module.__name__][name])
        yield
    finally:
        for m in switched:
            m.gradient_checkpointing = True
        for module, name, original in replaced:
            setattr(module, name, original)


class CheckpointedInputs:
    """The ranks, among each checkpoint's saved tensors, of the layer inputs saved through it, to save them again
    at the same ranks in its replays."""

    def __init__(self) -> None:
        # checkpoint frame -> the ranks of its saved tensors that are layer inputs saved here. By rank, not by
        # placeholder: a placeholder dies once read (the first backward), but a second backward through the same
        # graph (retain_graph=True) replays the block again, and every rank saved in the forward must be saved
        # again, or torch's count of saved tensors falls short and its own backward raises CheckpointError
        self._ranks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._ranks)

    def save(self, x: Tensor) -> Callable[[], Tensor] | None:
        """Inside a checkpointed block's forward: x saved by the checkpoint; returns what reads it back once in
        the backward (recomputing the block if nothing has yet). None outside a checkpoint's forward."""
        hooks = _default_hooks()
        if hooks is None or not _is(hooks[0], "_checkpoint_hook"):
            return None
        frame = _closure(hooks[0]).get("frame")
        if not (hasattr(frame, "weak_holders") and hasattr(frame, "recomp_counter")):
            return None
        pack, unpack = hooks
        holder = pack(x)
        self._ranks.setdefault(frame, set()).add(len(frame.weak_holders) - 1)
        return lambda: unpack(holder)

    def fill(self, x: Any) -> None:
        """In a checkpoint's replay, at a rule layer's call: x saved where the forward saved this call's input."""
        hooks = _default_hooks()
        if not isinstance(x, Tensor) or hooks is None or not _is(hooks[0], "_recomputation_hook"):
            return
        cells = _closure(hooks[0])
        frame = cells.get("target_frame_ref", lambda: None)()
        gid = cells.get("gid")
        if frame is None or gid is None:
            return
        if frame.recomp_counter[gid] in self._ranks.get(frame, ()):
            hooks[0](x)   # last: with every placeholder filled, the replay stops here (torch's early stop)
