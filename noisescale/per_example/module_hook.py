"""The forward hooks noisescale puts on the user's modules, as objects a copy of the model leaves behind.

A copy of a measured model (``copy.deepcopy(model)``: an EMA model; ``torch.save(model)``) copies the modules' hook
tables. Bound methods there would copy or pickle the engine they belong to (weak references, the pass: pickling
raised), and its copy would then act on the copied model. A ``ModuleHook`` copies as one that does nothing: the copy
is not measured, and loading such a pickle needs noisescale installed."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["ModuleHook"]


class ModuleHook:
    """Calls ``method`` with the hook's arguments; its copies call nothing."""

    __slots__ = ("method",)

    def __init__(self, method: Callable[..., Any] | None = None):
        self.method = method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return None if self.method is None else self.method(*args, **kwargs)

    def __reduce__(self):
        return ModuleHook, ()
