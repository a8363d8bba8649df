"""One entry point for per-example squared gradient norms that replaces ``loss.mean().backward()``.

For per-example losses l_i, g_i = dl_i/dtheta over all trainable parameters and the batch gradient is
gbar = mean_i g_i. A call runs the one real forward and backward of mean_i l_i (times ``loss_scale``), accumulates
into ``p.grad`` exactly as ``backward()`` would, and returns |g_i|^2 (B,) and |gbar|^2 -- the inputs of the
gradient noise scale estimators (McCandlish et al. 2018, appendix A).

Backends: "ghost" computes the norms from hooks during that pass (``ghost.py``, ``layers.py``); "vmap" from a
separate torch.func pass (``vmap.py``); "auto" uses ghost for every parameter whose module has a rule and vmap for
the rest only.

Limits of ghost: every hooked module must see tensors whose dim 0 is the example index (a position embedding
applied to ``arange(T)`` without the batch dim would be wrong when T == B and is an error otherwise). A parameter
used only outside its module's forward (nn.MultiheadAttention's out_proj) is detected -- it gets a gradient but no
hooked call -- and auto sends it to vmap; one used both through its module and directly
(``F.linear(x, self.embedding.weight)`` next to the embedding call) is invisible to hooks: give such a model
backend="vmap". Activation checkpointing (which re-runs forwards) is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn

from noisescale.batches import batch_size_of, call_model
from noisescale.per_example.ghost import GhostModule, GhostNormEngine
from noisescale.per_example.layers import rule_for, uses_batch_statistics
from noisescale.per_example.vmap import vmap_sqnorms

__all__ = ["PerExampleNorms", "PerExampleGradNorms", "per_example_sqnorms", "BACKENDS"]

BACKENDS = ("auto", "ghost", "vmap")


@dataclass(frozen=True)
class PerExampleNorms:
    """Result of one step.

    loss: scalar, detached mean of the per-example losses.
    losses: (B,) detached per-example losses l_i.
    sqnorms: (B,) |g_i|^2 summed over all trainable parameters (unscaled by loss_scale).
    grad_sqnorm: scalar |gbar|^2 of this batch's mean gradient (independent of what p.grad held before).
    by_parameter: parameter name -> (B,) contribution to sqnorms, when asked for.
    backend_of: parameter name -> "ghost" | "vmap".
    """

    loss: Tensor
    losses: Tensor
    sqnorms: Tensor
    grad_sqnorm: Tensor
    by_parameter: dict[str, Tensor] | None
    backend_of: dict[str, str]


@dataclass(frozen=True)
class _Plan:
    ghost: dict[nn.Module, GhostModule]
    vmap_names: list[str]
    backend_of: dict[str, str]


def _checked_losses(losses: Any, batch_size: int) -> Tensor:
    if not isinstance(losses, Tensor) or losses.shape != (batch_size,):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn(outputs, targets) must return per-example losses of shape ({batch_size},), got {got}; "
            "use reduction='none' and reduce any token dims per example")
    return losses


def _leaves_in_graph(output: Tensor) -> set[int]:
    """The ids of the leaf tensors (parameters) that ``output`` depends on, from its autograd graph."""
    leaves, seen, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad
            leaves.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _record_sqnorm(received: dict[str, Tensor], name: str, dtype: torch.dtype, grad: Tensor) -> None:
    """Tensor hook on a parameter: keeps |grad|^2 of the gradient this backward brings (before accumulation)."""
    received[name] = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, dtype)).square()


class PerExampleGradNorms:
    """Stateful shell: installs the ghost hooks once and measures every step it is called on.

    ``norms = PerExampleGradNorms(model, loss_fn)(inputs, targets)`` replaces ``loss.mean().backward()``: p.grad
    ends as that backward leaves it (bit-identical under ghost and auto). Use as a context manager or call
    ``close()`` to remove the hooks.

    Parameters shared by several modules or calls are measured by summing their per-example gradients before the
    norm, which materialises (B x numel) for those parameters only.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], backend: str = "auto",
                 chunk_size: int | None = None, by_parameter: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.model, self.loss_fn, self.backend = model, loss_fn, backend
        self.chunk_size, self.by_parameter = chunk_size, by_parameter
        self._path_of = {module: path or "<model>" for path, module in model.named_modules()}
        hooked = [] if backend == "vmap" else [m for m in self._path_of if rule_for(m) is not None]
        self._engine = GhostNormEngine(hooked)

    def close(self) -> None:
        """Remove the hooks from the model."""
        self._engine.close()

    def __enter__(self) -> PerExampleGradNorms:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _plan(self) -> _Plan:
        """Which trainable parameters go to ghost and which to vmap (decided per call: freezing may change)."""
        name_of = {p: name for name, p in self.model.named_parameters()}
        owners: dict[str, list[tuple[nn.Module, str]]] = {}
        vmap_names: set[str] = set()
        for module, path in self._path_of.items():
            if uses_batch_statistics(module):
                raise ValueError(
                    f"module {path!r} ({type(module).__name__}) normalises with batch statistics (train mode), so "
                    "the examples are coupled and a per-example gradient is undefined; put it in eval mode "
                    "(module.eval()) or use GroupNorm/LayerNorm")
            local = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not local:
                continue
            rule = rule_for(module)
            reason = "no ghost rule for this module type" if rule is None else rule.unsupported_reason(module)
            if self.backend == "ghost" and reason is not None:
                raise ValueError(f"backend='ghost' cannot handle module {path!r} ({type(module).__name__}): {reason}; "
                                 "use backend='auto' to route its parameters to vmap")
            for n, p in local:
                owners.setdefault(name_of[p], []).append((module, n))
                if self.backend == "vmap" or reason is not None:
                    vmap_names.add(name_of[p])
        ghost: dict[nn.Module, GhostModule] = {}
        for name, uses in owners.items():
            if name in vmap_names:
                continue
            for module, local_name in uses:
                entry = ghost.setdefault(module, GhostModule(self._path_of[module], rule_for(module), {}))
                entry.names[local_name] = name
        backend_of = {name: "vmap" if name in vmap_names else "ghost" for name in owners}
        return _Plan(ghost, sorted(vmap_names), backend_of)

    def _used_outside_their_module(self, plan: _Plan, parameters: dict[str, Tensor], loss: Tensor,
                                   use_count: dict[str, int]) -> list[str]:
        """Ghost parameters in the loss's graph although no hooked call used them: their module's forward was
        bypassed (e.g. nn.MultiheadAttention reads out_proj.weight directly). Auto sends them to vmap; ghost
        raises before the backward, so a failed call leaves p.grad untouched."""
        unused = {name for name, backend in plan.backend_of.items() if backend == "ghost" and use_count[name] == 0}
        if not unused:
            return []
        in_graph = _leaves_in_graph(loss)
        bypassed = sorted(name for name in unused if id(parameters[name]) in in_graph)
        if bypassed and self.backend == "ghost":
            raise ValueError(f"backend='ghost' cannot measure parameters {bypassed}: they receive a gradient but "
                             "their module's forward was never called (used directly by another module); use "
                             "backend='auto' to route them to vmap")
        return bypassed

    def __call__(self, inputs: Any, targets: Any, *, loss_scale: float | Tensor = 1.0) -> PerExampleNorms:
        """One step on ``inputs`` (a tensor, a tuple of positional inputs or a mapping of keyword inputs, every
        tensor batch-first: :mod:`noisescale.batches`) and ``targets`` (any pytree of batch-first tensors, or
        None); ``loss_fn(outputs, targets)`` receives whatever the model returns (a HuggingFace ModelOutput, say)
        and must return (B,) per-example losses."""
        batch_size = batch_size_of(inputs)
        scale = float(loss_scale)
        if not scale > 0:
            raise ValueError(f"loss_scale must be positive, got {scale}")
        plan = self._plan()
        if not plan.backend_of:
            raise ValueError("model has no trainable parameters (all have requires_grad=False)")
        parameters = dict(self.model.named_parameters())
        names = list(plan.backend_of)
        accumulate_dtype = torch.float32
        received: dict[str, Tensor] = {}  # name -> |this pass's gradient|^2, read before it is accumulated
        handles = [parameters[name].register_hook(partial(_record_sqnorm, received, name, accumulate_dtype))
                   for name in names]
        try:
            with self._engine.recording(plan.ghost, batch_size, scale) as ghost_pass:
                losses = _checked_losses(self.loss_fn(call_model(self.model, inputs), targets), batch_size)
                loss = losses.mean()
                objective = loss if scale == 1.0 and not isinstance(loss_scale, Tensor) else loss * loss_scale
                bypassed = self._used_outside_their_module(plan, parameters, loss, ghost_pass.use_count)
                objective.backward()  # the real backward: p.grad, and DDP's all-reduce, exactly as without us
        finally:
            for handle in handles:
                handle.remove()
        vmap_names = plan.vmap_names + bypassed
        backend_of = {name: "vmap" if name in vmap_names else "ghost" for name in names}
        by_parameter = ghost_pass.result()
        grad_sqnorm = sum(received.values(), torch.zeros((), dtype=accumulate_dtype, device=loss.device))
        grad_sqnorm = grad_sqnorm.to(torch.promote_types(loss.dtype, accumulate_dtype)) / scale ** 2
        if vmap_names:
            by_parameter.update(vmap_sqnorms(self.model, self.loss_fn, inputs, targets, vmap_names, self.chunk_size))
        zeros = torch.zeros(batch_size, dtype=grad_sqnorm.dtype, device=loss.device)
        by_parameter = {name: by_parameter[name].to(zeros.dtype) if name in by_parameter else zeros
                        for name in names}
        return PerExampleNorms(
            loss=loss.detach(),
            losses=losses.detach(),
            sqnorms=torch.stack(list(by_parameter.values())).sum(0),
            grad_sqnorm=grad_sqnorm,
            by_parameter=by_parameter if self.by_parameter else None,
            backend_of=backend_of,
        )


def per_example_sqnorms(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: Any, targets: Any,
                        backend: str = "auto", chunk_size: int | None = None, by_parameter: bool = False,
                        loss_scale: float | Tensor = 1.0) -> PerExampleNorms:
    """One-shot form of ``PerExampleGradNorms``: hooks are installed for this call only."""
    with PerExampleGradNorms(model, loss_fn, backend, chunk_size, by_parameter) as measure:
        return measure(inputs, targets, loss_scale=loss_scale)
