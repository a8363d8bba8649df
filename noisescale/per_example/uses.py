"""Per-example gradients of a fallback module's own parameters from the operations that used them in the real pass.

Modules without a layer rule often use their parameters in a few plain operations:
- ViT's class token, expanded to every example;
- a learned position table added to every example;
- a layer scale;
- HuggingFace's learned position embeddings (nn.Embedding subclasses that build their own position ids);
- a weight passed to F.linear.

While such a module's forward runs, a TorchFunctionMode (``ParameterUses``) sees the outermost torch function calls.
A call that takes one of the module's parameters p and returns y (g = dL/dy, from a tensor hook in the real
backward) is recorded if it is one of:

    y = p.expand(...), p.repeat(...)        dl_i/dp = sum over the broadcast dims of g_i (repeat: of size-1 dims)
    y = x + p, p + x, x - p, p - x          dl_i/dp = the same, with the sign of p
    y = x * p, p * x                        dl_i/dp = sum over the broadcast dims of g_i * x_i
    y = F.linear(x, p, q)                   dl_i/dp = sum_t g_{i,t} x_{i,t}^T, dl_i/dq = sum_t g_{i,t}   (LinearFactors)
    y = F.embedding(idx, p), p[idx]         row idx_{i,t} of dl_i/dp receives g_{i,t}                   (IndexFactors)
    y = F.layer_norm(x, s, p, q)            dl_i/dp = sum_t g_{i,t} * x_hat_{i,t}, dl_i/dq = sum_t g_{i,t}

The broadcast rows need p broadcast over the examples: p's dim aligned with y's dim 0 is missing or of size 1.
Every row needs y to hold the B examples in dim 0, the convention of the rules and of the fallback.

Any other differentiable use of p (an output that requires grad) marks the call incomplete, and the module is
re-run as before (``fallback.py``). Uses no torch function sees are caught afterwards: for each parameter, the sum
over the examples of the recorded per-example gradients must have the norm of the gradient the real backward gave
p (``GhostPass``). An example is a custom autograd.Function, whose forward runs without grad. Where the norms
differ, the call is re-run and the module is not captured again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from noisescale.per_example.factors import IndexFactors, LinearFactors, compute_dtype

__all__ = ["ParameterUses", "per_example_total"]

_EXPANDS = {Tensor.expand, Tensor.broadcast_to, torch.broadcast_to}
_ADDS = {Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__, torch.add}
_SUBS = {Tensor.sub, Tensor.__sub__, torch.sub}
_MULS = {Tensor.mul, Tensor.__mul__, Tensor.__rmul__, torch.mul}
_CASTS = {Tensor.to, Tensor.type_as, Tensor.float, Tensor.half, Tensor.bfloat16, Tensor.double}
_SHAPE_OF_SECOND = {Tensor.expand_as, Tensor.view_as, Tensor.reshape_as, Tensor.type_as}  # reads only its shape
_EMBEDDING_ARGUMENTS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


@dataclass
class _Source:
    """A tensor that is a parameter, or a basic-indexing view (``index``) or a cast of one."""

    name: str
    shape: torch.Size              # the parameter's shape
    index: tuple | None = None     # p[index] is this tensor


@dataclass
class _Use:
    """One recorded use of a parameter (or a view of it): its output's gradient arrives in ``grad[0]``."""

    source: _Source
    kind: str                 # "broadcast", "linear_weight"/"_bias", "embedding", "layer_norm_weight"/"_bias"
    shape: torch.Size         # the shape of the tensor that was used
    grad: list
    sign: float = 1.0
    factor: Any = None        # mul: the other operand; linear_weight: the input; embedding: (indices, padding_idx);
                              # layer_norm_weight: (input, normalized shape, eps)


