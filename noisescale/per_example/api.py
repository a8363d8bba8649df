"""One entry point for per-example squared gradient norms that replaces ``loss.mean().backward()``.

For per-example losses l_i, g_i = dl_i/dtheta over all trainable parameters and the batch gradient is
gbar = mean_i g_i. A call runs the one real forward and backward of mean_i l_i (times ``loss_scale``), accumulates
into ``p.grad`` exactly as ``backward()`` would, and returns |g_i|^2 (B,) and |gbar|^2 -- the inputs of the
gradient noise scale estimators (McCandlish et al. 2018, appendix A).

Inputs: a tensor, a tuple of positional inputs or a mapping of keyword inputs (``model(**batch)``), every tensor
batch-first (:mod:`noisescale.batches`); the loss may read a HuggingFace ``ModelOutput`` (:mod:`noisescale.losses`).

Backends, per parameter (``PerExampleNorms.backend_of``):

- "ghost": a layer rule (``layers.py``) turns the module's input and output gradient, kept by hooks during the real
  pass, into the norms (Linear, Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm, RMSNorm, BatchNorm in eval mode,
  HF GPT-2's Conv1D, third-party RMSNorm layers and scaled word embeddings matched by structure, and rules
  registered with ``register_rule``).
- "module": the per-module fallback (``fallback.py``) for a module without a rule: vmap of the VJP of that
  module's own forward over the examples, fed with the output gradients of the real pass (or a per-example loop
  through that module where vmap cannot run it, as for fused RNN kernels). Covers nn.MultiheadAttention (with
  its out_proj), nn.RNN/LSTM/GRU in either layout, and parameters used directly inside a module's forward (ViT's
  cls_token and position table).
- "vmap": a separate whole-model torch.func pass (``vmap.py``, a per-example loop where vmap fails), for
  backend="vmap" and, under auto, for what the hooks cannot reach.

backend="auto" uses ghost where a rule applies, the per-module fallback for other modules and the whole-model
vmap for what neither can measure (docs/models.md, "The whole-model vmap", lists the cases); backend="ghost" allows
rules only and raises otherwise.

Broadcast calls: a module called on index tensors that returns a batch of 1 inside a forward over B examples (HF
position embeddings on ``position_ids`` of shape (1, T)) is measured exactly: its output is expanded to B in the
forward hook (the same values). p.grad stays bit-identical when that output feeds a broadcasting operation directly
(an addition, as in HF models); if other layers run on it first, they now run on B copies and p.grad may differ in
the last bits. Other outputs computed once for all the examples -- a rule layer on index tensors without the
examples (T5's relative position buckets (T, T), positions (T,)), a module with no input holding the examples and an
output of batch 1 (BEiT's relative position bias) -- are measured from the gradients of the operations that
broadcast them over the examples in the real backward (``broadcast.py``: additions, ``where``, products), found by
a walk of the graph after the model's forward; one that reaches the examples otherwise (a matrix product, Swin's
windows) goes to the whole-model vmap.

Layouts: hooked modules must see the examples in dim 0 (or 1 shared by all). A layer called on another layout --
sequence-first (T, B, d) tensors outside nn.MultiheadAttention and the RNNs, windows or flattened (B * T, d) rows --
is sent to the whole-model vmap when dim 0 differs from B; where another dim of an input has B's size, a forward on
B - 1 examples (``PerExampleGradNorms._probe``) tells which dim holds the examples. What cannot be detected:
positions passed *without* a batch dim (``embedding(torch.arange(T))``) look exactly like one index per example when
T == B and no input shows a dim of size B, and their norms are then wrong (a warning is issued when the indices are
arange(B)); otherwise they are measured as computed once for all the examples. Pass positions as (1, T). A parameter
used both through its module and directly (``F.linear(x, self.embedding.weight)`` next to the embedding call) is
found in the pass's graph (``graph_uses.py``) and measured with the layer's calls, or by the whole-model vmap where
its use is not one the capture knows. An output computed once for all the examples that is combined elementwise with
a per-example tensor of exactly its own shape (a table of B rows added to one row per example, no broadcast) is
taken for a tensor still shared by all of them. Activation
checkpointing (HF gradient checkpointing, reentrant or not) gives the same norms (tested): a non-reentrant
recomputation inside the backward is not recorded again (its outputs get no gradient); under reentrant
checkpointing the recomputed call is the one recorded.

FSDP (FSDP2 ``fully_shard``, FSDP1 with flat parameters or ``use_orig_params=True``; :mod:`noisescale.sharded`):
ghost rules and the per-module fallback work unchanged, since every example and its activations live on one rank
and FSDP unshards each layer around its forward and backward; the rules take shapes from the call, never from
``module.weight`` (a shard between calls), a fallback call keeps copies of its parameters, and FSDP1's flat
parameters are measured under their original names. The norms and |gbar|^2 are those of this rank's batch (scale
from the local loss); the whole-model vmap cannot run on sharded parameters, so a parameter that would need it is
an error naming it, raised before the backward; so is a weight a rule's layer reads that is also read outside its
module's calls (a tied output ``F.linear(h, wte.weight)``), found by counting the graph's uses of the unsharded
tensors the layer's calls read (``GhostPass.hold``); so is a rule layer's weight read though the layer is never
called (``x @ self.proj.weight.T``), found on the unsharded tensors each module's call holds of the layers under
it, at any depth (``GhostPass.hold_children``).
Dropout inside a fallback module is replayed from the generator state saved before its call (exact with the
global CPU/CUDA generators, and ``torch.Generator`` objects the model's modules hold: ``_rng.module_generators``, which
every extra forward of noisescale's puts back as it found them); a generator held elsewhere is not.

Losses that couple the examples (a contrastive loss, statistics of the batch) have no per-example gradients: the
first call checks that each l_i reads example i alone and raises otherwise (its two forwards also show a forward
that reorders the raw inputs before its first layer, which no graph shows: ``row_order.py``; such a model goes to
the whole-model vmap); ``observe`` warns about outputs that
couple them (``coupling.py``) and about a term over the batch in the model's own loss (an MoE's router loss:
``OutputGradients.batch_terms``).

Failures: if anything fails (a rule, the fallback, vmap, the loss's shape), every p.grad is put back as it was
before the call and ``PerExampleError`` names the module, its type, the parameters, the backend and what to do.
Under DDP, gradients already all-reduced by the failed backward cannot be taken back on the other ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn

from noisescale._buffers import BuffersBefore, kept_buffers
from noisescale._checks import listed
from noisescale._compiled import eager
from noisescale._grads import GradSnapshot
from noisescale._gradient_norm import gradient_values
from noisescale._graph import autograd_consumers, leaf_uses, operations_taking, output_shape
from noisescale._rng import isolated_rng, module_generators, rng_state
from noisescale._wrappers import path_to, unwrapped_module
from noisescale.batches import batch_size_of, call_model, select_examples, tensors_of, to_device
from noisescale.per_example.coupling import coupled_losses, coupled_on_any_rank, coupled_outputs, example_weights
from noisescale.per_example.errors import PerExampleError
from noisescale.per_example.factors import full_precision
from noisescale.per_example.ghost import GhostModule, GhostNormEngine, GhostPass, reordered_inputs_message
from noisescale.per_example.graph_uses import capture_linear_uses, linear_uses
from noisescale.per_example.layers import RULES, STRUCTURAL_RULES, LayerRule, rule_for, uses_batch_statistics
from noisescale.per_example.outputs import OutputGradients, inner_product
from noisescale.per_example.vmap import quiet_torch_notes, vmap_sqnorms
from noisescale.sharded import (flat_parameter_owners, fsdp1_original_parameters, fsdp2_shards, fsdp2_units,
                                is_sharded, refuse_tensor_parallel)

__all__ = ["PerExampleNorms", "PerExampleGradNorms", "ObservedNorms", "per_example_sqnorms", "BACKENDS"]

BACKENDS = ("auto", "ghost", "vmap")


@dataclass(frozen=True)
class PerExampleNorms:
    """Result of one step.

    loss: scalar, detached mean of the per-example losses.
    losses: (B,) detached per-example losses l_i.
    sqnorms: (B,) |g_i|^2 summed over all trainable parameters (unscaled by loss_scale).
    grad_sqnorm: scalar |gbar|^2 of this batch's mean gradient (independent of what p.grad held before).
    by_parameter: parameter name -> (B,) contribution to sqnorms, when asked for.
    backend_of: parameter name -> "ghost" (a layer rule) | "module" (the per-module fallback) | "vmap" (the
        whole-model torch.func pass).
    """

    loss: Tensor
    losses: Tensor
    sqnorms: Tensor
    grad_sqnorm: Tensor
    by_parameter: dict[str, Tensor] | None
    backend_of: dict[str, str]


@dataclass
class ObservedNorms:
    """What :meth:`PerExampleGradNorms.observe` read from a forward and backward run by the caller; filled when the
    ``with`` block ends. sqnorms: (B,) |g_i|^2 summed over all trainable parameters; by_parameter: name -> (B,)
    contribution, when asked for; backend_of: name -> "ghost" | "module" | "vmap", as in ``PerExampleNorms``;
    received: the names of the parameters the caller's backward has brought a gradient so far, filled as it runs
    (a block left before its end can tell whether its backward ran)."""

    sqnorms: Tensor | None = None
    by_parameter: dict[str, Tensor] | None = None
    backend_of: dict[str, str] | None = None
    received: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Plan:
    ghost: dict[nn.Module, GhostModule]
    vmap_names: list[str]
    backend_of: dict[str, str]
    parameters: dict[str, nn.Parameter]
    # parameters of rule layers their rules do not measure (``_unmeasured_by_rule``): to the whole-model vmap, never
    # to an enclosing fallback, whose captures in later passes would not see the weight a pre-hook computes
    unhooked: frozenset[str] = frozenset()
    generators: tuple[torch.Generator, ...] = ()   # the model's own (``_rng.module_generators``)


def _checked_losses(losses: Any, batch_size: int) -> Tensor:
    if not isinstance(losses, Tensor) or losses.shape != (batch_size,):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn(outputs, targets) must return per-example losses of shape ({batch_size},), got {got}; "
            "use reduction='none' and reduce any token dims per example")
    if not losses.is_floating_point():
        raise ValueError(f"loss_fn(outputs, targets) must return floating-point per-example losses, got "
                         f"{losses.dtype}: a loss computed from the outputs, not a count of correct predictions")
    if losses.grad_fn is None:
        raise ValueError("loss_fn(outputs, targets) returned losses without an autograd graph (no trainable "
                         "parameter reaches them), so no gradient can be taken: compute them from the outputs "
                         "without .detach(), .item() or torch.no_grad(), and call with gradients enabled")
    return losses


def _parametrized_rule(module: nn.Module) -> LayerRule | None:
    """The rule of a rule layer that computes a tensor its rule measures by ``torch.nn.utils.parametrize`` from
    trainable parameters (weight norm on a Linear without bias, on an Embedding), or None."""
    parametrizations = getattr(module, "parametrizations", None)
    rule = rule_for(module) if isinstance(parametrizations, nn.ModuleDict) else None
    if rule is None or rule.unsupported_reason(module) is not None:
        return None
    return rule if any((rule.parameter_names is None or name in rule.parameter_names)
                       and any(p.requires_grad for p in parametrizations[name].parameters())
                       for name in parametrizations) else None


def _scaled_by_frequency(what: str) -> str:
    return (f"{what} scale_grad_by_freq=True: its gradient divides each token's by the token's count in the whole "
            "batch, so the examples are coupled, their gradients taken alone do not add up to the batch's, and the "
            "batch gradient's mean changes with the batch size, which the noise scale assumes it does not; measure "
            "with scale_grad_by_freq=False")


_BATCH_NORMS = ("NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0")


def _refuse_coupled_operations(nodes: set, parameters: dict[str, Tensor]) -> None:
    """A ValueError where an operation of the graph (``nodes``) couples the examples in the backward or by batch
    statistics outside the modules the plan refuses for it (``_build_plan``), which the independence check's
    forwards, in eval mode, do not see: an embedding lookup with scale_grad_by_freq=True (``F.embedding`` on a table
    of one's own module), whose norms were the loop's while the batch's gradient is not their mean; a batch norm
    with training=True over more than one row (``F.batch_norm(..., self.training)`` in one's own module; an
    instance norm's runs on one row of all the channels), whose norms were a mix of neither."""
    for node in nodes:
        kind = type(node).__name__
        if kind in ("EmbeddingBackward0", "EmbeddingBagBackward0") and node._saved_scale_grad_by_freq:
            variable = getattr(node.next_functions[0][0], "variable", None)
            names = [name for name, p in parameters.items() if p is variable]
            raise ValueError(_scaled_by_frequency(
                f"an embedding lookup of parameter {names[0]!r} has" if names else
                "an embedding lookup (F.embedding, F.embedding_bag) of a tensor computed from parameters has"))
        rows = (output_shape(node, 0) or (1,))[0] if kind in _BATCH_NORMS and getattr(node, "_saved_training",
                                                                                      False) else 1
        if rows > 1:   # (the output's shape from the node's metadata: a saved tensor under checkpointing is not read)
            raise ValueError(
                f"an operation of the model normalises with batch statistics over {rows} rows "
                "(F.batch_norm with training=True outside an nn.BatchNorm), so the examples are coupled and a "
                "per-example gradient is undefined; use nn.BatchNorm (measured from micro-batches by AdaptiveTrainer "
                "and the integrations), GroupNorm or LayerNorm, or normalise with running statistics "
                "(training=False)")


def _encloses(outer: str, inner: str) -> bool:
    """Whether the module at path ``outer`` contains the one at ``inner`` (the model's own path is "<model>")."""
    return outer != inner and (outer == "<model>" or inner.startswith(outer + "."))


def _leaf_uses(nodes: list, visited: set | None = None) -> dict[int, list]:
    """id(leaf) -> [leaf, n, its gradient accumulator] for the leaf tensors (parameters) of the autograd graph from
    ``nodes`` back, n the number of the graph's operations that take the leaf directly: one per call of a layer
    that uses its weight (``leaf_uses``; ``visited`` receives the graph's nodes)."""
    return {id(node.variable): [node.variable, n, node] for node, n in leaf_uses(nodes, visited).items()}


def _unused(plan: _Plan, ghost_pass: GhostPass) -> list[str]:
    """The parameters no hooked call of their module used in this pass, but for the whole-model vmap's."""
    return sorted(name for name, backend in plan.backend_of.items()
                  if backend != "vmap" and ghost_pass.use_count[name] == 0 and name not in ghost_pass.vmap_names)


def _attach_unused(plan: _Plan, ghost_pass: GhostPass) -> list[str]:
    """FSDP: the graph holds the unsharded tensors, not the model's parameters, so a parameter no call of its module
    used (MHA's out_proj, read by MHA's forward) goes to the nearest enclosing module that went through the
    fallback (``GhostPass.attach``) whether the graph takes it or not. Returns those without such a module."""
    return [name for name in _unused(plan, ghost_pass) if name in plan.unhooked or not ghost_pass.attach(name)]


def _read_without_a_call(ghost_pass: GhostPass, names: list[str], roots: list, model: nn.Module,
                         parameters: dict[str, Tensor]) -> set[str]:
    """FSDP, the first pass of a plan: the parameters the graph from ``roots`` takes outside their layers' calls,
    which only the whole-model vmap would measure:

    - those of ``names`` (``_attach_unused``) whose unsharded tensor, held at the end of a call of a module above
      their layer (``GhostPass.hold_children``), it takes: ``x @ self.proj.weight.T`` in a forward. The others (a
      layer the model does not use) keep zero norms;
    - those of ``parameters`` that are FSDP1's original parameters (``fsdp1_original_parameters``) and that it
      takes as leaves: a weight of another unit read after that unit resharded (``self.blocks[0].proj.weight`` in
      block 1), which FSDP1 lets through at world size 1, where the resharded view is the whole weight."""
    held = {name: ghost_pass.read_by_callers.get(name, {}) for name in names}
    originals = {id(p) for p in fsdp1_original_parameters(model)}
    in_graph = _leaf_uses(roots) if originals else {}
    return ({name for name, count in _held_uses(held, roots).items() if count > 0}
            | {name for name, p in parameters.items() if id(p) in in_graph and id(p) in originals})


def _uses_by_name(in_graph: dict[int, list], parameters: dict[str, Tensor]) -> dict[str, int]:
    """name -> the operations taking the parameter, from ``_leaf_uses``."""
    return {name: in_graph.get(id(parameter), (None, 0))[1] for name, parameter in parameters.items()}


def _captured_from_graph(ghost_pass: GhostPass, extra: dict[str, int], in_graph: dict[int, list], consumers: dict,
                         parameters: dict[str, Tensor]) -> set[str]:
    """The parameters of ``extra`` (name -> the graph's uses no hooked call made) all of whose extra uses are
    matrix products of the examples' rows (a tied output head read outside any module call: ``graph_uses``),
    hooked to add their per-example gradients to the layers' in the backward, and counted as uses."""
    captured = set()
    for name, count in extra.items():
        uses = linear_uses(in_graph[id(parameters[name])][2], consumers, ghost_pass.hooked_nodes,
                           ghost_pass.broadcasts.rows, ghost_pass.batch_size)
        if uses is not None and len(uses) == count:
            capture_linear_uses(uses, partial(ghost_pass.add_shared, name), ghost_pass.pass_hooks,
                                partial(setattr, ghost_pass, "repeated", True))
            ghost_pass.use_count[name] += count
            ghost_pass.graph_captured.add(name)
            captured.add(name)
    return captured


def _held_uses(held: dict[str, dict[int, Tensor]], nodes: list) -> dict[str, int]:
    """name -> the number of operations of the graph from ``nodes`` back that take the FSDP-unsharded tensors its
    rule calls read (``GhostPass.hold``): FSDP2's unsharded parameters are leaves (taken through their gradient
    accumulators), FSDP1's are views of its flat parameter (taken through their own nodes)."""
    consumers = autograd_consumers(nodes)
    accumulators = {id(node.variable): node for node in consumers if hasattr(node, "variable")}
    return {name: sum(operations_taking(accumulators.get(key) if tensor.grad_fn is None else tensor.grad_fn, consumers)
                      for key, tensor in tensors.items())
            for name, tensors in held.items()}


def _record_norm(received: dict[str, Tensor], ghost_pass: GhostPass | None, name: str, grad: Tensor) -> None:
    """Keeps |grad| (at least float32; no dtype argument where the gradient has one already, which costs a
    microsecond a call) of the gradient this backward brings a parameter, before accumulation; the pass, if any,
    keeps it too for the parameters whose uses it captured (``GhostPass.note_gradient``)."""
    if name in received:  # a second backward inside this one: reentrant checkpointing splitting a shared weight
        raise RuntimeError(_split_gradient(name))
    values = gradient_values(grad)   # (a sparse one's: nn.Embedding(sparse=True))
    received[name] = (torch.linalg.vector_norm(values) if values.dtype in (torch.float32, torch.float64) else
                      torch.linalg.vector_norm(values, dtype=torch.promote_types(values.dtype, torch.float32)))
    if ghost_pass is not None:
        ghost_pass.note_gradient(name, grad)


def _split_gradient(name: str) -> str:
    return (f"parameter {name!r} received its gradient in two parts (reentrant activation checkpointing around "
            "some but not all of its uses), whose parts noisescale cannot add up (neither |gbar|^2 from the "
            "gradients as they arrive nor the per-example norms); use non-reentrant checkpointing "
            "(use_reentrant=False) or checkpoint all of its uses together")


def _mark_received(received: set[str], split: set[str], ghost_pass: GhostPass, name: str, grad: Tensor) -> None:
    """Notes that this backward brought the parameter a gradient (``GhostPass.note_gradient``, as above), and
    whether it came in two parts (refused after the caller's backward)."""
    if name in received:
        split.add(name)
    received.add(name)
    ghost_pass.note_gradient(name, grad)


def _refuse_parameter_adapters(path_of: dict[nn.Module, str]) -> None:
    """Raise a ValueError naming them where the model has PEFT LoRA adapters on parameters
    (``LoraConfig(target_parameters=...)``, PEFT's ``ParamWrapper``: an MoE's 3-D expert weights). Such an adapter
    registers a parametrization on the wrapped module inside every forward and removes it after; the per-example
    passes that re-run modules (torch.func's ``functional_call``) swap those weights meanwhile, and a new user's
    Mixtral was left without its ``down_proj``: every later forward raised, with noisescale or without."""
    names = [path for module, path in path_of.items()
             if hasattr(module, "_activate_lora") and isinstance(getattr(module, "parameter_name", None), str)]
    if names:
        raise ValueError(f"modules {listed(names)} are PEFT LoRA adapters on parameters (LoraConfig("
                         "target_parameters=...)), which register a parametrization on their module inside every "
                         "forward: per-example gradient norms cannot re-run them without breaking the model. Put the "
                         "adapters on modules (target_modules), or measure the noise scale from micro-batches "
                         "(noisescale.estimators.two_batch_noise_scale, or DDPNoiseScale across ranks)")


def _squared_total(norms: dict[str, Tensor], device: torch.device) -> Tensor:
    """sum of |grad|^2 over the recorded gradient norms (float32 at least)."""
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    stacked = torch.stack(list(norms.values()))
    with full_precision():
        return torch.linalg.vecdot(stacked, stacked)


class _GradientTaps:
    """One tensor hook per trainable parameter, installed when the plan is built and inert unless a call
    listens: hooks registered and removed on every call cost more than the measurement itself on small models.
    The listener gets (name, gradient) before the gradient is accumulated into p.grad."""

    def __init__(self):
        self._handles: list = []
        self.listener: Callable[[str, Tensor], None] | None = None

    def cover(self, parameters: dict[str, nn.Parameter]) -> None:
        """Tap exactly these parameters (the plan's trainable ones), replacing the taps of an older plan."""
        self.close()
        self._handles = [p.register_hook(torch.utils.hooks.unserializable_hook(partial(self._on_grad, name)))
                         for name, p in parameters.items()]   # (not pickled with the parameter: no warning)

    def _on_grad(self, name: str, grad: Tensor) -> None:
        listener = self.listener
        if listener is not None:
            listener(name, grad)

    @contextmanager
    def listening(self, listener: Callable[[str, Tensor], None]) -> Iterator[None]:
        self.listener = listener
        try:
            yield
        finally:
            self.listener = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class PerExampleGradNorms:
    """Stateful shell: installs the hooks once and measures every step it is called on.

    ``norms = PerExampleGradNorms(model, loss_fn)(inputs, targets)`` replaces ``loss.mean().backward()``: p.grad
    ends as that backward leaves it (bit-identical under ghost and auto). Use as a context manager or call
    ``close()`` to remove the hooks.

    Parameters shared by several modules or calls, and those measured by the per-module fallback, are measured by
    summing their per-example gradients before the norm, which materialises (B x numel) for those parameters only.

    ``check_independence``: the first call of a plan runs two more forwards in eval mode, of the batch
    and with some examples' inputs replaced by others', and refuses a loss whose other examples' values moved (a
    contrastive loss: ``coupling.py``); ``observe`` compares the model's outputs instead, and walks the pass's
    graph for a term over the batch in the model's own loss (``OutputGradients.batch_terms``), warns, and keeps
    what it found in ``coupling`` (None if nothing), which the monitors' summaries report; under FSDP both
    checks' forwards run on every rank at once (the first call of a plan only), and the ranks refuse, or warn,
    together.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], backend: str = "auto",
                 chunk_size: int | None = None, by_parameter: bool = False, check_independence: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.model, self.loss_fn, self.backend = model, loss_fn, backend
        # the module inside DDP and compile wrappers, whose forward runs without DDP's machinery: the probe, the
        # independence check and observe's vmap call it; its parameter names are the model's without the prefix
        self._module = unwrapped_module(model)
        self._prefix = path_to(model, self._module)
        self.chunk_size, self.by_parameter = chunk_size, by_parameter
        self.check_independence = check_independence
        self._path_of = {module: path or "<model>" for path, module in model.named_modules()}
        # FSDP (noisescale.sharded): the parameters are shards between calls; FSDP1 may keep them in flat parameters
        self._sharded = is_sharded(model)
        refuse_tensor_parallel(model)
        _refuse_parameter_adapters(self._path_of)
        if self._sharded and backend == "vmap":
            raise ValueError("backend='vmap' cannot run on an FSDP-sharded model (torch.func needs whole "
                             "parameters); use backend='auto' or 'ghost'")
        flat_owners = {module for module, _, _, _ in flat_parameter_owners(model)} if self._sharded else set()
        if backend == "vmap":
            hooked = []
        elif backend == "ghost":
            hooked = [m for m in self._path_of if rule_for(m) is not None]
        else:  # auto: every module with parameters of its own, by its rule or by the per-module fallback
            adopted = _adopted_containers(model, self._sharded)
            hooked = [m for m in self._path_of if m in flat_owners or any(True for _ in _own_parameters(m, adopted))
                      or _parametrized_rule(m) is not None]
        self._engine = GhostNormEngine(hooked, root=model, resharding=fsdp2_units(model) if self._sharded else ())
        self._taps = _GradientTaps()  # |gbar|^2 (FSDP: hooks on its unsharded parameters, per call)
        self._cached_plan: tuple[tuple, _Plan] | None = None
        self._probes: dict[tuple, dict] = {}   # (B, input shapes) -> the probe's shapes per call (``_probe``)
        self._warned_ambiguous = False
        self._warned_reordered = False
        self._warned_unmatched: set[str] = set()   # modules whose re-run did not add up (warned once each)
        self._warned_redraws = False   # a pass drew random numbers and sent parameters to the vmap (warned once)
        self._buffers_before = BuffersBefore(model)   # each pass's buffers as it found them, for the vmap after it
        self._warned_buffers: set[str] = set()   # buffers changed by a pass without a copy (warned once each)
        self._flattened_rows = False   # a pass saw a rule's call with B k rows: probe from then on (``_probe``)
        self._warned_unchecked_uses = False
        self._uses_checked = False     # FSDP: whether a pass of this plan counted the graph's uses of each parameter
        self._read_elsewhere: set[str] = set()   # the rule-measured ones the last check found read outside their
        # layers' calls, and not captured from the graph: measured by the vmap (FSDP: from the first pass on)
        self._observed = False         # observe keeps the output gradients in its first pass, and in every pass
        self._outputs_needed = False   # once one needed the whole-model vmap (``OutputGradients``)
        self._independence_checked = False   # whether a call of this plan checked that the losses are per example
        self.coupling: str | None = None   # observe's finding: the outputs that couple the examples (kept once found)
        self._closed = False

    def close(self) -> None:
        """Remove the hooks from the model."""
        self._engine.close()
        self._taps.close()
        self._closed = True
    def __enter__(self) -> PerExampleGradNorms:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _plan_key(self) -> tuple:
        """Everything the plan depends on that may change between calls: each module's parameters (identity,
        requires_grad), the modules' train/eval modes and the rule registries. The module tree is fixed at
        ``__init__`` (the hooks are installed then)."""
        shards = fsdp2_shards(self.model) if self._sharded else {}   # not the unsharded parameters FSDP2 registers
        return (tuple(None if p is None else (id(shards.get(id(p), p)), p.requires_grad)
                      for module in self._path_of for p in module._parameters.values()),
                tuple(id(child) for module in self._path_of for child in module._modules.values()),  # modules added
                tuple(module.training for module in self._path_of), tuple(RULES.items()), tuple(STRUCTURAL_RULES))

    def _plan(self) -> _Plan:
        """The plan of this call: rebuilt only when freezing, parameters, train/eval modes or the rules have
        changed since the last call (building it walks the whole model); a pass does not change it."""
        key = self._plan_key()
        if self._cached_plan is None or self._cached_plan[0] != key:
            plan = self._build_plan()
            self._probes.clear()
            self._uses_checked, self._read_elsewhere, self._observed = False, set(), False
            self._independence_checked = False
            if not self._sharded:
                self._taps.cover({name: plan.parameters[name] for name in plan.backend_of})
            self._buffers_before.watch([module for module in self._path_of if module._buffers])
            self._cached_plan = (key, plan)
        return self._cached_plan[1]

    def _checked_plan(self, loss_scale: float | Tensor) -> tuple[_Plan, float]:
        """This call's plan and ``loss_scale`` as a float, both checked."""
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed (its hooks were removed from the model); "
                               "create a new one to measure again")
        scale = float(loss_scale)
        if not scale > 0:
            raise ValueError(f"loss_scale must be positive, got {scale}")
        plan = self._plan()
        if not plan.backend_of:
            raise ValueError("model has no trainable parameters (all have requires_grad=False)")
        return plan, scale

    def _build_plan(self) -> _Plan:
        """Which trainable parameters go to ghost, the per-module fallback and vmap."""
        parameters = dict(self.model.named_parameters())
        name_of = {p: name for name, p in parameters.items()}
        adopted = _adopted_containers(self.model, self._sharded)
        owned = {module: [(n, name_of[p]) for n, p in _own_parameters(module, adopted)
                          if p.requires_grad and not _is_flat(p)] for module in self._path_of}
        if self._sharded:  # FSDP1 flat parameters: measured by the modules that own their original parameters
            for module, local_name, name, requires_grad in flat_parameter_owners(self.model):
                if requires_grad:
                    owned.setdefault(module, []).append((local_name, name))
        owned_names = {name for entries in owned.values() for _, name in entries}
        orphans = sorted(name for name, p in parameters.items()
                         if p.requires_grad and not _is_flat(p) and name not in owned_names)
        if orphans:
            raise ValueError(f"trainable parameters {orphans} belong to modules added to the model after this "
                             f"{type(self).__name__} was created (a parametrization such as weight_norm, say), so "
                             "no hook sees them; create it (or the monitor) after changing the model")
        owners: dict[str, list[tuple[nn.Module, str, str]]] = {}
        unhooked: set[str] = set()   # parameters of a rule layer its rule does not measure (``_unmeasured_by_rule``)
        for module, path in self._path_of.items():
            if uses_batch_statistics(module):
                raise ValueError(
                    f"module {path!r} ({type(module).__name__}) normalises with batch statistics ("
                    + ("train mode" if module.track_running_stats else "track_running_stats=False, in any mode")
                    + "), so the examples are coupled and a per-example gradient is undefined; "
                    + ("put it in eval mode (module.eval()) or " if module.track_running_stats else "")
                    + "use GroupNorm/LayerNorm, or measure the noise scale from micro-batches, "
                    "each normalised by its own statistics as in gradient accumulation, as "
                    "AdaptiveTrainer(max_micro_batch=...) and the HF Trainer and Lightning integrations with "
                    "gradient accumulation do (under DDP too)")
            if (isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.scale_grad_by_freq
                    and module.weight.requires_grad):   # (a frozen table's flag scales no gradient)
                raise ValueError(_scaled_by_frequency(f"module {path!r} ({type(module).__name__}) has"))
            local = owned.get(module)
            if not local:
                continue
            rule = rule_for(module)
            reason = "no ghost rule for this module type" if rule is None else rule.unsupported_reason(module)
            # parameters the rule does not know, from which a forward pre-hook computes the weight: left out of the
            # layer's hooked calls, they are found in the pass's graph (``_bypassed``) and go to the whole-model vmap
            foreign = None if reason is not None else _unmeasured_by_rule(rule, local)
            if self.backend == "ghost" and (reason or foreign) is not None:
                raise ValueError(f"backend='ghost' cannot handle module {path!r} ({type(module).__name__}): "
                                 f"{reason or foreign}; use backend='auto' to measure it by the "
                                 + ("per-module fallback" if foreign is None else "whole-model vmap"))
            backend = "vmap" if self.backend == "vmap" else "ghost" if reason is None else "module"
            for n, name in local:
                if foreign is not None and n not in rule.parameter_names:
                    unhooked.add(name)
                owners.setdefault(name, []).append((module, n, backend))
        backend_of: dict[str, str] = {}
        for name, uses in owners.items():
            ruled = [self._path_of[module] for module, _, backend in uses if backend == "ghost"]
            # a module without a rule that registers a parameter a layer with a rule inside it uses (BERT's masked-LM
            # head holds its decoder's bias, for tying): the layer's calls measure it, and the check for weights
            # read outside their layers' calls (``_bypassed``) catches a direct use by the enclosing module
            uses[:] = [use for use in uses if use[2] != "module" or not any(
                _encloses(self._path_of[use[0]], path) for path in ruled)]
            backends = {backend for _, _, backend in uses}
            backend_of[name] = backends.pop() if len(backends) == 1 else "module"
        hooked: dict[nn.Module, GhostModule] = {}
        for name, uses in owners.items():
            if backend_of[name] == "vmap" or name in unhooked:
                continue
            for module, local_name, _ in uses:
                rule = rule_for(module) if backend_of[name] == "ghost" else None
                entry = hooked.get(module)
                if entry is None or (entry.rule is not None and rule is None):
                    names = dict(entry.names) if entry else {}
                    entry = hooked[module] = GhostModule(self._path_of[module], rule, names)
                entry.names[local_name] = name
        if self.backend == "auto":   # a rule layer without trainable parameters of its own whose weight is
            # parametrized (weight norm on a Linear without bias, on an Embedding): its rule gives each example's
            # gradient of that weight (``GhostPass.claim_parametrized``), as for a layer with a bias
            for module, path in self._path_of.items():
                rule = None if module in hooked else _parametrized_rule(module)
                if rule is not None:
                    hooked[module] = GhostModule(path, rule, {})
        vmap_names = sorted(name for name, backend in backend_of.items() if backend == "vmap")
        shards = fsdp2_shards(self.model) if self._sharded else {}
        return _Plan(hooked, vmap_names, backend_of, {name: shards.get(id(p), p) for name, p in parameters.items()},
                     frozenset(unhooked), module_generators(self._module))

    def _bypassed(self, plan: _Plan, ghost_pass: GhostPass, roots: list) -> list[str]:
        """Parameters in the graph of the pass (from the autograd nodes ``roots``) although no hooked call of their
        module used them: their module's forward was bypassed (nn.MultiheadAttention reads out_proj.weight
        directly). They are measured with the nearest enclosing module that went through the per-module fallback,
        else by the whole-model vmap (auto). So are the rule-measured parameters that the graph takes more often
        than their layers' hooked calls did, a weight also read outside its layer's call (``other.weight`` in
        another module's forward), whose rule would miss that use: checked in every pass (one counting walk,
        ``_check_graph``), since a forward may start reading a weight directly after its first calls; those whose
        other uses are products of the examples' rows are captured from the graph, the others go to the vmap in
        that pass. Under FSDP, the first pass of each plan, and to the vmap from then on (the check holds the
        unsharded parameters the rule calls read until the backward). ghost raises before the backward, so a failed
        call leaves p.grad untouched. Returns the vmap ones."""
        unused = _unused(plan, ghost_pass)
        if self._sharded:
            check = not self._uses_checked
            if not unused and not check:
                return sorted(self._read_elsewhere & set(plan.backend_of))
            # the graph holds FSDP's unsharded parameters, not the model's shards: the rule calls' own uses are
            # counted on the unsharded tensors they read, and a parameter also read elsewhere is refused
            unattached = _attach_unused(plan, ghost_pass)
            if check:
                held = _held_uses(ghost_pass.held, roots)
                self._read_elsewhere = set(self._read_elsewhere_now(plan, ghost_pass, held))
                self._read_elsewhere |= _read_without_a_call(ghost_pass, unattached, roots, self.model, plan.parameters)
            return sorted(self._read_elsewhere)
        in_graph = self._check_graph(plan, ghost_pass, roots)
        bypassed = sorted(name for name in unused if id(plan.parameters[name]) in in_graph)
        if bypassed and self.backend == "ghost":
            raise ValueError(f"backend='ghost' cannot measure parameters {bypassed}: they receive a gradient but "
                             "their module's forward was never called (used directly by another module); use "
                             "backend='auto' to measure them with the module that uses them")
        if self._read_elsewhere and self.backend == "ghost":
            raise ValueError(f"backend='ghost' cannot measure parameters {sorted(self._read_elsewhere)}: another "
                             "module also reads them directly, outside their own module's calls, which the hooks "
                             "do not see; use backend='auto' to measure them by the whole-model vmap")
        return sorted({name for name in bypassed if name in plan.unhooked or not ghost_pass.attach(name)}
                      | self._read_elsewhere)

    def _check_graph(self, plan: _Plan, ghost_pass: GhostPass, roots: list) -> dict[int, list]:
        """One walk of the pass's graph from the autograd nodes ``roots`` before its backward (a second, listing
        the operations, only where a weight is read elsewhere): ``_read_elsewhere``, the rule-measured parameters it
        takes outside their layers' calls, but for those whose uses there are captured from the graph
        (``_captured_from_graph``). Returns the graph's leaves (``_leaf_uses``)."""
        visited: set = set()
        in_graph = _leaf_uses(roots, visited)
        if not self._uses_checked:   # the first pass of a plan
            _refuse_coupled_operations(visited, plan.parameters)
        extra = self._read_elsewhere_now(plan, ghost_pass, _uses_by_name(in_graph, plan.parameters),
                                         ghost_pass.calls_outside(visited))
        self._read_elsewhere = set(extra) - (_captured_from_graph(
            ghost_pass, extra, in_graph, autograd_consumers(roots), plan.parameters) if extra else set())
        return in_graph

    def _read_elsewhere_now(self, plan: _Plan, ghost_pass: GhostPass, in_graph: dict[str, int],
                            outside: dict[str, int] | None = None) -> dict[str, int]:
        """name -> extra uses, for the rule-measured parameters that the pass's graph takes more often (``in_graph``:
        name -> operations taking it) than their layers' hooked calls in it did (``_bypassed``): ``outside``, name
        -> its hooked calls whose output the graph does not reach (an aux head the loss does not read), are not.
        Such a call's rule sees no gradient, so a penalty on the weight in the loss, one more use, was missed when
        the call was counted (norms of 0, a review of loops found)."""
        self._uses_checked = True
        outside = outside or {}
        return {name: in_graph.get(name, 0) - ghost_pass.use_count[name] + outside.get(name, 0)
                for name, backend in plan.backend_of.items()
                if backend == "ghost" and name not in ghost_pass.fallback_names | ghost_pass.vmap_names
                and 0 < ghost_pass.use_count[name]
                and ghost_pass.use_count[name] - outside.get(name, 0) < in_graph.get(name, 0)}

    def __call__(self, inputs: Any, targets: Any, *, loss_scale: float | Tensor = 1.0) -> PerExampleNorms:
        """One step on ``inputs`` (a tensor, a tuple of positional inputs or a mapping of keyword inputs, every
        tensor batch-first: :mod:`noisescale.batches`) and ``targets`` (any pytree of batch-first tensors, or
        None); ``loss_fn(outputs, targets)`` receives whatever the model returns (a HuggingFace ModelOutput, say)
        and must return (B,) per-example losses.

        If anything fails, every p.grad is put back as it was before the call (None stays None, accumulated
        gradients are restored in place) and the error names the module, the parameters and the backend."""
        batch_size = batch_size_of(inputs)
        plan, scale = self._checked_plan(loss_scale)
        parameters = plan.parameters
        names = list(plan.backend_of)
        # under FSDP2 also the unsharded parameters registered now, which hold an unsynchronised accumulation
        saved = GradSnapshot(list({id(p): p for p in [*parameters.values(), *self.model.parameters()]}.values())
                              if self._sharded else [parameters[name] for name in names])
        try:
            with eager():   # a compiled model's pass runs eagerly (``noisescale._compiled``)
                return self._measure(inputs, targets, loss_scale, scale, batch_size, plan, parameters, names)
        except BaseException:
            saved.restore()
            raise

    def _probe(self, plan: _Plan, inputs: Any, batch_size: int) -> dict | None:
        """Where an input has a dim of size B besides dim 0 (a sequence as long as the batch), a module's dim 0 of
        size B may hold positions, not examples (T5's relative position buckets (T, T), a sequence-first layer
        (T, B, d)), and its norms would be silently wrong. Then one forward without grad on the first B - 1
        examples, with the random number generators forked (the training's own draws are unchanged) and the
        model's buffers put back afterwards (a step counter, a running average), shows which calls' dim 0 follows
        the batch (``GhostPass.follows_batch``); cached per batch size and input shapes. Python attributes a
        forward changes and the user's own forward hooks do see this extra call.
        None otherwise, and under FSDP, whose forward communicates."""
        shapes = tuple(tuple(t.shape) for t in tensors_of(inputs))
        if batch_size < 2 or not plan.ghost or self._sharded or not (
                self._flattened_rows or any(batch_size in s[1:] for s in shapes)):
            return None
        key = (batch_size, shapes)
        if key not in self._probes:
            model = self._module
            device = next(iter(plan.parameters.values())).device
            try:   # counters, running averages: put back after
                with kept_buffers(model), torch.no_grad(), isolated_rng(plan.parameters.values(), plan.generators), \
                        quiet_torch_notes(), self._engine.probing(plan.ghost, batch_size - 1) as found:
                    call_model(model, to_device(select_examples(inputs, slice(0, batch_size - 1)), device))
            except Exception:   # the model does not run on these inputs alone: unchecked (warned after the pass)
                return None
            if len(self._probes) >= 16:
                self._probes.clear()
            self._probes[key] = dict(found)
        return self._probes[key]

    def _check_independence(self, plan: _Plan, inputs: Any, targets: Any, batch_size: int) -> None:
        """On a plan's first call, before the real pass: a ValueError where each example's loss does not read that
        example alone (``coupling.py``); spent once it could tell (not with every example's inputs the same), not
        with ``check_independence=False``. Under FSDP, whose forwards communicate, every rank runs the two forwards
        on its first call and the ranks refuse together (one all-reduce over the default group, which FSDP training
        runs on)."""
        if not self.check_independence or self._independence_checked:
            return
        probes = []   # each forward's layer calls, with their input rows (``GhostNormEngine.note_row_order``)
        drew = []     # whether each forward drew random numbers (noise added to the inputs in any mode)
        device = next((p.device for p in plan.parameters.values()), None)

        @contextmanager
        def watch():
            before = rng_state(device, plan.generators)
            with self._engine.probing(plan.ghost, batch_size, rows=True) as calls:
                yield
            probes.append(calls)
            after = rng_state(device, plan.generators)
            drew.append(any(not torch.equal(before[key], after[key]) for key in before))

        coupling = coupled_losses(self._module, self.loss_fn, inputs, targets, batch_size,
                                  list(plan.parameters.values()), always_forward=self._sharded,
                                  watch=watch if plan.ghost else nullcontext)
        if coupling is not None and not coupling.coupled and len(probes) >= 2:
            self._engine.note_row_order(probes[-2], probes[-1], coupling.replaced, any(drew))
        if self._sharded:
            self._independence_checked = True
            if coupled_on_any_rank(coupling is not None and coupling.coupled, next(self.model.parameters()).device):
                raise coupling.error() if coupling is not None and coupling.coupled else ValueError(
                    "the per-example losses are coupled on another rank (its error names how); this rank's examples "
                    "could not show it")
            return
        if coupling is None:
            return
        if coupling.coupled:
            raise coupling.error()
        self._independence_checked = True

    def _warn_if_unchecked(self, ghost_pass: GhostPass, batch_size: int, can_probe: bool = True) -> None:
        """Once per instance: a measured call had a dim besides the batch's of size B and no probe checked it (auto
        sent it to the whole-model vmap). A call with the examples flattened into rows, or an unchecked one with a
        dim of size B, makes every later call probe."""
        self._flattened_rows = self._flattened_rows or ghost_pass.flattened or bool(ghost_pass.ambiguous)
        if ghost_pass.ambiguous and not self._warned_ambiguous:
            self._warned_ambiguous = True
            outcome = ("its norms may be wrong (backend='ghost' cannot tell)" if self.backend == "ghost" else
                       "such layers were measured by the whole-model vmap in this pass (slower)")
            named = listed([repr(path) for path in dict.fromkeys(ghost_pass.ambiguous)])
            warnings.warn(
                f"a measured layer's input ({named}) has a dim besides the batch's of the batch's size ({batch_size}), "
                "which "
                "may hold positions rather than the examples (T5's relative position buckets (T, T) with T == B, a "
                f"sequence-first layer, a sequence pooled to B positions, an MoE router's (B T, experts) or (B T, "
                f"top-k) outputs with B equal to the number of experts or to top-k, or examples paired with "
                f"examples as in CLIP's (B, B) logits): {outcome}. Which dim holds the examples "
                + ("is checked by a forward on B - 1 examples of the model's inputs, which runs from the next pass "
                   "on, once per input shape; this pass had none" if can_probe else
                   "would be checked by a forward on B - 1 examples of the model's inputs, which observe was not "
                   "given: without observe(..., model_inputs=inputs) such layers stay with the whole-model vmap in "
                   "every pass")
                + ". A batch size that differs from the model's other dims (sequence length, hidden size, number "
                "of experts) avoids both",
                RuntimeWarning,
                stacklevel=4)

    def _warn_if_rerun_unmatched(self, ghost_pass: GhostPass, batch_size: int) -> None:
        """Once per module: its re-run on each example did not add up to the gradient its parameters received, so
        the whole-model vmap measured them in that pass, and in every pass where it happens again (timm's Eva at as
        many examples as patches: its rotary table, handed to each attention, was sliced as if it held the examples;
        72 ms a call against 34)."""
        for path in ghost_pass.unmatched:
            if path in self._warned_unmatched:
                continue
            self._warned_unmatched.add(path)
            kind = type(self.model if path == "<model>" else self.model.get_submodule(path)).__name__
            warnings.warn(
                f"module {path!r} ({kind}) could not be measured by re-running it on each example: the re-run's "
                "per-example gradients did not add up to the gradient its parameters received, so the whole-model "
                "vmap measures them, slower, in each pass where that happens (every pass checks again). Likely "
                f"causes: an input with as many rows as the batch ({batch_size}) that does not hold the examples (a "
                "rotary table with as many positions as examples: a batch size unlike the model's other sizes "
                "avoids it), outputs returned in another order of rows than the inputs', or a forward that updates "
                "the module's own buffers from its inputs (a re-run on one example updates them from that example "
                "alone; spectral norm's power iteration, which does not read the inputs, is re-run from copies of "
                "the buffers the call found)",
                RuntimeWarning, stacklevel=4)

    def _random_state(self, plan: _Plan) -> dict[str, Tensor] | None:
        """The global random state (CPU, and the parameters' CUDA device) and the model's own generators', until a
        redraw has been warned about."""
        if self._warned_redraws:
            return None
        return rng_state(next((p.device for p in plan.parameters.values()), None), plan.generators)

    def _warn_if_redrawn(self, vmap_names: list[str], before: dict | None, after: dict | None) -> None:
        """Once per instance: the pass drew random numbers (dropout, drop path), and parameters were measured by
        the whole-model vmap, which draws its own for each example (``vmap.py``): their norms are those of another
        draw than the step's (timm's MaxViT, whose relative-position MLPs have dropout: 1-7 % off the step's, with
        nothing said before)."""
        if before is None or after is None or all(torch.equal(before[key], after[key]) for key in before):
            return
        self._warned_redraws = True
        warnings.warn(
            f"parameters {listed(vmap_names)} were measured by the whole-model vmap, and the pass drew random "
            "numbers (dropout, drop path): the vmap draws its own masks for each example, so these parameters' norms "
            "are those of another draw of the masks, not of this step's (the others' are this step's). For this step's own, "
            "switch those random layers off in the modules that need the vmap (eval mode or rate 0), or give such "
            "modules a rule (noisescale.per_example.register_rule)", RuntimeWarning, stacklevel=4)

    def _warn_if_reordered(self, paths: list[str]) -> None:
        """Once per instance: the pass's layers were called on raw inputs in another order than the examples'
        (``GhostPass.note_reordered``), so the whole model went to the whole-model vmap."""
        if paths and not self._warned_reordered:
            self._warned_reordered = True
            warnings.warn(reordered_inputs_message(list(dict.fromkeys(paths)), (
                "This model's parameters are measured by the whole-model vmap instead, in every call (exact, "
                "slower)")), RuntimeWarning, stacklevel=4)

    def _warn_if_buffers_missed(self, vmap_names: list[str], missed: list[str]) -> None:
        """Once per buffer: the pass changed it in place although no earlier pass had (so no copy was taken before
        it), and the whole-model vmap, which re-runs the pass after it, started from its values after the pass."""
        missed = [name for name in missed if name not in self._warned_buffers]
        if not missed:
            return
        self._warned_buffers.update(missed)
        warnings.warn(
            f"the forward changed buffers {listed(missed)} in place, which no earlier call of this object had changed, "
            f"so the values this pass found were not kept: the whole-model vmap, which re-runs the pass after it, "
            f"started from their values after the pass, and the norms of parameters {listed(vmap_names)} may be off "
            "by what that change does (spectral norm's power iteration in train mode: one more update of its vectors). "
            "From the next call on they are copied before each pass; for this pass's own, measure from a first "
            "call in the mode the training runs in", RuntimeWarning, stacklevel=4)

    def _measure(self, inputs, targets, loss_scale, scale, batch_size, plan, parameters, names) -> PerExampleNorms:
        received: dict[str, Tensor] = {}  # name -> |this pass's gradient|, read before it is accumulated
        handles = []
        self._check_independence(plan, inputs, targets, batch_size)
        probe = self._probe(plan, inputs, batch_size)
        self._buffers_before.take()
        try:
            with self._engine.recording(plan.ghost, batch_size, scale, self.backend == "ghost",
                                        sharded=self._sharded, probe=probe, inputs=inputs,
                                        check_uses=not self._uses_checked) as ghost_pass:
                drawn = self._random_state(plan)
                losses = _checked_losses(self.loss_fn(call_model(self.model, inputs), targets), batch_size)
                drawn = drawn, self._random_state(plan)
                loss = losses.mean()
                objective = loss if scale == 1.0 and not isinstance(loss_scale, Tensor) else loss * loss_scale
                bypassed = self._bypassed(plan, ghost_pass, [loss.grad_fn])
                if self._sharded:
                    self._check_sharded_measurable(ghost_pass, bypassed, self._read_elsewhere)
                    # |gbar|^2 of this rank's batch from the gradients FSDP's unsharded parameters receive
                    handles = [leaf.register_hook(partial(_record_norm, received, None, key))
                               for key, (leaf, _, _) in _leaf_uses([objective.grad_fn]).items()
                               if isinstance(leaf, nn.Parameter)]
                with self._taps.listening(partial(_record_norm, received, ghost_pass)):
                    objective.backward()  # the real backward: p.grad, and DDP's all-reduce, exactly as without us
                ghost_pass.finish()
        finally:
            for handle in handles:
                handle.remove()
        self._warn_if_unchecked(ghost_pass, batch_size)
        self._warn_if_rerun_unmatched(ghost_pass, batch_size)
        missed = self._buffers_before.missed()
        vmap_names = sorted(set(plan.vmap_names) | set(bypassed) | ghost_pass.vmap_names
                            | (set(names) if ghost_pass.reordered else set()))
        self._warn_if_reordered(ghost_pass.reordered)
        backend_of = dict(plan.backend_of) if not vmap_names and not ghost_pass.fallback_names else {
            name: "vmap" if name in vmap_names else "module" if name in ghost_pass.fallback_names
            else plan.backend_of[name] for name in names}
        found = ghost_pass.stacked()
        grad_sqnorm = _squared_total(received, loss.device)
        dtype = torch.promote_types(loss.dtype, grad_sqnorm.dtype)
        grad_sqnorm = grad_sqnorm if grad_sqnorm.dtype == dtype else grad_sqnorm.to(dtype)
        grad_sqnorm = grad_sqnorm if scale == 1.0 else grad_sqnorm / scale ** 2
        if found is not None and not vmap_names and not self.by_parameter:
            by_parameter, sqnorms = None, found[1].sum(0)   # the parameters the pass did not reach add zeros
        else:
            by_parameter = {} if found is None else dict(zip(found[0], found[1].unbind()))
            if vmap_names:
                if ghost_pass.inputs_changed():
                    raise ValueError(
                        f"the model changed one of its inputs in place during its forward, and parameters "
                        f"{vmap_names[:5]} need the whole-model vmap, which would re-run it on the changed input: "
                        "leave the inputs as they are (work on a copy, x = x.clone()) or use backend='ghost'")
                # from a forward of their own (no grad): the step's outputs, as large as the logits, are not kept
                weights = example_weights(self.loss_fn, self.model, inputs, targets)
                by_parameter.update(self._whole_model_sqnorms(inputs, targets, vmap_names, batch_size, ghost_pass,
                                                              weights))
                self._warn_if_redrawn(vmap_names, *drawn)
                self._warn_if_buffers_missed(vmap_names, missed)
            by_parameter = _every_parameter(by_parameter, names, batch_size, dtype, loss.device)
            sqnorms = torch.stack(list(by_parameter.values())).sum(0)
        self._buffers_before.release()
        return PerExampleNorms(
            loss=loss.detach(),
            losses=losses.detach(),
            sqnorms=sqnorms if sqnorms.dtype == dtype else sqnorms.to(dtype),
            grad_sqnorm=grad_sqnorm,
            by_parameter=by_parameter if self.by_parameter else None,
            backend_of=backend_of,
        )

    def _whole_model_sqnorms(self, inputs: Any, targets: Any, names: list[str], batch_size: int,
                             ghost_pass: GhostPass, weights: Tensor | None) -> dict[str, Tensor]:
        """The whole-model vmap's norms of ``names`` (each example's gradient scaled by ``weights``,
        ``coupling.example_weights``), or an error saying why the hooks could not measure them."""
        try:
            return vmap_sqnorms(self.model, self.loss_fn, inputs, targets, names, batch_size, self.chunk_size,
                                self._buffers_before.of(self.model), weights)
        except Exception as error:
            if self.backend == "vmap":
                why = ("backend='vmap' runs the whole model under torch.func.vmap (or one example at a time where vmap "
                       "cannot), and it failed; backend='auto' measures the layers from hooks on the real pass and "
                       "runs the vmap only for parameters the hooks cannot measure")
            else:
                declined = "".join(f"; module {path!r}: {why}" for path, why in ghost_pass.declined.items())
                why = ("These parameters are used outside any module call, or by modules the hooks could not measure "
                       f"per example{declined}; so the whole model must run under torch.func.vmap. Call such modules "
                       "with the examples in dim 0 (or 1, shared), or register a rule "
                       "(noisescale.per_example.register_rule)")
            raise PerExampleError(
                f"parameters {names}", "vmap", f"{type(error).__name__}: {error}",
                f"{why}. A model that cannot run on one example alone (its rows are not independent examples: a "
                "graph's nodes indexed by an edge_index, say) has no per-example gradients: measure the noise scale "
                "from independent micro-batches instead (noisescale.estimators.two_batch_noise_scale)") from error

    @staticmethod
    def _check_sharded_measurable(ghost_pass: GhostPass, bypassed: list[str], read_elsewhere: set[str]) -> None:
        """Under FSDP the whole-model vmap cannot run (torch.func needs whole parameters): raise, before the
        backward, naming the parameters that would need it and why."""
        need_vmap = sorted(ghost_pass.vmap_names | set(bypassed))
        if need_vmap:
            reasons = [f"module {path!r}: {why}" for path, why in ghost_pass.declined.items()]
            if read_elsewhere & set(need_vmap):
                reasons.append(
                    f"{sorted(read_elsewhere & set(need_vmap))} read outside their own module's calls (a tied output "
                    "F.linear(h, wte.weight), x @ self.proj.weight.T), a use the hooks do not see; such a use made by "
                    "a call of a module is measured (self.proj(x), or an nn.Linear sharing the weight: "
                    "lm_head.weight = wte.weight)")
            reasons = "; ".join(reasons) or "used outside any module call"
            raise ValueError(
                f"parameters {need_vmap} cannot be measured on this FSDP-sharded model: they would need the "
                f"whole-model torch.func vmap, which cannot run on sharded parameters ({reasons}). Call their "
                "modules with the examples in dim 0, register a rule for them "
                "(noisescale.per_example.register_rule), or measure the model unsharded (DDP)")

    @contextmanager
    def observe(self, batch_size: int, *, loss_scale: float = 1.0, model_inputs: Any = None,
                vmap_batch: tuple[Any, Any] | None = None) -> Iterator[ObservedNorms]:
        """Read the per-example norms of a forward and backward that the caller runs itself inside the ``with``
        block (a training framework's own step), leaving that step untouched: p.grad is the caller's.

        The caller's backward must differentiate ``loss_scale * mean_i l_i`` over the ``batch_size`` examples
        held in dim 0 of every hooked module's input; on exit ``observed.sqnorms`` holds |dl_i/dtheta|^2.
        Equivalently, with ``loss_scale=batch_size`` the objective is any sum of per-example terms and the norms
        are those of each term's gradient. Ghost rules and the per-module fallback (which works from the recorded
        calls) can observe.

        Parameters that need the whole-model vmap (a separate pass) are measured after the caller's pass, on an
        isolated random stream, by vmap over single examples of the loss <y_i, G_i>: the outputs y_i of the pass's
        one call of the model against the gradients G_i the caller's backward brought to them, on that call's
        inputs (``outputs.py``), so the caller's loss need not be known. ``vmap_batch`` = (inputs, targets)
        measures them by ``loss_fn(model(inputs), targets)`` instead, which must then return the very l_i whose
        ``loss_scale * mean`` the caller differentiates. Where neither can run (the model called twice, or not at
        all; an input without the examples in dim 0; an FSDP-sharded model) they raise a ValueError naming them.

        ``model_inputs``: the inputs of the pass's call of the model (model(**inputs) for a mapping), when the
        caller has them before the pass: where a dim of an input besides dim 0 has B's size, a forward without grad
        on B - 1 of them checks which layers' dim 0 holds the examples (as ``__call__`` does); without them such
        passes are warned about.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        plan, scale = self._checked_plan(loss_scale)
        if plan.vmap_names:
            raise ValueError("observe reads the hooks of the caller's own pass; backend='vmap' has none, use "
                             "backend='auto' or 'ghost'")
        # the caller's pass runs eagerly (``noisescale._compiled``), also through a compiled wrapper this object was
        # not given (nanoGPT measures raw_model and steps torch.compile(raw_model))
        with eager():
            parameters = plan.parameters
            observed = ObservedNorms()
            received = observed.received
            split: set[str] = set()   # parameters whose gradient came in two parts (reentrant checkpointing)
            probe = None if model_inputs is None else self._probe(plan, model_inputs, batch_size)
            can_vmap = not self._sharded
            first = not self._uses_checked   # the first pass of the plan (under FSDP the only one checked)
            walked = []   # outside FSDP: the graph's check, at the end of the model's call (``_check_graph``)
            with self._engine.recording(plan.ghost, batch_size, scale, self.backend == "ghost",
                                        sharded=self._sharded, probe=probe, inputs=model_inputs,
                                        check_uses=first) as ghost_pass:
                outputs = OutputGradients(
                    self.model, batch_size, want_roots=first,
                    keep=lambda: vmap_batch is None and can_vmap and (
                        not self._observed or self._outputs_needed or bool(ghost_pass.vmap_names)
                        or bool(self._read_elsewhere)),
                    on_roots=None if self._sharded else lambda roots: walked.append(
                        self._check_graph(plan, ghost_pass, roots)))
                drawn = self._random_state(plan)
                self._buffers_before.take()
                try:
                    with self._taps.listening(partial(_mark_received, received, split, ghost_pass)):
                        yield observed
                finally:
                    outputs.close()
                drawn = drawn, self._random_state(plan)
            missed = self._buffers_before.missed()
            if not received and not self._sharded:   # (FSDP's unsharded parameters are not tapped)
                outputs.release()
                raise ValueError("no gradient reached the model's parameters inside the observe block: run the forward "
                                 "and its backward (loss.backward()) inside the with block, with grad enabled; the "
                                 "norms would be zeros")
            if split and not ghost_pass.repeated:   # (two backwards of the caller's: refused as such by finish)
                outputs.release()
                raise ValueError(_split_gradient(sorted(split)[0]))
            self._observed = True
            if self.check_independence and not self._independence_checked:
                # before any refusal below: a coupled model's warning says more than a refused vmap (CLIP's logit_scale)
                self._warn_if_outputs_coupled(outputs.inputs if outputs.kept else model_inputs, batch_size,
                                              list(parameters.values()))
            bypassed = [name for name in sorted(received) if ghost_pass.use_count[name] == 0
                        and (name in plan.unhooked or not ghost_pass.attach(name))]
            # no gradient taps on FSDP's unsharded tensors: as in a call
            unattached = _attach_unused(plan, ghost_pass) if self._sharded else []
            if first and outputs.roots:
                if self.check_independence:
                    self._warn_if_batch_terms(outputs)
                if self._sharded:
                    held = _held_uses(ghost_pass.held, outputs.roots)
                    self._read_elsewhere = set(self._read_elsewhere_now(plan, ghost_pass, held))
                    self._read_elsewhere |= _read_without_a_call(ghost_pass, unattached, outputs.roots,
                                                                  self.model, parameters)
            unchecked = not walked if not self._sharded else first and not outputs.roots
            if unchecked and not self._warned_unchecked_uses:
                self._warned_unchecked_uses = True
                warnings.warn("observe found no tensor with grad in the output of the model's call (an output type "
                              "torch's pytree cannot open, or no call of the model in the pass: a Lightning "
                              "training_step calling a submodule, self.net(x), instead of self(x)), so it cannot "
                              "check for weights also read outside their layers' calls; the layers' own norms are "
                              "measured as usual", RuntimeWarning, stacklevel=3)
            bypassed = set(bypassed) | (self._read_elsewhere & set(plan.backend_of))
            if outputs.calls > 1:   # the graph was checked at the end of the first call only: the other calls'
                bypassed |= ghost_pass.graph_captured   # products of a captured weight were not captured
            bypassed = sorted(bypassed)
            if bypassed and self.backend == "ghost":
                raise ValueError(f"backend='ghost' cannot measure parameters {bypassed}: they are used outside their "
                                 "own modules' calls; use backend='auto' to measure them by the whole-model vmap")
            if not can_vmap:
                self._check_sharded_measurable(ghost_pass, bypassed, self._read_elsewhere)
            self._warn_if_unchecked(ghost_pass, batch_size, can_probe=model_inputs is not None)
            ghost_pass.finish()  # the per-module fallback, from the recorded calls and output gradients
            self._warn_if_rerun_unmatched(ghost_pass, batch_size)
            need_vmap = sorted(ghost_pass.vmap_names | set(bypassed))   # finish adds those whose checks failed
            if not can_vmap:
                self._check_sharded_measurable(ghost_pass, need_vmap, self._read_elsewhere)
            by_parameter = ghost_pass.result()
            try:
                if need_vmap:   # on an isolated random stream (vmap_sqnorms)
                    self._outputs_needed = True
                    by_parameter.update(self._observed_by_vmap(need_vmap, vmap_batch, outputs, ghost_pass, batch_size,
                                                               batch_size / scale, received))
                    self._warn_if_redrawn(need_vmap, *drawn)
                    self._warn_if_buffers_missed(need_vmap, missed)
            finally:
                outputs.release()
                self._buffers_before.release()
            reference = next(iter(by_parameter.values()), None)
            dtype = torch.float32 if reference is None else torch.promote_types(reference.dtype, torch.float32)
            device = next(iter(parameters.values())).device if reference is None else reference.device
            by_parameter = _every_parameter(by_parameter, plan.backend_of, batch_size, dtype, device)
            observed.sqnorms = torch.stack(list(by_parameter.values())).sum(0)
            observed.by_parameter = by_parameter if self.by_parameter else None
            observed.backend_of = {name: "vmap" if name in need_vmap else "module" if name in ghost_pass.fallback_names
                                   else backend for name, backend in plan.backend_of.items()}

    def _warn_if_outputs_coupled(self, inputs: Any, batch_size: int, parameters: list[nn.Parameter]) -> None:
        """observe's check that the examples are independent (``coupling.py``), on the model's outputs after the
        caller's pass: a warning naming those that couple the examples, or saying why it could not run. Under FSDP
        every rank runs the two forwards on its first call, even where its own examples cannot show a coupling, and
        the ranks warn together (one all-reduce), as a call's check does."""
        if inputs is None or isinstance(inputs, str):
            return
        try:
            moved = coupled_outputs(self._module, inputs, batch_size, parameters, always_forward=self._sharded)
        except Exception as error:   # (out of memory): the caller's step is done, and stays as it is
            moved, self._independence_checked = None, True
            warnings.warn(f"could not check that the examples are independent, which needs two more forwards: "
                          f"{type(error).__name__}: {error}", RuntimeWarning, stacklevel=4)
            if not self._sharded:
                return
        self._independence_checked = moved is not None or self._sharded
        elsewhere = self._sharded and coupled_on_any_rank(bool(moved), parameters[0].device) and not moved
        if moved or elsewhere:
            shown = ", ".join(f"{path} ({change:.2g})" for path, change in list(moved.items())[:4]) if moved else ""
            self.coupling = (f"replacing some examples' inputs by others' moved the other examples' rows of its "
                             f"outputs {shown}" if moved else "replacing some examples' inputs by others' moved the "
                             "other examples' rows of its outputs on another rank (whose warning names them)")
            warnings.warn(
                f"the model couples the examples: {self.coupling} (in eval mode, relative to each output's largest "
                "value). A "
                "loss that reads them (a contrastive loss such as CLIP's or SigLIP's) has no per-example gradients, "
                "and the norms and the noise scale observed are then wrong; measure the noise scale from "
                "independent micro-batches instead (noisescale.estimators.two_batch_noise_scale). observe cannot "
                "see the loss, so this is not an error; "
                "check_independence=False (NoiseScaleOptions too) skips the check", RuntimeWarning, stacklevel=4)

    def _warn_if_batch_terms(self, outputs: OutputGradients) -> None:
        """observe's check, on the first pass of a plan, for a term over the whole batch added to the loss inside the
        model (``OutputGradients.batch_terms``): a warning, kept in ``coupling``. It walks the pass's graph and runs
        nothing, so it runs under FSDP too."""
        shapes = outputs.batch_terms()
        if not shapes:
            return
        self.coupling = (f"an output of shape {shapes[0]} without the examples (a loss computed inside the model) "
                         "received a gradient that reaches the parameters other than through the outputs that hold "
                         "the examples")
        warnings.warn(
            f"the loss holds a term over the whole batch: {self.coupling}, such as an MoE's router load-balancing "
            "loss (output_router_logits=True; even with router_aux_loss_coef=0 the term is added). It has no "
            "per-example gradients: the norms observed split its gradient over the examples, and the noise scale is "
            "not that of the training's loss (a tiny Mixtral's norms: 0.1 to 0.3 % off with a coefficient of "
            "0.02, 26 % with 1). Measure it on the language-model loss alone (the router loss off, or a "
            "PerExampleGradNorms call with a per-example loss); check_independence=False skips this check",
            RuntimeWarning, stacklevel=4)

    def _observed_by_vmap(self, names: list[str], vmap_batch: tuple[Any, Any] | None, outputs: OutputGradients,
                          ghost_pass: GhostPass, batch_size: int, scale: float,
                          received: set[str]) -> dict[str, Tensor]:
        """observe's parameters that need the whole-model vmap: by ``loss_fn`` on ``vmap_batch``, or by the
        output gradients of the pass on its call's inputs: |dl_i/dtheta|^2 = scale^2 |J_i^T G_i|^2, with
        scale = B / loss_scale (the caller's objective is loss_scale * mean_i l_i). Those the pass brought a
        gradient (``received``) must get it through the outputs; the others (XLNet's segment bias without
        token types) have zero norms."""
        if vmap_batch is not None:
            weights = example_weights(self.loss_fn, self.model, *vmap_batch)
            return vmap_sqnorms(self.model, self.loss_fn, *vmap_batch, names, batch_size, self.chunk_size,
                                self._buffers_before.of(self.model), weights)
        kept = outputs.gradients([self.model.get_parameter(name) for name in names if name in received])
        if isinstance(kept, str):
            _refuse_vmap(names, ghost_pass, because=kept)
        indices, grads = kept
        sqnorms = vmap_sqnorms(self._module, partial(inner_product, indices), outputs.inputs, grads,
                               [name.removeprefix(self._prefix) for name in names], batch_size, self.chunk_size,
                               self._buffers_before.of(self._module))
        return {self._prefix + name: values * scale ** 2 for name, values in sqnorms.items()}


