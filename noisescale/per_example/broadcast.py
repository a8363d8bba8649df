"""Per-example gradients of a tensor computed once for all examples and broadcast over them, from the real backward.

A relative position bias (T5's ``relative_attention_bias`` looked up on (T, T) buckets, BEiT's and Swin's bias
tables) or a position embedding called on positions without a batch dim is computed once, without the examples, and
added to B examples' attention scores or embeddings. The backward sums each example's gradient into the one
gradient of that shared tensor o, so the hooks of the module that made o cannot tell the examples apart; but the
operations that broadcast o against a batched tensor (the "frontier": o + scores, where(mask, o, -inf), o * x) see
them: their output gradient g has the examples in dim 0. Example i's gradient of o is that of g_i through the
frontier (``_unreduced``), summed over the dims o was broadcast along except dim 0 (``_per_example``), and carried
back through the batch-free operations between the frontier and o before the real backward runs them (directly for
views, permutations, copies and elementwise operations, ``_carried``; others by calling their autograd node under
vmap over the examples). The module that made o then
gets dl_i/do for each example as if it had been called on every example: its rule (an Embedding on shared buckets)
or the per-module fallback (a module that computes the bias) turns that into the norms.

The graph is walked from the model's outputs after its forward (node output shapes from autograd's
``_input_metadata``); an operation that takes o besides those above, or a batch-free operation that could mix
the examples (a matrix product, a reduction over a batched tensor), sends o's module to the whole-model vmap, as
does a pass where the per-example gradients do not sum to the gradient o received (checked in ``GhostPass.finish``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import vmap


__all__ = ["Broadcast", "BroadcastGradients"]

# operations of one tensor (and constants): a shared input gives a shared output, whatever its shape (the number of
# heads may equal the batch size)
_OF_ONE = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "PermuteBackward0", "TransposeBackward0",
           "TBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
           "CloneBackward0", "ToCopyBackward0", "SliceBackward0", "SelectBackward0", "IndexBackward0",
           "RepeatBackward0", "NegBackward0", "AddBackward1", "SubBackward1", "MulBackward1", "DivBackward1",
           "UpsampleBilinear2DBackward0", "UpsampleBicubic2DBackward0", "UpsampleNearest2DBackward0",
           "SigmoidBackward0", "TanhBackward0", "ExpBackward0"}
# elementwise operations of several tensors: they give the examples to a shared input broadcast along their
# output's dim 0 of size B (the frontier, ``_unreduced``); one not broadcast keeps the output shared
_ELEMENTWISE = {"AddBackward0", "SubBackward0", "WhereBackward0", "MulBackward0", "ExpandBackward0"}


@dataclass
class Broadcast:
    """A shared tensor o of the pass and ``deliver(per_example, total, dtype)``, called in the backward with dl_i/do
    for each example, (B, *o.shape) of the pass's loss (None if o's gradient arrives a second time: another
    backward through the pass), the gradient o received, and bfloat16 where o reached the frontier in half
    precision (autocast: the backward rounds its sum to it), else total's dtype."""

    tensor: Tensor
    deliver: Callable[[Tensor | None, Tensor, torch.dtype], None]
    sums: dict = field(default_factory=dict)      # (node, output) -> per-example gradient so far, (B, *shape)
    delivered: bool = False
    low_precision: bool = False                   # it reaches the frontier in float16 or bfloat16 (autocast)

    def add(self, per_example: Tensor) -> None:
        """Each example's gradient of the tensor through one of its uses, (B, *o.shape)."""
        _add(self.sums, (self.tensor.grad_fn, self.tensor.output_nr), per_example)