class ParameterUses(TorchFunctionMode):
    """Between ``start()`` and ``stop()`` (one call of the module's forward), records the uses of ``parameters``
    (local name -> parameter) listed in the module docstring, also through p[slices] and dtype casts of p;
    ``complete`` turns False at any other use."""

    def __init__(self, parameters: dict[str, Tensor], batch_size: int):
        super().__init__()
        self._sources = {id(p): (_Source(name, p.shape), p) for name, p in parameters.items()}
        self.tracked = set(parameters)
        self.batch_size = batch_size
        self.uses: list[_Use] = []
        self.complete = True
        self.reason: str | None = None
        self._open = False
        self._pending: dict[int, _Use] = {}   # id(output of batch 1) -> its use, until ``close``

    def start(self) -> None:
        self.__enter__()
        self._open = True

    def stop(self) -> None:
        if self._open:
            self._open = False
            self.__exit__(None, None, None)
            self._sources.clear()   # the views of this call are not kept alive

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.complete:
            return result
        used = [t for t in _tensors(args, kwargs.values()) if id(t) in self._sources]
        if not used:
            return result
        if not any(t.requires_grad for t in _tensors((result,))):
            return result   # p.shape, p.detach(), a use under no_grad: nothing to differentiate
        if func in _SHAPE_OF_SECOND and len(args) == 2 and used == [args[1]] and args[0] is not args[1]:
            return result   # x.expand_as(p): p gives the shape, no gradient
        reason = self._record(func, args, kwargs, used, result)
        if reason is not None:
            self.complete, self.reason = False, f"{getattr(func, '__name__', func)}: {reason}"
        return result

    # ------------------------------------------------------------------------------------------- recognised uses

    def _record(self, func, args, kwargs, used: list[Tensor], y: Any) -> str | None:
        if not isinstance(y, Tensor):
            return "not a recognised use"
        if func is Tensor.__getitem__ and isinstance(args[1], Tensor) and not args[1].is_floating_point():
            return self._lookup(args[0], args[1], None, y)   # p[indices]: a lookup of rows
        if len(used) == 1 and args and args[0] is used[0] and (func in _CASTS or func is Tensor.__getitem__):
            return self._derive(func, args, y)
        if y.dim() == 0 or y.shape[0] not in (self.batch_size, 1):
            return "its output does not hold the examples in dim 0"
        if len({id(p) for p in used}) != len(used):
            return "a parameter enters twice"
        if func is F.linear:
            return self._linear(args, kwargs, y)
        if func is F.embedding:
            return self._embedding(args, kwargs, y)
        if func is F.layer_norm:
            return self._layer_norm(args, kwargs, y)
        if len(used) != 1:
            return "two parameters enter one operation"
        p = used[0]
        if p.dim() == y.dim() and p.shape[0] != 1:
            return "the parameter is not broadcast over the examples"
        if func in _EXPANDS or func is Tensor.repeat:
            if args[0] is not p or (func is Tensor.repeat and not _repeats_like_expand(p, args[1:])):
                return "a repeat of a dim of size above 1, or not the parameter expanded"
            return self._broadcast(p, y)
        if func not in _ADDS and func not in _SUBS and func not in _MULS and func is not Tensor.__rsub__:
            return "not a recognised use"
        if set(kwargs) - {"alpha"} or kwargs.get("alpha", 1) != 1 or len(args) != 2:
            return "an alpha or an out argument"
        if func in _ADDS:
            return self._broadcast(p, y)
        if func in _MULS:
            other = args[1] if args[0] is p else args[0]
            return self._broadcast(p, y, factor=other.detach() if isinstance(other, Tensor) else other)
        p_is_minuend = (args[0] is p) != (func is Tensor.__rsub__)
        return self._broadcast(p, y, sign=1.0 if p_is_minuend else -1.0)

    def _derive(self, func, args, y: Tensor) -> str | None:
        """p[index] (basic indexing of the parameter itself) or a dtype cast of p or of such a view."""
        source, _ = self._sources[id(args[0])]
        if func is Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if source.index is not None or not all(isinstance(k, (int, slice)) or k is Ellipsis or k is None
                                                   for k in index):
                return "an index other than slices, integers and None of the parameter itself"
            source = _Source(source.name, source.shape, index)
        elif y.shape != args[0].shape:
            return "a cast that changes the shape"
        self._sources[id(y)] = (source, y)
        return None

    def _hooked(self, use: _Use, y: Tensor) -> None:
        self.uses.append(use)
        if y.shape[0] == self.batch_size:
            y.register_hook(partial(_keep, use.grad))
        else:   # batch 1: per example only if y is the module's output, broadcast to the B examples (shared)
            self._pending[id(y)] = use

    def close(self, output: Any, broadcast: Tensor | None) -> bool:
        """After the module's forward: a use whose output of batch 1 is the module's ``output``, broadcast by the
        engine to the B examples (``broadcast``, a call shared by every example: position ids (1, T)), takes the
        gradient of the broadcast output, per example; any other use of batch 1 leaves the record incomplete.
        Returns whether the record is complete."""
        use = self._pending.pop(id(output), None) if broadcast is not None else None
        if use is not None:
            broadcast.register_hook(partial(_keep, use.grad))
            if use.kind == "embedding":
                indices, padding_idx = use.factor
                use.factor = (indices.expand(self.batch_size, -1), padding_idx)
            elif use.kind == "linear_weight":
                use.factor = use.factor.expand(self.batch_size, *use.factor.shape[1:])
            elif use.kind == "layer_norm_weight":
                x, shape, eps = use.factor
                use.factor = (x.expand(self.batch_size, *x.shape[1:]), shape, eps)
        if self._pending:
            self.complete, self.reason = False, "an output of batch 1 that is not the module's own"
        self._pending.clear()
        return self.complete

    def _broadcast(self, p: Tensor, y: Tensor, sign: float = 1.0, factor: Any = None) -> str | None:
        self._hooked(_Use(self._sources[id(p)][0], "broadcast", p.shape, [None], sign, factor), y)
        return None

    def _whole(self, t: Any) -> _Source | None:
        """The source of ``t`` when it is a whole parameter (or a cast of one), else None."""
        entry = self._sources.get(id(t)) if isinstance(t, Tensor) else None
        return entry[0] if entry is not None and entry[0].index is None else None

    def _linear(self, args, kwargs, y: Tensor) -> str | None:
        x, weight = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != y.shape[0] or id(x) in self._sources:
            return "its input does not hold the examples in dim 0"
        sources = [(t, self._whole(t)) for t in (weight, bias) if isinstance(t, Tensor) and id(t) in self._sources]
        if any(source is None for _, source in sources):
            return "a view of a parameter as the weight or the bias"
        for t, source in sources:
            kind = "linear_weight" if t is weight else "linear_bias"
            self._hooked(_Use(source, kind, t.shape, [None], factor=x.detach() if t is weight else None), y)
        return None

    def _embedding(self, args, kwargs, y: Tensor) -> str | None:
        bound = {**dict(zip(_EMBEDDING_ARGUMENTS, args)), **kwargs}
        if bound.get("max_norm") is not None or bound.get("scale_grad_by_freq") or bound.get("sparse"):
            return "max_norm, scale_grad_by_freq or sparse"
        return self._lookup(bound["weight"], bound["input"], bound.get("padding_idx"), y)

    def _lookup(self, weight: Any, indices: Tensor, padding_idx: int | None, y: Tensor) -> str | None:
        """y = weight[indices] (F.embedding, or indexing by an integer tensor): row indices_{i,t} of dl_i/dweight
        receives g_{i,t}."""
        source = self._whole(weight)
        if source is None or id(indices) in self._sources:
            return "a view of a parameter as the table, or a parameter as the indices"
        if y.dim() == 0 or y.shape[0] not in (self.batch_size, 1) or indices.dim() == 0:
            return "its output does not hold the examples in dim 0"
        if indices.dim() == 1 and torch.equal(indices, torch.arange(self.batch_size, device=indices.device)):
            return "indices arange(B): positions or one row per example cannot be told apart"
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        self._hooked(_Use(source, "embedding", weight.shape, [None],
                          factor=(indices.reshape(y.shape[0], -1), padding_idx)), y)
        return None

    def _layer_norm(self, args, kwargs, y: Tensor) -> str | None:
        bound = {**dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args)), **kwargs}
        x, shape, eps = bound["input"], tuple(bound["normalized_shape"]), bound.get("eps", 1e-5)
        if id(x) in self._sources or x.shape[0] != y.shape[0]:
            return "its input does not hold the examples in dim 0"
        for kind in ("weight", "bias"):
            t = bound.get(kind)
            if isinstance(t, Tensor) and id(t) in self._sources:
                source = self._whole(t)
                if source is None:
                    return "a view of a parameter as the affine"
                self._hooked(_Use(source, f"layer_norm_{kind}", t.shape, [None],
                                  factor=(x.detach(), shape, eps) if kind == "weight" else None), y)
        return None

    # ------------------------------------------------------------------------------------------ per-example grads

    def per_example_grads(self) -> dict[str, list[Tensor | LinearFactors | IndexFactors]]:
        """local name -> the per-example gradient of each use, (B, *shape) or factors (uses whose output got no
        gradient contribute nothing)."""
        grads: dict[str, list] = {}
        for use in self.uses:
            g = use.grad[0]
            if g is not None:
                grads.setdefault(use.source.name, []).append(_per_example(use, compute_dtype(g), self.batch_size))
        return grads