def _every_parameter(by_parameter: dict[str, Tensor], names: Any, batch_size: int, dtype: torch.dtype,
                     device: torch.device) -> dict[str, Tensor]:
    """name -> (B,) squared norms in ``dtype`` for every name, zeros for those the pass did not reach (a no-op
    ``to`` costs a microsecond per parameter, so it is skipped, and the zeros are made only where needed)."""
    zeros, every = None, {}
    for name in names:
        value = by_parameter.get(name)
        if value is None:
            value = zeros = torch.zeros(batch_size, dtype=dtype, device=device) if zeros is None else zeros
        every[name] = value if value.dtype == dtype else value.to(dtype)
    return every


def _refuse_vmap(names: Any, ghost_pass: GhostPass, because: str) -> None:
    """observe: parameters that need the whole-model vmap and cannot be measured by it."""
    if names:
        outside = sorted(set(names) & ghost_pass.outside_uses)
        reasons = "; ".join([f"{path}: {why}" for path, why in ghost_pass.declined.items()] + (
            [f"{listed(outside)}: the sum of their captured per-example gradients missed part of their gradient"]
            if outside else [])) or "read outside their modules' calls"
        raise ValueError(f"parameters {sorted(names)} cannot be measured from the caller's own pass: they need the "
                         f"whole-model vmap, a separate pass ({reasons}), and "
                         f"{because}. Call the model once in the pass (observe measures them from its outputs' "
                         "gradients), give observe the pass's vmap_batch=(inputs, targets), or measure this model "
                         "with NoiseScaleMonitor, which runs that pass itself")


