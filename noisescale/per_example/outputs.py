"""Per-example gradients of parameters only the whole-model vmap can measure, in a caller's own pass, from the
gradients the caller's backward brought to the model's outputs.

A framework's step (HuggingFace ``Trainer``, say) differentiates a loss L built from the model's outputs with its own
weighting: a token mean over the accumulated batch, a division by the accumulation steps, a factor for the
processes, label smoothing, a custom ``compute_loss``. Whatever it is, while examples do not meet in the forward,
example i's share of dL/dtheta is J_i^T G_i, with J_i the Jacobian of example i's outputs y_i and G_i = dL/dy_i, the
gradient the real backward brought to them. ``OutputGradients`` keeps G and the inputs of the model's one call in
the pass; ``inner_product`` is the per-example loss <y_i(theta), G_i> whose gradient, taken by ``vmap_sqnorms`` over
single examples, is that share: the same per-example gradient the hooks measure, with no knowledge of the loss.

Which gradient each output contributes:
- an output that holds the examples in dim 0: the whole gradient it received (the caller's loss, and a loss the
  model computed from it, HuggingFace's with ``labels``);
- such an output that another of them was computed from (an encoder's last hidden state next to the logits): only
  what the caller did with it directly, from a hook on an alias ``y.view_as(y)`` handed to the caller in its place,
  since its whole gradient also holds what came through the other;
- any other output that received a gradient (a scalar loss computed inside the model) must reach the measured
  parameters only through the outputs above, or the pass is refused.

The forward that vmap runs draws its own dropout masks (``vmap.py``): with dropout these parameters' norms are
those of another draw of the masks, as in ``PerExampleGradNorms.__call__``.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from noisescale._graph import autograd_nodes, output_shape
from noisescale._wrappers import unwrapped_module
from noisescale.per_example.module_hook import ModuleHook
from noisescale.per_example.vmap import in_own_pass

__all__ = ["OutputGradients", "inner_product"]


class OutputGradients:
    """While active, the gradients of the outputs of ``model``'s one call with grad (under DDP, of the module
    inside it, before DDP's own autograd node), as the module docstring says, and that call's inputs, when
    ``keep()`` says so at the end of the call (else no gradient is held: the gradient of the logits is as large as
    the logits). Calls without grad (a logging forward) and noisescale's own passes are not counted. ``on_roots``
    gets the autograd nodes of that call's outputs at its end, before ``keep`` is asked; ``want_roots`` keeps them
    in ``roots``."""

    def __init__(self, model: nn.Module, batch_size: int, keep: Callable[[], bool], want_roots: bool,
                 on_roots: Callable[[list], Any] | None = None):
        self.batch_size, self._keep, self._want_roots, self._on_roots = batch_size, keep, want_roots, on_roots
        self.kept = False
        self.calls = 0
        self.roots: list = []               # the autograd nodes of the call's outputs
        self.inputs: Any = None             # the call's inputs as noisescale.batches takes them
        self._versions: list[tuple[Tensor, int]] = []
        self._batched: list[tuple[int, list, Any, bool]] = []   # (leaf position, gradient holder, node, aliased)
        self._others: list[tuple[tuple, list, Any]] = []        # (shape, gradient holder, node) of other outputs
        self._with_examples: set = set()    # the nodes of the outputs with the examples in dim 0
        self._hooks: list = []
        self._module = unwrapped_module(model)
        self._before: list[tuple[Tensor, int]] = []   # the first call's input tensors and their versions before it
        self._handles = [self._module.register_forward_pre_hook(ModuleHook(self._on_input), with_kwargs=True),
                         self._module.register_forward_hook(ModuleHook(self._on_output), with_kwargs=True)]

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and not in_own_pass() and self.calls == 0:
            self._before = [(t, t._version) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]

    def _on_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not torch.is_grad_enabled() or in_own_pass():
            return None
        self.calls += 1
        if self.calls > 1:
            return None
        leaves, spec = tree_flatten(output)
        unique = {id(leaf): index for index, leaf in reversed(list(enumerate(leaves)))
                  if isinstance(leaf, Tensor) and leaf.grad_fn is not None}
        roots = [leaves[index].grad_fn for index in unique.values()]
        if self._on_roots is not None and roots:
            self._on_roots(roots)
        keep = self._keep()
        if not (keep or self._want_roots):
            return None
        self.roots = roots
        batched = [index for index in unique.values() if leaves[index].dim()
                   and leaves[index].shape[0] == self.batch_size]
        self._with_examples = {leaves[index].grad_fn for index in batched}
        for index in sorted(set(unique.values()) - set(batched)):   # which of them receive a gradient
            leaf, holder = leaves[index], [None, 0]
            self._hooks.append(leaf.register_hook(partial(_keep, holder)))
            self._others.append((tuple(leaf.shape), holder, leaf.grad_fn))
        if not keep:
            return None
        self.kept = True
        self.inputs = _keywords(self._module, args, kwargs) if args and kwargs else dict(kwargs) if kwargs else args
        if any(t._version != version for t, version in self._before):   # the vmap would re-run it on them
            self.inputs = ("the model changed one of its inputs in place during its forward, so its outputs cannot "
                           "be recomputed from them: leave the inputs as they are (work on a copy, x = x.clone())")
        self._versions = [(t, t._version) for t in tree_leaves(self.inputs) if isinstance(t, Tensor)]
        upstream = _reached_from([leaves[index].grad_fn for index in batched])
        aliases = {}
        for index in sorted(batched):
            leaf, holder = leaves[index], [None, 0]
            aliased = leaf.grad_fn in upstream
            if aliased:
                aliases[id(leaf)] = leaf.view_as(leaf)
            self._hooks.append((aliases[id(leaf)] if aliased else leaf).register_hook(partial(_keep, holder)))
            self._batched.append((index, holder, leaf.grad_fn, aliased))
        if not aliases:
            return None
        return tree_unflatten([aliases.get(id(leaf), leaf) if isinstance(leaf, Tensor) else leaf
                               for leaf in leaves], spec)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def release(self) -> None:
        """Drop the gradients and the hooks on the outputs (the caller may keep the outputs)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._batched, self._others, self.inputs, self.roots = [], [], [], None, []
        self._with_examples = set()

    def batch_terms(self) -> list[tuple[int, ...]]:
        """The shapes of the outputs without the examples in dim 0 that got a gradient from the caller (a loss the
        model computed, HuggingFace's with ``labels``: an output the graph of those with the examples does not
        reach) and whose graph reaches a parameter other than through a tensor with the examples in dim 0 (an
        output, or logits the model's loss read and did not return): a term over the whole batch added inside the
        model, such as an MoE's router load-balancing loss
        (``output_router_logits=True``; its router logits, (B T, experts), hold rows, not examples). It has no
        per-example gradients; the layers' norms split its gradient over the examples' rows. Needs the pass's
        outputs (``want_roots`` or ``keep``)."""
        received = [(shape, node) for shape, holder, node in self._others if holder[0] is not None]
        if not received:
            return []
        upstream = set(autograd_nodes(next_node for node in self._with_examples
                                      for next_node, _ in node.next_functions))
        holds_examples = partial(_holds_examples, batch=self.batch_size)
        return [shape for shape, node in received if node not in upstream and any(
            hasattr(reached, "variable") for reached in autograd_nodes([node], self._with_examples, holds_examples))]

    def gradients(self, measured: list[Tensor]) -> tuple[list[int], list[Tensor]] | str:
        """(positions of the outputs among the output's flattened leaves, their gradients G) for the
        ``measured`` parameters, or why the outputs cannot stand for the loss."""
        if self.calls != 1:
            return (f"the model was called {self.calls} times with grad in the pass, not once (in Lightning, "
                    "training_step must call the module itself, self(x), not a submodule)")
        if not self.kept:
            return ("the model's output gradients were not kept in this pass (no earlier pass needed them; the next "
                    "passes keep them)")
        if isinstance(self.inputs, str):
            return self.inputs
        if any(holder[1] > 1 for _, holder, _, _ in self._batched) or any(h[1] > 1 for _, h, _ in self._others):
            return "the model's outputs received gradients from more than one backward or autograd.grad call"
        if any(t._version != version for t, version in self._versions):
            return "an input of the model's call was changed in place after the call"
        for t in tree_leaves(self.inputs):
            if isinstance(t, Tensor) and t.dim() and t.shape[0] not in (1, self.batch_size):
                return (f"an input of shape {tuple(t.shape)} holds neither the {self.batch_size} examples observe was "
                        "given (its batch_size) nor one row shared by all")
        totals = {node for _, holder, node, aliased in self._batched if not aliased and holder[0] is not None}
        wanted = {id(p) for p in measured}
        missing = wanted - _leaves_reached(self.roots)
        if missing:
            return ("a parameter used outside the model's call (a weight the caller's loss reads itself) got no "
                    "gradient through the model's outputs")
        for shape, holder, node in self._others:
            if holder[0] is not None and _reaches(node, wanted, totals):
                return (f"an output of shape {shape}, without the examples in dim 0, received a gradient that "
                        "reaches these parameters other than through the outputs that hold the examples")
        kept = [(index, holder[0]) for index, holder, _, _ in self._batched if holder[0] is not None]
        if not kept:
            return "none of the model's outputs holding the examples in dim 0 received a gradient"
        return [index for index, _ in kept], [grad.detach() for _, grad in kept]