def _tensors(*groups) -> Iterator[Tensor]:
    """The tensors among the values of ``groups`` and inside their lists and tuples (the arguments of a torch
    function nest no deeper: torch.cat's list of tensors)."""
    for group in groups:
        for value in group:
            if isinstance(value, Tensor):
                yield value
            elif isinstance(value, (list, tuple)):
                yield from _tensors(value)


def _repeats_like_expand(p: Tensor, sizes: tuple) -> bool:
    """Whether p.repeat(*sizes) repeats only dims where p has size 1 (or new leading dims): an expand."""
    sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)) else sizes
    aligned = (1,) * (len(sizes) - p.dim()) + tuple(p.shape)
    return len(sizes) >= p.dim() and all(count == 1 or size == 1 for count, size in zip(sizes, aligned))


def _keep(holder: list, grad: Tensor) -> None:
    holder[0] = grad


def _sum_to_parameter(g: Tensor, shape: torch.Size) -> Tensor:
    """(B, *shape) from g (B, ...): the sum of each g_i over the dims where the parameter was broadcast (its
    shape aligned with g's trailing dims; a dim of g's dim 0 in the parameter has size 1)."""
    inner = shape[1:] if len(shape) == g.dim() else shape
    lead = g.dim() - 1 - len(inner)
    dims = [*range(1, 1 + lead), *(1 + lead + j for j, size in enumerate(inner) if size == 1 != g.shape[1 + lead + j])]
    if not dims:
        return g.reshape(g.shape[0], *shape).clone()   # a fresh tensor: GhostPass sums into it in place
    return g.sum(dims, keepdim=True).reshape(g.shape[0], *shape)


