"""A rule-measured weight's uses outside its layers' calls, captured from the autograd graph of the pass.

A tied output head read outside any module call (torchtune's ``TiedLinear``: ``F.linear(h, tok_embeddings.weight)``;
x-transformers: ``h @ token_emb.weight.t()``) takes the embedding's weight W in a matrix product no hook sees. Its
node in the graph (``MmBackward0``, ``AddmmBackward0`` with a bias, after ``W.t()``) saves the product's input X,
the examples' rows, and a pre-hook on it receives the output gradient G. The use's per-example gradient is a
Linear's, G_i = sum over example i's rows r of g_r x_r^T, kept as factors (``LinearFactors``) and added to the
layer's own calls' by ``GhostPass.add_shared``, whose norm of the sum (``sqnorm_of_sum``) takes the cross terms
as for a weight tied through two modules. X's rows are taken as the examples' only where they are B rows, or the
B k rows of a (B, ..., d) tensor reshaped with no other dim of size B, computed from a rule layer's outputs on the
examples through no operation that moves rows along dim 0 (a flip, an index, a product over the examples); other
uses are not captured, and the weight goes to the whole-model vmap as before. A product's gradient is taken once:
a second (``autograd.grad`` and then ``backward``) is refused as the layers' hooks refuse theirs.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor

from noisescale._graph import WEIGHT_CAST
from noisescale.per_example.broadcast import reorders_rows, rows_selected
from noisescale.per_example.factors import LinearFactors, full_precision

__all__ = ["linear_uses", "capture_linear_uses"]

_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
_PRODUCTS = {"MmBackward0": (1, "_saved_self"), "AddmmBackward0": (2, "_saved_mat1")}   # W^T's input, X's name


def _users(node: Any, consumers: dict) -> list[tuple[Any, int]]:
    """(node, input position) of the operations taking the output of ``node``, through autocast's casts."""
    users = []
    for user, position, _ in consumers.get(node, ()):
        users.extend(_users(user, consumers) if type(user).__name__ == WEIGHT_CAST else [(user, position)])
    return users


def _hooked(node: Any, consumers: dict, hooked: set) -> bool:
    """Whether ``node`` or one of the two nodes above it (a Linear's ``W.t()`` and product, a view of it) is the
    output node of a hooked layer call (``hooked``)."""
    for _ in range(3):
        if node in hooked:
            return True
        above = consumers.get(node, ())
        if len(above) != 1:
            return False
        node = above[0][0]
    return node in hooked


def _computed_from_examples(node: Any, examples: dict, batch: int) -> bool:
    """Whether the graph from ``node`` back reaches the output of a rule layer's call on the examples' rows
    (``examples``: ``BroadcastGradients.rows``), so that a tensor of B rows holds the examples, not a table of B
    positions computed from parameters alone, and no operation on a path from those outputs to ``node`` reorders
    or mixes rows along dim 0 (``_mixes_rows``: a flip, roll, index, concatenation behind an elementwise op, a
    product with the examples' rows contracted, as a permutation matrix would), which would pair row r with another
    example than r; the walk stops at the first such outputs."""
    reaches, stack = {}, [(node, False)]   # node -> whether it reaches the examples' outputs (post-order)
    while stack:
        current, expanded = stack.pop()
        if current is None or (current in reaches and not expanded):
            continue
        if current in examples:
            reaches[current] = True
            continue
        if not expanded:
            reaches[current] = False   # (on the stack: a cycle cannot occur in autograd graphs)
            stack.append((current, True))
            stack.extend((next_node, False) for next_node, _ in current.next_functions
                         if next_node is not None and next_node not in reaches)
            continue
        inputs = [reaches.get(next_node, False) for next_node, _ in current.next_functions]
        if any(inputs):
            if _mixes_rows(current, inputs, batch):
                return False
            reaches[current] = True
    return reaches.get(node, False)


