"""Per-module fallback: per-example gradients of one module's own parameters from one recorded call.

For a module without a layer rule, the ghost engine keeps what its forward hook sees -- the call's ``args`` and
``kwargs`` and the gradient g of (loss_scale / B) sum_i l_i with respect to each tensor output -- and, once the
backward is over, computes dl_i/dtheta for the module's parameters theta only:

    dl_i/dtheta ~ vjp_theta(f(theta, x_i))(g_i)      for each example i, x_i its slice of the inputs

with torch.func (``vmap`` over the examples of ``vjp`` of ``functional_call(module, theta, x_i)``), unless the
call's parameter uses were all captured in the real pass (``uses.py``, read by ``GhostPass.finish``). The children's
parameters enter as constants, so a module with a rule inside a module without one is not counted twice. Where
vmap cannot run an op (fused kernels, data-dependent control flow) the same is done one example at a time.
Two layers get a cheaper exact path: nn.MultiheadAttention from its projections' inputs and output gradients
recorded in the real pass (``attention.LinearCapture``; else one re-run of the call with its affine maps written
out), and nn.RNN/LSTM/GRU by one such re-run (``recurrent.py``).

Which dim of each tensor holds the examples (``BatchDims``): by default dim 0 of every tensor whose dim 0 is B;
a tensor with dim 0 of size 1 is shared by every example (broadcast), any other tensor is a constant. Layers that
are not batch-first have their own spec (``BATCH_DIMS``): nn.MultiheadAttention and nn.RNN/LSTM/GRU with
``batch_first=False`` hold the examples in dim 1, their hidden states always in dim 1.

Randomness: when the module drew random numbers in its forward (dropout in train mode, detected by a change of
the global generator's state, or of a ``torch.Generator`` the module holds, across the call), it is re-run once on
the whole batch from the generators' states saved before the call, which reproduces the masks of the real pass
exactly when the module draws from them in a deterministic order; the per-example gradients then come from one
backward of that re-run per example. Random numbers drawn from a generator the module does not hold (one passed in
its inputs, a global of one's own) are not reproduced.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import types
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from noisescale._functional import functional_call
from noisescale._rng import module_generators, set_rng_state
from noisescale.per_example.attention import (attention_per_example_grads, attention_supported,
                                              captured_per_example_grads)
from noisescale.per_example.experts import experts_per_example_grads, experts_supported
from noisescale.per_example.factors import LinearFactors
from noisescale.per_example.recurrent import unrolled_per_example_grads, unrolled_supported
from noisescale.per_example.vmap import conversions_refused, example_gradients, quiet_torch_notes
from noisescale.sharded import is_fsdp2_unit

__all__ = ["FallbackCall", "BatchDims", "BATCH_DIMS", "batch_dims_for", "bound_arguments", "output_tensors",
           "check_unmodified", "is_parameter_table", "module_per_example_grads", "opaque_input", "output_leaves"]


def output_leaves(output: Any) -> list[Any]:
    """The leaves of a module's output, in a fixed order, through tuples/lists, mappings (HF ModelOutput) and
    dataclasses."""
    if isinstance(output, Mapping):
        return [leaf for value in output.values() for leaf in output_leaves(value)]
    if isinstance(output, (tuple, list)):
        return [leaf for value in output for leaf in output_leaves(value)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [leaf for item in dataclasses.fields(output) for leaf in output_leaves(getattr(output, item.name))]
    return [output]


def output_tensors(output: Any) -> list[Tensor]:
    """The tensors of a module's output (``output_leaves``)."""
    if isinstance(output, Tensor):
        return [output]
    return [leaf for leaf in output_leaves(output) if isinstance(leaf, Tensor)]



