"""Per-example gradients of a weight matrix kept as factors, and the squared norm of a sum of them.

A weight W (rows x cols) used at positions t of example i has the per-example gradient G_i = sum_t u_t v_t^T:

- ``LinearFactors``: a Linear, u_t its output gradient and v_t its input (in blocks of rows, as for the fused
  q/k/v projection of attention);
- ``IndexFactors``: an embedding lookup, u_t the one-hot row index_t and v_t the output gradient.

Its squared norm needs no (B, rows, cols) gradients (the Gram form of ghost clipping, Li et al. 2022,
arXiv:2110.05679):

    |G_i|^2 = sum_{t,s} (u_t . u_s)(v_t . v_s)

and neither does that of a weight used by several calls c (tied input and output embeddings of a language model,
a module applied twice), since |sum_c G_{i,c}|^2 = sum_{c,c'} <G_{i,c}, G_{i,c'}> with

    <sum_t u_t v_t^T, sum_s u'_s v'_s^T> = sum_{t,s} (u_t . u'_s)(v_t . v'_s)                 (B T T' (rows + cols))

against B T rows cols for materialising each call's gradients. For a tied vocabulary embedding the materialised
(B, vocabulary, d) gradients are often larger than the whole model; ``sqnorm_of_sum`` takes whichever form costs
fewer multiply-adds.
"""

from __future__ import annotations

import contextlib
from typing import Union

import torch
from torch import Tensor

__all__ = ["LinearFactors", "IndexFactors", "gram_preferred", "per_example_sqnorm", "position_weight_sqnorms",
           "sqnorm_of_sum"]


def compute_dtype(t: Tensor) -> Tensor:
    """Half-precision tensors are upcast so that squared sums neither overflow nor lose their small terms."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def common_dtype(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """a and b in one dtype, ``compute_dtype``'s of the wider: a layer whose output is float32 in a float64 model (a
    vocabulary head accumulating in float32) has inputs and output gradients of two dtypes."""
    a, b = compute_dtype(a), compute_dtype(b)
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def full_precision() -> contextlib.AbstractContextManager:
    """Autocast switched off where it is on (a caller's backward inside ``torch.autocast`` runs the hooks under it,
    and CPU autocast computes ``bmm``, ``matmul`` and ``vecdot`` in bfloat16): the norms' products and sums in the
    dtypes ``compute_dtype`` gives them. What the model computes is not touched."""
    if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
        return _NO_CHANGE   # (every rule call asks: about 0.5 us)
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


_NO_CHANGE = contextlib.nullcontext()


def per_example_sqnorm(t: Tensor) -> Tensor:
    """(B,) squared Euclidean norm of each t[i], in one pass without a squared copy."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square()


def prefer_factored(factored_cost: int, materialised_cost: int, factored_memory: int, materialised_memory: int,
                    held: int) -> bool:
    """Whether to take a norm from factors (Gram matrices) rather than from materialised per-example gradients:
    the form with fewer multiply-adds, unless the materialised gradients would take more than a quarter of the
    memory the factors already hold (``held``) and more than the Gram matrices (a vocabulary-sized output layer at
    long sequences: (B, V, d) against (B, T, T))."""
    if factored_cost < materialised_cost:
        return True
    return materialised_memory > held / 4 and factored_memory < materialised_memory


def gram_preferred(positions: int, d_in: int, d_out: int) -> bool:
    """Whether ``position_weight_sqnorms`` takes the Gram form for a weight (d_out, d_in) used at ``positions``."""
    return prefer_factored(positions * (d_in + d_out), d_in * d_out, 2 * positions * positions, d_in * d_out,
                           positions * (d_in + d_out))


def position_weight_sqnorms(a: Tensor, g: Tensor) -> Tensor:
    """|sum_t g_t a_t^T|_F^2 per example for a (B, T, d_in), g (B, T, d_out): the Gram form
    sum_{t,s} (a_t . a_s)(g_t . g_s) costs B T^2 (d_in + d_out), the materialised (d_out, d_in) gradients
    B T d_in d_out (Li et al. 2022, "ghost clipping"; Bu et al. 2023, "mixed ghost clipping"); the cheaper is
    taken unless its memory is out of proportion (``prefer_factored``)."""
    positions, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if positions == 1:
        return per_example_sqnorm(a) * per_example_sqnorm(g)
    if gram_preferred(positions, d_in, d_out):
        gram_a, gram_g = torch.bmm(a, a.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2))
        return torch.linalg.vecdot(gram_a.flatten(1), gram_g.flatten(1))
    return per_example_sqnorm(torch.bmm(g.transpose(1, 2), a))


class LinearFactors:
    """The per-example gradient of a weight used as a Linear at every position, kept as its factors: blocks of
    rows (a, g), a (B, T, d_in), g (B, T, d_out_block), gradient_i = cat over blocks of sum_t g_t a_t^T. Its norm
    is taken in ghost form without the (B, d_out, d_in) gradients, which are built only when needed."""

    def __init__(self, blocks: list[tuple[Tensor, Tensor]]):
        self.blocks = [common_dtype(a, g) for a, g in blocks]

    def sqnorms(self) -> Tensor:
        return sum(position_weight_sqnorms(a, g) for a, g in self.blocks)

    def grads(self) -> Tensor:
        return torch.cat([torch.bmm(g.transpose(1, 2), a) for a, g in self.blocks], 1)

    def _terms(self) -> list[tuple[int, Tensor, Tensor]]:
        """(first row, u (B, T, rows of the block), v (B, T, cols)) per block."""
        terms, offset = [], 0
        for a, g in self.blocks:
            terms.append((offset, g, a))
            offset += g.shape[2]
        return terms

    def _materialising_cost(self) -> int:
        return sum(a.shape[0] * a.shape[1] * a.shape[2] * g.shape[2] for a, g in self.blocks)

    def _numel(self) -> int:
        return sum(g.shape[2] for _, g in self.blocks) * self.blocks[0][0].shape[2]

    def _held(self) -> int:
        return sum(a.numel() + g.numel() for a, g in self.blocks)