class BroadcastGradients:
    """The shared tensors of one pass: ``add`` them in the forward, ``connect`` them to the graph after the model's
    forward (before the backward), ``close`` after the pass."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.pending: list[Broadcast] = []
        self.saves_hooked = False   # the forward ran under saved-tensor hooks (activation checkpointing)
        self.rows: dict = {}   # autograd node of a rule layer's output -> k: its B k rows are B examples' blocks
        self._handles: list = []

    def add(self, tensor: Tensor, deliver: Callable[[Tensor | None, Tensor, torch.dtype], None]) -> Broadcast:
        broadcast = Broadcast(tensor, deliver)
        self.pending.append(broadcast)
        return broadcast

    def adopt(self, broadcast: Broadcast) -> None:
        """Takes a pending tensor out of those to connect: its per-example gradients will be ``Broadcast.add``ed
        by whoever consumes it (a rule layer whose parametrized weight it is); the hook that delivers them is set."""
        self.pending.remove(broadcast)
        self._handles.append(broadcast.tensor.register_hook(
            _deliverer(broadcast, broadcast.tensor.grad_fn, broadcast.tensor.output_nr)))

    def connect(self, roots: list) -> list[tuple[Broadcast, str]]:
        """Hooks every pending shared tensor into the graph from the autograd nodes ``roots``; returns those that
        cannot be measured this way, with why."""
        pending, self.pending = self.pending, []
        if not pending:
            return []
        consumers = _consumers(roots)
        failed = []
        for broadcast in pending:
            why = self._hook(broadcast, consumers)
            if why is not None:
                failed.append((broadcast, why))
        return failed

    def _hook(self, broadcast: Broadcast, consumers: dict) -> str | None:
        start = broadcast.tensor.grad_fn
        if start is None:
            return "its output has no autograd node"
        frontier, between, stack = defaultdict(list), {}, [start]
        while stack:
            node = stack.pop()
            for consumer, k, output_nr in consumers.get(node, []):
                name = type(consumer).__name__
                try:
                    shapes = [tuple(meta.shape) for meta in consumer._input_metadata]
                    carried = node._input_metadata[output_nr]
                except (AttributeError, IndexError, RuntimeError):   # a torch without the nodes' output shapes
                    return "the autograd graph does not give its operations' output shapes"
                shape = tuple(carried.shape)
                if carried.dtype in (torch.float16, torch.bfloat16):   # autocast: the backward rounds its sums
                    broadcast.low_precision = True
                if len(shapes) != 1:
                    return f"an operation with several outputs ({name}) takes it"
                padded = (1,) * (len(shapes[0]) - len(shape)) + shape
                if self.saves_hooked and _reads_saved_tensors(consumer):
                    return (f"an operation ({name}) that saved a tensor takes it, under saved-tensor hooks "
                            "(activation checkpointing) that let a saved tensor be read only once")
                blocks = self._blocks(consumer, k, shapes[0]) if name in _ELEMENTWISE and padded[:1] == (1,) \
                    and len(padded) == len(shapes[0]) else None
                if blocks is not None:   # broadcast over the examples (in B blocks of rows: Swin's windows)
                    frontier[consumer].append((k, (node, output_nr), shape, blocks))
                elif name in _OF_ONE or name in _ELEMENTWISE and padded == shapes[0] and name != "ExpandBackward0":
                    if consumer not in between:
                        between[consumer] = True
                        stack.append(consumer)
                else:
                    return f"an operation ({name}) takes it in a way the hooks do not follow"
        if not frontier:
            return "no operation combines it with the examples"
        for consumer, edges in frontier.items():
            self._handles.append(consumer.register_prehook(
                lambda grads, edges=edges, consumer=consumer: self._at_frontier(broadcast, consumer, edges, grads)))
        targets = set(between) | {start}
        for node in between:
            self._handles.append(node.register_prehook(
                lambda grads, node=node: self._between(broadcast, node, targets, grads)))
        self._handles.append(broadcast.tensor.register_hook(_deliverer(broadcast, start, broadcast.tensor.output_nr)))
        return None

    def _at_frontier(self, broadcast: Broadcast, consumer: Any, edges: list, grads: tuple) -> None:
        grad = grads[0]
        if grad is None:
            return
        with torch.no_grad():
            for k, key, shape, blocks in edges:
                unreduced = _unreduced(consumer, k, grad)
                if blocks > 1:
                    unreduced = unreduced.reshape(self.batch_size, blocks, *unreduced.shape[1:]).sum(1)
                _add(broadcast.sums, key, _per_example(unreduced, shape))

    def _blocks(self, consumer: Any, k: int, shape: tuple) -> int | None:
        """k' where the output of ``consumer`` (a frontier candidate, its input k the shared tensor's) holds the B
        examples in dim 0, in blocks of k' rows: 1 where dim 0 is B; where it is B k' rows (Swin's windows), only if
        another input's rows trace back to a rule layer's output whose rows a probe showed to be the examples'
        blocks (``_rows_of``). None otherwise."""
        if not shape or shape[0] % self.batch_size:
            return None
        blocks = shape[0] // self.batch_size
        if blocks == 1:
            return 1
        others = [edge for j, edge in enumerate(consumer.next_functions) if j != k and edge[0] is not None]
        return blocks if any(self._rows_of(node, nr, {}) == blocks for node, nr in others) else None

    def _rows_of(self, node: Any, output_nr: int, seen: dict, depth: int = 0) -> int | None:
        """k where output ``output_nr`` of ``node`` has B k rows, the examples' blocks in order, traced through
        operations that keep dim 0's rows (elementwise, batched products, permutations of the other dims) or
        regroup them (a reshape to a multiple of B rows) back to a rule layer's output (``rows``)."""
        if node in self.rows:
            return self.rows[node] if output_nr == 0 else None
        if depth > 32 or node in seen or hasattr(node, "variable"):
            return None
        seen[node] = None
        name = type(node).__name__
        try:
            rows = node._input_metadata[output_nr].shape[0] if node._input_metadata[output_nr].shape else None
        except (AttributeError, IndexError, RuntimeError):
            return None
        if rows is None or rows % self.batch_size or not _keeps_rows(node, name):
            return None
        for source, nr in node.next_functions:
            if source is None:
                continue
            blocks = self._rows_of(source, nr, seen, depth + 1)
            if blocks is None:
                continue
            source_rows = source._input_metadata[nr].shape[0]
            if name in _REGROUP or source_rows == rows:   # a reshape regroups whole blocks (B divides both)
                return rows // self.batch_size
        return None

    def _between(self, broadcast: Broadcast, node: Any, targets: set, grads: tuple) -> None:
        """Before the real backward runs ``node``: carry each example's gradient of its output to its inputs."""
        per_example = broadcast.sums.pop((node, 0), None)
        if per_example is None:
            return
        wanted = [(k, edge) for k, edge in enumerate(node.next_functions) if edge[0] in targets]
        if not wanted:
            return
        with torch.no_grad():
            for (k, edge), value in zip(wanted, _carried(node, per_example, [k for k, _ in wanted])):
                _add(broadcast.sums, edge, value)

    def close(self) -> None:
        """Removes the hooks (the pending tensors stay, for ``GhostPass.finish`` to send to the vmap)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.rows = [], {}


def _consumers(roots: list) -> dict:
    """node -> [(node taking its output, input position, output position)] over the graph from ``roots``: one walk
    that reads each node's inputs once (building that tuple is most of a walk's cost)."""
    consumers, seen, stack = defaultdict(list), set(roots), [root for root in roots if root is not None]
    while stack:
        node = stack.pop()
        for k, (next_node, output_nr) in enumerate(node.next_functions):
            if next_node is not None:
                consumers[next_node].append((node, k, output_nr))
                if next_node not in seen:
                    seen.add(next_node)
                    stack.append(next_node)
    return consumers


def _deliverer(broadcast: Broadcast, start: Any, output_nr: int) -> Callable[[Tensor], None]:
    """The tensor hook on the shared tensor: every consumer has run, so its per-example gradient is complete."""

    def deliver(total: Tensor) -> None:
        per_example = broadcast.sums.pop((start, output_nr), None)
        if broadcast.delivered:
            per_example = None
        elif per_example is None:
            per_example = total.new_zeros(0)   # nothing came through the frontier: fails the sum check
        broadcast.delivered = True
        broadcast.deliver(per_example, total, torch.bfloat16 if broadcast.low_precision else total.dtype)

    return deliver


# operations whose output row r is computed from row r of their inputs (dim 0 kept, other dims free)
_ROWWISE = {"AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "MulBackward0", "MulBackward1",
            "DivBackward0", "DivBackward1", "NegBackward0", "CloneBackward0", "ToCopyBackward0", "BmmBackward0",
            "ExpandBackward0", "SoftmaxBackward0", "SafeSoftmaxBackward0", "TanhBackward0", "SigmoidBackward0"}
# reshapes: row-major order is kept, so B blocks of whole examples stay blocks when both sides have a multiple of B
_REGROUP = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"}


def _keeps_rows(node: Any, name: str) -> bool:
    """Whether ``node`` keeps (or regroups) dim 0's rows: see ``_ROWWISE`` and ``_REGROUP``; a transpose or
    permutation only where dim 0 stays in place."""
    if name in _ROWWISE or name in _REGROUP:
        return True
    if name == "TransposeBackward0":
        return node._saved_dim0 != 0 and node._saved_dim1 != 0 and node._saved_dim0 != -len(
            node._input_metadata[0].shape) and node._saved_dim1 != -len(node._input_metadata[0].shape)
    if name == "PermuteBackward0":
        return node._saved_dims[0] % len(node._saved_dims) == 0
    return False


def _reads_saved_tensors(node: Any) -> bool:
    """Whether carrying a gradient through ``node`` reads a tensor it saved (a mask, an operand)."""
    return any(name.startswith("_raw_saved_") for name in dir(node))


def _add(sums: dict, key: Any, value: Tensor) -> None:
    sums[key] = value if key not in sums else sums[key] + value


def _unreduced(node: Any, k: int, grad: Tensor) -> Tensor:
    """The gradient of a frontier operation's input k before it is summed over the dims that input was broadcast
    along: the shape of the operation's output, (B, ...)."""
    name = type(node).__name__
    if name == "AddBackward0":
        return grad if k == 0 else grad * node._saved_alpha
    if name == "SubBackward0":
        return grad if k == 0 else grad * -node._saved_alpha
    if name == "WhereBackward0":
        zero = grad.new_zeros(())
        return torch.where(node._saved_condition, grad, zero) if k == 0 else \
            torch.where(node._saved_condition, zero, grad)
    if name == "ExpandBackward0":
        return grad
    other = node._saved_other if k == 0 else node._saved_self   # MulBackward0
    return grad * other.conj()


