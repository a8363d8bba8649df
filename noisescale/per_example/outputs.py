"""Per-example gradients of parameters only the whole-model vmap can measure, in a caller's own pass, from the
gradients the caller's backward brought to the model's outputs.

A framework's step (HuggingFace ``Trainer``, say) differentiates a loss L built from the model's outputs with its own
weighting: a token mean over the accumulated batch, a division by the accumulation steps, a factor for the
processes, label smoothing, a custom ``compute_loss``. Whatever it is, while examples do not meet in the forward,
example i's share of dL/dtheta is J_i^T G_i, with J_i the Jacobian of example i's outputs y_i and G_i = dL/dy_i, the
gradient the real backward brought to them. ``OutputGradients`` keeps G from the one call of the model in the
pass (a tensor hook per output that holds the examples in dim 0), and that call's inputs; ``inner_product`` is the per-example loss
<y_i(theta), G_i> whose gradient, taken by ``vmap_sqnorms`` over single examples, is that share: the same
per-example gradient the hooks measure, with no knowledge of the loss.

The forward that vmap runs draws its own dropout masks (``vmap.py``): with dropout these parameters' norms are
those of another draw of the masks, as in ``PerExampleGradNorms.__call__``. A loss that reaches the parameters other
than through the outputs (an auxiliary loss computed inside the model and returned as a scalar) is not seen.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

__all__ = ["OutputGradients", "inner_product"]


class OutputGradients:
    """While active, the gradients dL/dy of the outputs y of ``model``'s call that hold the ``batch_size``
    examples in dim 0, and the call's inputs, when ``keep()`` says so at the end of that call (else only the calls
    are counted and no gradient is held: the gradient of the logits is as large as the logits)."""

    def __init__(self, model: nn.Module, batch_size: int, keep: Callable[[], bool]):
        self.batch_size, self._keep = batch_size, keep
        self.kept = False
        self.calls = 0
        self.indices: list[int] = []        # positions of those outputs among the output's flattened leaves
        self._grads: list[list] = []
        self._nodes: list = []              # their autograd nodes
        self.roots: list = []               # the autograd nodes of the call's outputs
        self.inputs: Any = None             # the call's inputs as noisescale.batches takes them, if they can be
        self._inputs_refused = ""
        self._handle = model.register_forward_hook(self._on_output, with_kwargs=True)

    def _on_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.calls += 1
        if self.calls > 1:
            return
        self.roots = [leaf.grad_fn for leaf in tree_flatten(output)[0]
                      if isinstance(leaf, Tensor) and leaf.grad_fn is not None]
        if not self._keep():
            return
        self.kept = True
        self.inputs, self._inputs_refused = self._batch_of(args, kwargs)
        seen = set()
        for index, leaf in enumerate(tree_flatten(output)[0]):
            if (isinstance(leaf, Tensor) and leaf.requires_grad and leaf.grad_fn is not None and leaf.dim()
                    and leaf.shape[0] == self.batch_size and leaf.grad_fn not in seen):
                seen.add(leaf.grad_fn)
                holder = [None]
                leaf.register_hook(partial(_keep, holder))
                self.indices.append(index)
                self._grads.append(holder)
                self._nodes.append(leaf.grad_fn)

    def _batch_of(self, args: tuple, kwargs: dict) -> tuple[Any, str]:
        """(the call's inputs: a tuple of positional inputs or a mapping of keyword inputs, "") or (None, why):
        every tensor among them must hold the examples in dim 0, for vmap to run over them."""
        if args and kwargs:
            return None, "the model was called with positional and keyword inputs together"
        inputs = dict(kwargs) if kwargs else tuple(args)
        for leaf in tree_flatten(inputs)[0]:
            if isinstance(leaf, Tensor) and not (leaf.dim() and leaf.shape[0] == self.batch_size):
                return None, f"an input of shape {tuple(leaf.shape)} does not hold the examples in dim 0"
        return inputs, ""

    def close(self) -> None:
        self._handle.remove()

    def gradients(self) -> tuple[list[int], list[Tensor]] | None:
        """(positions, dL/dy) of the outputs that received a gradient and that no other such output was computed
        from, or None when they cannot stand for the loss: the model was called other than once, or none of its
        batched outputs received a gradient. (An encoder's last hidden state, returned next to the logits computed
        from it, receives the gradient that came through the logits: counting both would count it twice.)"""
        kept = [(index, holder[0], node) for index, holder, node in zip(self.indices, self._grads, self._nodes)
                if holder[0] is not None]
        if self.calls != 1 or not kept:
            return None
        inner = _ancestors([node for _, _, node in kept])
        return ([index for index, _, node in kept if node not in inner],
                [grad.detach() for _, grad, node in kept if node not in inner])

    def why_not_inputs(self) -> str:
        return self._inputs_refused or self.why_not()

    def why_not(self) -> str:
        if self.calls != 1:
            return f"the model was called {self.calls} times in the pass, not once"
        if not self.kept:
            return "the model's output gradients were not kept in this pass (no earlier pass needed them)"
        return "none of the model's outputs holding the examples in dim 0 received a gradient"


def inner_product(indices: list[int], outputs: Any, grads: list[Tensor]) -> Tensor:
    """sum over the kept outputs of <y, G>: the loss whose gradient is J^T G (``vmap_sqnorms``'s loss_fn with the
    positions bound)."""
    leaves = tree_flatten(outputs)[0]
    return sum((leaves[index] * grad).sum() for index, grad in zip(indices, grads))


def _ancestors(nodes: list) -> set:
    """The nodes among ``nodes`` that the graph of another of them reaches (walked back to the leaves)."""
    wanted, found = set(nodes), set()
    for start in nodes:
        seen, stack = {start}, [next_node for next_node, _ in start.next_functions]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in wanted:
                found.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _keep(holder: list, grad: Tensor) -> None:
    holder[0] = grad if holder[0] is None else holder[0] + grad