def inner_product(indices: list[int], outputs: Any, grads: list[Tensor]) -> Tensor:
    """sum over the kept outputs of <y, G>: the loss whose gradient is J^T G (``vmap_sqnorms``'s loss_fn with the
    positions bound); the outputs of the call on one example must line up with those of the pass."""
    leaves = tree_leaves(outputs)
    if max(indices) >= len(leaves) or any(not isinstance(leaves[index], Tensor)
                                          or leaves[index].shape[1:] != grad.shape[1:]
                                          for index, grad in zip(indices, grads)):
        raise ValueError("the model's outputs on one example do not line up with those of the pass (another "
                         "structure or shape), so their gradients cannot be applied to them")
    return sum((leaves[index] * grad).sum() for index, grad in zip(indices, grads))


def _reached_from(nodes: list) -> set:
    """The nodes among ``nodes`` that the graph of another of them reaches (walked back to the leaves)."""
    wanted = set(nodes)
    return {node for start in wanted
            for node in autograd_nodes(next_node for next_node, _ in start.next_functions) if node in wanted}


def _reaches(start: Any, leaves: set[int], stops: set) -> bool:
    """Whether the graph from ``start``, not walked past the nodes ``stops``, reaches a leaf (by id) of
    ``leaves``."""
    return any(id(getattr(node, "variable", None)) in leaves for node in autograd_nodes([start], stops))


def _leaves_reached(nodes: list) -> set[int]:
    """id of every leaf (parameter) the graph from ``nodes`` reaches."""
    return {id(node.variable) for node in autograd_nodes(nodes) if hasattr(node, "variable")}


def _keywords(module: nn.Module, args: tuple, kwargs: dict) -> dict | str:
    """A call with positional and keyword inputs as keyword inputs (bound to the forward's signature), or why
    it cannot be."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return "the model's call could not be bound to its forward's signature"
    keywords = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            return "the model was called with positional inputs that cannot be passed by name"
        keywords.update(value if kind == inspect.Parameter.VAR_KEYWORD else {name: value})
    return keywords


def _keep(holder: list, grad: Tensor) -> None:
    """holder = [the gradient received, how many times one arrived]."""
    holder[0], holder[1] = grad, holder[1] + 1


def _holds_examples(node: Any, batch: int) -> bool:
    """Whether every output of autograd node ``node`` has the ``batch`` examples in dim 0."""
    shapes = [output_shape(node, k) for k in range(len(node._input_metadata))]
    return bool(shapes) and all(shape and shape[0] == batch for shape in shapes)
