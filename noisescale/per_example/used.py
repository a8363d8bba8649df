"""The tensors a module's call used, by dotted name ("out_proj.weight"): the module's own attributes, or under FSDP
the copies of its unsharded parameters taken in the forward (the module holds shards by the time its per-example
gradients are computed)."""

from __future__ import annotations

from functools import reduce

from torch import Tensor, nn


def attribute(module: nn.Module, name: str) -> Tensor | None:
    """``module.a.b`` for ``name`` "a.b": a parameter, a plain tensor (FSDP1's views of its flat parameter) or None."""
    return reduce(getattr, name.split("."), module)


def used_parameter(module: nn.Module, name: str, copies: dict[str, Tensor] | None = None) -> Tensor | None:
    """The detached tensor a call of ``module`` used as its parameter ``name``: the copy in ``copies`` where there
    is one (FSDP), else the module's own; None where it has none (a layer built with bias=False)."""
    value = copies[name] if copies is not None and name in copies else attribute(module, name)
    return None if value is None else value.detach()