def _per_example(unreduced: Tensor, shape: tuple) -> Tensor:
    """(B, *shape): each example's gradient of an input of ``shape`` broadcast to ``unreduced``'s shape (B, ...)."""
    padded = (1,) * (unreduced.dim() - len(shape)) + shape
    dims = [d for d in range(1, unreduced.dim()) if padded[d] == 1 and unreduced.shape[d] != 1]
    summed = unreduced.sum(dims, keepdim=True) if dims else unreduced
    return summed.reshape(unreduced.shape[0], *shape)


_SAME_ORDER = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0",
               "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "CloneBackward0", "ToCopyBackward0"}


def _rearranged(node: Any, per_example: Tensor) -> Tensor | None:
    """The per-example gradients of a view, copy or permutation's input, taken from its output's directly (no
    vmap, whose cost per call is that of many such operations); None for other operations."""
    name = type(node).__name__
    if node.next_functions[0][0] is None:
        return None
    meta = _input_meta(node, 0)
    if name in _SAME_ORDER:   # the same elements in the same order
        return per_example.reshape(per_example.shape[0], *meta.shape).to(device=meta.device, dtype=meta.dtype)
    if name == "PermuteBackward0":
        dims = [d % len(node._saved_dims) for d in node._saved_dims]
        inverse = sorted(range(len(dims)), key=dims.__getitem__)
        return per_example.permute(0, *(d + 1 for d in inverse))
    if name == "TransposeBackward0":
        rank = per_example.dim() - 1
        return per_example.transpose(node._saved_dim0 % rank + 1, node._saved_dim1 % rank + 1)
    return None


