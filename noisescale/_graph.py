"""Walking an autograd graph backwards, from given nodes towards the leaves."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def autograd_nodes(starts: Iterable[Any], stops: Iterable[Any] = ()) -> Iterator[Any]:
    """Every node of the autograd graph reachable from the nodes ``starts`` (a tensor's ``grad_fn``; None is
    skipped), each once, not walked into or past the nodes ``stops``; an AccumulateGrad node holds its leaf in
    ``.variable``."""
    stops, seen, stack = set(stops), set(), list(starts)
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)