def _per_example(use: _Use, g: Tensor, batch: int) -> Tensor | LinearFactors | IndexFactors:
    if use.kind == "broadcast":
        if use.factor is not None:
            g = g * use.factor
        grad = _sum_to_parameter(g, use.shape)
        if use.source.index is not None:   # a view p[index]: the rest of p gets no gradient
            whole = grad.new_zeros(batch, *use.source.shape)
            whole[(slice(None), *use.source.index)] = grad
            grad = whole
        return grad if use.sign == 1.0 else -grad
    if use.kind == "linear_weight":
        x = use.factor
        return LinearFactors([(x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1]))])
    if use.kind == "linear_bias":
        return g.reshape(batch, -1, g.shape[-1]).sum(1)
    if use.kind.startswith("layer_norm"):   # y = x_hat * weight + bias over the normalised trailing dims
        if use.kind == "layer_norm_weight":
            x, shape, eps = use.factor
            g = g * F.layer_norm(compute_dtype(x), shape, eps=eps)
        return g.reshape(batch, -1, *use.shape).sum(1)
    indices, padding_idx = use.factor
    v = g.reshape(batch, indices.shape[1], -1)
    if padding_idx is not None:
        v = v * (indices != padding_idx).unsqueeze(-1).to(v.dtype)
    return IndexFactors(indices, v, use.shape[0])


def per_example_total(part: Tensor | LinearFactors | IndexFactors) -> Tensor:
    """sum_i of one use's per-example gradients: the gradient the real backward brought through that use."""
    if isinstance(part, LinearFactors):
        return torch.cat([g.flatten(0, 1).T @ a.flatten(0, 1) for a, g in part.blocks], 0)
    if isinstance(part, IndexFactors):
        total = part.v.new_zeros(part.rows, part.v.shape[-1])
        return total.index_add_(0, part.indices.flatten(), part.v.flatten(0, 1))
    return part.sum(0)