def _carried(node: Any, per_example: Tensor, positions: list[int]) -> list[Tensor]:
    """The gradients ``node`` gives its inputs at ``positions`` for each example's output gradient, (B, *output
    shape): directly for views, copies, permutations and elementwise operations, else by the node itself."""
    name = type(node).__name__
    if len(node.next_functions) == 1:
        rearranged = _rearranged(node, per_example)
        if rearranged is not None:
            return [rearranged]
    elif name in _ELEMENTWISE:
        return [_per_example(_unreduced(node, k, per_example), tuple(_input_meta(node, k).shape)) for k in positions]
    return _call_per_example(node, per_example, positions)


def _input_meta(node: Any, k: int) -> Any:
    """Shape and dtype of the tensor ``node`` took as its input k."""
    source, output_nr = node.next_functions[k]
    return source._input_metadata[output_nr]


def _call_per_example(node: Any, per_example: Tensor, positions: list[int]) -> list[Tensor]:
    """The gradients ``node`` gives its inputs at ``positions`` for each example's output gradient: the node's
    own backward under vmap over the examples, or one call per example where vmap cannot run it."""

    def one(grad: Tensor) -> tuple[Tensor, ...]:
        out = node(grad)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(out[k] for k in positions)

    try:
        return list(vmap(one)(per_example))
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        rows = [one(grad) for grad in per_example]
        return [torch.stack([row[j] for row in rows]) for j in range(len(positions))]
