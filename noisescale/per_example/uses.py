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
    y = x / p, p / x                        as x * (1 / p) and p * (1 / x)
    y = F.linear(x, p, q)                   dl_i/dp = sum_t g_{i,t} x_{i,t}^T, dl_i/dq = sum_t g_{i,t}   (LinearFactors)
    y = x @ m, m 2-D                        as F.linear(x, m.T) (litgpt's LoRA: x @ lora_A.transpose(0, 1))
    y = F.embedding(idx, p), p[idx]         row idx_{i,t} of dl_i/dp receives g_{i,t}                   (IndexFactors)
    y = F.layer_norm(x, s, p, q)            dl_i/dp = sum_t g_{i,t} * x_hat_{i,t}, dl_i/dq = sum_t g_{i,t}
    y = F.conv2d(x, p, q, ...)              ConvRule's per-example gradients (conv1d, conv3d too)

The broadcast rows need p broadcast over the examples: p's dim aligned with y's dim 0 is missing or of size 1.
Every row needs y to hold the B examples in dim 0, the convention of the rules and of the fallback, or, for a
call on the examples' rows flattened in B blocks of k (an MoE's router on (B T, d) tokens: ``rows`` = B k), their
B k rows, each use's per-example gradients then summed over each example's block; so may an F.linear on the
examples' rows flattened inside the call (DeepSeek-V3's router reshapes its (B, T, d) input itself). Such rows are
followed only through operations whose input and outputs all have the B k rows in dim 0 (and that do not sort or
index them): a view as (B, T, d) and a transpose after it could move a token into another example's block. A use's
output rows must reach the call's outputs in their blocks (``_rows_reach_outputs_in_place``).