_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def _unmeasured_by_rule(rule: LayerRule, local: list[tuple[str, str]]) -> str | None:
    """Why a module's own trainable parameters (``local``: (local name, name) pairs) are not all the rule's to
    measure (``LayerRule.parameter_names``), or None."""
    if rule.parameter_names is None:
        return None
    others = sorted(n for n, _ in local if n not in rule.parameter_names)
    if not others:
        return None
    return (f"its rule measures {sorted(rule.parameter_names)} only, not its parameters {others} (the weight is "
            "computed from them, as from torch.nn.utils.weight_norm's weight_g and weight_v, or from pruning's "
            "weight_orig and mask)")


def _adopted_containers(model: nn.Module, sharded: bool) -> set[int]:
    """ids of the ``ParameterDict``/``ParameterList`` right under a module without a rule, whose parameters that
    module's calls measure (``_own_parameters``). One under a rule layer keeps its parameters (the rule measures the
    layer's own only: they go to the whole-model vmap), and so does every one under FSDP (a review found the root's
    per-module fallback under FSDP1 giving the other units zero norms in observe after a call)."""
    if sharded:
        return set()
    return {id(child) for module in model.modules() if not isinstance(module, _CONTAINERS) and rule_for(module) is None
            for child in module.children() if isinstance(child, _CONTAINERS)}