@dataclass
class FallbackCall:
    """One recorded call of a fallback module: its inputs, its outputs' batch dims and their gradients."""

    args: tuple
    kwargs: dict
    output_dims: list[int | None]   # None: an output computed once for all the examples, gradients (B, *shape)
    grads: list[Tensor | None]
    rng_before: dict[str, Tensor] | None  # noisescale._rng.rng_state before the call, when it drew random numbers
    device: torch.device | None
    versions: list[tuple[Tensor, int]] = field(default_factory=list)
    shared: bool = False  # a call with a batch of 1 (its output expanded to B): every input is shared
    parameters: dict[str, Tensor] | None = None  # the module's parameters as the call used them (FSDP), by name
    weights: dict[str, Tensor] | None = None  # an RNN's weights as the call ran with them (``recurrent_weights``)
    linear_blocks: list | None = None  # attention.LinearCapture's record of the call's projections
    buffers: dict[str, Tensor] | None = None  # its buffers as the call found them, where its forward changes them
    uses: Any = None  # uses.ParameterUses: the call's parameter uses, all recognised (read by GhostPass.finish)
    blocks: int | None = None  # its tensors hold B blocks of that many rows flattened from the examples
    output_blocks: int | None = None  # its inputs hold the B examples, its outputs B blocks of that many rows
    output_views: list[tuple[Tensor, int]] = field(default_factory=list)  # outputs that are views, with versions
    precision: torch.dtype = torch.float64   # the lowest its outputs came in (autocast: bfloat16)
    autocast: tuple[str, torch.dtype] | None = None   # (device type, dtype) of the autocast the call ran under
    opaque: str | None = None   # the type of an input a re-run cannot be given (a cache), for a captured call


# ----------------------------------------------------------------------------------------------- batch dims

class BatchDims:
    """Default spec: dim 0 of every input tensor with B rows is the example index (not of a parameter passed in),
    size-1 dim 0 is broadcast, anything else is a constant; every output that requires grad holds the examples in dim 0.

    A spec for another layout overrides ``argument_dim`` (by the forward's argument name) and ``output_dims``."""

    def argument_dim(self, module: nn.Module, name: str, t: Tensor, batch_size: int) -> int | None:
        return 0 if t.dim() and t.shape[0] == batch_size and not is_parameter_table(t) else None

    def output_dims(self, module: nn.Module, count: int) -> list[int]:
        return [0] * count

    def unsupported_reason(self, module: nn.Module, arguments: dict[str, Any]) -> str | None:
        return None

    def input_dims(self, module: nn.Module, args: tuple, kwargs: dict, batch_size: int) -> list[int | None]:
        """One dim (or None) per leaf of tree_leaves((args, kwargs)), in that order."""
        names = _argument_names(module, len(args))
        dims = []
        for name, value in [*zip(names, args), *kwargs.items()]:
            leaves = tree_leaves(value)
            dims.extend(self.argument_dim(module, name, t, batch_size) if isinstance(t, Tensor) else None
                        for t in leaves)
        return dims


# inputs a re-run can be given as they are: no state of the examples in them
_PLAIN_INPUTS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
                 torch.layout, torch.memory_format, enum.Enum, slice, type(Ellipsis), types.FunctionType,
                 types.BuiltinFunctionType, types.MethodType)


def opaque_input(leaves: list[Any]) -> str | None:
    """The type of the first leaf (of tree_flatten((args, kwargs)), or ``output_leaves``) that is neither a tensor
    nor a plain value: an input that may hold the examples' state (a HuggingFace cache, which the forward also
    updates), so a re-run on one example can neither be given that example's share of it nor leave it as it was;
    an output whose tensors, if any, cannot be found. None if there is none."""
    return next((type(v).__name__ for v in leaves if not isinstance(v, (Tensor, *_PLAIN_INPUTS))), None)


def is_parameter_table(t: Tensor) -> bool:
    """A parameter, or a view of one: a table of the model, not a batch of examples. A parameter expanded to the
    examples (Perceiver's latents, query.expand(B, ...): stride 0 in dim 0) is the same for each and counts as
    examples."""
    return (isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)) and not (t.dim() and t.stride(0) == 0)


_ARGUMENT_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # forward function -> names after self


def _argument_names(module: nn.Module, count: int) -> list[str]:
    forward = module.forward
    function = getattr(forward, "__func__", None)   # a method: its names are read once (inspect takes ~15 us)
    names = None if function is None else _ARGUMENT_NAMES.get(function)
    if names is None:
        try:
            names = list(inspect.signature(forward).parameters)
        except (TypeError, ValueError):
            names = []
        if function is not None:
            _ARGUMENT_NAMES[function] = names
    return [names[j] if j < len(names) else f"arg{j}" for j in range(count)]