In place of p, each row also takes a tensor computed from the module's parameters alone, with any operation and
with constants (tensors without grad that do not hold the examples): ``cls_token + pos[:, :1]`` (ViT-MAE), a
table indexed by a buffer (Swin's relative position bias), ``p.exp()``, ``w.t()``, a part of ``w.split(sizes)``,
a convolution kernel standardised on the fly (timm's ``StdConv2dSame``; ``StdConv2d`` has a rule). The
per-example gradients with respect to such a tensor d = f(theta) are taken back to the parameters by the VJP of f
recomputed with torch.func, for each example: dl_i/dtheta = J_f(theta)^T dl_i/dd.

Any other differentiable use of p (an output that requires grad) marks the call incomplete, and the module is
re-run as before (``fallback.py``). Uses no torch function sees are caught afterwards: for each parameter, the sum
over the examples of the recorded per-example gradients must have the norm of the gradient the real backward gave
p (``GhostPass``). An example is a custom autograd.Function, whose forward runs without grad. Where the norms
differ, the call is re-run and the module is not captured again.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import BackwardCFunction
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from noisescale._graph import autograd_consumers, autograd_nodes, output_shape
from noisescale.per_example.broadcast import carried_examples, reorders_rows
from noisescale.per_example.fallback import output_tensors
from noisescale.per_example.factors import IndexFactors, LinearFactors, compute_dtype
from noisescale.per_example.layers import ConvRule, functional_convolution

__all__ = ["ParameterUses", "per_example_total"]

_EXPANDS = {Tensor.expand, Tensor.broadcast_to, torch.broadcast_to}
_ADDS = {Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__, Tensor.add_, torch.add}
_SUBS = {Tensor.sub, Tensor.__sub__, torch.sub}
_MULS = {Tensor.mul, Tensor.__mul__, Tensor.__rmul__, torch.mul}
_DIVS = {Tensor.div, Tensor.__truediv__, torch.div}
_SHAPE_OF_SECOND = {Tensor.expand_as, Tensor.view_as, Tensor.reshape_as, Tensor.type_as}  # reads only its shape
_MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm}
_TRANSPOSES = {torch.t, Tensor.t, Tensor.T.__get__, Tensor.mT.__get__}
_CONVOLUTIONS = {F.conv1d, F.conv2d, F.conv3d}
_CONVOLUTION_RULE = ConvRule()
_CONVOLUTION_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
# reshapes that, keeping dim 0's size, keep each of its rows (row-major order): einops' pack and rearrange
_RESHAPES = {Tensor.reshape, Tensor.view, torch.reshape, Tensor.flatten, torch.flatten, Tensor.contiguous}
_EMBEDDING_ARGUMENTS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


@dataclass(eq=False)
class _Source:
    """A tensor computed from the module's parameters alone: a parameter (``name``), or ``func`` of sources and
    constants (``args`` and ``kwargs``, with the sources in place of their tensors)."""

    name: str | None = None
    func: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def names(self) -> set[str]:
        if self.name is not None:
            return {self.name}
        leaves = tree_leaves((self.args, self.kwargs))
        return set().union(*(leaf.names() for leaf in leaves if isinstance(leaf, _Source)))

    def build(self, values: dict[str, Tensor]) -> Tensor:
        """This tensor recomputed from the parameters' ``values`` (name -> tensor)."""
        if self.name is not None:
            return values[self.name]
        args, kwargs = tree_map(lambda leaf: leaf.build(values) if isinstance(leaf, _Source) else leaf,
                                (self.args, self.kwargs))
        return self.func(*args, **kwargs)


@dataclass
class _Use:
    """One recorded use of a source: its output's gradient arrives in ``grad[0]``."""

    source: _Source
    kind: str                 # "broadcast", "linear_weight"/"_bias", "embedding", "layer_norm_weight"/"_bias",
                              # "convolution_weight"/"_bias"
    shape: torch.Size         # the shape of the tensor that was used
    grad: list
    sign: float = 1.0
    factor: Any = None        # mul: the other operand; linear_weight: the input; embedding: (indices, padding_idx);
                              # layer_norm_weight: (input, normalized shape, eps); convolution: (input, what
                              # ConvRule reads of the call)


class ParameterUses(TorchFunctionMode):
    """Between ``start()`` and ``stop()`` (one call of the module's forward), records the uses of ``parameters``
    (local name -> parameter), and of tensors computed from them alone, listed in the module docstring;
    ``complete`` turns False at any other use."""

    def __init__(self, parameters: dict[str, Tensor], batch_size: int, rows: int | None, hooks: list):
        """``rows``: the call takes the B = ``batch_size`` examples' rows flattened, B k of them (blocks of k,
        which the caller verifies before using the record: ``GhostPass``). ``hooks``: where the handles of the
        hooks on the pass's tensors go, for the caller to remove after the pass (a hook holds the record, which
        holds tensors of the graph: kept, the graph could never be freed)."""
        super().__init__()
        self._hooks = hooks
        self._parameters = parameters
        self._sources = {id(p): (_Source(name), p) for name, p in parameters.items()}   # id -> (source, tensor)
        self.examples = batch_size
        self.batch_size = rows or batch_size   # the rows dim 0 holds (the examples' own, or their blocks')
        self._used_rows: list[tuple[Any, int]] = []   # rows mode: (autograd node, output nr) of each use's output
        self._input_nodes: set = set()   # rows mode: the autograd nodes of the call's inputs
        self.uses: list[_Use] = []
        self.complete = True
        self.reason: str | None = None
        self._open = False
        self._pending: dict[int, _Use] = {}   # id(output of batch 1) -> its use, until ``close``
        self._batched: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # id -> tensor with examples
        # id -> a source expanded or repeated to B in dim 0 (a use): its dim 0 must meet the examples' dim 0
        self._claimed: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    @property
    def tracked(self) -> set[str]:
        """The local names of the parameters whose uses are recorded."""
        return set(self._parameters)

    def start(self, args: tuple = (), kwargs: dict | None = None) -> None:
        """Record from here on; the call's tensors with the B examples in dim 0 (not parameters) hold examples."""
        for t in _tensors(args, (kwargs or {}).values()):
            if t.dim() and t.shape[0] == self.batch_size and not isinstance(t, nn.Parameter):
                self._batched[id(t)] = t
            if t.grad_fn is not None:
                self._input_nodes.add(t.grad_fn)
        self.__enter__()
        self._open = True

    def _holds_examples(self, t: Tensor) -> bool:
        """Computed from the call's batched inputs (provenance through every operation the mode saw), or a
        constant expanded to the B examples (BART's position ids, arange(T).expand(B, -1): the same row for
        each)."""
        return self._batched.get(id(t)) is t or (t.layout == torch.strided and not t.is_nested and t.dim() > 0
                                                 and t.shape[0] == self.batch_size > 1 and t.stride(0) == 0)

    def stop(self) -> None:
        """Stop recording: this mode leaves the torch function mode stack from wherever it is (an inner module's
        mode is still above it when that module raised and the error was caught)."""
        if self._open:
            self._open = False
            above = []
            while torch._C._len_torch_function_stack():
                mode = torch._C._pop_torch_function_stack()
                if mode is self:
                    break
                above.append(mode)
            for mode in reversed(above):
                torch._C._push_on_torch_function_stack(mode)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.complete:
            return result
        tensors = list(_tensors(args, kwargs.values()))
        outputs = list(_tensors((result,)))
        if not outputs:
            return result   # t.shape, t.dim(), t.dtype (einops reads the shapes of what it packs): no tensor made
        claimed = [t for t in tensors if self._claimed.get(id(t)) is t]
        if (claimed and func in _RESHAPES and len(tensors) == 1 and isinstance(result, Tensor) and result.dim()
                and result.shape[0] == claimed[0].shape[0]):
            self._claimed[id(result)] = self._batched[id(result)] = result   # the same rows: still to be checked
            return result
        if claimed and not _aligned(func, args, kwargs, tensors, result):
            self.complete, self.reason = False, (f"{getattr(func, '__name__', func)}: a parameter expanded to the "
                                                 "batch's size meets the examples in another dim")
            return result
        if (any(self._holds_examples(t) for t in tensors) and not _reorders_rows(func, args, kwargs, self.batch_size)
                and (self.examples == self.batch_size or self._keeps_rows(tensors, outputs))):
            for out in outputs:
                self._batched[id(out)] = out
        used = [t for t in tensors if id(t) in self._sources]
        if not used:
            return result
        if not any(t.requires_grad for t in outputs):
            return result   # p.shape, p.detach(), a use under no_grad: nothing to differentiate
        if func in _SHAPE_OF_SECOND and len(args) == 2 and used == [args[1]] and args[0] is not args[1]:
            return result   # x.expand_as(p): p gives the shape, no gradient
        if self._derived(func, tensors, result):
            self._sources[id(result)] = (_Source(func=func, args=self._in_place_of(args),
                                                 kwargs=self._in_place_of(kwargs)), result)
            return result
        if isinstance(result, (tuple, list)) and all(isinstance(part, Tensor) for part in result) and all(
                self._derived(func, tensors, part) for part in result):   # w.split(sizes), w.chunk(n), w.unbind()
            for k, part in enumerate(result):
                self._sources[id(part)] = (_Source(func=partial(_part, func, k), args=self._in_place_of(args),
                                                   kwargs=self._in_place_of(kwargs)), part)
            return result
        reason = self._record(func, args, kwargs, used, result)
        if reason is not None:
            self.complete, self.reason = False, f"{getattr(func, '__name__', func)}: {reason}"
        return result

    def _keeps_rows(self, tensors: list[Tensor], outputs: list[Tensor]) -> bool:
        """For rows in blocks: whether an operation (not one that reorders dim 0) keeps each row where it was, as
        far as shapes tell: an input with the rows in dim 0 and every output with as many (a view as (B, T, d) has
        B, and the transpose and reshape after it are not followed)."""
        return (all(out.dim() and out.shape[0] == self.batch_size for out in outputs)
                and any(t.dim() and t.shape[0] == self.batch_size and self._holds_examples(t) for t in tensors))

    def _derived(self, func, tensors: list[Tensor], y: Any) -> bool:
        """Whether y is computed from sources and constants alone (tensors without grad not computed from the
        call's examples), and is not a source expanded or repeated to the B examples (a use)."""
        if not isinstance(y, Tensor):
            return False
        if (func in _EXPANDS or func is Tensor.repeat) and y.dim() and y.shape[0] == self.batch_size:
            return False
        return all(id(t) in self._sources or not (t.requires_grad or self._holds_examples(t)) for t in tensors)

    def _in_place_of(self, value: Any) -> Any:
        """``value`` (args or kwargs) with each source's tensor replaced by the source."""
        return tree_map(lambda leaf: self._sources[id(leaf)][0]
                        if isinstance(leaf, Tensor) and id(leaf) in self._sources else leaf, value)

    def _source(self, t: Tensor) -> _Source:
        return self._sources[id(t)][0]

    # ------------------------------------------------------------------------------------------- recognised uses

    def _record(self, func, args, kwargs, used: list[Tensor], y: Any) -> str | None:
        if not isinstance(y, Tensor):
            return "not a recognised use"
        if func is Tensor.__getitem__ and isinstance(args[1], Tensor) and not args[1].is_floating_point():
            return self._lookup(args[0], args[1], None, y)   # p[indices]: a lookup of rows
        # a Linear on the examples' rows flattened inside the call (DeepSeek-V3's router: (B, T, d) in, (B T, d)
        # to F.linear): B blocks of rows, taken for them if they reach the outputs so (``close``)
        flattened = (func is F.linear and self.examples == self.batch_size and y.dim() > 0
                     and y.shape[0] > self.batch_size and y.shape[0] % self.batch_size == 0 and self._holds_examples(y))
        if y.dim() == 0 or y.shape[0] not in (self.batch_size, 1) and not flattened or (
                y.shape[0] == self.batch_size and not self._holds_examples(y)
                and not (func in _EXPANDS or func is Tensor.repeat)):
            return "its output does not hold the examples in dim 0"
        if func in _CONVOLUTIONS:   # its output's dim 0 is its input's, whatever the other dims' sizes
            return self._convolution(args, kwargs, y)
        if self.batch_size > 1 and self.batch_size in y.shape[1:] and not flattened:   # (blocks: dim 0, checked)
            return "its output has another dim of the batch's size: which holds the examples cannot be told"
        if len({id(p) for p in used}) != len(used):
            return "a parameter enters twice"
        if func is F.linear:
            return self._linear(args, kwargs, y)
        if func in _MATMULS and len(args) == 2 and not kwargs and isinstance(args[1], Tensor) and args[1].dim() == 2:
            return self._matmul(args[0], args[1], y)
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
            self._claimed[id(y)] = self._batched[id(y)] = y   # B copies: of examples, or heads as many as them?
            return self._broadcast(p, y)
        if func in _DIVS and len(args) == 2 and not kwargs:   # x / p = x * (1 / p), p / x = p * (1 / x)
            if args[1] is p:
                reciprocal = _Source(func=torch.reciprocal, args=(self._source(p),))
                factor = args[0].detach() if isinstance(args[0], Tensor) else args[0]
                self._hooked(_Use(reciprocal, "broadcast", p.shape, [None], factor=factor), y)
                return None
            other = args[1]
            return self._broadcast(p, y, factor=other.detach().reciprocal() if isinstance(other, Tensor) else 1 / other)
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

    def _hooked(self, use: _Use, y: Tensor) -> None:
        self.uses.append(use)
        if y.shape[0] not in (self.examples, 1) and y.grad_fn is not None:   # rows in blocks
            self._used_rows.append((y.grad_fn, y.output_nr))
        if y.shape[0] != 1 or self.batch_size == 1:
            self._hooks.append(y.register_hook(partial(_keep, use.grad)))
        else:   # batch 1: per example only if y is the module's output, broadcast to the B examples (shared)
            self._pending[id(y)] = use

    def refuse_unseen(self, inputs: list[Tensor], outputs: list[Tensor], budget: int = 20_000) -> None:
        """Refuse the record when the call's autograd graph, from its outputs back to its inputs, holds a node the
        mode cannot have seen: a custom autograd.Function (its forward runs without grad, so a parameter used in
        it leaves no trace here; the check of the sums in GhostPass misses a use whose sum over the examples
        cancels). A graph larger than ``budget`` nodes is refused too."""
        if not self.complete:
            return
        nodes = autograd_nodes((t.grad_fn for t in outputs), stops=(t.grad_fn for t in inputs))
        for count, node in enumerate(nodes, 1):
            if count > budget or isinstance(node, BackwardCFunction):
                self.complete, self.reason = False, (f"a custom autograd.Function ({type(node).__name__}) in its "
                                                     "graph" if count <= budget else "a graph too large to check")
                return

    def close(self, output: Any, broadcast: Tensor | None) -> bool:
        """After the module's forward: a use whose output of batch 1 is the module's ``output``, broadcast by the
        engine to the B examples (``broadcast``, a call shared by every example: position ids (1, T)), takes the
        gradient of the broadcast output, per example; any other use of batch 1 leaves the record incomplete.
        Returns whether the record is complete."""
        use = self._pending.pop(id(output), None) if broadcast is not None else None
        if use is None and broadcast is not None and id(output) in self._sources:   # computed from parameters alone
            self._hooked(_Use(self._source(output), "broadcast", output.shape, [None]), broadcast)
        elif use is not None:   # its operands of batch 1 are shared by the B examples too
            self._hooks.append(broadcast.register_hook(partial(_keep, use.grad)))
            use.factor = tree_map(lambda t: t.expand(self.batch_size, *t.shape[1:])
                                  if isinstance(t, Tensor) and t.dim() and t.shape[0] == 1 else t, use.factor)
        if self._pending:
            self.complete, self.reason = False, "an output of batch 1 that is not the module's own"
        elif self._used_rows and self.complete and not _rows_reach_outputs_in_place(
                self._used_rows, output_tensors(output), self._input_nodes, self.examples):
            self.complete, self.reason = False, ("rows moved between the examples' blocks (or by an operation not "
                                                 "known to keep them) on the way to its outputs")
        self._pending.clear()
        self._used_rows.clear()
        self._sources = {key: entry for key, entry in self._sources.items()
                         if entry[0].name is not None}   # the computed tensors of this call are not kept alive
        return self.complete

    def _broadcast(self, p: Tensor, y: Tensor, sign: float = 1.0, factor: Any = None) -> str | None:
        self._hooked(_Use(self._source(p), "broadcast", p.shape, [None], sign, factor), y)
        return None

    def _not_rows(self, x: Any, y: Tensor) -> str | None:
        """Why x, a Linear's input, cannot give its output y's rows their examples; None if it can."""
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != y.shape[0] or id(x) in self._sources:
            return "its input does not hold the examples in dim 0"
        return None

    def _linear(self, args, kwargs, y: Tensor) -> str | None:
        x, weight = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if (reason := self._not_rows(x, y)) is not None:
            return reason
        for t in (weight, bias):
            if isinstance(t, Tensor) and id(t) in self._sources:
                kind = "linear_weight" if t is weight else "linear_bias"
                self._hooked(_Use(self._source(t), kind, t.shape, [None], factor=x.detach() if t is weight else None),
                             y)
        return None

    def _matmul(self, x: Any, m: Tensor, y: Tensor) -> str | None:
        """y = x @ m = F.linear(x, m.T): a use of m.T as a Linear's weight; of the parameter itself where m is a
        parameter transposed (no per-example gradients materialised to take back)."""
        if id(m) not in self._sources:
            return "a parameter as the left operand of a matrix product"
        source = self._source(m)
        if source.name is None and len(source.args) in (1, 3) and isinstance(source.args[0], _Source) and (
                source.func in _TRANSPOSES or (source.func in (Tensor.transpose, torch.transpose)
                                               and {d % 2 for d in source.args[1:]} == {0, 1})):
            weight = source.args[0]   # p.t(), p.T, p.transpose(0, 1): the parameter as a Linear's weight
        else:
            weight = _Source(func=torch.t, args=(source,))
        if (reason := self._not_rows(x, y)) is not None:
            return reason
        self._hooked(_Use(weight, "linear_weight", m.shape[::-1], [None], factor=x.detach()), y)
        return None

    def _embedding(self, args, kwargs, y: Tensor) -> str | None:
        bound = {**dict(zip(_EMBEDDING_ARGUMENTS, args)), **kwargs}
        if bound.get("max_norm") is not None or bound.get("scale_grad_by_freq") or bound.get("sparse"):
            return "max_norm, scale_grad_by_freq or sparse"
        return self._lookup(bound["weight"], bound["input"], bound.get("padding_idx"), y)

    def _lookup(self, weight: Any, indices: Tensor, padding_idx: int | None, y: Tensor) -> str | None:
        """y = weight[indices] (F.embedding, or indexing by an integer tensor): row indices_{i,t} of dl_i/dweight
        receives g_{i,t}."""
        if not isinstance(weight, Tensor) or id(weight) not in self._sources or id(indices) in self._sources:
            return "a parameter as the indices"
        if y.dim() == 0 or y.shape[0] not in (self.batch_size, 1) or indices.dim() == 0:
            return "its output does not hold the examples in dim 0"
        if indices.dim() == 1 and torch.equal(indices, torch.arange(self.batch_size, device=indices.device)):
            return "indices arange(B): positions or one row per example cannot be told apart"
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        self._hooked(_Use(self._source(weight), "embedding", weight.shape, [None],
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
                self._hooked(_Use(self._source(t), f"layer_norm_{kind}", t.shape, [None],
                                  factor=(x.detach(), shape, eps) if kind == "weight" else None), y)
        return None

    def _convolution(self, args, kwargs, y: Tensor) -> str | None:
        bound = {**dict(zip(_CONVOLUTION_ARGUMENTS, args)), **kwargs}
        x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
        if (not isinstance(x, Tensor) or id(x) in self._sources or y.shape[0] != self.batch_size
                or x.shape[0] != self.batch_size or not self._holds_examples(x)):
            return "its input does not hold the examples in dim 0"
        convolution = functional_convolution(weight.shape, **{name: bound[name] for name in _CONVOLUTION_ARGUMENTS[3:]
                                                              if name in bound})   # by name: F.conv2d(x, w, padding=1)
        for kind, t in (("weight", weight), ("bias", bias)):
            if isinstance(t, Tensor) and id(t) in self._sources:
                self._hooked(_Use(self._source(t), f"convolution_{kind}", t.shape, [None],
                                  factor=(x.detach(), convolution)), y)
        return None

    # ------------------------------------------------------------------------------------------ per-example grads

    def per_example_grads(self) -> dict[str, list[Tensor | LinearFactors | IndexFactors]]:
        """local name -> the per-example gradient of each use, (B, *shape) or factors (uses whose output got no
        gradient contribute nothing)."""
        grads: dict[str, list] = {}
        computed: dict[_Source, Tensor] = {}   # a computed tensor -> the sum of its uses' per-example gradients
        for use in self.uses:
            g = use.grad[0]
            if g is None:
                continue
            part = _per_example(use, compute_dtype(g), self.examples)
            if use.source.name is not None:
                grads.setdefault(use.source.name, []).append(part)
            else:
                dense = part if isinstance(part, Tensor) else part.grads().reshape(self.examples, *use.shape)
                computed[use.source] = dense if use.source not in computed else computed[use.source] + dense
        for source, dense in computed.items():
            for name, grad in self._pulled_back(source, dense).items():
                grads.setdefault(name, []).append(grad)
        return grads

    def _pulled_back(self, source: _Source, dense: Tensor) -> dict[str, Tensor]:
        """name -> (B, *shape): the per-example gradients ``dense`` (B, *d.shape) of a computed tensor d = f(theta)
        taken back to the parameters, J_f^T per example (torch.func: one VJP, vmapped over the examples)."""
        values = {name: self._parameters[name].detach().to(dense.dtype) for name in sorted(source.names())}
        _, pullback = vjp(source.build, values)
        try:
            return vmap(lambda d: pullback(d)[0])(dense)
        except (RuntimeError, NotImplementedError, ValueError):   # an op without a batching rule
            rows = [pullback(d)[0] for d in dense]
            return {name: torch.stack([row[name] for row in rows]) for name in values}


def _rows_reach_outputs_in_place(used: list[tuple[Any, int]], outputs: list[Tensor], inputs: set, batch: int,
                                 budget: int = 2_000) -> bool:
    """Whether the rows of every use's output (``used``: its autograd node and output number), B blocks of k in
    dim 0, reach each of the call's ``outputs`` they reach as B blocks in dim 0, carried forward through the
    operations of the call's graph (``broadcast.carried_examples``: row-wise operations, reshapes, reductions and
    top-k along other dims), never through an operation that moves rows between blocks or whose effect on them is
    not known (a product with a permutation matrix, ``index_copy``, a flip). Then each row's gradient is its own
    example's, whatever reordering its input went through. The graph is walked back from the outputs to the
    call's ``inputs`` (at most ``budget`` nodes: beyond, False)."""
    consumers = autograd_consumers([t.grad_fn for t in outputs], inputs, budget)
    if consumers is None:
        return False
    ends = {(t.grad_fn, t.output_nr) for t in outputs if t.grad_fn is not None}
    found: dict[tuple[Any, int], tuple[int, int] | None] = {}
    stack = [(node, nr, (0, None)) for node, nr in used]
    while stack:
        node, nr, where = stack.pop()
        if where[1] is None:   # a use's output: its rows are B blocks of k
            shape = output_shape(node, nr)
            if not shape or shape[0] % batch:
                return False
            where = (0, shape[0] // batch)
        if (node, nr) in found:
            if found[(node, nr)] != where:
                return False
            continue
        found[(node, nr)] = where
        if (node, nr) in ends and where[0] != 0:
            return False
        for consumer, k, output_nr in consumers.get(node, ()):
            if output_nr != nr:
                continue
            inp = output_shape(node, nr)
            if reorders_rows(consumer, where[0], inp):
                return False
            for out_nr in range(len(consumer._input_metadata)):   # its outputs (the gradients it takes)
                out = output_shape(consumer, out_nr)
                if out is None:
                    continue
                carried = carried_examples(consumer, k, out_nr, where, inp, out, batch)
                if carried is None:
                    return False
                stack.append((consumer, out_nr, carried))
    return True


def _part(func, k: int, *args, **kwargs) -> Tensor:
    """Part k of what ``func`` returns (a split of a computed tensor)."""
    return func(*args, **kwargs)[k]


def _tensors(*groups) -> Iterator[Tensor]:
    """The tensors among the values of ``groups`` and inside their lists and tuples (the arguments of a torch
    function nest no deeper: torch.cat's list of tensors)."""
    for group in groups:
        for value in group:
            if isinstance(value, Tensor):
                yield value
            elif isinstance(value, (list, tuple)):
                yield from _tensors(value)


_ALONG_DIM = {torch.index_select: 1, Tensor.index_select: 1, torch.gather: 1, Tensor.gather: 1, torch.sort: 1,
              Tensor.sort: 1, torch.flip: 1, Tensor.flip: 1, torch.roll: 2, Tensor.roll: 2}   # func -> dim's position


def _reorders_rows(func, args: tuple, kwargs: dict, batch: int) -> bool:
    """Whether ``func`` may select or reorder dim 0's rows (an index tensor, a sort, flip, roll, gather or
    index_select along dim 0), so that its output's rows are no longer the examples in their order; an index
    arange(B) keeps them (CLIP's ``hidden[arange(B), last]``)."""
    if func is Tensor.__getitem__:
        index = args[1][0] if isinstance(args[1], tuple) and args[1] else args[1]
        if isinstance(index, (list, Tensor)):
            index = torch.as_tensor(index)
            return not (index.dtype not in (torch.bool, torch.uint8) and not index.is_floating_point()
                        and index.numel() == batch and torch.equal(index.reshape(-1).cpu(), torch.arange(batch)))
        return False
    if func not in _ALONG_DIM:
        return False
    position = _ALONG_DIM[func]
    name = "dims" if func in (torch.flip, Tensor.flip, torch.roll, Tensor.roll) else "dim"
    dims = kwargs.get(name, args[position] if len(args) > position else (None if name == "dims" else -1))
    if dims is None:   # a roll of the flattened tensor
        return True
    rank = args[0].dim() if isinstance(args[0], Tensor) else 1
    return any(int(d) % max(rank, 1) == 0 for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))


def _aligned(func, args: tuple, kwargs: dict, tensors: list[Tensor], y: Any) -> bool:
    """Whether an operation on a source expanded to the batch's size keeps that dim 0 at the examples' dim 0:
    concatenation along another dim, or an elementwise operation, of tensors as many-dimensional as the result
    (ViT's torch.cat([cls_token.expand(B, 1, d), patches], 1)). Anything else (scores (B, H, T, T) + a bias
    expanded to (H, T, T) with H == B) is not known to."""
    if not isinstance(y, Tensor) or any(t.dim() != y.dim() for t in tensors):
        return False
    if func in (torch.cat, torch.concat, torch.concatenate):
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return dim % y.dim() != 0
    return func in _ADDS or func in _SUBS or func in _MULS or func in _DIVS


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
    """One use's per-example gradients from its output's gradient g, whose dim 0 holds the ``batch`` examples,
    or their rows in ``batch`` blocks."""
    if use.kind == "broadcast":
        if use.factor is not None:
            g = g * use.factor
        grad = _in_blocks(_sum_to_parameter(g, use.shape), batch)
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
    if use.kind.startswith("convolution"):
        x, convolution = use.factor
        return _in_blocks(_CONVOLUTION_RULE.per_example_grads(convolution, x, g, {use.kind[len("convolution_"):]})
                          .popitem()[1], batch)
    indices, padding_idx = use.factor
    indices = indices.reshape(batch, -1)
    v = g.reshape(batch, indices.shape[1], -1)
    if padding_idx is not None:
        v = v * (indices != padding_idx).unsqueeze(-1).to(v.dtype)
    return IndexFactors(indices, v, use.shape[0])


def _in_blocks(grads: Tensor, batch: int) -> Tensor:
    """(batch, ...) per-example gradients from (batch k, ...) per-row ones: the sum of each example's k rows."""
    return grads if grads.shape[0] == batch else grads.unflatten(0, (batch, -1)).sum(1)


def per_example_total(part: Tensor | LinearFactors | IndexFactors) -> Tensor:
    """sum_i of one use's per-example gradients: the gradient the real backward brought through that use."""
    if isinstance(part, LinearFactors):
        return torch.cat([g.flatten(0, 1).T @ a.flatten(0, 1) for a, g in part.blocks], 0)
    if isinstance(part, IndexFactors):
        total = part.v.new_zeros(part.rows, part.v.shape[-1])
        return total.index_add_(0, part.indices.flatten(), part.v.flatten(0, 1))
    return part.sum(0)