class IndexFactors:
    """The per-example gradient of an embedding table (rows x d) looked up at ``indices`` (B, T): row index_t
    receives v_t (B, T, d), zero where the lookup gets no gradient (``padding_idx``); rows hit several times add up.
    Its squared norm is sum_{t,s} [index_t == index_s] (v_t . v_s) (cost T^2 d per example) or that of the
    materialised (B, rows, d) scatter, whichever is cheaper."""

    def __init__(self, indices: Tensor, v: Tensor, rows: int):
        self.indices, self.v, self.rows = indices, compute_dtype(v), rows

    def sqnorms(self) -> Tensor:
        positions = self.indices.shape[1]
        if positions == 1:
            return per_example_sqnorm(self.v)
        if positions * positions > self.rows * self.v.shape[-1]:
            return per_example_sqnorm(self.grads())
        return _inner(self, self)

    def grads(self) -> Tensor:
        grads = self.v.new_zeros(self.indices.shape[0], self.rows, self.v.shape[-1])
        return grads.scatter_add_(1, self.indices.unsqueeze(-1).expand(-1, -1, self.v.shape[-1]), self.v)

    def _terms(self) -> list[tuple[int, Tensor, Tensor]]:
        return [(0, self.indices, self.v)]

    def _materialising_cost(self) -> int:
        return self.v.numel()

    def _numel(self) -> int:
        return self.rows * self.v.shape[2]

    def _held(self) -> int:
        return self.v.numel() + self.indices.numel()


Factors = Union[LinearFactors, IndexFactors]


def _row_gram(first: tuple[int, Tensor, Tensor], second: tuple[int, Tensor, Tensor]) -> Tensor | None:
    """(B, T, T') of u_t . u'_s for two terms (first row, u, v), u dense rows or (B, T) row indices; None when
    the terms share no row."""
    (start, u, v), (other_start, w, _) = first, second
    if u.dim() == 2 and w.dim() == 2:  # index . index: the same row
        return (u.unsqueeze(2) == w.unsqueeze(1)).to(v.dtype)
    if u.dim() == 2:  # index . dense block of rows [other_start, other_start + n)
        local = u - other_start
        inside = ((local >= 0) & (local < w.shape[2])).to(w.dtype)                          # (B, T)
        picked = w.gather(2, local.clamp(0, w.shape[2] - 1).unsqueeze(1).expand(-1, w.shape[1], -1))  # (B, T', T)
        return picked.transpose(1, 2) * inside.unsqueeze(2)
    if w.dim() == 2:
        gram = _row_gram(second, first)
        return None if gram is None else gram.transpose(1, 2)
    low, high = max(start, other_start), min(start + u.shape[2], other_start + w.shape[2])
    if low >= high:
        return None
    return torch.bmm(u[..., low - start:high - start], w[..., low - other_start:high - other_start].transpose(1, 2))


def _inner(first: Factors, second: Factors) -> Tensor:
    """(B,) <G_i, G'_i> of two factored per-example gradients of the same weight."""
    total = None
    for term in first._terms():
        for other in second._terms():
            gram = _row_gram(term, other)
            if gram is not None:
                value = torch.linalg.vecdot(gram.flatten(1), torch.bmm(term[2], other[2].transpose(1, 2)).flatten(1))
                total = value if total is None else total + value
    if total is None:  # no shared row at all
        return first._terms()[0][2].new_zeros(first._terms()[0][2].shape[0])
    return total


def _pair_cost(first: Factors, second: Factors) -> int:
    """Multiply-adds of ``_inner``: B T T' (cols + rows), rows counting 1 where a side is a row index."""
    return sum(u.shape[0] * u.shape[1] * w.shape[1] * (v.shape[2] + (u.shape[2] if u.dim() == w.dim() == 3 else 1))
               for _, u, v in first._terms() for _, w, _ in second._terms())


def sqnorm_of_sum(parts: list[Factors], dense: Tensor | None) -> Tensor:
    """(B,) |sum of the parts' per-example gradients + dense|^2 for a weight used by several calls: by pairwise
    factored inner products when there is no dense part (B, *shape) and they cost fewer multiply-adds than
    materialising the parts' gradients (or these would take too much memory: ``prefer_factored``), else by
    materialising them and summing them with ``dense``."""
    if dense is None and parts:
        batch = parts[0]._terms()[0][2].shape[0]
        factored = sum(_pair_cost(p, q) for p in parts for q in parts)
        materialised = sum(p._materialising_cost() + batch * p._numel() for p in parts)
        gram_memory = max(term[1].shape[0] * term[1].shape[1] * other[1].shape[1]
                          for p in parts for q in parts for term in p._terms() for other in q._terms())
        if prefer_factored(factored, materialised, gram_memory, 2 * batch * parts[0]._numel(),
                           sum(p._held() for p in parts)):
            total = None
            for k, part in enumerate(parts):
                value = part.sqnorms()
                for other in parts[k + 1:]:
                    value = value + 2 * _inner(part, other)
                total = value if total is None else total + value
            return total
    total = None if dense is None else compute_dtype(dense)
    for part in parts:
        grads = part.grads()
        total = grads if total is None else total + grads.reshape(total.shape)
    return per_example_sqnorm(total)