def _own_parameters(module: nn.Module, adopted: set[int]) -> Iterator[tuple[str, nn.Parameter]]:
    """(local name, parameter) of what ``module``'s calls measure: its own parameters, and those of the
    ``ParameterDict``/``ParameterList`` right under it that it adopted (never called: the module reads them, PEFT's
    LoRA on embeddings ``F.embedding(x, self.lora_embedding_A[name].T)``), under dotted names; an adopted container
    owns none."""
    if id(module) in adopted:
        return
    yield from module.named_parameters(recurse=False)
    for child_name, child in module.named_children():
        if id(child) in adopted:
            for name, p in child.named_parameters(recurse=False):
                yield f"{child_name}.{name}", p


def _is_flat(p: Tensor) -> bool:
    """An FSDP1 flat parameter (its original parameters are measured instead)."""
    return getattr(p, "_is_flat_param", False)


def per_example_sqnorms(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: Any, targets: Any,
                        backend: str = "auto", chunk_size: int | None = None, by_parameter: bool = False,
                        loss_scale: float | Tensor = 1.0, check_independence: bool = True) -> PerExampleNorms:
    """One-shot form of ``PerExampleGradNorms``: hooks are installed for this call only."""
    with PerExampleGradNorms(model, loss_fn, backend, chunk_size, by_parameter, check_independence) as measure:
        return measure(inputs, targets, loss_scale=loss_scale)
