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
vmap over the examples). The module that made o then gets dl_i/do for each example as if it had been called on
every example: its rule (an Embedding on shared buckets) or the per-module fallback (a module that computes the
bias) turns that into the norms. A weight computed by ``torch.nn.utils.parametrize`` is such a tensor too; the rule
of the layer that uses it gives its per-example gradients directly (``Broadcast.add``, no walk).

The graph is walked from the model's outputs after its forward (node output shapes from autograd's
``_input_metadata``). A frontier's dim 0 must be shown to hold the examples, not merely to have their number (heads
as many as the examples, a sequence-first tensor at T == B): another of its inputs, or an elementwise operation or
a rule layer downstream, must meet it row by row with rows that trace back to a rule layer's output or input,
whose dim 0 the engine checked (``_paired``, ``_examples_at``); Swin's B windows' rows trace back to its
projections' verified blocks. Elementwise operations of the shared tensor with parameters or constants of its own
shape keep it shared. An operation that takes it otherwise, a tensor changed in place after its module returned
it, or saved tensors with hooks (activation checkpointing lets them be read once) send o's module to the
whole-model vmap, as does a pass where the per-example gradients do not sum to the gradient o received (checked
in ``GhostPass.finish``, to the rounding of the lowest precision o passed through).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import vmap

from noisescale._graph import ORDER_KEEPING, autograd_consumers, operations_taking, output_shape
from noisescale.per_example.vmap import quiet_torch_notes


__all__ = ["Broadcast", "BroadcastGradients", "computed_once", "reorders_rows", "rows_selected"]

_PRECISION = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 2}

# operations of one tensor (and constants): a shared input gives a shared output, whatever its shape (the number of
# heads may equal the batch size)
_OF_ONE = ORDER_KEEPING | {"PermuteBackward0", "TransposeBackward0", "TBackward0", "SliceBackward0", "SelectBackward0",
                           "IndexBackward0", "RepeatBackward0", "NegBackward0", "AddBackward1", "SubBackward1",
                           "MulBackward1", "DivBackward1", "RsubBackward1", "SumBackward0", "SumBackward1",
                           "MeanBackward0", "MeanBackward1", "UpsampleBilinear2DBackward0",
                           "UpsampleBicubic2DBackward0", "UpsampleNearest2DBackward0", "SigmoidBackward0",
                           "TanhBackward0", "ExpBackward0", "ConstantPadNdBackward0"}
# identities on several tensors at once, input k passed on as output k (FSDP2's hook on the tensor inputs of each
# unit, RegisterPostBackwardFunction(param_group, *inputs))
_PASS_THROUGH = {"RegisterPostBackwardFunctionBackward"}
# elementwise operations of several tensors: they give the examples to a shared input broadcast along their
# output's dim 0 of size B (the frontier, ``_unreduced``); one not broadcast keeps the output shared
_ELEMENTWISE = {"AddBackward0", "SubBackward0", "WhereBackward0", "MulBackward0", "DivBackward0", "ExpandBackward0"}
# products and normalisations with parameters whose every input is an input of their autograd node (no index or
# mask hidden in it): a shared input combined only with parameters gives a shared output (DeBERTa's relative
# embeddings through a LayerNorm and the attention's own query and key projections), carried by the node itself
_WITH_PARAMETERS = {"AddmmBackward0", "MmBackward0", "NativeLayerNormBackward0"}
# operations of one tensor and no other input (not even an index): what they make of a parameter, or of a tensor
# computed once for all the examples, is still computed without the examples (``computed_once``)
_OF_ONE_ONLY = ORDER_KEEPING | {"PermuteBackward0", "TransposeBackward0", "TBackward0", "SliceBackward0",
                                "SelectBackward0", "NegBackward0", "AddBackward1", "SubBackward1", "MulBackward1",
                                "DivBackward1", "RsubBackward1"}


@dataclass(eq=False)   # compared by identity (its fields hold tensors)
class Broadcast:
    """A shared tensor o of the pass and ``deliver(per_example, total, dtype)``, called in the backward with dl_i/do
    for each example, (B, *o.shape) of the pass's loss (None if o's gradient arrives a second time: another
    backward through the pass), the gradient o received, and bfloat16 where o reached the frontier in half
    precision (autocast: the backward rounds its sum to it), else total's dtype."""

    tensor: Tensor
    deliver: Callable[[Tensor | None, Tensor, torch.dtype], None]
    sums: dict = field(default_factory=dict)      # (node, output) -> per-example gradient so far, (B, *shape)
    delivered: bool = False
    followers: list = field(default_factory=list)   # shared tensors made of this one: they get its gradients
    precision: torch.dtype = torch.float64        # the lowest it reaches the frontier in (autocast, a cast)
    without_examples: bool = False   # shown to be made without them (``computed_once`` may build on it)

    def __post_init__(self):   # as the module returned it: an in-place change later gives it another node
        self.node, self.output_nr, self.version = self.tensor.grad_fn, self.tensor.output_nr, self.tensor._version

    def add(self, per_example: Tensor) -> None:
        """Each example's gradient of the tensor through one of its uses, (B, *o.shape)."""
        _add(self.sums, (self.node, self.output_nr), per_example)

    def note(self, dtype: torch.dtype) -> None:
        """It reaches the frontier in ``dtype``: the backward rounds its sum over the examples to that."""
        if _PRECISION.get(dtype, 2) > _PRECISION.get(self.precision, 2):
            self.precision = torch.bfloat16 if dtype in (torch.float16, torch.bfloat16) else dtype