def _data_dim(module: nn.Module) -> int:
    return 0 if getattr(module, "batch_first", False) else 1


class MultiheadAttentionDims(BatchDims):
    """nn.MultiheadAttention: query/key/value (L, B, E), or (B, L, E) with batch_first; key_padding_mask (B, S);
    a 2-D attn_mask (L, S) is shared; outputs attn_output like the query, attention weights (B, ...)."""

    def unsupported_reason(self, module, arguments):
        query, mask = arguments.get("query"), arguments.get("attn_mask")
        if not isinstance(query, Tensor) or query.dim() != 3:
            return "it was called without a batch dimension"
        if isinstance(mask, Tensor) and mask.dim() == 3:
            return "a 3-D attn_mask (B * num_heads, L, S) is not split per example; pass a 2-D mask"
        return None

    def argument_dim(self, module, name, t, batch_size):
        if name in ("query", "key", "value"):
            return _data_dim(module)
        return 0 if name == "key_padding_mask" else None

    def output_dims(self, module, count):
        return [_data_dim(module)] + [0] * (count - 1)


class RecurrentDims(BatchDims):
    """nn.RNN / LSTM / GRU: input (T, B, H_in), or (B, T, H_in) with batch_first; hidden states (layers, B, H)
    in every layout; outputs (output, h_n) or (output, (h_n, c_n))."""

    def unsupported_reason(self, module, arguments):
        first = arguments.get("input")
        if not isinstance(first, Tensor):
            return f"its input is a {type(first).__name__} (PackedSequence is not supported)"
        if first.dim() != 3:
            return "it was called without a batch dimension"
        return None

    def argument_dim(self, module, name, t, batch_size):
        return _data_dim(module) if name == "input" else 1

    def output_dims(self, module, count):
        return [_data_dim(module)] + [1] * (count - 1)


BATCH_DIMS: dict[type, BatchDims] = {nn.MultiheadAttention: MultiheadAttentionDims(), nn.RNNBase: RecurrentDims()}
_DEFAULT_DIMS = BatchDims()


def batch_dims_for(module: nn.Module) -> BatchDims:
    """The spec of ``type(module)`` or of its nearest base class in BATCH_DIMS; the default one otherwise."""
    for base in type(module).__mro__:
        if base in BATCH_DIMS:
            return BATCH_DIMS[base]
    return _DEFAULT_DIMS


def bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (positional ones named after the forward's signature)."""
    return {**dict(zip(_argument_names(module, len(args)), args)), **kwargs}


# ----------------------------------------------------------------------------------------------- per-example grads

@dataclass
class _Rebuild:
    """Rebuilds a call's (args, kwargs) from its leaves. ``blocks``: the leaves at ``blocked`` come as (b, k, ...)
    and the module takes them as (b k, ...) rows (an MoE's tokens); its outputs go back to (b, k, ...)."""

    spec: Any
    blocks: int | None = None
    blocked: frozenset = frozenset()

    def __call__(self, leaves: list[Any]) -> tuple[tuple, dict]:
        if self.blocks:
            leaves = [t.flatten(0, 1) if k in self.blocked else t for k, t in enumerate(leaves)]
        return tree_unflatten(leaves, self.spec)


def _flatten_call(args: tuple, kwargs: dict) -> tuple[list[Any], _Rebuild]:
    leaves, spec = tree_flatten((args, kwargs))
    return leaves, _Rebuild(spec)


def _detached(leaves: list[Any]) -> list[Any]:
    return [t.detach() if isinstance(t, Tensor) else t for t in leaves]


def _with_examples(leaves: list[Any], dims: list[int | None], examples: dict[int, Tensor]) -> list[Any]:
    """``leaves`` with leaf k replaced by examples[k] (its batch dim restored as size 1)."""
    filled = list(leaves)
    for k, example in examples.items():
        filled[k] = example.unsqueeze(dims[k])
    return filled


class _OwnForward(nn.Module):
    """Runs ``inner.forward`` without ``inner``'s own hooks: an FSDP2 unit's would all-gather its shards over the
    tensors ``functional_call`` puts in place, leaving the re-run's parameters unused (zero gradients)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner.forward(*args, **kwargs)


def _selected_outputs(module, parameters, constants, rebuild, leaves, hooked: list[int]) -> tuple[Tensor, ...]:
    args, kwargs = rebuild(leaves)
    if is_fsdp2_unit(module):
        module, parameters, constants = (_OwnForward(module), {f"inner.{k}": v for k, v in parameters.items()},
                                         {f"inner.{k}": v for k, v in constants.items()})
    outputs = output_tensors(functional_call(module, (parameters, constants), args, kwargs, strict=False))
    if rebuild.blocks:
        return tuple(outputs[k].unflatten(0, (-1, rebuild.blocks)) for k in hooked)
    return tuple(outputs[k] for k in hooked)


def _by_vmap(module, parameters, constants, rebuild, leaves, dims, grads, output_dims, hooked):
    batched = [k for k, d in enumerate(dims) if d is not None]

    def one_example(example_inputs: list[Tensor], example_grads: list[Tensor]) -> dict[str, Tensor]:
        filled = _with_examples(leaves, dims, dict(zip(batched, example_inputs)))
        _, pullback = vjp(lambda p: _selected_outputs(module, p, constants, rebuild, filled, hooked), parameters)
        return pullback(tuple(g if d is None else g.unsqueeze(d) for g, d in zip(example_grads, output_dims)))[0]

    with quiet_torch_notes():
        return vmap(one_example, randomness="error")(
            [leaves[k].movedim(dims[k], 0) for k in batched],
            [g if d is None else g.movedim(d, 0) for g, d in zip(grads, output_dims)])


def _by_loop(module, parameters, constants, rebuild, leaves, dims, grads, output_dims, hooked, batch_size):
    rows: dict[str, list[Tensor]] = {name: [] for name in parameters}
    for i in range(batch_size):
        filled = [t.narrow(d, i, 1) if d is not None else t for t, d in zip(leaves, dims)]
        variables = {name: p.detach().requires_grad_() for name, p in parameters.items()}
        with torch.enable_grad():
            outputs = _selected_outputs(module, variables, constants, rebuild, filled, hooked)
            cotangents = [g[i] if d is None else g.narrow(d, i, 1) for g, d in zip(grads, output_dims)]
            example = example_gradients(outputs, list(variables.values()), cotangents)
        for name, grad in zip(variables, example):
            rows[name].append(grad)
    return {name: torch.stack(values) for name, values in rows.items()}


def _by_replay(module, parameters, constants, rebuild, leaves, dims, grads, output_dims, hooked, batch_size, call):
    """Re-run the whole batch from the saved generator state (same dropout masks), one backward per example."""
    devices = [call.device] if "cuda" in call.rng_before else []
    variables = {name: p.detach().requires_grad_() for name, p in parameters.items()}
    rows: dict[str, list[Tensor]] = {name: [] for name in parameters}
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        set_rng_state(call.rng_before, call.device, module_generators(module))   # its own put back by the caller
        outputs = _selected_outputs(module, variables, constants, rebuild, leaves, hooked)
        for i in range(batch_size):
            masked = []
            for g, d in zip(grads, output_dims):
                one = torch.zeros_like(g)
                one.narrow(d, i, 1).copy_(g.narrow(d, i, 1))
                masked.append(one)
            example = example_gradients(outputs, list(variables.values()), masked, retain_graph=True)
            for name, grad in zip(variables, example):
                rows[name].append(grad)
    return {name: torch.stack(values) for name, values in rows.items()}


def check_unmodified(call: FallbackCall) -> None:
    """Raises if an input or a parameter of the call changed in place since the call: its re-run, or the
    operands its captured uses kept, would no longer be those of the real pass."""
    for tensor, version in call.versions:
        if tensor._version != version:
            raise RuntimeError("an input or a parameter of this call was modified in place after the call (an "
                               "optimizer step inside PerExampleGradNorms.observe, say), so the call cannot be "
                               "re-run; step the optimizer after the measured pass, and avoid in-place operations "
                               "on the module's inputs")


def module_per_example_grads(module: nn.Module, call: FallbackCall, names: list[str],
                             batch_size: int) -> dict[str, Tensor | LinearFactors]:
    """Per-example gradients, (B, *shape) or as LinearFactors, of the call's output gradients with respect to the
    module's parameters ``names`` (dotted local names: its own and those of children it uses without calling
    them). By one re-run of the call for RNN/LSTM/GRU (``recurrent.py``) and nn.MultiheadAttention
    (``attention.py``), else by vmap, a per-example loop, or the replay of a call that drew random numbers."""
    check_unmodified(call)
    hooked = [k for k, g in enumerate(call.grads) if g is not None]
    if not hooked:
        return {}
    grads = [call.grads[k] for k in hooked]
    output_dims = [call.output_dims[k] for k in hooked]
    if call.parameters is not None:  # FSDP: copies taken in the forward, the module's own are shards by now
        parameters = {name: call.parameters[name] for name in names}
        constants = {name: p for name, p in call.parameters.items() if name not in parameters}
    else:
        parameters = {name: module.get_parameter(name).detach() for name in names}
        constants = {name: p.detach() for name, p in module.named_parameters() if name not in parameters}
    # a forward that updates its buffers (spectral norm's power iteration in train mode): the re-run starts from the
    # buffers the call found where they were kept, and works on copies either way (the real ones stay as they are)
    constants.update(call.buffers if call.buffers is not None else
                     {name: b.detach().clone() for name, b in module.named_buffers()})
    leaves, rebuild = _flatten_call(call.args, call.kwargs)
    leaves = _detached(leaves)
    rows = batch_size * (call.blocks or 1)
    dims = ([None] * len(leaves) if call.shared else
            batch_dims_for(module).input_dims(module, call.args, call.kwargs, rows))
    if call.blocks:   # (B k, ...) rows as (B, k, ...): each example's re-run takes its own k rows
        leaves = [t.unflatten(0, (batch_size, call.blocks)) if d == 0 else t for t, d in zip(leaves, dims)]
        grads = [g.unflatten(0, (batch_size, call.blocks)) for g in grads]
        rebuild.blocks, rebuild.blocked = call.blocks, frozenset(k for k, d in enumerate(dims) if d == 0)
    elif call.output_blocks:   # the examples in, B blocks of k rows out: each example's re-run gives its k rows
        grads = [g.unflatten(0, (batch_size, call.output_blocks)) for g in grads]
        rebuild.blocks = call.output_blocks
    with torch.no_grad():
        if call.linear_blocks is not None and not call.shared and call.grads[0] is not None:
            captured = captured_per_example_grads(module, call.linear_blocks, call.grads[0], names, batch_size)
            if captured is not None:  # the projections of the real pass: no re-run
                return captured
        if call.rng_before is None and not call.shared:
            arguments = bound_arguments(module, call.args, call.kwargs)
            if unrolled_supported(module):
                return unrolled_per_example_grads(module, arguments, call.grads, names,
                                                  call.parameters if call.parameters is not None else call.weights)
            if isinstance(module, nn.MultiheadAttention) and attention_supported(module, arguments, call.grads):
                return attention_per_example_grads(module, arguments, call.grads, names, call.parameters)
            inputs = [arguments.get(name) for name in _argument_names(module, 3)]
            if experts_supported(module, inputs, call.grads, names, rows):
                return experts_per_example_grads(module, inputs, call.grads, names, batch_size, call.parameters)
        if call.rng_before is not None:
            return _by_replay(module, parameters, constants, rebuild, leaves, dims, grads, output_dims, hooked,
                              batch_size, call)
        try:
            with conversions_refused():   # a forward converting its own modules crashed torch.func (vmap.py)
                return _by_vmap(module, parameters, constants, rebuild, leaves, dims, grads, output_dims, hooked)
        except (RuntimeError, NotImplementedError, ValueError, TypeError):
            # torch.func cannot batch some ops (fused RNN kernels, .item(), data-dependent control flow)
            return _by_loop(module, parameters, constants, rebuild, leaves, dims, grads, output_dims, hooked,
                            batch_size)