def _mixes_rows(node: Any, inputs: list[bool], batch: int) -> bool:
    """Whether ``node``, some of whose inputs (``inputs``: which) come from the examples' rows, may move them to
    other rows along dim 0: a reorder along dim 0 (``reorders_rows``), or a matrix product whose contracted operand
    holds them (mm's and addmm's mat2; bmm's mat2 unless its batch dim holds the examples in blocks, as attention's
    B heads do: an einsum over the examples runs as a bmm of batch 1)."""
    name = type(node).__name__
    if name == "MmBackward0":
        return inputs[1]
    if name == "AddmmBackward0":
        return inputs[2]
    try:
        shape = tuple(node._input_metadata[0].shape)
    except (AttributeError, IndexError, RuntimeError):
        shape = None
    if name == "BmmBackward0":
        return inputs[1] and (shape is None or shape[0] % batch != 0)
    return reorders_rows(node, 0, shape)


def _example_rows(node: Any, x: Tensor, batch: int, examples: dict) -> int | None:
    """k, where the product's input ``x`` (``node``: its autograd node) holds the B examples' rows in B blocks of k
    (example-major), else None: computed from the examples (``_computed_from_examples``), B rows or B k rows
    reshaped from a (B, ..., d) tensor, through casts, with no other dim of size B, and none of them picked or
    reordered along dim 0 (``rows_selected``)."""
    rows = x.shape[0]
    if node is None or rows_selected(node, batch) or not _computed_from_examples(node, examples, batch):
        return None
    if rows == batch:
        return 1
    if rows % batch:
        return None
    producer = node
    while producer is not None and type(producer).__name__ == WEIGHT_CAST:
        producer = producer.next_functions[0][0]
    if producer is None or type(producer).__name__ not in _RESHAPES:
        return None
    sizes = tuple(producer._saved_self_sym_sizes)
    if len(sizes) < 3 or sizes[0] != batch or batch in sizes[1:-1] or math.prod(sizes[:-1]) != rows:
        return None
    return rows // batch


def linear_uses(accumulator: Any, consumers: dict, hooked: set, examples: dict,
                batch: int) -> list[tuple[Any, Tensor]] | None:
    """(product node, its input as (B, k, d)) for each use of the leaf of gradient accumulator ``accumulator`` in
    the graph (``consumers``: ``autograd_consumers``) that no hooked layer call made (``hooked``: their output
    nodes); None if one of them is not a product X W^T of the examples' rows (``examples``: ``_example_rows``)."""
    found = []
    for user, _ in _users(accumulator, consumers):
        if _hooked(user, consumers, hooked):
            continue
        above = consumers.get(user, ())
        if type(user).__name__ != "TBackward0" or len(above) != 1:
            return None
        product, position, _ = above[0]
        while type(product).__name__ == WEIGHT_CAST:   # autocast's cast of W^T (``h @ W.t()``: matmul casts its operand)
            above = consumers.get(product, ())
            if len(above) != 1:
                return None
            product, position, _ = above[0]
        wanted = _PRODUCTS.get(type(product).__name__)
        if wanted is None or position != wanted[0]:
            return None
        try:
            x = getattr(product, wanted[1])
        except RuntimeError:   # freed, or not saved
            return None
        producer = product.next_functions[position - 1][0]
        k = None if x is None or x.dim() != 2 else _example_rows(producer, x, batch, examples)
        if k is None:
            return None
        found.append((product, x.reshape(batch, k, x.shape[1])))
    return found


def capture_linear_uses(uses: list[tuple[Any, Tensor]], add: Any, handles: list, repeated: Any) -> None:
    """Hooks each product node of ``uses`` (``linear_uses``) to hand its use's per-example gradient, as factors,
    to ``add`` in the backward, once: a second gradient through it (autograd.grad and then backward, two
    backwards) calls ``repeated`` instead; the hooks' handles go to ``handles``."""
    for product, x in uses:
        handles.append(product.register_prehook(partial(_on_product_grad, add, repeated, [x])))


def _on_product_grad(add: Any, repeated: Any, held: list, grad_outputs: tuple[Tensor, ...]) -> None:
    g = grad_outputs[0]
    if g is None:
        return
    if not held:
        repeated()
        return
    x = held.pop()
    with torch.no_grad(), full_precision():
        add(LinearFactors([(x.detach(), g.reshape(*x.shape[:2], g.shape[-1]))]))
