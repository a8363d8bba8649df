"""The user's module inside the wrappers a training run puts around it: ``DistributedDataParallel`` and
``torch.compile``'s ``OptimizedModule``, in either order (accelerate, the HF Trainer's ``torch_compile=True``, compiles
after wrapping in DDP: ``torch.compile(DDP(model))``)."""

from __future__ import annotations

import sys

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _inner(model: nn.Module) -> nn.Module | None:
    """The module one wrapper holds: DDP's ``module``, or the ``_orig_mod`` that ``torch.compile(module)`` wrapped
    (its names carry an ``_orig_mod.`` prefix); None for any other module."""
    if isinstance(model, DistributedDataParallel):
        return model.module
    frames = sys.modules.get("torch._dynamo.eval_frame")   # not imported: nothing was compiled
    return model._orig_mod if frames is not None and isinstance(model, frames.OptimizedModule) else None


def ddp_of(model: nn.Module) -> DistributedDataParallel | None:
    """The DistributedDataParallel that ``model`` is or that a compile wrapper holds; None if there is none."""
    while model is not None and not isinstance(model, DistributedDataParallel):
        model = _inner(model)
    return model


def unwrapped_module(model: nn.Module) -> nn.Module:
    """The module inside every DDP and compile wrapper (the model itself if there is none): its forward runs without
    DDP's gradient all-reduce, and its state_dict has no ``module.`` or ``_orig_mod.`` prefix, so a checkpoint saved
    under DDP or from a compiled model loads into a single-process eager model and back."""
    inner = _inner(model)
    while inner is not None:
        model, inner = inner, _inner(inner)
    return model


def path_to(model: nn.Module, module: nn.Module) -> str:
    """The prefix of ``module``'s parameter names within ``model``'s ("" for the model itself, "module." inside DDP,
    "_orig_mod.module." inside a compiled DDP)."""
    path = next(path for path, candidate in model.named_modules() if candidate is module)
    return path + "." if path else ""