class BroadcastGradients:
    """The shared tensors of one pass: ``add`` them in the forward, ``connect`` them to the graph after the model's
    forward (before the backward), ``close`` after the pass."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.pending: list[Broadcast] = []
        self.rows: dict = {}     # autograd node of a rule layer's output -> b: its B b rows are B examples' blocks
        self.inputs: dict = {}   # the same for a rule layer's input (the node of its output 0)
        self._hooked_saves: dict = {}   # node -> whether its saved tensors have saved-tensor hooks
        self._handles: list = []

    def add(self, tensor: Tensor, deliver: Callable[[Tensor | None, Tensor, torch.dtype], None],
            without_examples: bool = False) -> Broadcast:
        """A shared tensor: a module's output computed once for all the examples, or a parameter the forward read
        outside its module's calls (DeBERTa's relative embeddings), found in the graph by ``connect``."""
        broadcast = Broadcast(tensor, deliver, without_examples=without_examples)
        self.pending.append(broadcast)
        return broadcast

    def shared_nodes(self) -> set:
        """The autograd nodes of the shared outputs so far shown to be made without the examples, for
        ``computed_once``."""
        return {broadcast.node for broadcast in self.pending if broadcast.without_examples}

    def adopt(self, broadcast: Broadcast) -> None:
        """Takes a pending tensor out of those to connect: its per-example gradients will be ``Broadcast.add``ed
        by whoever consumes it (a rule layer whose parametrized weight it is); the hook that delivers them is set."""
        self.pending.remove(broadcast)
        self._handles.append(broadcast.tensor.register_hook(_deliverer(broadcast)))

    def connect(self, roots: list, parameters: dict[int, Callable[[], Broadcast]] | None = None
                ) -> list[tuple[Broadcast, str]]:
        """Hooks every pending shared tensor into the graph from the autograd nodes ``roots``; returns those that
        cannot be measured this way, with why. ``parameters``: id(parameter) -> what ``add``s it as a shared
        tensor given the number of operations that take it (``operations_taking``), called for those the graph
        takes (a parameter read outside its module's calls)."""
        if not self.pending:
            return []
        consumers = autograd_consumers(roots)
        if parameters:
            for node in list(consumers):
                if hasattr(node, "variable") and id(node.variable) in parameters:
                    share = parameters[id(node.variable)]
                    share(operations_taking(node, consumers)).node = node   # its gradient accumulator
        pending, self.pending = self.pending, []
        starts = {(broadcast.node, broadcast.output_nr): broadcast for broadcast in pending}
        failed = []
        for broadcast in pending:
            why = self._hook(broadcast, consumers, starts)
            if why is not None:
                failed.append((broadcast, why))
        return failed

    def _hook(self, broadcast: Broadcast, consumers: dict, starts: dict) -> str | None:
        """Finds where ``broadcast``'s tensor meets the examples and hooks the nodes on the way; where the walk
        reaches another shared tensor made of it (in ``starts``: DeBERTa's projections of its layer-normed relative
        embeddings), it follows that one's per-example gradients instead of walking on. Why not, or None."""
        start = broadcast.node
        if start is None:
            return "its output has no autograd node (or the model's outputs do not depend on it)"
        if broadcast.tensor._version != broadcast.version:
            return "it was changed in place after its module returned it"
        broadcast.note(broadcast.tensor.dtype)
        frontier, between, passed, follows = defaultdict(list), {}, defaultdict(set), False
        stack = [(start, None)]   # (node, the one output followed where it passes several tensors on, else None)
        while stack:
            node, followed = stack.pop()
            made = starts.get((node, 0))
            if made is not None and made is not broadcast and len(_input_shapes(node)) == 1:
                made.followers.append(broadcast)   # its deliverer adds its per-example gradient to ours
                follows = True
                continue
            for consumer, k, output_nr in consumers.get(node, []):
                if followed is not None and output_nr != followed:
                    continue
                name = type(consumer).__name__
                try:
                    shapes = [tuple(meta.shape) for meta in consumer._input_metadata]
                    carried = node._input_metadata[output_nr]
                except (AttributeError, IndexError, RuntimeError):   # a torch without the nodes' output shapes
                    return "the autograd graph does not give its operations' output shapes"
                shape = tuple(carried.shape)
                broadcast.note(carried.dtype)
                if name in _PASS_THROUGH and k < len(shapes) and shapes[k] == shape:   # still shared, as output k
                    if k not in passed[consumer]:
                        passed[consumer].add(k)
                        stack.append((consumer, k))
                    continue
                if len(shapes) != 1:
                    return f"an operation with several outputs ({name}) takes it"
                out = shapes[0]
                padded = (1,) * (len(out) - len(shape)) + shape
                if consumer not in self._hooked_saves:   # asked once per node: asking sets hooks
                    self._hooked_saves[consumer] = _saves_hooked(consumer)
                if self._hooked_saves[consumer]:
                    return (f"an operation ({name}) whose saved tensors have hooks takes it (activation "
                            "checkpointing lets a saved tensor be read only once)")
                spread = (name in _ELEMENTWISE and len(padded) == len(out) and padded[:1] == (1,)
                          and out[:1] != (1,) or _tiles_examples(consumer, name, out, self.batch_size))
                blocks = self._blocks(consumer, k, out, consumers) if spread else None
                if blocks is not None:   # broadcast over the examples (in B blocks of rows: Swin's windows)
                    frontier[consumer].append((k, (node, output_nr), shape, blocks))
                elif name in _OF_ONE or name in _ELEMENTWISE and (padded == out or name == "ExpandBackward0" or all(
                        hasattr(other, "variable") for j, (other, _) in enumerate(consumer.next_functions)
                        if j != k)) or name in _WITH_PARAMETERS and all(
                        _of_parameters(other) for j, (other, _) in enumerate(consumer.next_functions) if j != k):
                    # shared still: its own shape, an expand, or combined with parameters only
                    if consumer not in between:
                        between[consumer] = True
                        stack.append((consumer, None))
                else:
                    return f"an operation ({name}) takes it in a way the hooks do not follow"
        if not frontier and not follows and consumers.get(start):
            return "no operation combines it with the examples"
        for consumer, edges in frontier.items():
            self._handles.append(consumer.register_prehook(
                lambda grads, edges=edges, consumer=consumer: self._at_frontier(broadcast, consumer, edges, grads)))
        targets = set(between) | set(passed) | {start}
        for node in between:
            self._handles.append(node.register_prehook(
                lambda grads, node=node: self._between(broadcast, node, targets, grads)))
        for node, outputs in passed.items():
            self._handles.append(node.register_prehook(
                lambda grads, node=node, outputs=outputs: self._passed(broadcast, node, outputs)))
        self._handles.append(broadcast.tensor.register_hook(_deliverer(broadcast)))
        return None

    def _at_frontier(self, broadcast: Broadcast, consumer: Any, edges: list, grads: tuple) -> None:
        grad = grads[0]
        if grad is None:
            return
        with torch.no_grad():
            for k, key, shape, blocks in edges:
                if type(consumer).__name__ == "RepeatBackward0":   # B blocks of whole tiles
                    _add(broadcast.sums, key, _untiled(grad, consumer._saved_repeats, shape, self.batch_size))
                    continue
                unreduced = _unreduced(consumer, k, grad)
                if blocks > 1:
                    unreduced = unreduced.reshape(self.batch_size, blocks, *unreduced.shape[1:]).sum(1)
                _add(broadcast.sums, key, _per_example(unreduced, shape))

    def _blocks(self, consumer: Any, k: int, shape: tuple, consumers: dict) -> int | None:
        """b where the output of ``consumer`` (its input k the shared tensor, broadcast along dim 0) holds the B
        examples in dim 0, in blocks of b rows (b = 1, or Swin's windows): only if rows of the examples meet it
        row by row, as another input of ``consumer`` or of an elementwise operation that takes its output
        (``_paired``), whose rows trace back to a rule layer's output (``rows_of``). A dim 0 that only happens to
        have B's size (heads as many as the examples, a sequence-first tensor at T == B) has none. None
        otherwise."""
        if not shape or shape[0] % self.batch_size:
            return None
        blocks = shape[0] // self.batch_size
        if len(consumer.next_functions) == 1:   # an expand or a repeat: its rows must meet the examples' on every path
            return blocks if self._all_paired(consumer, shape[0], blocks, consumers, 0) else None
        return blocks if self._paired(consumer, k, shape[0], blocks, consumers, 0) else None

    def _all_paired(self, node: Any, rows: int, blocks: int, consumers: dict, depth: int) -> bool:
        """Whether every operation that takes the output of ``node`` keeps its rows (``_keeps_rows``) until the
        examples' rows meet them (``_meets``): an expanded or repeated shared tensor whose example 0's block is also
        read by every example (``e[:1]``), or whose blocks are averaged, is not broadcast over the examples."""
        users, out = consumers.get(node, []), output_shape(node, 0) or ()
        if not users or depth > 6:
            return False
        for consumer, j, nr in users:
            name, shape = type(consumer).__name__, output_shape(consumer, 0) or ()
            if nr != 0 or not shape:
                return False
            aligned = len(shape) == len(out) and shape[0] == rows   # dim 0 stays dim 0
            if aligned and self._meets(consumer, j, rows, blocks):
                continue
            if not _keeps_rows(consumer, name):
                return False
            if name in _REGROUP:
                if shape[0] % self.batch_size or not self._all_paired(
                        consumer, shape[0], shape[0] // self.batch_size, consumers, depth + 1):
                    return False
            elif not aligned or not self._all_paired(consumer, rows, blocks, consumers, depth + 1):
                return False
        return True

    def _meets(self, node: Any, k: int, rows: int, blocks: int) -> bool:
        """Whether another input of ``node`` (its input k the rows followed) holds the examples' rows in blocks of
        ``blocks``, traced back to a rule layer's output (``rows_of``), or ``node`` is a rule layer's input."""
        out = output_shape(node, 0)
        for j, (source, nr) in enumerate(node.next_functions):
            shape = None if j == k or source is None else output_shape(source, nr)
            if shape and len(shape) == len(out) and shape[0] == rows and self.rows_of(source, nr) == blocks:
                return True
        return self.inputs.get(node) == blocks

    def _paired(self, node: Any, k: int | None, rows: int, blocks: int, consumers: dict, depth: int) -> bool:
        """Whether the examples' rows meet the output of ``node`` row by row (same number of dims, ``rows`` rows):
        as another input of ``node`` whose rows trace back to a rule layer's output (``rows_of``), as the input of
        a rule layer that took its dim 0 for the examples (``inputs``), or so at an operation downstream that
        keeps the rows."""
        out = output_shape(node, 0)
        if not out or out[0] != rows:
            return False
        if self._meets(node, k, rows, blocks):
            return True
        if depth >= 6:
            return False
        for consumer, j, nr in consumers.get(node, []):
            name, shape = type(consumer).__name__, output_shape(consumer, 0) or ()
            if nr != 0 or not _keeps_rows(consumer, name):
                continue
            if name in _REGROUP:   # B blocks of whole examples regrouped (a matmul's reshape to (B heads, ...))
                if shape and shape[0] % self.batch_size == 0 and self._paired(
                        consumer, j, shape[0], shape[0] // self.batch_size, consumers, depth + 1):
                    return True
            elif len(shape) == len(out) and self._paired(consumer, j, rows, blocks, consumers, depth + 1):
                return True
        return False

    def rows_of(self, node: Any, output_nr: int) -> int | None:
        """b where output ``output_nr`` of ``node`` holds the B examples in dim 0 in blocks of b rows, traced back to
        a rule layer's output (``rows``); None where it cannot be traced."""
        found = self._examples_at(node, output_nr, {})
        return found[1] if found is not None and found[0] == 0 else None

    def examples_at(self, node: Any, output_nr: int) -> tuple[int, int] | None:
        """(d, b) where output ``output_nr`` of ``node`` holds the B examples in dim d in blocks of b rows, traced
        back to a rule layer's output; None where it cannot be traced."""
        return self._examples_at(node, output_nr, {})

    def _examples_at(self, node: Any, output_nr: int, seen: dict, depth: int = 0) -> tuple[int, int] | None:
        """(d, b) where output ``output_nr`` of ``node`` holds the B examples in dim d in blocks of b, traced back
        through operations whose effect on that dim is known (``carried_examples``: elementwise operations,
        reshapes, permutations, selections along other dims, batched products) to a rule layer's output; None
        where it cannot be traced, or where some input on the way holds the examples' rows reordered or selected
        along their dim (``_REORDERED``: an addition of reversed rows and the examples' rows holds no example in
        order). ``seen``: the results so far."""
        found = self._examples_or_reordered(node, output_nr, seen, depth)
        return None if found is _REORDERED else found

    def _examples_or_reordered(self, node: Any, output_nr: int, seen: dict, depth: int) -> Any:
        if node in self.rows:
            return (0, self.rows[node]) if output_nr == 0 else None
        if depth > 40 or hasattr(node, "variable"):
            return None
        if (node, output_nr) not in seen:
            seen[(node, output_nr)] = None   # until found (the graph has no cycles; this bounds the walk)
            seen[(node, output_nr)] = self._traced(node, output_nr, seen, depth)
        return seen[(node, output_nr)]

    def _traced(self, node: Any, output_nr: int, seen: dict, depth: int) -> Any:
        out, carried = output_shape(node, output_nr), None
        for k, (source, nr) in enumerate(node.next_functions):
            found = None if source is None else self._examples_or_reordered(source, nr, seen, depth + 1)
            if found is _REORDERED or found is not None and reorders_rows(node, found[0], output_shape(source, nr)):
                return _REORDERED
            if found is not None and carried is None:
                carried = carried_examples(node, k, output_nr, found, output_shape(source, nr), out, self.batch_size)
        return carried

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

    def _passed(self, broadcast: Broadcast, node: Any, outputs: set) -> None:
        """Before the real backward runs ``node``, an identity on several tensors (``_PASS_THROUGH``): each example's
        gradient of its output j is that of its input j."""
        for j in outputs:
            per_example = broadcast.sums.pop((node, j), None)
            if per_example is not None:
                _add(broadcast.sums, node.next_functions[j], per_example)

    def close(self) -> None:
        """Removes the hooks (the pending tensors stay, for ``GhostPass.finish`` to send to the vmap)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.rows, self.inputs, self._hooked_saves = [], {}, {}, {}


def computed_once(x: Tensor, shared: set) -> bool:
    """Whether a floating tensor was computed without the examples: a parameter (or a view of one), or made of
    one, or of a shared output whose autograd node is in ``shared``, by operations of that one tensor with no
    other input (views, slices, dropout's mask of its own shape, scalars): DeBERTa's layer-normed relative
    embeddings, sliced and given a batch dim of 1 before its query and key projections take them."""
    if not (x.requires_grad and x.is_floating_point()):
        return False
    if x.grad_fn is None:
        return isinstance(x, torch.nn.Parameter) or isinstance(x._base, torch.nn.Parameter)
    node, output_nr = x.grad_fn, x.output_nr
    for _ in range(32):
        if node in shared:
            return True
        if hasattr(node, "variable"):
            return isinstance(node.variable, torch.nn.Parameter)
        if type(node).__name__ in _PASS_THROUGH:   # into an FSDP2 unit: the tensor it was given
            node, output_nr = node.next_functions[output_nr]
            continue
        edges = [edge for edge in node.next_functions if edge[0] is not None]
        if len(edges) != 1 or not (type(node).__name__ in _OF_ONE_ONLY or _masked_alike(node, edges[0])):
            return False
        node, output_nr = edges[0]
    return False


def _masked_alike(node: Any, edge: tuple) -> bool:
    """A product of a tensor with a constant that leaves its shape as it was (dropout's mask): no dim of examples
    added to it. Read from the shapes alone: an output of the tensor's own shape means the constant broadcast to it
    (no more dims, each 1 or equal). The constant itself is not read: under non-reentrant activation checkpointing
    reading a saved tensor (``node._saved_other``) in the forward re-ran the whole block up to it (a LoRA Llama's
    RMSNorm weight times the hidden states, before each q/k/v and gate/up projection: its layers ran 4 times a
    micro-batch instead of 2), and the recomputed activations stayed alive until the backward."""
    if type(node).__name__ != "MulBackward0" or len(node.next_functions) != 2:
        return False
    k = 0 if node.next_functions[0] == edge else 1
    out, shape = output_shape(node, 0), tuple(_input_meta(node, k).shape)
    return out is not None and out == shape


def _of_parameters(node: Any, depth: int = 0) -> bool:
    """Whether an autograd input is a parameter, or made of one by operations of that one tensor (W.t())."""
    if node is None or depth > 8:
        return False   # a constant may hold the examples
    if hasattr(node, "variable"):
        return isinstance(node.variable, torch.nn.Parameter)
    return (type(node).__name__ in _OF_ONE_ONLY and len(node.next_functions) == 1
            and _of_parameters(node.next_functions[0][0], depth + 1))


def _tiles_examples(node: Any, name: str, out: tuple, batch: int) -> bool:
    """A repeat whose output's dim 0 holds B blocks of whole tiles (DeBERTa's relative projections repeated over
    the B examples' heads): a frontier, if the examples' rows meet it (``_blocks``)."""
    if name != "RepeatBackward0" or not out:
        return False
    repeats = node._saved_repeats
    return len(repeats) == len(out) and repeats[0] % batch == 0 and repeats[0] > 1


def _untiled(grad: Tensor, repeats: tuple, shape: tuple, batch: int) -> Tensor:
    """(B, *shape): each example's gradient of x (of ``shape``) from the gradient of x.repeat(repeats), whose dim 0
    holds B blocks of repeats[0] / B tiles: every tile's gradient summed, per example's block."""
    padded = (1,) * (len(repeats) - len(shape)) + tuple(shape)
    split = [batch, repeats[0] // batch, padded[0]]
    for r, n in zip(repeats[1:], padded[1:]):
        split += [r, n]
    summed = grad.reshape(split).sum([1] + [3 + 2 * i for i in range(len(repeats) - 1)])
    return summed.reshape(batch, *shape)


def _deliverer(broadcast: Broadcast) -> Callable[[Tensor], None]:
    """The tensor hook on the shared tensor: every consumer has run, so its per-example gradient is complete."""

    def deliver(total: Tensor) -> None:
        key = (broadcast.node, broadcast.output_nr)
        per_example = broadcast.sums.pop(key, None)
        if broadcast.delivered:
            per_example = None
        elif per_example is None:
            per_example = total.new_zeros(0)   # nothing came through the frontier: fails the sum check
        else:
            for follower in broadcast.followers:   # before the node runs: its pre-hooks carry it on
                _add(follower.sums, key, per_example)
                follower.note(broadcast.precision)
        broadcast.delivered = True
        broadcast.note(total.dtype)
        broadcast.deliver(per_example, total, broadcast.precision)

    return deliver


# operations whose output row r is computed from row r of their inputs (dim 0 kept, other dims free)
_ROWWISE = {"AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "MulBackward0", "MulBackward1",
            "DivBackward0", "DivBackward1", "NegBackward0", "CloneBackward0", "ToCopyBackward0", "BmmBackward0",
            "ExpandBackward0", "SoftmaxBackward0", "SafeSoftmaxBackward0", "LogSoftmaxBackward0", "TanhBackward0",
            "SigmoidBackward0", "ReluBackward0", "GeluBackward0", "SiluBackward0", "NativeDropoutBackward0",
            "NativeLayerNormBackward0", "PowBackward0", "RsqrtBackward0", "SqrtBackward0", "ExpBackward0"}
# fused scaled-dot-product attention kernels (CPU, CUDA): row-wise along the batch dim only
_ATTENTION = {"ScaledDotProductFlashAttentionForCpuBackward0", "ScaledDotProductFlashAttentionBackward0",
              "ScaledDotProductEfficientAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0"}
# reshapes: row-major order is kept, so B blocks of whole examples stay blocks when both sides have a multiple of B
_REGROUP = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"}


def _keeps_rows(node: Any, name: str) -> bool:
    """Whether ``node`` keeps (or regroups) dim 0's rows: see ``_ROWWISE`` and ``_REGROUP``; a transpose or
    permutation only where dim 0 stays in place."""
    if name in _ROWWISE or name in _REGROUP:
        return True
    if name == "TransposeBackward0":
        rank = len(node._input_metadata[0].shape)
        return signed_dim(node._saved_dim0) % rank != 0 and signed_dim(node._saved_dim1) % rank != 0
    if name == "PermuteBackward0":
        return signed_dim(node._saved_dims[0]) % len(node._saved_dims) == 0
    return False


def _input_shapes(node: Any) -> list:
    try:
        return list(node._input_metadata)
    except (AttributeError, RuntimeError):
        return []


def carried_examples(node: Any, k: int, output_nr: int, found: tuple[int, int], inp: tuple | None,
                    out: tuple | None, batch: int) -> tuple[int, int] | None:
    """Where ``node``'s output ``output_nr`` holds the examples, given that its input k holds them in dim d in
    blocks of b, ``found`` = (d, b), with input and output shapes ``inp`` and ``out``; None where not known."""
    if inp is None or out is None:
        return None
    d, b = found
    name = type(node).__name__
    if name in _ROWWISE or name in _ELEMENTWISE or name == "SliceBackward0" and signed_dim(node._saved_dim) % len(
            inp) != d:   # elementwise (broadcast right-aligned) or a slice along another dim
        dd = d + len(out) - len(inp)
        return (dd, b) if 0 <= dd < len(out) and out[dd] == inp[d] else None
    if name in _ALONG_ONE and signed_dim(node._saved_dim) % len(inp) != d:   # a top-k, sort, gather, concatenation
        return (d, b) if len(out) == len(inp) and out[d] == inp[d] else None   # or softmax along another dim
    if name in _ALONG_DIMS and node._saved_dim:   # a sum or mean along other dims (a router's weights normalised)
        dims = {signed_dim(x) % len(inp) for x in node._saved_dim}
        return None if d in dims else ((d if node._saved_keepdim else d - sum(x < d for x in dims)), b)
    if name in _REGROUP:
        if d == 0 and out and out[0] % batch == 0:   # row-major order: B blocks of whole examples stay blocks
            return 0, out[0] // batch
        return (d, b) if len(out) > d and out[:d + 1] == inp[:d + 1] else None
    if name == "PermuteBackward0":
        dims = [signed_dim(x) % len(inp) for x in node._saved_dims]
        return dims.index(d), b
    if name == "TransposeBackward0":
        d0, d1 = (signed_dim(x) % len(inp) for x in (node._saved_dim0, node._saved_dim1))
        return (d1 if d == d0 else d0 if d == d1 else d), b
    if name in ("SelectBackward0", "UnbindBackward0"):
        dim = signed_dim(node._saved_dim) % len(inp)
        return None if dim == d else (d - (dim < d), b)
    if name == "UnsqueezeBackward0":
        dim = signed_dim(node._saved_dim) % len(out)
        return d + (dim <= d), b
    if name in ("SplitBackward0", "SplitWithSizesBackward0"):
        return None if signed_dim(node._saved_dim) % len(inp) == d else (d, b)
    if name in _ATTENTION:   # fused attention: each batch row's output from that row's query, key and value
        return (0, b) if d == 0 and output_nr == 0 and out[0] == inp[0] else None
    if name == "RollBackward0":   # a roll along other dims (Swin's shifted windows); no dims: the flattened tensor
        dims = node._saved_dims
        return (d, b) if dims and all(signed_dim(x) % len(inp) != d for x in dims) else None
    if name == "ConstantPadNdBackward0":   # (left, right) per dim from the last: the examples' dim not padded
        pads = node._saved_pad
        padded = len(inp) - 1 - d   # the examples' dim counted from the last
        return (d, b) if 2 * padded + 1 >= len(pads) or pads[2 * padded] == pads[2 * padded + 1] == 0 else None
    if name in ("MmBackward0", "AddmmBackward0"):   # rows of the first matrix
        return (0, b) if d == 0 and k == (0 if name == "MmBackward0" else 1) else None
    return None


_REORDERED = object()   # ``_examples_at``'s mark for the examples' rows reordered or selected along their dim
# operations along one dim (``_saved_dim``) that reorder, select or mix the rows along it (a softmax over the
# examples' dim: row-wise along the others, ``_ROWWISE``)
_ALONG_ONE = {"CatBackward0", "GatherBackward0", "SortBackward0", "TopkBackward0", "IndexSelectBackward0",
              "SoftmaxBackward0", "SafeSoftmaxBackward0", "LogSoftmaxBackward0"}


# operations computing row r of their output from row r of their inputs alone, whatever their other dims (a softmax,
# sum or mean along dim 0 stops the search, as an operation along the examples): ``rows_selected`` looks past them
_ROW_BY_ROW = (_ROWWISE - {"BmmBackward0", "SoftmaxBackward0", "SafeSoftmaxBackward0", "LogSoftmaxBackward0"}) | {
    "LeakyReluBackward0", "EluBackward0", "HardtanhBackward0", "SoftplusBackward0", "LogBackward0", "AbsBackward0",
    "MishBackward0", "HardswishBackward0", "GeluBackward1", "ClampBackward1", "ClampMinBackward0",
    "ClampMaxBackward0", "WhereBackward0", "SinBackward0", "CosBackward0", "MaskedFillBackward0",
    "MaskedFillBackward1", "Log1PBackward0", "ReciprocalBackward0", "SgnBackward0", "SignBackward0",
    "PowBackward1", "RsubBackward0", "RsubBackward1", "MaximumBackward0", "MinimumBackward0", "AddcmulBackward0",
    "AddcdivBackward0", "LerpBackward0", "LerpBackward1"}
_ALONG_DIMS = {"SumBackward1", "MeanBackward1"}   # reductions along ``_saved_dim``: row by row where dim 0 is not one
_SEARCHED = 64   # nodes looked at before a layer, at most (a call costs about 1 us a node)


_PRODUCTS = {"MmBackward0": (0, 1), "AddmmBackward0": (1, 2)}   # (rows operand, other matrix) positions


def _rows_operand(node: Any, name: str) -> int | None:
    """Where ``node`` is a matrix product of rows with a matrix of parameters or constants alone (``x[idx] @ W``,
    ``F.linear(x[idx], W, b)``), row by row for its rows operand: that operand's position among its inputs. The
    matrix may come through transposes and casts of a parameter (autocast's), but through nothing else."""
    positions = _PRODUCTS.get(name)
    if positions is None:
        return None
    other = node.next_functions[positions[1]][0]
    while other is not None and type(other).__name__ in ("TBackward0", "ToCopyBackward0", "TransposeBackward0"):
        other = other.next_functions[0][0]
    bias = node.next_functions[0][0] if name == "AddmmBackward0" else None
    if (other is None or hasattr(other, "variable")) and (bias is None or hasattr(bias, "variable")):
        return positions[0]
    return None


def _row_by_row(node: Any, name: str) -> bool:
    if name in _ROW_BY_ROW:
        return True
    if name in _ALONG_DIMS:
        dims, rank = node._saved_dim, len(node._saved_self_sym_sizes)
        return bool(dims) and rank > 0 and all(signed_dim(d) % rank != 0 for d in dims)
    return False


def reorders_rows(node: Any, d: int, inp: tuple | None) -> bool:
    """Whether ``node`` reorders, selects or mixes rows along dim d of an input holding the examples there: a flip
    or roll along it, a sort, top-k, gather, index_select, concatenation or softmax along it, an index tensor in it
    other than arange (CLIP's ``hidden[arange(B), last]``)."""
    name = type(node).__name__
    rank = len(inp) if inp else 1
    if name in ("FlipBackward0", "RollBackward0"):
        dims = node._saved_dims
        return not dims or any(signed_dim(x) % rank == d for x in dims)
    if name in _ALONG_ONE:
        return signed_dim(node._saved_dim) % rank == d
    if name == "IndexBackward0":
        indices = node._saved_indices
        index = indices[d] if d < len(indices) else None
        return index is not None and not (inp and index.numel() == inp[d] and torch.equal(
            index.reshape(-1), torch.arange(inp[d], device=index.device)))
    return False


def _saves_hooked(node: Any) -> bool:
    """Whether a tensor ``node`` saved has saved-tensor hooks (non-reentrant activation checkpointing), which let it
    be read only once: the real backward's. Read from each saved tensor's ``unpack_hook``: setting hooks to find out
    (as before) took away torch's check that a saved tensor was not changed in place, so a user's in-place bug
    that torch reports became a silent wrong gradient."""
    for name in dir(node):
        if name.startswith("_raw_saved_"):
            saved = getattr(node, name)
            for tensor in saved if isinstance(saved, (list, tuple)) else [saved]:
                if getattr(tensor, "unpack_hook", None) is not None:
                    return True
    return False


def signed_dim(dim: int) -> int:
    """A dim autograd saved as unsigned (-1 reads 2^64 - 1 in Python)."""
    return dim - 2 ** 64 if dim >= 2 ** 63 else dim


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
    if name == "DivBackward0":
        other = node._saved_other
        return grad / other.conj() if k == 0 else -grad * (node._saved_self / (other * other)).conj()
    other = node._saved_other if k == 0 else node._saved_self   # MulBackward0
    return grad * other.conj()


def _per_example(unreduced: Tensor, shape: tuple) -> Tensor:
    """(B, *shape): each example's gradient of an input of ``shape`` broadcast to ``unreduced``'s shape (B, ...)."""
    padded = (1,) * (unreduced.dim() - len(shape)) + shape
    dims = [d for d in range(1, unreduced.dim()) if padded[d] == 1 and unreduced.shape[d] != 1]
    summed = unreduced.sum(dims, keepdim=True) if dims else unreduced
    return summed.reshape(unreduced.shape[0], *shape)


def _rearranged(node: Any, per_example: Tensor) -> Tensor | None:
    """The per-example gradients of a view, copy or permutation's input, taken from its output's directly (no
    vmap, whose cost per call is that of many such operations); None for other operations."""
    name = type(node).__name__
    if node.next_functions[0][0] is None:
        return None
    meta = _input_meta(node, 0)
    if name in ORDER_KEEPING:   # the same elements in the same order
        return per_example.reshape(per_example.shape[0], *meta.shape).to(device=meta.device, dtype=meta.dtype)
    if name == "PermuteBackward0":
        dims = [signed_dim(d) % len(node._saved_dims) for d in node._saved_dims]
        inverse = sorted(range(len(dims)), key=dims.__getitem__)
        return per_example.permute(0, *(d + 1 for d in inverse))
    if name == "TransposeBackward0":
        rank = per_example.dim() - 1
        return per_example.transpose(signed_dim(node._saved_dim0) % rank + 1, signed_dim(node._saved_dim1) % rank + 1)
    return None


def _carried(node: Any, per_example: Tensor, positions: list[int]) -> list[Tensor]:
    """The gradients ``node`` gives its inputs at ``positions`` for each example's output gradient, (B, *output
    shape): directly for views, copies, permutations and elementwise operations, else by the node itself."""
    name = type(node).__name__
    if len(node.next_functions) == 1:
        rearranged = _rearranged(node, per_example)
        if rearranged is not None:
            return [rearranged]
    elif (name, positions) in (("AddmmBackward0", [1]), ("MmBackward0", [0])):   # x of x W^T: g W per example
        product = per_example @ node._saved_mat2.mT.conj()
        return [product if name == "MmBackward0" or node._saved_alpha == 1 else product * node._saved_alpha]
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
        with quiet_torch_notes():
            return list(vmap(one)(per_example))
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        rows = [one(grad) for grad in per_example]
        return [torch.stack([row[j] for row in rows]) for j in range(len(positions))]


def rows_selected(node: Any, batch: int, clean: set | None = None) -> bool:
    """Whether the rows of x (``node``: its autograd node) were picked from an activation's rows by an index
    (mixture-of-experts routing: ``expert(flat[routed])``), or reversed, rolled, sorted, gathered, joined or mixed
    along dim 0 (``reorders_rows``), seen in x's autograd graph on every path back through views, copies and
    operations row by row (``_row_by_row``, up to ``_SEARCHED`` nodes): an index along dim 0 of a tensor that is not
    indexed by arange(B) over its B rows. A table indexed by the examples' ids (a leaf), CLIP's
    ``hidden[arange(B), last]`` and ``hidden[arange(B)[:, None], positions]`` are examples. ``clean``: the nodes
    earlier searches of the pass found nothing behind (a residual stream's), skipped, and added to."""
    clean = set() if clean is None else clean
    frontier, stack, seen = [], [node], set()
    while stack:   # behind views, activations, norms, scales, biases, dropout: 0.2 to 0.9 off, silently, before
        node = stack.pop()
        if node is None or hasattr(node, "variable") or node in seen or node in clean:
            continue
        seen.add(node)
        name = type(node).__name__
        if len(seen) > _SEARCHED:   # not looked at: taken for reordered rows, which the whole-model vmap measures
            return True
        if name in ORDER_KEEPING or _row_by_row(node, name):
            stack.extend(source for source, _ in node.next_functions)
        elif (rows := _rows_operand(node, name)) is not None:   # an index behind x[idx] @ W
            stack.append(node.next_functions[rows][0])
        else:
            frontier.append(node)
    if any(_picked(node, batch) for node in frontier):
        return True
    clean.update(seen)
    return False


def row_by_row_call(outputs: list[Tensor], inputs: list[Any]) -> bool:
    """Whether a call computed each row of its outputs from the same row of its inputs alone: every path of the
    autograd graph from the outputs back to the ``inputs`` (or to parameters) goes through views, copies and
    operations row by row (``_row_by_row``) on as many rows (other operands broadcast over them), at most
    ``_SEARCHED`` nodes: a norm written out (T5's and SwitchTransformers' LayerNorm). A call that reorders or mixes
    its rows, or whose graph holds anything else, is not."""
    stops = {t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None}
    starts = [(t.grad_fn, t.shape[0]) for t in outputs if t.grad_fn is not None and t.dim()]
    if not starts:
        return False
    stack, seen = list(starts), set()
    while stack:
        node, rows = stack.pop()
        if node in stops or (node, rows) in seen:
            continue
        seen.add((node, rows))
        sources = _row_sources(node, rows, _first_dim) if len(seen) <= _SEARCHED else None
        if sources is None:
            return False
        stack.extend((source, rows) for source in sources)
    return True


def picked_owners(node: Any, rows: int, batch: int, examples_at: Callable[[Any, int], tuple[int, int] | None],
                  owned: dict) -> Tensor | None:
    """(rows,) the example each row of a layer's input belongs to (``node``: the input's autograd node), where its
    rows were picked by an index from a tensor holding the B examples in blocks of k rows (``examples_at``: (dim, k)
    of a node's output, row j of it example j // k's), or are outputs of layers on such rows (``owned``: output node
    -> owners), carried to the input by views, copies and operations row by row on as many rows (other operands
    broadcast over them): an expert of a mixture of experts run on the tokens routed to it (litgpt's
    ``expert(x[token_idx])``, transformers 4's Mixtral and SwitchTransformers' ``expert(hidden[None, top_x])``).
    None where a path ends anywhere else, or the owners found differ."""
    found, stack, seen = None, [node], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > _SEARCHED:
            return None
        owners = owned.get(node)
        if owners is None:
            sources = _row_sources(node, rows, _leading_rows)
            if sources is not None:
                stack.extend(sources)
                continue
            owners = _index_owners(node, batch, examples_at)   # (None for an operation row by row that failed)
            if owners is None:
                return None
        if owners.shape[0] != rows or found is not None and found is not owners and not torch.equal(found, owners):
            return None
        found = owners
    return found


def _row_sources(node: Any, rows: int, rows_of: Callable[[tuple], int | None]) -> list | None:
    """Where ``node`` computes row r of its output from row r of its inputs alone (views and copies, ``_row_by_row``
    operations, products with parameters: ``_rows_operand``), its inputs that hold its ``rows`` rows (``rows_of``
    their shape), the operands broadcast over them (one row, or none) skipped; None where it is not such an
    operation, or an input has other rows (regrouped by a view, or an operand of other rows)."""
    name = type(node).__name__
    elementwise, product = _row_by_row(node, name), _rows_operand(node, name)
    if not (elementwise or name in ORDER_KEEPING or product is not None):
        return None
    sources = []
    for source, output_nr in [node.next_functions[product]] if product is not None else node.next_functions:
        if source is None or hasattr(source, "variable"):
            continue
        shape = output_shape(source, output_nr)
        if shape is not None and rows_of(shape) == rows:
            sources.append(source)
        elif not (elementwise and shape is not None and rows_of(shape) in (None, 1)):
            return None
    return sources


def _first_dim(shape: tuple) -> int | None:
    """A tensor's rows: its dim 0 (None for a scalar)."""
    return shape[0] if shape else None


def _leading_rows(shape: tuple) -> int:
    """The rows of a tensor of ``shape``: its first dim other than 1 before the last (1 if none), so that the
    rows (1, N, d) of ``hidden[None, top_x]`` are those (N, d) of its reshape."""
    return next((size for size in shape[:-1] if size != 1), 1)


def _index_owners(node: Any, batch: int, examples_at: Callable[[Any, int], tuple[int, int] | None]) -> Tensor | None:
    """(N,) the example of each row ``node`` picks, where it is an index (or index_select) along a dim p, every dim
    before p of size 1, of a tensor holding the B examples in that dim in blocks of k: index // k (a boolean mask
    taken as the indices it selects). None otherwise."""
    name = type(node).__name__
    if name not in ("IndexBackward0", "IndexSelectBackward0"):
        return None
    sizes = node._saved_self_sym_sizes
    indices = (list(node._saved_indices) if name == "IndexBackward0" else
               [None] * (signed_dim(node._saved_dim) % len(sizes)) + [node._saved_index])
    position = next((p for p, t in enumerate(indices) if t is not None), None)
    if position is None or position >= len(sizes) or any(sizes[p] != 1 for p in range(position)):
        return None
    index, others = indices[position], [t for t in indices[position + 1:] if t is not None]
    if name == "IndexSelectBackward0" and index.dim() == 0:   # one row, kept as a row (AdaptiveLogSoftmaxWithLoss's
        index = index.reshape(1)   # index_select(0, mask.nonzero().squeeze()) where one target falls in a cluster)
    if index.dtype == torch.bool and index.dim() == 1 and not others:
        index = index.nonzero()[:, 0]
    if index.dtype == torch.bool or index.is_floating_point() or index.dim() != 1 or any(   # picks within its rows
            t.dim() != 1 or t.shape != index.shape for t in others) or any(t is None for t in indices[
                position + 1:position + 1 + len(others)]):
        return None
    source, output_nr = node.next_functions[0]
    if source is None or hasattr(source, "variable"):   # rows of a parameter table, looked up by ids
        return None
    found = examples_at(source, output_nr)
    if found is None or found[0] != position or sizes[position] != batch * found[1]:
        return None
    return torch.remainder(index, sizes[position]) // found[1]


def _picked(node: Any, batch: int) -> bool:
    """Whether ``node``, the first operation before a layer's input that is not row by row, picks or reorders the
    rows along dim 0 (``rows_selected``)."""
    name = type(node).__name__
    if name not in ("IndexBackward0", "IndexSelectBackward0") and reorders_rows(
            node, 0, tuple(node._input_metadata[0].shape)):   # rows reversed, rolled, sorted, gathered, joined
        return True
    if name == "IndexBackward0":
        sizes, first = node._saved_self_sym_sizes, node._saved_indices[0]
    elif name == "IndexSelectBackward0" and node._saved_dim == 0:
        sizes, first = node._saved_self_sym_sizes, node._saved_index
    else:
        return False
    source = node.next_functions[0][0]
    if source is None or hasattr(source, "variable"):   # rows of a parameter table, looked up by the examples' ids
        return False
    return not (sizes[0] == batch and (first is None or (   # arange(B), or arange(B)[:, None] broadcast over k
        first.dim() > 0 and first.shape[0] == batch and first.numel() == batch   # (a 0-d index picks one row)
        and torch.equal(first.reshape(-1), torch.arange(batch, device=first.device)))))
