"""Hook engine for ghost per-example gradient norms, computed during the one real backward pass.

Forward hooks, installed once, keep a reference to each call's input (a tensor autograd saves anyway) and register
a tensor hook on that call's output, so a module called several times in one forward gets one closure per call.
When backward reaches the output, the hook hands (input, output gradient) to the layer rule of ``layers.py``.

Scale: the pass differentiates loss_scale * mean_i l_i, so the output gradient of example i is
loss_scale / B * dl_i/dz_i; the norms are multiplied by (B / loss_scale)^2 once at the end.

Parameters used by more than one call in a forward (tied weights, a reused module) cannot be normed per call:
|sum_c g_{i,c}|^2 != sum_c |g_{i,c}|^2. Their per-example gradients (B x numel) are materialised and summed
over calls first; everything else stays in ghost form.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import torch
from torch import Tensor, nn

from noisescale.per_example.layers import LayerRule, per_example_sqnorm

__all__ = ["GhostModule", "GhostPass", "GhostNormEngine"]


@dataclass(frozen=True)
class GhostModule:
    """A module handled by ghost norms in this pass: its rule and its trainable parameters (local -> global)."""

    path: str
    rule: LayerRule
    names: dict[str, str]


@dataclass
class GhostPass:
    """What one forward/backward accumulates: per-parameter (B,) squared norms and shared per-example grads, both
    of the loss_scale * mean loss (rescaled by grad_factor = B / loss_scale in ``result``)."""

    modules: dict[nn.Module, GhostModule]
    batch_size: int
    grad_factor: float
    use_count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sqnorms: dict[str, Tensor] = field(default_factory=dict)
    shared_grads: dict[str, Tensor] = field(default_factory=dict)

    def result(self) -> dict[str, Tensor]:
        """Per-parameter (B,) squared norms of every parameter that took part in this pass."""
        sqnorms = dict(self.sqnorms)
        for name, grads in self.shared_grads.items():
            sqnorms[name] = per_example_sqnorm(grads)
        return {name: sqnorm * self.grad_factor ** 2 for name, sqnorm in sqnorms.items()}


def _add(store: dict[str, Tensor], name: str, value: Tensor) -> None:
    """Sum per name; rules return fresh tensors, so the stored one can be added to in place."""
    if name in store:
        store[name].add_(value)
    else:
        store[name] = value


class GhostNormEngine:
    """Installs one forward hook per module that has a layer rule; inactive outside ``recording``."""

    def __init__(self, modules: list[nn.Module]):
        self._pass: GhostPass | None = None
        self._handles = [
            module.register_forward_hook(self._on_forward, with_kwargs=True) for module in modules
        ]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def recording(self, modules: dict[nn.Module, GhostModule], batch_size: int,
                  loss_scale: float) -> Iterator[GhostPass]:
        """Record one forward/backward of ``modules``; the hooks are inert again on exit."""
        self._pass = GhostPass(modules, batch_size, batch_size / loss_scale)
        try:
            yield self._pass
        finally:
            self._pass = None

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        ghost_pass = self._pass
        if ghost_pass is None or module not in ghost_pass.modules:
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        entry = ghost_pass.modules[module]
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or x.shape[:1] != (ghost_pass.batch_size,) or output.shape[0] != x.shape[0]:
            raise ValueError(
                f"module {entry.path!r} ({type(module).__name__}) was called with an input of shape "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}; ghost norms need dim 0 to be "
                f"the batch of {ghost_pass.batch_size} examples (use backend='vmap' for this model)")
        for name in entry.names.values():
            ghost_pass.use_count[name] += 1
        call = {"x": x}
        output.register_hook(partial(self._on_output_grad, ghost_pass, entry, module, call))

    @staticmethod
    def _on_output_grad(ghost_pass: GhostPass, entry: GhostModule, module: nn.Module, call: dict,
                        grad_output: Tensor) -> None:
        x = call.pop("x")
        single = {local for local, name in entry.names.items() if ghost_pass.use_count[name] == 1}
        shared = set(entry.names) - single
        with torch.no_grad():
            if single:
                for local, sqnorm in entry.rule.per_example_sqnorms(module, x, grad_output, single).items():
                    _add(ghost_pass.sqnorms, entry.names[local], sqnorm)
            if shared:
                for local, grads in entry.rule.per_example_grads(module, x, grad_output, shared).items():
                    _add(ghost_pass.shared_grads, entry.names[local], grads)
