"""Walking an autograd graph backwards, from given nodes towards the leaves, and what some of its nodes do."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# autograd nodes of operations whose output holds their input's elements in the same order (views, copies):
# a gradient passes back through them by a reshape (and a cast)
ORDER_KEEPING = frozenset({"AliasBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                           "CloneBackward0", "ToCopyBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
                           "SqueezeBackward1", "SqueezeBackward2"})


def output_shape(node: Any, output_nr: int) -> tuple | None:
    """The shape of output ``output_nr`` of autograd node ``node`` (its gradient's), or None where unknown."""
    try:
        return tuple(node._input_metadata[output_nr].shape)
    except (AttributeError, IndexError, RuntimeError):
        return None


def autograd_nodes(starts: Iterable[Any], stops: Iterable[Any] = (),
                   stop_at: Callable[[Any], bool] | None = None) -> Iterator[Any]:
    """Every node of the autograd graph reachable from the nodes ``starts`` (a tensor's ``grad_fn``; None is
    skipped), each once, not walked into or past the nodes ``stops`` nor those ``stop_at`` says; an AccumulateGrad
    node holds its leaf in ``.variable``."""
    stops, seen, stack = set(stops), set(), list(starts)
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops or stop_at is not None and stop_at(node):
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)


def autograd_consumers(roots: Iterable[Any], stops: Iterable[Any] = (),
                       budget: int | None = None) -> dict[Any, list[tuple[Any, int, int]]] | None:
    """node -> [(node taking its output, input position, output position)] over the graph from ``roots``, not
    into the nodes ``stops`` (a call's inputs): one walk that reads each node's inputs once (building that tuple is
    most of a walk's cost). None where it would take more than ``budget`` nodes."""
    roots = [root for root in roots if root is not None]
    stops = set(stops)
    consumers, seen, stack = defaultdict(list), set(roots), list(roots)
    while stack:
        node = stack.pop()
        if budget is not None and len(seen) > budget:
            return None
        for k, (next_node, output_nr) in enumerate(node.next_functions):
            if next_node is not None and next_node not in stops:
                consumers[next_node].append((node, k, output_nr))
                if next_node not in seen:
                    seen.add(next_node)
                    stack.append(next_node)
    return consumers


_LEAF = "AccumulateGrad"
WEIGHT_CAST = "ToCopyBackward0"   # autocast's cached cast of a weight, taken by each of the weight's uses


def leaf_uses(roots: Iterable[Any], visited: set | None = None) -> dict[Any, int]:
    """Gradient accumulator node -> how many operations of the graph from ``roots`` take its leaf, counted as
    ``operations_taking`` counts them, in one walk that counts each node's takers without listing them (about
    half the cost of ``autograd_consumers``, which a caller needs only to see which operations they are).
    ``visited``, where given, receives every node of the graph."""
    roots = [root for root in roots if root is not None]
    takers, seen, stack = defaultdict(int), set() if visited is None else visited, list(roots)
    seen.update(roots)
    while stack:
        for next_node, _ in stack.pop().next_functions:
            if next_node is not None:
                takers[next_node] += 1
                if next_node not in seen:
                    seen.add(next_node)
                    stack.append(next_node)
    uses: dict[Any, int] = {}
    for node, count in takers.items():
        kind = type(node).__name__
        if kind == _LEAF:
            uses[node] = uses.get(node, 0) + count
        elif kind == WEIGHT_CAST:   # a cast of a leaf (autocast's cached copy of a weight) counts as its own takers
            source = node.next_functions[0][0]
            if source is not None and type(source).__name__ == _LEAF:
                uses[source] = uses.get(source, 0) + count - 1
    return uses


def operations_taking(node: Any, consumers: dict[Any, list[tuple[Any, int, int]]]) -> int:
    """How many operations of the graph (``autograd_consumers``) take the output of ``node`` (a leaf's gradient
    accumulator): one per use, a copy of it (autocast's cached cast of a weight to bfloat16) counting once for each
    operation that takes the copy."""
    return sum(len(consumers.get(user, ())) if type(user).__name__ == WEIGHT_CAST else 1
               for user, _, _ in consumers.get(node, ()))
