"""Hook engine for per-example gradient norms, computed from the one real backward pass.

Forward hooks, installed once, keep a reference to each call's input (a tensor autograd saves anyway) and register
a hook on that call's output (a layer with a rule: a pre-hook of the output's autograd node), so a module called
several times in one forward gets one closure per call.

- A module with a layer rule (``layers.py``): when backward reaches the output, the hook hands (input, output
  gradient) to the rule ("ghost" norms).
- A module without one (or whose rule declined it): the call's args, kwargs and output gradients are kept and, once
  the backward is over, its parameters' per-example gradients are computed from that module alone
  (``fallback.py``, backend "module"). Where the forward used them only in operations ``uses.py`` knows (a class
  token expanded, a position table added, F.linear, F.embedding), the uses recorded in the real pass give them
  without a re-run, once their sum over the examples is checked against the gradient the backward brought.

Scale: the pass differentiates loss_scale * mean_i l_i, so the output gradient of example i is
loss_scale / B * dl_i/dz_i; the norms are multiplied by (B / loss_scale)^2 once at the end.

Broadcast calls: a module called on index tensors with an output of batch 1 inside a forward over B examples
(HuggingFace position embeddings on ``position_ids`` of shape (1, T)) has its output replaced by
``output.expand(B, ...)`` (same values; a forward hook may replace the output) so that the output gradient arrives
per example, and its input is treated as shared by every example (``_batch_of_one``), unless a rule's call earlier in
the pass took B k rows (a multiple-choice head runs its encoder on B x choices rows, where an expansion to B would
break the model's forward: ``GhostPass.in_rows``); then it is shared as follows. Other calls whose output is
computed once for all the examples (a rule layer on index tensors without them, T5's relative position buckets; a
fallback module whose inputs hold no examples and whose outputs have batch 1, BEiT's relative position bias) get
each example's output gradient from the operations that broadcast the output over the examples (``broadcast.py``,
``GhostPass.share``), connected after the model's forward (``_after_model``).

Sequence-first calls: a rule layer on (T, B, ...) (XLNet's and Longformer's layers) makes later calls probe; where
the probe's call had (T, B - 1, ...) with the same x[0], x[-1] and sums of absolute values over dim 0 in the first
B - 1 columns (``_column_ends``), the rule takes the call as (B, T, ...) (``GhostPass.examples_in_dim_1``), as it
takes rows flattened from the examples in B blocks (``GhostPass.row_blocks``).

Parameters used by more than one call in a forward (tied weights, a reused module) cannot be normed per call:
|sum_c g_{i,c}|^2 != sum_c |g_{i,c}|^2. Their calls' per-example gradients are kept as factors where the rule
gives them (Linear, Embedding, GPT-2's Conv1D, the attention and RNN fallbacks) and the norm of the sum is taken
from pairwise inner products of the factors, or, where that costs more, the (B x numel) gradients are
materialised and summed over calls (``factors.sqnorm_of_sum``).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from noisescale._buffers import changed_in_place
from noisescale._gradient_norm import dense_gradient
from noisescale._graph import autograd_nodes, output_shape
from noisescale._rng import (
    generator_states,
    host_rng_state,
    module_generators,
    rng_state,
    set_generator_states,
    set_host_rng_state,
)
from noisescale.batches import tensors_of
from noisescale.per_example.attention import LinearCapture, capturable
from noisescale.per_example.broadcast import (Broadcast, BroadcastGradients, computed_once, picked_owners,
                                              row_by_row_call, rows_selected)
from noisescale.per_example.checkpointing import CheckpointedInputs, recomputing
from noisescale.per_example.errors import PerExampleError
from noisescale.per_example.fallback import (BatchDims, FallbackCall, batch_dims_for, bound_arguments,
                                             check_unmodified, is_parameter_table, module_per_example_grads,
                                             opaque_input, output_leaves, output_tensors)
from noisescale.per_example.factors import IndexFactors, LinearFactors, full_precision, sqnorm_of_sum
from noisescale.per_example.layers import VERIFY_ROWS, LayerRule, close_values, rounding_tolerance
from noisescale.per_example.module_hook import ModuleHook
from noisescale.per_example.padding import Padding
from noisescale.per_example.recurrent import recurrent_weights, unrolled_supported
from noisescale.per_example.row_order import row_fingerprint, rows_reordered
from noisescale.per_example.used import attribute
from noisescale.per_example.uses import ParameterUses, per_example_total
from noisescale.sharded import clean_name

__all__ = ["GhostModule", "GhostPass", "GhostNormEngine"]

_CAPTURE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-3}   # half precision: 5e-2
_FALLBACK_ADVICE = ("Register a rule for this layer type (noisescale.per_example.register_rule), or use "
                    "backend='vmap' for the whole model. A module that cannot run on one example alone (its rows "
                    "are not independent examples: a graph's nodes indexed by an edge_index, say) has no "
                    "per-example gradients, under any backend: measure the noise scale from independent "
                    "micro-batches instead (noisescale.estimators.two_batch_noise_scale)")


@dataclass(frozen=True)
class GhostModule:
    """A module measured in this pass: its rule (None: the per-module fallback) and its trainable parameters
    (local name -> global name). Part of the engine's plan, shared by every pass: never changed in place."""

    path: str
    rule: LayerRule | None
    names: dict[str, str]


@dataclass
class GhostPass:
    """What one forward/backward accumulates: per-parameter (B,) squared norms and, for parameters used by several
    calls, their calls' per-example gradients (summed) and factors (kept), all of the loss_scale * mean loss
    (rescaled by grad_factor = B / loss_scale in ``result``)."""

    modules: dict[nn.Module, GhostModule]
    batch_size: int
    grad_factor: float
    use_count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sqnorms: dict[str, Tensor] = field(default_factory=dict)
    shared_grads: dict[str, Tensor] = field(default_factory=dict)
    shared_factors: dict[str, list[LinearFactors | IndexFactors]] = field(default_factory=lambda: defaultdict(list))
    fallback_calls: list[tuple[nn.Module, GhostModule, FallbackCall]] = field(default_factory=list)
    fallback_names: set[str] = field(default_factory=set)
    rng_before: dict[nn.Module, list] = field(default_factory=lambda: defaultdict(list))
    declined: dict[str, str] = field(default_factory=dict)        # module path -> why the fallback declined it
    unmatched: list[str] = field(default_factory=list)   # paths of modules whose re-run did not add up (declined)
    selected: set = field(default_factory=set)   # output nodes of calls on rows picked from another tensor
    owned: dict = field(default_factory=dict)   # output node of such a call -> (N,) the example of each row
    clean_rows: set = field(default_factory=set)   # nodes before rule layers' inputs found to keep the rows in order
    vmap_names: set[str] = field(default_factory=set)               # parameters left to the whole-model vmap
    strict: bool = False       # backend="ghost": a call the hooks cannot measure is an error, not sent to vmap
    replaying: bool = False
    sharded: bool = False      # FSDP: a fallback call keeps copies of its parameters (they are resharded later)
    refused: Any = field(default_factory=set)   # the engine's modules not to capture again
    cross_checked: Any = field(default_factory=dict)   # the engine's: module -> its calls (by their order in a
    # pass) whose capture a re-run has confirmed
    attached: Any = field(default_factory=dict)   # the engine's module -> local names of parameters ``attach`` gave it
    updates_buffers: Any = field(default_factory=dict)   # the engine's module -> whether its forward changed its
    # buffers (absent: no call of it seen yet)
    buffers_before: dict[nn.Module, list] = field(default_factory=lambda: defaultdict(list))   # per call: versions,
    # and for the modules that change them or were not seen yet, copies of the buffers as the call found them (its
    # re-run needs them)
    captured_names: set[str] = field(default_factory=set)   # parameters of calls whose uses were captured
    noted: dict[str, tuple[Tensor, torch.dtype, Tensor] | None] = field(default_factory=dict)   # note_gradient
    probe: dict | None = None   # module -> per call, the shapes of its tensors with B - 1 examples (``probing``)
    calls: dict[nn.Module, int] = field(default_factory=lambda: defaultdict(int))   # calls so far, per module
    reordered: list[str] = field(default_factory=list)   # paths of calls on raw inputs reordered (``note_reordered``)
    # without a probe, the paths of the modules whose measured calls had a dim besides the batch's of size B (vmap)
    ambiguous: list[str] = field(default_factory=list)
    verified: Any = field(default_factory=dict)   # the engine's module -> its rule reproduces its output
    rechecks: list = field(default_factory=list)   # (module, entry, 0-d bool tensor): rule.reproduces per call
    outside_uses: set[str] = field(default_factory=set)   # the engine's: parameters measured by vmap from now on
    flattened: bool = False   # without a probe, a rule's call had B k rows (examples flattened into rows?)
    in_rows: bool = False     # a rule's call had B k rows: a batch of one is not expanded to B (``_batch_of_one``)
    # row counts (B k) this pass has shown to hold the examples in B blocks (traced, an input reshaped, or a probe
    # whose rows differ between blocks); rows alike in every block are taken as blocks only for these
    example_major_rows: set = field(default_factory=set)
    inputs: dict = field(default_factory=dict)   # id -> (tensor, version before the call) of the model's inputs
    repeated: bool = False    # a layer's output got a gradient twice: more than one backward through the pass
    broadcasts: BroadcastGradients | None = None   # outputs computed once for every example (``share``)
    shared: dict[int, tuple[Broadcast, GhostModule, Any]] = field(default_factory=dict)   # id -> (.., entry, call)
    sum_checks: list = field(default_factory=list)   # (entry, fallback call or None, 0-d bool tensor): check_sum
    # handles of the hooks the pass puts on autograd nodes and tensors, removed after it: a hook holds the pass's
    # records through the C++ node, a cycle the garbage collector cannot see, which kept every step's tensors
    pass_hooks: list = field(default_factory=list)
    host_rng: tuple | None = None   # Python's and NumPy's generators before the pass's first re-run (``_rerun``)
    hooked_nodes: set = field(default_factory=set)   # the output nodes of the rule layers' calls (``graph_uses``)
    call_nodes: list = field(default_factory=list)   # (hooked output node, parameter names) of each rule call
    graph_captured: set[str] = field(default_factory=set)   # parameters whose products were captured (``graph_uses``)
    check_uses: bool = False   # the pass whose graph is checked for parameters read outside their layers' calls
    held: dict[str, dict[int, Tensor]] = field(default_factory=lambda: defaultdict(dict))   # FSDP: ``hold``
    # FSDP: the unsharded parameters of the rule layers under each module called, at any depth (``hold_children``)
    read_by_callers: dict[str, dict[int, Tensor]] = field(default_factory=lambda: defaultdict(dict))

    def hold(self, module: nn.Module, entry: GhostModule) -> None:
        """Under FSDP: the unsharded parameters a rule call read (its module's attributes now, resharded after the
        forward), by which the graph's other uses of them are counted (``PerExampleGradNorms._bypassed``)."""
        _keep(self.held, module, entry)

    def hold_children(self, module: nn.Module) -> None:
        """Under FSDP, at the end of any module's call (FSDP has not resharded it yet): the unsharded parameters of
        the rule layers under it, at any depth (through containers never called: ``self.holder.proj``), which its
        forward may read without calling them (``x @ self.proj.weight.T``); ``PerExampleGradNorms._bypassed``
        counts the graph's uses of those of a layer no call used (a shard of another unit is never in the graph)."""
        for child in module.modules():
            entry = self.modules.get(child) if child is not module else None
            if entry is not None:
                _keep(self.read_by_callers, child, entry)

    def share(self, entry: GhostModule, tensor: Tensor, deliver: Any, call: Any = None,
              without_examples: bool = False) -> Broadcast:
        """A call of ``entry``'s module whose output ``tensor`` is computed once for all the examples and broadcast
        over them (a relative position bias): measured from each example's gradient of it (``broadcast.py``), which
        ``deliver(per_example, total, dtype)`` gets in the backward once ``connect_shared`` has found its consumers.
        ``call``: the fallback call it belongs to. ``without_examples``: shown to be made without them (a parameter,
        a rule layer on one: ``computed_once``), so what is made of it is too; a call is otherwise only taken for
        shared by its shapes, which a sequence-first layout can mimic."""
        broadcast = self.broadcasts.add(tensor, deliver, without_examples)
        self.shared[id(broadcast)] = (broadcast, entry, call)
        return broadcast

    def claim_parametrized(self, module: nn.Module, path: str) -> list[tuple[str, Broadcast]]:
        """A rule layer's weights computed by ``torch.nn.utils.parametrize`` (weight norm, spectral norm) in this
        call: each is the output of its parametrization's call just made, shared by the examples; the layer's rule
        gives each example's gradient of it (``GhostNormEngine._on_output_grad``), so it needs no walk of the
        graph. (name, its shared output) for each, taken out of the ones to connect."""
        parametrizations = getattr(module, "parametrizations", None)
        if not isinstance(parametrizations, nn.ModuleDict):
            return []
        claimed = []
        for name in parametrizations:
            owner = f"{path}.parametrizations.{name}" if path != "<model>" else f"parametrizations.{name}"
            found = next((b for b in reversed(self.broadcasts.pending)
                          if self.shared[id(b)][1].path == owner), None)
            if found is not None:
                self.broadcasts.adopt(found)
                claimed.append((name, found))
        return claimed

    def connect_shared(self, roots: list) -> None:
        """After the model's forward: hook the shared outputs into the graph from the autograd nodes ``roots``;
        those whose consumers the hooks cannot follow go to the whole-model vmap (or raise, backend="ghost")."""
        unused = self._unused_parameters() if self.broadcasts.pending else None
        for broadcast, why in self.broadcasts.connect(roots, unused):
            self._unshare(broadcast, f"its output is computed once for all the examples and {why}")

    def _unused_parameters(self) -> dict[int, Any]:
        """The parameters of measured modules that no call of their module used and no fallback call encloses
        (DeBERTa's relative embeddings, which its encoder reads as ``.weight`` and layer-norms; under FSDP2 those
        unsharded when the model's forward ends, in the root unit): id -> what shares it, for
        ``BroadcastGradients.connect`` to measure those the graph takes from each example's gradient of them
        (``broadcast.py``), as it does the outputs computed once that they feed."""
        found = {}
        for module, entry in self.modules.items():
            for local, name in entry.names.items():
                if self.use_count[name] == 0 and name not in self.vmap_names and self._enclosing(name) is None:
                    parameter = module.get_parameter(local)
                    if self.sharded and type(parameter) is not nn.Parameter:   # a shard now, or a view (FSDP1)
                        continue
                    found[id(parameter)] = partial(self._share_parameter, name, GhostModule(entry.path, None,
                                                                                            {local: name}), parameter)
        return found

    def _share_parameter(self, name: str, entry: GhostModule, parameter: Tensor, uses: int) -> Broadcast:
        self.use_count[name] += uses   # every operation that takes it is followed
        return self.share(entry, parameter, partial(self._on_parameter_grad, name, entry), without_examples=True)

    def _on_parameter_grad(self, name: str, entry: GhostModule, per_example: Tensor | None, total: Tensor,
                           dtype: torch.dtype) -> None:
        if self.check_sum(entry, per_example, total, dtype):
            self.add_shared(name, per_example)

    def _unshare(self, broadcast: Broadcast, why: str) -> None:
        _, entry, call = self.shared.pop(id(broadcast))
        if self.strict:
            raise ValueError(f"backend='ghost' cannot measure module {entry.path!r}: {why}; use backend='auto' to "
                             "measure it by the whole-model vmap")
        self._drop(entry, call, why)

    def _drop(self, entry: GhostModule, call: Any, why: str) -> None:
        self.decline(entry, why)
        if call is not None:
            self.fallback_calls[:] = [c for c in self.fallback_calls if c[2] is not call]

    def check_sum(self, entry: GhostModule, per_example: Tensor | None, total: Tensor, dtype: torch.dtype,
                  call: Any = None) -> bool:
        """Keeps, to read in ``finish``, whether the per-example gradients (B, *shape) of a shared output add up to
        the gradient ``total`` it received, to the rounding of ``dtype`` (else an operation the hooks did not follow
        took it); False where there are none to use (None: a second backward through the pass)."""
        if per_example is None:
            self.repeated = True
            return False
        with torch.no_grad():
            if per_example.numel() == 0:
                ok = torch.zeros((), dtype=torch.bool, device=total.device)
            else:
                rtol = _CAPTURE_RTOL.get(dtype, 5e-2)
                dtype = torch.promote_types(total.dtype, torch.float32)
                wanted = torch.linalg.vector_norm(total, dtype=dtype)
                # not `<=`: a non-finite gradient (NaN data) gives no verdict, and must not send the module away
                ok = ~(torch.linalg.vector_norm(per_example.sum(0) - total, dtype=dtype) > rtol * wanted)
        self.sum_checks.append((entry, call, ok))
        return per_example.numel() > 0

    def follows_batch(self, module: nn.Module, index: int, tensors: list[Tensor],
                      batched: list[tuple[Tensor, int]], positional: bool = True, blocks: int = 1,
                      features_last: bool = True, traced: bool = False) -> bool:
        """Whether every (tensor, dim) this pass takes for the B examples of call ``index`` of ``module`` had
        B - 1 in the probe's forward on B - 1 examples and its other dims as they are (``tensors``, the call's
        ``_call_tensors``, are read only where one did). A dim of size B that stays B holds positions, not
        examples: T5's relative position buckets (T, T), a sequence-first layer (T, B, d), with T == B; another dim
        that follows the batch pairs examples with examples (CLIP's (B, B) logits). Where no probe ran: True,
        unless another dim of a tensor has B's size too (Funnel's sequence pooled to B positions; not the last where
        ``features_last``, a layer's features), which under auto is left to the whole-model vmap and makes later
        calls probe (``ambiguous``; backend='ghost' warns), unless ``traced`` (a rule taking other dims for
        positions, for which only dim 0 matters) and its inputs' rows trace back through the autograd graph to the
        examples' rows (``BroadcastGradients.rows_of``: ConvNeXt's feature map as high as the batch, Qwen3's heads
        as many). ``positional``: whether the layer could be taking positions for examples (not a convolution,
        whose images may well be as high as the batch is large). ``blocks``: the dims hold B blocks of that many
        rows (the probe's, B - 1 blocks)."""
        if self.probe is None:   # unchecked: note whether a dim besides the batch's (and the features) has its
            batch = self.batch_size   # size (counted: slicing a torch.Size costs microseconds)
            ambiguous = positional and any(
                t.shape.count(batch) - (features_last and t.dim() > 1 and t.shape[-1] == batch)
                > (t.dim() > d and t.shape[d] == batch) for t, d in batched)
            if ambiguous and traced:   # dim 0 shown to hold the examples
                ambiguous = not all(d == 0 and t.grad_fn is not None and self.broadcasts.rows_of(
                    t.grad_fn, t.output_nr) == 1 for t, d in batched)
            if ambiguous and module in self.modules:
                self.ambiguous.append(self.modules[module].path)
            return self.strict or not ambiguous   # auto: such a call goes to the whole-model vmap
        calls = self.probe.get(module, [])
        if index >= len(calls) or len(calls[index].shapes) != len(tensors):
            return False   # the probe took another path through the model: nothing can be matched
        for t, dim in batched:
            shape = calls[index].shapes[next(k for k, u in enumerate(tensors) if u is t)]
            if len(shape) != t.dim() or len(shape) <= dim or shape[dim] != (self.batch_size - 1) * blocks:
                return False
            if any(a != b for k, (a, b) in enumerate(zip(shape, t.shape)) if k != dim):
                return False   # another dim follows the batch too: CLIP's (B, B) logits, examples against examples
        return True

    def not_the_examples(self, dim: str, size: int) -> str:
        """Why ``dim`` (of ``size``) of a call was not taken for the examples, after ``follows_batch`` said no: a
        probe on one example fewer showed it, or, where none ran (under FSDP, or before auto's first probe), another
        dim has that size too and the two cannot be told apart."""
        if self.probe is None:   # another dim of B's size (``follows_batch``); ``size`` may be B blocks of rows
            other = "that size" if size == self.batch_size else f"size {self.batch_size}, the number of examples,"
            return (f"{dim} of size {size} cannot be told from another dim of {other} without a probe on one example "
                    "fewer (a batch size unlike the layer's other sizes avoids this)")
        return f"{dim} of size {size} is not the examples (a probe on one example fewer showed it)"

    def inputs_changed(self) -> bool:
        """Whether a tensor of the model's call's inputs was changed in place since the pass began."""
        return any(t._version != version for t, version in self.inputs.values())

    def note_reordered(self, entry: GhostModule, x: Any) -> None:
        """A call whose input rows the independence check found in another order than the examples'
        (``GhostNormEngine.note_row_order``): where that input has no autograd graph (the model's raw inputs, reordered
        before the first layer), no hook can tell which row is which example, and every later layer inherits the
        error; the pass's parameters all go to the whole-model vmap (``reordered``), or, under backend='ghost' and
        FSDP (where it cannot run), an error. An input whose graph reads a parameter (an activation) is followed by
        the hooks; one whose graph reads only inputs that require grad (an input-gradient method's) is not."""
        if not isinstance(x, Tensor) or isinstance(x, nn.Parameter) or x.grad_fn is not None and any(
                isinstance(getattr(node, "variable", None), nn.Parameter) for node in autograd_nodes([x.grad_fn])):
            return
        if self.strict or self.sharded:
            raise ValueError(_reordered_message(entry.path, self.strict))
        self.reordered.append(entry.path)

    def decline(self, entry: GhostModule, why: str) -> None:
        """This call of ``entry``'s module cannot be measured by the hooks: its parameters go to the whole-model
        vmap, and ``why`` to the error message should that fail."""
        self.declined[entry.path] = why
        self.vmap_names.update(entry.names.values())

    def row_blocks(self, module: nn.Module, index: int, x: Tensor) -> int | None:
        """k where call ``index`` of ``module`` sees the examples flattened into rows, B blocks of k (OPT's MLP on
        (B * T, d), Swin's windows (B * windows, N, d)): x's rows trace back through its autograd graph (reshapes,
        permutations keeping the examples first, row-wise operations, dropout) to B blocks of k rows of rule layers'
        outputs (``BroadcastGradients.rows_of``), or, where they cannot be traced (token ids flattened before the
        first layer), x has B k rows, the probe's call had (B - 1) k, and the first and last rows and the absolute
        sums of the probe's blocks are those of x's first B - 1 blocks (so the rows are example-major, not
        position-major: ``_block_ends``; dropout before the layer makes them differ). None otherwise."""
        if x.grad_fn is not None:
            traced = self.broadcasts.rows_of(x.grad_fn, x.output_nr)
            if traced is not None and traced * self.batch_size == x.shape[0]:
                self.example_major_rows.add(x.shape[0])
                return traced
        elif (x._base is not None and x._base.dim() and x._base.shape[0] == self.batch_size
              and self.inputs.get(id(x._base), (None, None))[1] == x._base._version and _reshaped(x, x._base)):
            self.example_major_rows.add(x.shape[0])
            return x.shape[0] // self.batch_size   # the model's input (unchanged since the call) reshaped: token ids
        calls = None if self.probe is None else self.probe.get(module, [])
        if not calls or index >= len(calls) or calls[index].block_ends is None or x.dim() < 1:
            return None
        probed, k = calls[index], x.shape[0] // self.batch_size
        if k != probed.block_rows or probed.block_ends.shape[2:] != x.shape[1:]:
            return None
        if "rows" not in probed.verdicts:   # the pass the probe ran for: its batch, compared once
            ends = _block_ends(x, self.batch_size)
            probed.verdicts["rows"] = _same_rows(ends[:, :self.batch_size - 1], probed.block_ends)
            # rows alike in every block (token types all 0, positions 0..T-1 in every row) match the probe's in any
            # layout: they cannot show that the rows are example-major (two columns of B examples concatenated,
            # [a_0..a_B-1, p_0..p_B-1], as sentence-transformers' merged forward runs them, matched too, and the
            # rule paired rows 2i and 2i+1 as example i: norms 13x to 680x off, silently)
            probed.verdicts["rows_shown"] = not bool((ends == ends[:, :1]).all())
        if not probed.verdicts["rows"]:
            return None
        if probed.verdicts["rows_shown"]:
            self.example_major_rows.add(x.shape[0])
            return k
        return k if x.shape[0] in self.example_major_rows else None

    def examples_in_dim_1(self, module: nn.Module, index: int, x: Tensor) -> bool:
        """Whether call ``index`` of ``module`` holds the examples in dim 1, (T, B, ...): the probe's call had
        (T, B - 1, ...), with x[0], x[-1] and the absolute sums over dim 0 equal to those of x's first B - 1
        columns (``_column_ends``; a reshape of other rows into (T, B) does not match, padding or not)."""
        calls = None if self.probe is None else self.probe.get(module, [])
        if not calls or index >= len(calls) or calls[index].column_ends is None:
            return False
        probed = calls[index]
        if probed.column_ends.shape[2:] != x.shape[2:] or x.shape[0] != probed.shapes[0][0]:
            return False
        if "columns" not in probed.verdicts:   # the pass the probe ran for: its batch, compared once
            probed.verdicts["columns"] = _same_rows(_column_ends(x)[:, :self.batch_size - 1], probed.column_ends)
        return probed.verdicts["columns"]

    def attach(self, name: str) -> bool:
        """Measure ``name`` -- used inside a module's forward without a call of its own module (MHA's out_proj)
        -- with the nearest enclosing module that went through the fallback in this pass; False if none did."""
        best = self._enclosing(name)
        if best is None:
            return False
        module, prefix, entry = best
        self.attached.setdefault(module, set()).add(name[len(prefix):])   # its later calls capture it too
        # the entries are the engine's plan, shared by every pass: this pass's calls get a widened copy
        widened = GhostModule(entry.path, entry.rule, {**entry.names, name[len(prefix):]: name})
        self.modules = {**self.modules, module: widened}
        self.fallback_calls[:] = [(m, widened if m is module else e, call) for m, e, call in self.fallback_calls]
        self.use_count[name] += sum(1 for m, _, _ in self.fallback_calls if m is module)
        self.fallback_names.add(name)
        return True

    def _enclosing(self, name: str) -> tuple[nn.Module, str, GhostModule] | None:
        """(module, its path + ".", entry) of the nearest module enclosing the module of parameter ``name`` that
        went through the fallback in this pass; None if none did."""
        owner_path = name.rsplit(".", 1)[0] if "." in name else ""
        best = None
        for module, entry, _ in self.fallback_calls:
            path = "" if entry.path == "<model>" else entry.path + "."
            # FSDP1 with flat parameters names the parameters without the wrappers' path components
            for prefix in (path, clean_name(path)):
                if owner_path.startswith(prefix) and (best is None or len(prefix) > len(best[1])):
                    best = (module, prefix, entry)
        return best

    def finish(self) -> None:
        """Per-example gradients of every fallback call, once the backward has brought all output gradients."""
        if self.repeated:
            raise ValueError("a measured layer's output received gradients from more than one backward through "
                             "the same forward (backward(retain_graph=True) twice, or torch.autograd.grad and then "
                             "backward): per-example norms need exactly one backward per measured forward")
        self.replaying = True  # the hooks stay inert while modules are re-run
        try:
            self._read_rechecks()
            self._read_sum_checks()
            for module, entry, call in list(self.fallback_calls):
                if any(t._version != version for t, version in call.output_views):
                    self._drop(entry, call, "an output it returned as a view of another tensor was changed in place "
                                            "after its call, so its gradient may have bypassed the hook on it")
            captured = self._verified_captures()
            order = defaultdict(int)   # each call of a module is checked (a second call may reorder its rows)
            for module, entry, call in self.fallback_calls:   # a call's first capture: confirmed by a re-run
                order[module] += 1
                checked = self.cross_checked.setdefault(module, set())
                if id(call) in captured and order[module] not in checked and call.opaque is None:
                    confirmed = self._capture_confirmed(module, entry, call, captured[id(call)])
                    if confirmed is not None:
                        checked.add(order[module])
                    if confirmed is False:
                        self.refused.add(module)   # re-run (and sum-checked) from now on, this pass too
            for module, entry, call in self.fallback_calls:   # every call of a refused module (called twice)
                if module in self.refused:
                    captured.pop(id(call), None)
            found = []   # (entry, local name -> per-example gradients, the call where they come from its re-run)
            for module, entry, call in self.fallback_calls:
                grads = captured.get(id(call))
                if grads is None and set(entry.names.values()) <= self.outside_uses:
                    self.vmap_names.update(entry.names.values())   # a re-run would miss their other uses
                    continue
                rerun = grads is None
                if rerun and call.opaque is not None:   # a capture its sums refused, of a call a re-run cannot be
                    self.decline(entry, _cannot_be_given(call.opaque))   # given (Jamba's Mamba mixer and its cache)
                    continue
                if rerun:
                    grads = {local: [grad] for local, grad in self._rerun(module, entry, call).items()}
                found.append((entry, grads, call if rerun else None))
            with full_precision():   # the caller's autocast would take the norms' products in half precision
                self._add_found(found)
            self.fallback_calls.clear()
        finally:
            self.replaying = False
            if self.host_rng is not None:
                set_host_rng_state(self.host_rng)
                self.host_rng = None

    def _add_found(self, found: list[tuple[GhostModule, dict, FallbackCall | None]]) -> None:
        """The per-example gradients ``finish`` found for the fallback calls, added to the pass's norms, except
        those of re-runs that do not add up (``_unmatched_reruns``), whose modules go to the whole-model vmap."""
        unmatched = self._unmatched_reruns(found)
        for entry, grads, _ in found:
            if entry.path in unmatched:   # rows in another order than its inputs', or a use the re-run missed
                if self.strict:
                    raise ValueError(f"backend='ghost' cannot measure module {entry.path!r}: "
                                     f"{unmatched[entry.path]}; use backend='auto'")
                self.decline(entry, unmatched[entry.path])
                self.unmatched.append(entry.path)
                continue
            for local, parts in grads.items():
                name = entry.names.get(local)
                if name is None:   # attached by an earlier pass, measured by its own layer's calls in this one
                    continue
                if name in self.outside_uses:   # the re-run cannot see its uses outside the call
                    self.vmap_names.add(name)
                if len(parts) == 1 and isinstance(parts[0], LinearFactors) and self.use_count[name] == 1:
                    _add(self.sqnorms, name, parts[0].sqnorms())   # ghost form: no (B, *shape) gradients
                else:
                    for part in parts:
                        self.add_shared(name, part)

    def _unmatched_reruns(self, found: list[tuple[GhostModule, dict, FallbackCall | None]]) -> dict[str, str]:
        """path -> why, for the modules whose re-run per-example gradients do not add up to the gradient the real
        backward brought their parameters (``note_gradient``; the distance of their sum from that gradient, or of
        the norms where the shapes differ, against the latter's norm; each parameter used by this call alone;
        relative tolerance 1e-3, float32's, and half precision's where the gradient or the call's outputs are in it;
        one device sync): a module that returns its rows in another order than its inputs' (sorted by length, say),
        or a parameter used in a way the re-run does not repeat. Under FSDP the gradients arrive sharded, and are
        not compared."""
        rows = []   # (path, |sum_i of the re-run's gradients - the backward's gradient|, |the latter|, tolerance)
        for entry, grads, call in found:
            if call is None or self.sharded:
                continue
            for local, parts in grads.items():
                name = entry.names[local]
                noted = self.noted.get(name)
                if self.use_count[name] == 1 and len(parts) == 1 and noted is not None:
                    difference, size = _distance_to_sum(parts[0], noted[2], noted[0])
                    # at least float32's: a module may compute in float32 inside (Mamba's ``A_log.float()``)
                    rtol = max(_CAPTURE_RTOL.get(noted[1], 5e-2), _CAPTURE_RTOL.get(call.precision, 5e-2),
                               _CAPTURE_RTOL[torch.float32])
                    rows.append((entry.path, difference, size, rtol))
        if not rows:
            return {}
        device = rows[0][2].device
        differences = torch.stack([difference.to(device) for _, difference, _, _ in rows])
        wanted = torch.stack([norm.to(device, torch.float64) for _, _, norm, _ in rows])
        rtol = torch.tensor([r for _, _, _, r in rows], dtype=torch.float64, device=device)
        matched = (~(differences > rtol * wanted)).tolist()   # a non-finite gradient (NaN data): no verdict
        return {path: ("its per-example gradients from a re-run on each example do not add up to the gradient "
                       "its parameters received (its outputs' rows in another order than its inputs'?)")
                for (path, _, _, _), good in zip(rows, matched) if not good}

    def _capture_confirmed(self, module: nn.Module, entry: GhostModule, call: FallbackCall,
                           grads: dict) -> bool | None:
        """Whether the per-example norms of a call's captured uses are those of its re-run (each to its dtype's
        rounding, at least 1e-6 of itself, and 1e-3 of that of the largest):
        a capture takes a use's output row r for example r, which rows reordered by an operation it does not know
        (a concatenation of slices, ``torch.take``, a permutation matrix) break without changing the sums it checks.
        A module that cannot be re-run keeps its capture; None (no verdict) where the norms are not finite (NaN
        data): a later call checks."""
        try:
            rerun = self._rerun(module, entry, call)
        except PerExampleError:
            return True
        for local, parts in grads.items():
            if local not in rerun:
                return False
            with full_precision():
                captured, again = _sqnorms_of_sum(parts), _sqnorms_of_sum([rerun[local]])
            if not bool(torch.isfinite(captured).all() and torch.isfinite(again).all()):
                return None
            # each example against its own norm (a row given to another example whose norms are 1000 times smaller
            # hides below a tolerance taken from the largest), and the largest's rounding in the norms' dtype
            rtol = max(_CAPTURE_RTOL.get(captured.dtype, 5e-2), 1e-6)
            largest = torch.maximum(captured.abs().max(), again.abs().max())
            bound = rtol * torch.maximum(captured.abs(), again.abs()) + rtol * 1e-3 * largest
            if not bool(((captured - again).abs() <= bound).all()):
                return False
        return True

    def _rerun(self, module: nn.Module, entry: GhostModule, call: FallbackCall) -> dict:
        """The call's per-example gradients from re-runs of the module; Python's and NumPy's generators, which its
        code may draw from, are put back after the pass's re-runs (``finish``), and generators of its own after
        each."""
        if self.host_rng is None:
            self.host_rng = host_rng_state()
        own = generator_states(module_generators(module))
        try:
            with _autocast_as(call):
                return module_per_example_grads(module, call, list(entry.names), self.batch_size)
        except PerExampleError:
            raise
        except Exception as error:  # any failure of torch.func or of the module's own code
            raise PerExampleError(
                f"module {entry.path!r} ({type(module).__name__}), parameters {sorted(entry.names.values())}",
                "module", f"{type(error).__name__}: {error}", _FALLBACK_ADVICE) from error
        finally:
            set_generator_states(own)

    def _read_rechecks(self) -> None:
        """The per-call checks of rules that recheck (one device sync for all): a call its rule did not reproduce
        sends the module's parameters to the whole-model vmap for this pass and the module to the per-module
        fallback from the next one."""
        if not self.rechecks:
            return
        reproduced = torch.stack([ok for _, _, ok in self.rechecks]).tolist()
        for (module, entry, _), ok in zip(self.rechecks, reproduced):
            if not ok:
                self.verified[module] = False
                self.decline(entry, f"its rule {type(entry.rule).__name__} no longer reproduces its output")
        self.rechecks.clear()

    def _read_sum_checks(self) -> None:
        """The shared outputs never connected (the model's call did not end in the pass) and those whose
        per-example gradients did not add up (``check_sum``; one device sync for all) go to the whole-model vmap."""
        for broadcast in list(self.broadcasts.pending):
            self._unshare(broadcast, "its output is computed once for all the examples, and the model's call "
                                     "that would connect it to the examples did not end in the pass")
        if not self.sum_checks:
            return
        for (entry, call, _), ok in zip(self.sum_checks, torch.stack([ok for _, _, ok in self.sum_checks]).tolist()):
            if not ok:
                why = ("its output is computed once for all the examples, and their gradients of it did not add up to "
                       "the gradient it received (an operation the hooks did not follow took it)")
                if self.strict:
                    raise ValueError(f"backend='ghost' cannot measure module {entry.path!r}: {why}; use "
                                     "backend='auto'")
                self._drop(entry, call, why)
        self.sum_checks.clear()

    def note_gradient(self, name: str, grad: Tensor) -> None:
        """Keeps |grad|, its dtype and grad itself (not copied: read in ``finish``, right after the backward) of the
        gradient the backward brings a parameter whose uses were captured or that a fallback module re-runs
        (None if it arrives in two parts), to check the capture and the re-run against (``_verified_captures``,
        ``_unmatched_reruns``)."""
        if name in self.captured_names or name in self.fallback_names:
            grad = dense_gradient(grad)   # (an nn.Embedding(sparse=True) subclass re-run)
            self.noted[name] = None if name in self.noted else (
                torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32)), grad.dtype,
                grad)

    def _verified_captures(self) -> dict[int, dict[str, list]]:
        """id(call) -> local name -> the per-example gradients of its uses (``ParameterUses``), for the calls
        whose every parameter was used only by captured calls, with sum_i of the captured per-example gradients
        as large as the gradient the real backward brought it (relative tolerance by its dtype). The other
        calls are re-run, and the modules of calls that fail the check are not captured again."""
        grads, calls_of = {}, defaultdict(list)
        for module, entry, call in self.fallback_calls:
            check_unmodified(call)
            if call.uses is not None and set(entry.names) <= call.uses.tracked:
                grads[id(call)] = call.uses.per_example_grads()
                for local, name in entry.names.items():
                    calls_of[name].append((id(call), local))
        if not grads:
            return {}
        names = [name for name, calls in calls_of.items()
                 if len(calls) == self.use_count[name] and self.noted.get(name, 0) is not None]
        rows = []   # (|sum_i of the captured gradients|, |the backward's gradient|, relative tolerance) per name
        for name in names:
            parts = [part for key, local in calls_of[name] for part in grads[key].get(local, [])]
            total = torch.linalg.vector_norm(sum(map(per_example_total, parts))).float() if parts else None
            noted = self.noted.get(name)
            # the gradient's rounding, or that of the uses' own products where coarser (a float64 model's router
            # computing in float32: 1e-7 apart, which a float64 tolerance took for a use outside the call)
            dtypes = [noted[1] if noted else torch.float32] + [_dtype_of(part) for part in parts]
            rows.append((total, None if noted is None else noted[0].float(),
                         max(_CAPTURE_RTOL.get(dtype, 5e-2) for dtype in dtypes)))
        device = next((t.device for row in rows for t in row[:2] if t is not None), None)
        ok = set(names)
        if device is not None:   # one comparison, one device sync
            zero = torch.zeros((), device=device)
            found = torch.stack([zero if t is None else t.to(device) for t, _, _ in rows])
            wanted = torch.stack([zero if t is None else t.to(device) for _, t, _ in rows])
            rtol = torch.tensor([r for _, _, r in rows], device=device)
            matched = (~((found - wanted).abs() > rtol * torch.maximum(found, wanted))).tolist()   # NaN: no verdict
            ok = {name for name, good in zip(names, matched) if good}
        for name in set(names) - ok:   # uses outside the call (or unseen ones): the whole-model vmap sees them all
            self.outside_uses.add(name)
            self.vmap_names.add(name)
        for module, entry, call in self.fallback_calls:
            if id(call) in grads and not all(name in ok for name in entry.names.values()):
                del grads[id(call)]
                self.refused.add(module)
        return grads

    def add_shared(self, name: str, grad: Tensor | LinearFactors | IndexFactors) -> None:
        """One call's per-example gradient of a parameter used by several calls: dense ones are summed at once,
        factors kept for ``result``."""
        if isinstance(grad, (LinearFactors, IndexFactors)):
            self.shared_factors[name].append(grad)
        else:
            _add(self.shared_grads, name, grad)

    def calls_outside(self, graph: set) -> dict[str, int]:
        """name -> how many of this pass's rule calls on the parameter have an output node outside ``graph`` (the
        nodes of the loss's graph): their rules get no gradient."""
        outside: dict[str, int] = defaultdict(int)
        for node, names in self.call_nodes:
            if node not in graph:
                for name in names:
                    outside[name] += 1
        return outside

    def result(self) -> dict[str, Tensor]:
        """Per-parameter (B,) squared norms of every parameter that took part in this pass."""
        found = self.stacked()
        return {} if found is None else dict(zip(found[0], found[1].unbind()))

    @torch.no_grad()
    def stacked(self) -> tuple[list[str], Tensor] | None:
        """The parameters that took part in this pass and their (B,) squared norms stacked (P, B) in that order,
        one multiplication rescaling them all; None if none did (no autograd graph: the factors are views of
        activations that require grad)."""
        sqnorms = dict(self.sqnorms)
        with full_precision():
            for name in self.shared_grads.keys() | self.shared_factors.keys():
                sqnorms[name] = sqnorm_of_sum(self.shared_factors.get(name, []), self.shared_grads.get(name))
        if not sqnorms:
            return None
        return list(sqnorms), torch.stack(list(sqnorms.values())) * self.grad_factor ** 2


def _distance_to_sum(part: Tensor | LinearFactors | IndexFactors, grad: Tensor, norm: Tensor) -> tuple[Tensor, Tensor]:
    """(|T - G|, |G|) for T = sum_i of one call's per-example gradients ``part`` and G the gradient ``grad`` (of
    norm ``norm``) the backward brought; the norms' difference where the shapes differ. For factors, whose T would
    cost another weight gradient (an MoE's experts, on padded blocks), both through four fixed random directions V:
    (|(T - G) V|, |G V|), with E|X V|^2 = 4 |X|^2 for any X, at (rows + cols) 4 per row instead of rows cols."""
    if isinstance(part, LinearFactors) and grad.numel() == part._numel():
        a = part.blocks[0][0]
        directions = _directions(a.shape[-1], a.dtype, a.device)
        total = torch.cat([g.flatten(0, 1).T @ (a.flatten(0, 1) @ directions) for a, g in part.blocks])
        wanted = grad.reshape(total.shape[0], -1).to(a.dtype) @ directions
        return (torch.linalg.vector_norm(total - wanted, dtype=torch.float64),
                torch.linalg.vector_norm(wanted, dtype=torch.float64))
    total = per_example_total(part)
    if grad.numel() != total.numel():
        return (torch.linalg.vector_norm(total, dtype=torch.float64) - norm).abs(), norm
    return torch.linalg.vector_norm(total - grad.reshape(total.shape), dtype=torch.float64), norm


def _dtype_of(part: Tensor | LinearFactors | IndexFactors) -> torch.dtype:
    """The dtype one use's per-example gradients were computed in."""
    if isinstance(part, LinearFactors):
        return part.blocks[0][0].dtype
    return part.v.dtype if isinstance(part, IndexFactors) else part.dtype


@lru_cache(maxsize=32)
def _directions(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(size, 4) standard normal directions, the same in every pass (a generator of their own: the caller's random
    state is not touched)."""
    return torch.randn(size, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device, dtype)


def _add(store: dict[str, Tensor], name: str, value: Tensor) -> None:
    """Sum per name; rules return fresh tensors, so the stored one can be added to in place."""
    current = store.get(name)
    if current is None:
        store[name] = value
    elif current._base is not None or 0 in current.stride():   # a view, or zeros expanded by vmap: not in place
        store[name] = current + value
    else:
        current.add_(value)


def _broadcast(t: Tensor, batch_size: int) -> Tensor:
    return t.expand(batch_size, *t.shape[1:])


def _batch_of_one(args: tuple, kwargs: dict, output: Any, batch: int) -> bool:
    """A call shared by the B > 1 examples: its output has dim 0 of size 1 and its inputs are index tensors
    (HF position embeddings on position_ids (1, T); BART's on (T,) positions). Only index inputs are taken for
    positions: a float input of batch 1 (Swin-v2's coordinate table) or no input at all (Swin's bias table) may
    broadcast over windows or heads rather than examples, where an expanded output would break the model's own
    forward; such calls are left alone (and measured by the whole-model vmap)."""
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
    return (batch > 1 and isinstance(output, Tensor) and output.dim() > 0 and output.shape[0] == 1 and bool(tensors)
            and not any(t.is_floating_point() or t.is_complex() or t.dtype == torch.bool for t in tensors))


@dataclass
class ProbedCall:
    """One call in the probe's forward: the shapes of its tensors (``_call_tensors``) and, where its first input
    has a multiple of the probe's examples in rows, the ends and sums of each block (``_block_ends``), or, where
    its dim 1 has the examples' number, the ends and sums of each column (``_column_ends``)."""

    shapes: list[tuple]
    block_ends: Tensor | None   # (3, examples, ...): ``_block_ends`` of its first input
    block_rows: int | None      # the rows of each block, k
    column_ends: Tensor | None = None   # (3, examples, ...): ``_column_ends`` of its first input
    rows: Tensor | None = None   # ``row_order.row_fingerprint`` of its first input, in a probe that asks for it
    # the layout checks' results, made in the pass the probe ran for (the probe is cached per input shapes, and a
    # later batch's rows differ from the probe's; the layout is the model code's)
    verdicts: dict[str, bool] = field(default_factory=dict)


def _block_ends(x: Any, batch: int) -> Tensor | None:
    """(3, batch, ...) the first and last row and the sum of absolute values of each of ``batch`` blocks of x's
    rows, when x has k * batch rows with k > 1; else None. The sums see every row (padding at both ends of a
    block does not hide a block of other rows)."""
    if not isinstance(x, Tensor) or x.dim() == 0 or batch < 1 or x.shape[0] % batch or x.shape[0] == batch:
        return None
    k = x.shape[0] // batch
    x = x.detach()
    return torch.stack([x[::k], x[k - 1::k], x.abs().reshape(batch, k, *x.shape[1:]).sum(1)]).clone()


def _column_ends(x: Tensor) -> Tensor:
    """(3, columns, ...) x[0], x[-1] and the sum of absolute values over dim 0 of a (T, columns, ...) tensor."""
    x = x.detach()
    return torch.stack([x[0], x[-1], x.abs().sum(0)]).clone()


def _finite_rows(x: Tensor, output: Tensor) -> Tensor | None:
    """The first examples (up to ``VERIFY_ROWS``) whose output, and input if floating, are finite: a rule's check
    compares a few rows within their rounding, which an inf or NaN has not. None if no example is finite."""
    finite = torch.isfinite(output.detach()).reshape(output.shape[0], -1).all(1)
    if x.is_floating_point() or x.is_complex():
        finite &= torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(1)
    rows = finite.nonzero().flatten()[:VERIFY_ROWS]
    return rows if rows.numel() else None


def _same_rows(a: Tensor, b: Tensor) -> bool:
    """Equal rows, up to the rounding of float dtypes (a batched kernel may round a row differently when the
    batch is one example smaller), measured against each channel's (last dim's) own scale: one large channel (a
    "massive activation") does not loosen the others."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    if a.dim() < 2:
        return close_values(a, b)
    tolerance = rounding_tolerance(a.dtype)
    a, b = a.double(), b.double()
    scale = torch.maximum(a.abs(), b.abs()).amax(dim=tuple(range(a.dim() - 1)), keepdim=True)
    return bool(((a - b).abs() <= tolerance * scale).all())


def _call_tensors(args: tuple, kwargs: dict, output: Any) -> list[Tensor]:
    """The tensors of a call's inputs and outputs, in a fixed order (matched between the probe and the pass)."""
    if not kwargs and isinstance(output, Tensor) and all(isinstance(a, Tensor) for a in args):
        return [*args, output]   # a layer's usual call, without a pytree walk
    return [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)] + output_tensors(output)


def _first_input(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))


class GhostNormEngine:
    """Installs a forward pre-hook and a forward hook on each given module; inactive outside ``recording``."""

    def __init__(self, modules: list[nn.Module], root: nn.Module | None = None, resharding: Iterable[nn.Module] = ()):
        """``resharding``: modules that reshard their parameters in a forward hook of their own (FSDP2's units):
        this engine's forward hook runs before theirs, while the parameters a fallback copies are whole."""
        self._pass: GhostPass | None = None
        self._verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its rule verified
        self._warned: weakref.WeakSet = weakref.WeakSet()
        # (module, LinearCapture or ParameterUses) open during their module's forward, in the order they started
        self._open: list[tuple[nn.Module, Any]] = []
        self._refused: weakref.WeakSet = weakref.WeakSet()   # modules whose parameter uses could not be captured
        self._cross_checked = weakref.WeakKeyDictionary()   # module -> its calls whose capture a re-run confirmed
        self._attached: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # GhostPass.attached
        self._updates_buffers = weakref.WeakKeyDictionary()   # module -> whether its forward changed its buffers
        self._outside_uses: set[str] = set()   # parameters whose captured sums missed part of their gradient
        self._probe: dict | None = None                       # set inside ``probing``
        self._probe_modules: dict | None = None
        self._probe_batch = 0
        self._probe_rows = False
        self._reordered: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # ``note_row_order``
        self._checkpointed = CheckpointedInputs()   # rule layers' inputs saved by activation checkpointing
        self._handles = []
        resharding = set(resharding)
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(ModuleHook(self._before_forward), with_kwargs=True))
            self._handles.append(module.register_forward_hook(ModuleHook(self._on_forward), with_kwargs=True,
                                                              prepend=module in resharding))
        if root is not None:   # after the model's forward, the shared outputs' consumers are in the graph;
            # before FSDP2 reshards a root that reshards after its forward (its parameters read as .weight)
            self._handles.append(root.register_forward_hook(ModuleHook(self._after_model), prepend=root in resharding))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def recording(self, modules: dict[nn.Module, GhostModule], batch_size: int, loss_scale: float,
                  strict: bool, sharded: bool = False, probe: dict | None = None,
                  inputs: Any = None, check_uses: bool = False) -> Iterator[GhostPass]:
        """Record one forward/backward of ``modules`` (``inputs``: the model's call's, where known); the hooks are
        inert again on exit. ``check_uses``: the pass whose graph the caller checks for parameters read outside
        their layers' calls (the first of a plan); under FSDP it also holds what each call may read of its
        descendant layers' parameters (``GhostPass.hold_children``)."""
        self._pass = GhostPass(modules, batch_size, batch_size / loss_scale, strict=strict, sharded=sharded,
                               inputs={id(t): (t, t._version) for t in tensors_of(inputs)},
                               refused=self._refused, cross_checked=self._cross_checked,
                               attached=self._attached, probe=probe,
                               verified=self._verified,
                               updates_buffers=self._updates_buffers,
                               outside_uses=self._outside_uses, broadcasts=BroadcastGradients(batch_size),
                               check_uses=check_uses)
        # FSDP: a global forward hook runs before the module's own, so before FSDP2 reshards a module it wraps
        callers = (torch.nn.modules.module.register_module_forward_hook(self._after_any_module)
                   if sharded and check_uses else None)
        try:
            yield self._pass
        finally:
            if callers is not None:
                callers.remove()
            self._pass.broadcasts.close()
            for handle in self._pass.pass_hooks:
                handle.remove()
            self._pass = None
            for _, capture in reversed(self._open):   # a forward that raised leaves its captures open
                capture.stop()
            self._open.clear()

    @contextmanager
    def probing(self, modules: dict[nn.Module, GhostModule], batch_size: int,
                rows: bool = False) -> Iterator[dict[nn.Module, list]]:
        """A forward on ``batch_size`` examples inside records, for each call of ``modules``, a ``ProbedCall``
        and nothing else: the probe of ``GhostPass.follows_batch`` and ``GhostPass.row_blocks``; with ``rows``
        also its input rows' fingerprints (``note_row_order``)."""
        self._probe, self._probe_modules, self._probe_batch = defaultdict(list), modules, batch_size
        self._probe_rows = rows
        try:
            yield self._probe
        finally:
            self._probe = self._probe_modules = None

    def note_row_order(self, before: dict[nn.Module, list], after: dict[nn.Module, list],
                       replaced: dict[int, int], random: bool = False) -> None:
        """From the probes (``probing(..., rows=True)``) of the independence check's two forwards, the calls whose
        input rows are not the examples in the batch's order (``row_order.rows_reordered``; ``random``: the
        forwards drew random numbers), kept for the passes (``GhostPass.note_reordered``: where such a call's input
        has no autograd graph, the hooks cannot follow its rows)."""
        for module, calls in before.items():
            found = {index for index, (a, b) in enumerate(zip(calls, after.get(module, ())))
                     if rows_reordered(a.rows, b.rows, replaced, random)}
            if found:
                self._reordered[module] = found
            else:
                self._reordered.pop(module, None)

    def _after_any_module(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The global forward hook of an FSDP pass that checks uses (``recording``)."""
        ghost_pass = self._pass
        if ghost_pass is not None and not ghost_pass.replaying and self._probe is None:
            ghost_pass.hold_children(module)

    def _after_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        ghost_pass = self._pass
        if ghost_pass is None or self._probe is not None or ghost_pass.replaying or not ghost_pass.broadcasts.pending:
            return
        ghost_pass.connect_shared([t.grad_fn for t in tree_leaves(output)
                                   if isinstance(t, Tensor) and t.grad_fn is not None])

    def _active(self, module: nn.Module) -> GhostPass | None:
        ghost_pass = self._pass
        if ghost_pass is None or ghost_pass.replaying or module not in ghost_pass.modules or recomputing():
            return None
        return ghost_pass

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ghost_pass = self._pass
        entry = None if ghost_pass is None else ghost_pass.modules.get(module)
        if entry is None or entry.rule is not None and self._verified.get(module) is not False:
            return   # a layer measured by its rule needs nothing before its call (tested first: the common case)
        if self._probe is None and self._active(module) is not None:
            ghost_pass.rng_before[module].append(rng_state(_device_of(module), module_generators(module)))
            ghost_pass.buffers_before[module].append((
                [(name, b, b._version) for name, b in module.named_buffers()],
                {name: b.detach().clone() for name, b in module.named_buffers()}
                if ghost_pass.updates_buffers.get(module, True) else None))
            capture = self._capture_for(ghost_pass, module, _first_input(args, kwargs))
            if capture is not None:
                capture.start(args, kwargs)
                self._open.append((module, capture))

    def _capture_for(self, ghost_pass: GhostPass, module: nn.Module, x: Any) -> LinearCapture | ParameterUses | None:
        """What records the real pass's uses of a fallback module's parameters: nn.MultiheadAttention's
        projections (``LinearCapture``), or the plain operations of any other module (``ParameterUses``; on the
        rows of its first input ``x`` where they are a multiple of the B examples', as an MoE's router takes B T
        tokens, kept if ``_fallback_blocks`` finds them in B blocks) unless an earlier call of it could not be
        captured; None under FSDP and for RNN/LSTM/GRU (re-run instead)."""
        entry = ghost_pass.modules[module]
        if ghost_pass.sharded:
            return None
        if entry.rule is None and capturable(module):
            return LinearCapture(module, ghost_pass.pass_hooks)
        if module in self._refused or unrolled_supported(module) or not entry.names:
            return None
        batch = ghost_pass.batch_size
        rows = (x.shape[0] if isinstance(x, Tensor) and x.dim() and x.shape[0] > batch and x.shape[0] % batch == 0
                else None)
        # and the parameters of layers it reads without their call
        return ParameterUses({local: module.get_parameter(local) for local in {*entry.names, *self._attached.get(
            module, ())}}, batch, rows, ghost_pass.pass_hooks)

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        capture = None
        opened = None if not self._open else next(
            (k for k in range(len(self._open) - 1, -1, -1) if self._open[k][0] is module), None)
        if opened is not None:   # this call's capture, and any of children that raised inside its forward
            capture = self._open[opened][1]
            for _, started in reversed(self._open[opened:]):
                started.stop()
            del self._open[opened:]
        if self._probe is not None:
            if module in self._probe_modules and not recomputing():
                x = _first_input(args, kwargs)
                if self._probe_rows:   # the independence check's forwards: the rows alone (``note_row_order``)
                    self._probe[module].append(ProbedCall([], None, None, rows=row_fingerprint(x, self._probe_batch)))
                    return None
                ends = _block_ends(x, self._probe_batch)
                columns = (_column_ends(x) if isinstance(x, Tensor) and x.dim() > 1
                           and x.shape[1] == self._probe_batch else None)
                self._probe[module].append(ProbedCall([tuple(t.shape) for t in _call_tensors(args, kwargs, output)],
                                                      ends, None if ends is None else x.shape[0] // self._probe_batch,
                                                      columns))
            return None
        ghost_pass = self._active(module)
        if ghost_pass is None:
            if self._checkpointed and recomputing():
                self._checkpointed.fill(_first_input(args, kwargs))
            return None
        entry = ghost_pass.modules[module]
        index = ghost_pass.calls[module]
        if torch.is_grad_enabled():   # as the probe counts: reentrant checkpointing's first forward runs without grad
            ghost_pass.calls[module] += 1
        if self._reordered and index in self._reordered.get(module, ()):
            ghost_pass.note_reordered(entry, _first_input(args, kwargs))
        verified = self._verified.get(module)   # None before the first call of each instance
        if entry.rule is None or verified is False:
            return self._record_fallback_call(ghost_pass, entry, module, args, kwargs, output, capture, index)
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        x = _first_input(args, kwargs)
        if self._open and type(x) is Tensor and type(output) is Tensor:
            # inside a module whose parameter uses are captured (a TorchFunctionMode): this hook's own reads of
            # plain tensors are not that module's uses, and would each pass through the capture (~5 us)
            with torch._C.DisableTorchFunction():
                return self._on_rule_call(ghost_pass, entry, module, args, kwargs, output, x, index, verified)
        return self._on_rule_call(ghost_pass, entry, module, args, kwargs, output, x, index, verified)

    def _on_rule_call(self, ghost_pass: GhostPass, entry: GhostModule, module: nn.Module, args: tuple, kwargs: dict,
                      output: Tensor, x: Any, index: int, verified: bool | None) -> Tensor | None:
        """A call of a layer with a rule: checks that dim 0 holds the examples (or their rows in blocks, or dim 1)
        and hooks its output's autograd node; returns the output to use instead (a batch of one expanded), if any."""
        batch = ghost_pass.batch_size
        replaced, taken = None, x
        if (isinstance(x, Tensor) and x.dim() and x.shape[0] == 1 and not ghost_pass.in_rows
                and _batch_of_one(args, kwargs, output, batch)):
            x, replaced = _broadcast(x, batch), _broadcast(output, batch)   # a call shared by every example
            output = replaced
        self._warn_if_positions(entry, module, x, batch)
        blocks = None
        # rows picked by an index from another tensor's rows (tokens routed to an expert), or computed from such a
        # call's output: as many as B, or B k, only by chance (a probe on B - 1 examples picks a prefix of them)
        selected = isinstance(x, Tensor) and x.grad_fn is not None and x.dim() > 0 and (
            rows_selected(x.grad_fn, batch, ghost_pass.clean_rows)
            or bool(ghost_pass.selected) and _from_selected_rows(
                x, ghost_pass.selected, ghost_pass.broadcasts.rows))
        # the example each row was picked from, as far as the graph shows it (an expert on its routed tokens)
        owners = (picked_owners(x.grad_fn, x.shape[0], batch, ghost_pass.broadcasts.examples_at, ghost_pass.owned)
                  if selected and replaced is None and entry.rule.rows_as_positions and x.dim() == 2
                  and output.dim() == 2 and output.shape[0] == x.shape[0] else None)
        if selected and output.grad_fn is not None:
            ghost_pass.selected.add(output.grad_fn)
            if owners is not None:
                ghost_pass.owned[output.grad_fn] = owners
        if owners is not None and not owners.numel():   # no token routed to this expert: it adds nothing
            for name in entry.names.values():
                ghost_pass.use_count[name] += 1
            return None
        many = (owners is None and isinstance(x, Tensor) and x.dim() and x.shape[0] > batch
                and x.shape[0] % batch == 0)
        ghost_pass.in_rows = ghost_pass.in_rows or many   # B k rows (a multiple-choice head's B x choices)
        if many and not selected and output.shape[:1] == x.shape[:1] and entry.rule.rows_as_positions:
            blocks = ghost_pass.row_blocks(module, index, x)
            ghost_pass.flattened = ghost_pass.flattened or blocks is None and ghost_pass.probe is None
            if blocks is not None:   # rows of B examples in blocks: (B, k, ...) for the rule, same values
                hooked = output
                x, output = x.view(batch, blocks, *x.shape[1:]), output.view(batch, blocks, *output.shape[1:])
        transposed = (blocks is None and replaced is None and owners is None
                      and _sequence_first(x, output, batch, entry.rule))
        if transposed:   # (T, B, ...): the rule takes (B, T, ...) where a probe showed dim 1 to be the examples
            ghost_pass.flattened = ghost_pass.flattened or (ghost_pass.probe is None and x.shape[0] != batch)
            tensors = [] if ghost_pass.probe is None else _call_tensors(args, kwargs, output)
            transposed = ghost_pass.probe is not None and ghost_pass.follows_batch(
                module, index, tensors, [(x, 1), (output, 1)]) and ghost_pass.examples_in_dim_1(module, index, x)
            if transposed:
                hooked = output
                x, output = x.transpose(0, 1), output.transpose(0, 1)
        plain = replaced is None and blocks is None and not transposed
        if owners is not None:   # padded to (B, K, d) for the rule in the backward (``_on_output_grad``)
            why = None
        elif not isinstance(x, Tensor) or x.shape[:1] != (batch,) or output.shape[0] != x.shape[0]:
            why = f"called with an input of shape {_shape(x)}"
        elif is_parameter_table(x):
            why = "called on a parameter (DeBERTa's LayerNorm of its relative embeddings), not on the examples"
        elif plain and selected:
            why = (f"called on {batch} rows selected from another tensor's rows (tokens routed to an expert), as "
                   "many as the examples only by chance")
        elif plain and not ghost_pass.follows_batch(
                module, index, [] if ghost_pass.probe is None else _call_tensors(args, kwargs, output), [(x, 0)],
                entry.rule.rows_as_positions, traced=entry.rule.rows_as_positions):
            why = f"called with an input of shape {_shape(x)}: {ghost_pass.not_the_examples('its dim 0', batch)}"
        else:
            why = None
        # a table's rows (DeBERTa's relative embeddings, even with B rows), for the rules that take any leading dims
        # for positions (Linear, LayerNorm: not a BatchNorm's or convolution's channels)
        once = (owners is None and entry.rule.rows_as_positions and isinstance(x, Tensor) and x.requires_grad
                and computed_once(x, ghost_pass.broadcasts.shared_nodes()))
        shared = once or why is not None and _shared_indices(x, output, batch)   # or buckets, positions
        if why is not None and not shared:
            if not ghost_pass.strict:  # auto: a call without the examples in dim 0 goes to the whole-model vmap,
                # once a gradient reaches its output: a call whose output leaves the graph adds nothing to any
                # example's gradient (PEFT's DoRA calls lora_B(lora_A(eye)) for its weight norm, then detaches it),
                # so the layer's other calls stay with its rule. Under FSDP the vmap cannot run: declined now, so
                # that the refusal comes before the backward
                if output.grad_fn is None or ghost_pass.sharded:
                    ghost_pass.decline(entry, why)
                else:
                    ghost_pass.pass_hooks.append(output.grad_fn.register_prehook(
                        partial(_decline_when_reached, ghost_pass, entry, why)))
                return None
            raise ValueError(
                f"module {entry.path!r} ({type(module).__name__}) was {why}; ghost norms need dim 0 to be "
                f"the batch of {batch} examples (or 1, shared by all; use backend='vmap' for this model)")
        if verified is None:  # the first call of each instance checks the rule's formula, on finite rows
            with torch.no_grad():
                rows = _finite_rows(x, output)
                if rows is None:   # no verdict (this pass's norms are not finite anyway): the next call checks
                    return self._record_fallback_call(ghost_pass, entry, module, args, kwargs, output, None, index)
                self._verified[module] = bool(entry.rule.verify(module, x[rows], output[rows]))
            if not self._verified[module]:
                if ghost_pass.strict:
                    raise ValueError(f"backend='ghost': the rule {type(entry.rule).__name__} does not reproduce the "
                                     f"output of module {entry.path!r} ({type(module).__name__}); use backend='auto'")
                return self._record_fallback_call(ghost_pass, entry, module, args, kwargs, output, None, index)
        elif entry.rule.recheck:   # a subclass's own forward: checked on every call, read once after the pass
            with torch.no_grad():
                ghost_pass.rechecks.append((module, entry, entry.rule.reproduces(module, x, output)))
        for name in entry.names.values():
            ghost_pass.use_count[name] += 1
        if ghost_pass.sharded and ghost_pass.check_uses:
            ghost_pass.hold(module, entry)
        if shared:
            ghost_pass.share(entry, output, partial(self._on_shared_grad, ghost_pass, entry, module, x),
                             without_examples=once)
            if output.grad_fn is not None:
                ghost_pass.call_nodes.append((output.grad_fn, tuple(entry.names.values())))
            return None
        held = output if blocks is None and not transposed else hooked
        node = held.grad_fn
        if node is None:   # a leaf returned as the output: no gradient reaches the layer's parameters through it
            return replaced
        read = self._checkpointed.save(taken) if isinstance(taken, Tensor) else None
        if read is not None:   # inside a checkpointed block: read back in the backward, after its recomputation
            x = partial(_read_back, read, batch, blocks, transposed, replaced is not None)
        call = {"x": x, "blocks": blocks, "owners": owners, "transposed": transposed, "output_nr": held.output_nr,
                "claimed": ghost_pass.claim_parametrized(module, entry.path) if ghost_pass.shared else []}
        base = held._base
        if base is not None and base.grad_fn is not None and _reshaped(held, base):
            # the layer's product viewed (a Linear on (B, T, d): addmm's B T rows): a change of the view in place
            # (Longformer's ``q /= sqrt(d)``) takes the view's node out of the graph, the product's stays in it
            hooked_node, call["output_nr"], call["shape"] = base.grad_fn, base.output_nr, held.shape
        else:
            hooked_node = node
        # a pre-hook of the output's autograd node (a third of a tensor hook's cost to register): it sees the
        # gradient the layer's backward uses, after any tensor hook on the output
        ghost_pass.pass_hooks.append(
            hooked_node.register_prehook(partial(self._on_output_grad, ghost_pass, entry, module, call)))
        ghost_pass.hooked_nodes.update((node, hooked_node))
        ghost_pass.call_nodes.append((hooked_node, tuple(entry.names.values())))
        if not selected:   # its rows in its input's order, which its own search found kept
            ghost_pass.clean_rows.add(node)
        if not transposed and replaced is None and owners is None:   # the examples' rows, for shared outputs
            rows = ghost_pass.broadcasts
            rows.rows[node] = 1 if blocks is None else blocks
            taken = _first_input(args, kwargs)
            if isinstance(taken, Tensor) and taken.grad_fn is not None and taken.output_nr == 0:
                rows.inputs[taken.grad_fn] = rows.rows[node]
        return replaced

    def _warn_if_positions(self, entry: GhostModule, module: nn.Module, x: Any, batch: int) -> None:
        """Indices arange(B) without a batch dim look like positions 0..T-1 with T == B, which cannot be told
        apart from one index per example: warn (once per module) since the norms are wrong if they are."""
        if (isinstance(x, Tensor) and x.dim() == 1 and batch > 1 and not x.is_floating_point()
                and module not in self._warned and torch.equal(x, torch.arange(batch, device=x.device))):
            self._warned.add(module)
            warnings.warn(
                f"module {entry.path!r} ({type(module).__name__}) was called with arange({batch}) and no batch dim; "
                f"if these are positions shared by every example (T == B), its per-example norms may be wrong: call it "
                f"with a batch dim, shape (1, T), as HuggingFace models do", RuntimeWarning, stacklevel=2)

    @staticmethod
    def _record_fallback_call(ghost_pass: GhostPass, entry: GhostModule, module: nn.Module, args: tuple,
                              kwargs: dict, output: Any, capture: LinearCapture | ParameterUses | None,
                              index: int) -> Any:
        before = ghost_pass.rng_before[module].pop() if ghost_pass.rng_before[module] else None
        if ghost_pass.buffers_before[module]:   # a forward that changes its buffers (spectral norm's power iteration
            # in train mode): each call's re-run starts from copies taken before it, as every call's does until the
            # module's first call was seen
            versions, buffers = ghost_pass.buffers_before[module].pop()
            ghost_pass.updates_buffers[module] = ghost_pass.updates_buffers.get(module, False) or any(
                changed_in_place(b, version, buffers and buffers[name]) for name, b, version in versions)
        else:
            buffers = None
        if not torch.is_grad_enabled():   # no gradient comes of it (a rule's check of its layer's output, say)
            return None
        spec, batch = batch_dims_for(module), ghost_pass.batch_size
        reason = spec.unsupported_reason(module, bound_arguments(module, args, kwargs))
        if reason is not None:  # the whole-model vmap measures this module's parameters instead
            ghost_pass.decline(entry, reason)
            return None
        leaves = tree_leaves((args, kwargs))
        replaced = None
        if type(spec) is BatchDims and not ghost_pass.in_rows and _batch_of_one(args, kwargs, output, batch):
            replaced = _broadcast(output, batch)   # a call shared by every example (default layout)
        if isinstance(capture, ParameterUses):
            capture.refuse_unseen([t for t in leaves if isinstance(t, Tensor)], output_tensors(output))
            if not capture.close(output, replaced):
                ghost_pass.refused.add(module)   # a use it does not know: re-run this module from now on
        output = output if replaced is None else replaced
        outputs = output_tensors(output)
        dims = spec.output_dims(module, len(outputs))
        blocks = (GhostNormEngine._fallback_blocks(ghost_pass, module, index, args, kwargs)
                  if replaced is None and type(spec) is BatchDims else None)
        rows = batch * (blocks or 1)   # B examples, or B blocks of rows flattened from them (an MoE's tokens)
        # or B examples in, B blocks of rows out (a router flattening the tokens itself: DeepSeek-V3's)
        output_blocks = (_output_blocks(ghost_pass, outputs, batch)
                         if blocks is None and replaced is None and type(spec) is BatchDims else None)
        shared = (blocks is None and output_blocks is None and replaced is None and type(spec) is BatchDims
                  and (_computed_once(outputs, spec.input_dims(module, args, kwargs, batch), batch)
                       or _made_without_inputs(outputs, leaves, batch)))
        out_rows = rows * (output_blocks or 1)
        for t, dim in zip(outputs, dims):
            if t.requires_grad and (t.dim() <= dim or t.shape[dim] != out_rows) and not shared:
                ghost_pass.decline(entry, f"output of shape {tuple(t.shape)}: no examples in dim {dim}")
                return None   # not per example: the whole-model vmap
        if replaced is None and not shared:
            batched = [(t, d) for t, d in zip(leaves, spec.input_dims(module, args, kwargs, rows))
                       if d is not None and isinstance(t, Tensor)]
            reason = None
            if not batched:
                reason = "no input holds the examples, so its output cannot"
            else:   # outputs in blocks were traced to the inputs' examples by reshapes and row-wise operations
                batched += [(t, d) for t, d in zip(outputs, dims) if t.requires_grad and output_blocks is None]
                tensors = [] if ghost_pass.probe is None else _call_tensors(args, kwargs, output)
                if not ghost_pass.follows_batch(module, index, tensors, batched, blocks=blocks or 1,
                                                features_last=type(spec) is not BatchDims):
                    reason = ghost_pass.not_the_examples("a dim", rows)
            if reason is not None:
                ghost_pass.decline(entry, reason)
                return None
        captured = (isinstance(capture, ParameterUses) and capture.complete and not shared
                    and capture.batch_size == rows)   # its rows are the examples', or their blocks
        opaque_inputs = opaque_input(leaves)
        if opaque_inputs is not None and not captured:   # its re-run would take (and change) every example's state
            ghost_pass.decline(entry, _cannot_be_given(opaque_inputs))
            return None
        opaque = None if captured else opaque_input(output_leaves(output))
        if opaque is not None:   # the gradients of tensors inside it cannot be read
            ghost_pass.decline(entry, f"an output of type {opaque}, whose tensors cannot be found")
            return None
        after = rng_state(_device_of(module), module_generators(module))
        consumed = before is not None and not all(key in before and torch.equal(before[key], after[key])
                                                  for key in after)   # (a generator the call made: consumed)
        if shared and consumed:
            ghost_pass.decline(entry, "an output computed once for all the examples with random numbers")
            return None
        if shared:   # batch 1: the examples in dim 0 of its gradients; other shapes: in a dim of their own
            dims = [0 if t.dim() and t.shape[0] == 1 else None for t in outputs]
        call = FallbackCall(args, kwargs, dims, [None] * len(outputs), before if consumed else None,
                            _device_of(module),
                            [(t, t._version) for t in leaves if isinstance(t, Tensor)]
                            # its own parameters too (not under FSDP, whose shards change storage after the call)
                            + ([] if ghost_pass.sharded else [(q, q._version) for q in module.parameters()]),
                            shared=replaced is not None or shared,
                            parameters=_parameter_copies(module, entry) if ghost_pass.sharded else None,
                            weights=None if ghost_pass.sharded else recurrent_weights(module), buffers=buffers,
                            linear_blocks=capture.blocks if isinstance(capture, LinearCapture) else None,
                            uses=capture if captured else None, blocks=blocks, output_blocks=output_blocks,
                            opaque=opaque_inputs)
        # an output that others were computed from (a router's logits and their softmax, both returned) receives
        # their gradients too, inside the call, which the re-run takes from their own hooks: read those shares where
        # they arrive and take them off (nothing the caller sees changes)
        # (a captured call's too: a re-run confirms its first capture, and re-runs it should its sums not match)
        inner = _inner_edges(outputs, leaves) if not shared and replaced is None else {}
        if not shared and replaced is None:   # rows whose order the sum check verifies: a search for reordered rows
            ghost_pass.clean_rows.update(t.grad_fn for t in outputs if t.grad_fn is not None)   # stops at them
        # its outputs' rows, the examples' in blocks, for the next calls' inputs traced to them (a router's weights
        # into the experts), or the examples' own where the call computes each output row from the same input row
        # alone (a norm without a rule before an MoE's experts, which take their rows' examples from these)
        if blocks or output_blocks or (not shared and replaced is None and type(spec) is BatchDims
                                       and row_by_row_call(outputs, leaves)):
            for t in outputs:
                if t.grad_fn is not None and t.output_nr == 0 and t.dim() and t.shape[0] == out_rows:
                    ghost_pass.broadcasts.rows[t.grad_fn] = blocks or output_blocks or 1
        call.output_views = [(t, t._version) for t in outputs if t.requires_grad and t._base is not None]
        # the autocast it ran under (its re-run runs under the same: accelerate's autocast wraps the forward only,
        # and a router re-run in float32 routed some tokens to other experts, 0.29 off); the lowest precision its
        # outputs came in, or autocast's (half-precision products inside a call whose outputs are float32: an MoE's
        # experts adding into a float32 buffer)
        call.autocast = _autocast_of(outputs)
        floating = [t.dtype for t in outputs if t.is_floating_point()]
        call.precision = max(floating + ([call.autocast[1]] if call.autocast and any(  # (autocast leaves float64
            dtype != torch.float64 for dtype in floating) else []), key=rounding_tolerance,   # products as they are)
            default=torch.float64)
        hooked = set()   # a tensor returned twice gets its gradient once (its second place keeps None)
        for k, t in enumerate(outputs):
            if t.requires_grad and id(t) not in hooked:
                hooked.add(id(t))
                if shared:   # each example's gradient from the operations that broadcast it (``broadcast.py``)
                    ghost_pass.share(entry, t, partial(_keep_shared_grad, ghost_pass, entry, call, k), call)
                else:
                    parts: list[Tensor] = []
                    for node, j in inner.get(id(t), ()):
                        ghost_pass.pass_hooks.append(node.register_hook(partial(_note_inner, parts, j)))
                    if t.grad_fn is None:   # a leaf returned as it is
                        handle = t.register_hook(partial(_keep_grad, call, k, parts))
                    else:   # as for rule layers: after any hook of the caller's on it, before an in-place change
                        handle = t.grad_fn.register_prehook(partial(_keep_output_grad, call, k, t.output_nr, parts))
                    ghost_pass.pass_hooks.append(handle)
        for name in entry.names.values():
            ghost_pass.use_count[name] += 1
        if call.uses is not None:
            ghost_pass.captured_names.update(entry.names.values())
        ghost_pass.fallback_calls.append((module, entry, call))
        ghost_pass.fallback_names.update(entry.names.values())
        return replaced

    @staticmethod
    def _fallback_blocks(ghost_pass: GhostPass, module: nn.Module, index: int, args: tuple,
                         kwargs: dict) -> int | None:
        """k where a fallback call's first input holds B blocks of k rows flattened from the examples (an MoE's
        router and experts on (B T, d) tokens), as traced or probed (``GhostPass.row_blocks``), and every input with
        grad of B k rows traces back, through reshapes and row-wise operations, to B blocks of k rows of a rule
        layer's output (``BroadcastGradients.rows_of``): tokens picked by a mask (padding dropped) or sorted are
        not, even where the probe's B - 1 examples' rows come first. None otherwise. Without a probe, such rows
        make the later calls probe."""
        x, batch = _first_input(args, kwargs), ghost_pass.batch_size
        if not (isinstance(x, Tensor) and x.dim() and x.shape[0] > batch and x.shape[0] % batch == 0
                and not is_parameter_table(x)):
            return None
        blocks = ghost_pass.row_blocks(module, index, x)
        ghost_pass.flattened = ghost_pass.flattened or blocks is None and ghost_pass.probe is None
        if blocks is None or not all(
                ghost_pass.broadcasts.rows_of(t.grad_fn, t.output_nr) == blocks for t in tree_leaves((args, kwargs))
                if isinstance(t, Tensor) and t.requires_grad and t.dim() and t.shape[0] == x.shape[0]):
            return None
        return blocks

    @staticmethod
    def _on_output_grad(ghost_pass: GhostPass, entry: GhostModule, module: nn.Module, call: dict,
                        grad_outputs: tuple) -> None:
        """The pre-hook of a rule layer's output node: ``grad_outputs[call["output_nr"]]`` is that output's
        gradient (None where it got none: then neither do the layer's parameters from this call)."""
        grad_output = grad_outputs[call["output_nr"]]
        if grad_output is None:
            return
        if "x" not in call:   # a second backward through this call: refused in finish, after the caller's backward
            ghost_pass.repeated = True
            return
        x, blocks, owners = call.pop("x"), call.pop("blocks"), call.pop("owners")
        if not isinstance(x, Tensor):
            x = x()
        if owners is not None:   # each example's rows in a block of its own, zero rows after them
            padding, order = Padding.of_owners(owners, ghost_pass.batch_size)
            x, grad_output = padding.blocks(x[order])[0], padding.blocks(grad_output[order])[0]
        if "shape" in call:   # the gradient of the product the output views
            grad_output = grad_output.view(call["shape"])
        if blocks is not None:
            grad_output = grad_output.reshape(ghost_pass.batch_size, blocks, *grad_output.shape[1:])
        elif call["transposed"]:
            grad_output = grad_output.transpose(0, 1)
        GhostNormEngine._apply_rule(ghost_pass, entry, module, x, grad_output)
        for name, broadcast in call["claimed"]:   # a parametrized weight: each example's gradient of it
            with torch.no_grad(), full_precision():
                broadcast.add(entry.rule.per_example_grads(module, x, grad_output, {name})[name])

    @staticmethod
    def _on_shared_grad(ghost_pass: GhostPass, entry: GhostModule, module: nn.Module, x: Tensor,
                        per_example: Tensor | None, total: Tensor, dtype: torch.dtype) -> None:
        """A rule layer called once for every example (on buckets or positions without a batch dim): its rule
        sees each example's output gradient against the shared input."""
        if ghost_pass.check_sum(entry, per_example, total, dtype):
            GhostNormEngine._apply_rule(ghost_pass, entry, module, x.expand(ghost_pass.batch_size, *x.shape),
                                        per_example)

    @staticmethod
    def _apply_rule(ghost_pass: GhostPass, entry: GhostModule, module: nn.Module, x: Tensor,
                    grad_output: Tensor) -> None:
        """The rule's norms (or factors, for parameters of several calls) from a call's input and output
        gradient, both with the B examples in dim 0."""
        single = {local for local, name in entry.names.items() if ghost_pass.use_count[name] == 1}
        shared = set(entry.names) - single
        where = f"module {entry.path!r} ({type(module).__name__}), parameters {sorted(entry.names.values())}"
        try:
            with torch.no_grad(), full_precision():
                sqnorms = entry.rule.per_example_sqnorms(module, x, grad_output, single) if single else {}
                factors = entry.rule.per_example_factors(module, x, grad_output, shared) if shared else {}
        except Exception as error:
            raise PerExampleError(
                where, "ghost", f"the rule {type(entry.rule).__name__} raised {type(error).__name__}: {error}",
                "Fix or unregister the rule (noisescale.per_example.register_rule), or use backend='vmap'"
            ) from error
        missing = sorted((single - set(sqnorms)) | (shared - set(factors)))
        extra = sorted((set(sqnorms) - single) | (set(factors) - shared))
        if missing or extra:   # a parameter left out would keep a norm of 0, silently
            said = (f"returned nothing for {missing}, which it was given to measure" if missing else
                    f"returned {extra}, which it was not given")
            raise PerExampleError(
                where, "ghost", f"the rule {type(entry.rule).__name__} {said}",
                "Return exactly the names the rule is given, or set the rule's parameter_names to those it measures "
                "(the others then go to the whole-model vmap under backend='auto')")
        for local, sqnorm in sqnorms.items():
            _add(ghost_pass.sqnorms, entry.names[local], sqnorm)
        for local, grads in factors.items():
            ghost_pass.add_shared(entry.names[local], grads)


def _sqnorms_of_sum(parts: list[Tensor | LinearFactors | IndexFactors]) -> Tensor:
    """(B,) |sum of the parts' per-example gradients|^2, factored or dense (``sqnorm_of_sum``)."""
    factors = [part for part in parts if isinstance(part, (LinearFactors, IndexFactors))]
    dense = [part for part in parts if not isinstance(part, (LinearFactors, IndexFactors))]
    return sqnorm_of_sum(factors, sum(dense) if dense else None)


def _reshaped(view: Tensor, base: Tensor) -> bool:
    """Whether ``view`` is its base's every element in order, reshaped."""
    return (view.numel() == base.numel() and view.is_contiguous() and base.is_contiguous()
            and view.storage_offset() == base.storage_offset())


def _from_selected_rows(x: Tensor, selected: set, examples: dict) -> bool:
    """Whether x's rows come from the output of a call on rows selected from another tensor's rows (``selected``:
    a routed expert's first layer) through operations on as many rows (an activation, dropout, a gated expert's
    ``act(gate(h)) * up(h)``), not walked past a measured layer's output (``examples``): the expert's next layer,
    on B rows only by chance too (HF SwitchTransformers' ``wo``: 0.38 and 0.87 off, silently, before)."""
    stack, seen = [(x.grad_fn, 0)], set()
    while stack:
        node, depth = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in selected:
            return True
        if node in examples or depth >= 8:
            continue
        stack.extend((source, depth + 1) for source, nr in node.next_functions
                     if source is not None and (output_shape(source, nr) or (None,))[0] == x.shape[0])
    return False


def _sequence_first(x: Any, output: Any, batch: int, rule: LayerRule) -> bool:
    """Whether a rule layer's call may hold the examples in dim 1, (T, B, ...) as XLNet's and Longformer's layers
    take them: x and the output have B in dim 1 (to be checked by a probe)."""
    return (rule.rows_as_positions and isinstance(x, Tensor) and isinstance(output, Tensor) and x.dim() > 1
            and output.dim() > 1 and x.shape[1] == batch and output.shape[:2] == x.shape[:2])


def _decline_when_reached(ghost_pass: GhostPass, entry: GhostModule, why: str, grad_outputs: Any) -> None:
    """Prehook of the output node of a rule layer's call without the examples in dim 0: the backward reached it, so
    the call adds to the examples' gradients in a way the rule cannot split (``_on_rule_call``)."""
    ghost_pass.decline(entry, why)


def _shared_indices(x: Any, output: Any, batch: int) -> bool:
    """Whether a rule layer's call without the examples in dim 0 takes index tensors computed once for all of
    them (T5's relative position buckets (T, T), positions (T,)): its output gradient per example comes from the
    operations that broadcast the output over the examples (``GhostPass.share``)."""
    return (batch > 1 and isinstance(x, Tensor) and not (x.is_floating_point() or x.is_complex()
                                                         or x.dtype == torch.bool)
            and isinstance(output, Tensor) and output.requires_grad)


def _read_back(read: Callable[[], Tensor], batch: int, blocks: int | None, transposed: bool,
               broadcast: bool) -> Tensor:
    """A checkpointed call's input, read back in the backward, as its rule took it in the forward: a batch of
    one expanded, B k rows in blocks, or (T, B, ...) transposed."""
    x = read()
    if broadcast:
        return _broadcast(x, batch)
    if blocks is not None:
        return x.view(batch, blocks, *x.shape[1:])
    return x.transpose(0, 1) if transposed else x


def _parameter_copies(module: nn.Module, entry: GhostModule) -> dict[str, Tensor]:
    """Copies of the parameters a call of ``module`` used, taken in the forward: under FSDP they are
    unsharded only around the module's forward and backward, and the fallback re-runs the module afterwards."""
    names = {name for name, _ in module.named_parameters()} | set(entry.names)
    # FSDP1 flat parameters: the original parameters are plain tensor attributes (views of the flat parameter)
    # during the forward, not registered parameters; those of children the module reads without calling them
    # (MHA's out_proj) are attached to this call after the backward (``GhostPass.attach``) and need copies too
    for path, child in module.named_modules():
        names |= {f"{path}.{attribute}".lstrip(".") for attribute, value in vars(child).items()
                  if isinstance(value, Tensor) and value.requires_grad}
    return {name: attribute(module, name).detach().clone() for name in names}


def _keep(store: dict[str, dict[int, Tensor]], module: nn.Module, entry: GhostModule) -> None:
    """store[name][id] = the tensor ``module`` holds now as each of ``entry``'s parameters (``GhostPass.hold``)."""
    for local, name in entry.names.items():
        tensor = attribute(module, local)
        if isinstance(tensor, Tensor):
            store[name][id(tensor)] = tensor


def reordered_inputs_message(paths: list[str], outcome: str) -> str:
    """What :meth:`GhostPass.note_reordered` found, and ``outcome``: what was done about it."""
    named = (f"module {paths[0]!r} is" if len(paths) == 1 else
             f"modules {', '.join(repr(path) for path in paths)} are")
    return (f"{named} called on the examples' rows in another order than the batch's: the forward reorders its "
            "inputs before it (sorted by length, flipped, indexed by a permutation), and without an autograd graph "
            "there no hook can tell which row is which example, so each layer's norms would be credited to other "
            "examples (their sum, and with it B_simple, unchanged). "
            f"{outcome}. Reordering after the first layer (sort its outputs or the embeddings, not the raw inputs "
            "or token ids) keeps the hooks, which follow the graph")


def _reordered_message(path: str, strict: bool) -> str:
    return reordered_inputs_message([path], (
        "backend='ghost' cannot measure it: use backend='auto', which measures such a model by the whole-model "
        "vmap (exact, slower)" if strict else "Under FSDP the whole-model vmap, which would measure it, cannot run"))


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _inner_edges(outputs: list[Tensor], inputs: list[Any]) -> dict[int, list[tuple[Any, int]]]:
    """id(output) -> [(node, k)]: the operations inside the call (the autograd graph from its other outputs back to
    its inputs) that take that output as their input k. The gradient the output receives holds what they send it."""
    with_grad = {id(t): t for t in outputs if t.requires_grad and t.grad_fn is not None}
    if len(with_grad) < 2:
        return {}
    stops = {t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None}
    edges = {(t.grad_fn, t.output_nr): key for key, t in with_grad.items()}
    inner: dict[int, set] = defaultdict(set)
    for t in with_grad.values():
        for node in autograd_nodes([t.grad_fn], stops):
            for k, edge in enumerate(node.next_functions):
                key = edges.get(edge)
                if key is not None and node is not with_grad[key].grad_fn:
                    inner[key].add((node, k))
    return {key: sorted(found, key=lambda edge: (id(edge[0]), edge[1])) for key, found in inner.items()}


def _note_inner(parts: list[Tensor], k: int, grad_inputs: tuple, grad_outputs: tuple) -> None:
    """A node post-hook: keeps the gradient the node sends its input k."""
    if grad_inputs[k] is not None:
        parts.append(grad_inputs[k])


def _keep_output_grad(call: FallbackCall, index: int, output_nr: int, inner: list[Tensor],
                      grad_outputs: tuple) -> None:
    """The pre-hook of a fallback output's autograd node: ``_keep_grad`` of ``grad_outputs[output_nr]``."""
    if grad_outputs[output_nr] is not None:
        _keep_grad(call, index, inner, grad_outputs[output_nr])


def _keep_grad(call: FallbackCall, index: int, inner: list[Tensor], grad: Tensor) -> None:
    """Output ``index``'s gradient from the caller's uses: what it received less what the call's own operations
    sent it (``inner``, from ``_note_inner``)."""
    call.grads[index] = grad - sum(inner) if inner else grad


def _keep_shared_grad(ghost_pass: GhostPass, entry: GhostModule, call: FallbackCall, index: int,
                      per_example: Tensor | None, total: Tensor, dtype: torch.dtype) -> None:
    """Output ``index`` of a call computed once for all the examples: its gradient per example, (B, ...) in place
    of an output's batch of 1, else (B, *shape)."""
    if ghost_pass.check_sum(entry, per_example, total, dtype, call):
        call.grads[index] = per_example if call.output_dims[index] is None else \
            per_example.reshape(per_example.shape[0], *total.shape[1:])


def _computed_once(outputs: list[Tensor], input_dims: list[int | None], batch: int) -> bool:
    """A fallback call that no input gives the examples and none of whose outputs with grad has B rows (BEiT's
    and Swin's relative position bias, (1, heads, N, N); LED's positions (T, d)): shared by every example."""
    with_grad = [t for t in outputs if t.requires_grad]
    return (batch > 1 and all(d is None for d in input_dims) and bool(with_grad)
            and all(t.dim() == 0 or t.shape[0] != batch for t in with_grad))


def _output_blocks(ghost_pass: GhostPass, outputs: list[Tensor], batch: int) -> int | None:
    """k where every output with grad of a fallback call on the B examples holds B blocks of k > 1 rows, traced back
    through reshapes and row-wise operations to the examples' rows (``BroadcastGradients.rows_of``): a router that
    flattens the tokens (B, T, d) into (B T, d) itself (DeepSeek-V3's, GLM4-MoE's). None otherwise."""
    with_grad = [t for t in outputs if t.requires_grad]
    if not with_grad or not all(t.dim() and t.shape[0] > batch and t.shape[0] % batch == 0 for t in with_grad):
        return None
    k = with_grad[0].shape[0] // batch
    if any(t.shape[0] != batch * k or ghost_pass.broadcasts.rows_of(t.grad_fn, t.output_nr) != k for t in with_grad):
        return None
    return k


def _made_without_inputs(outputs: list[Tensor], leaves: list[Any], batch: int) -> bool:
    """A fallback call none of whose outputs with grad has B rows or is computed from an input with grad (the
    input read only for its length: x-transformers' ``ScaledSinusoidalEmbedding``, (T, d) from a scale and x's T):
    shared by every example. A walk of the outputs' autograd graphs, made only where their shapes would otherwise
    send the module to the whole-model vmap."""
    with_grad = [t for t in outputs if t.requires_grad]
    if batch < 2 or not with_grad or any(t.dim() and t.shape[0] == batch for t in with_grad):
        return False
    inputs = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
    nodes = {t.grad_fn for t in inputs if t.grad_fn is not None}
    variables = {id(t) for t in inputs if t.grad_fn is None}
    return not any(node in nodes or id(getattr(node, "variable", None)) in variables
                   for node in autograd_nodes([t.grad_fn for t in with_grad]))


def _cannot_be_given(kind: str) -> str:
    return f"an input of type {kind} that a re-run on one example cannot be given"


def _autocast_of(outputs: list[Tensor]) -> tuple[str, torch.dtype] | None:
    """(device type, dtype) of the autocast on for the device of the first output, else None."""
    device = outputs[0].device.type if outputs else "cpu"
    return (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None


def _autocast_as(call: FallbackCall) -> contextlib.AbstractContextManager:
    """The autocast a fallback call ran under, for its re-run: that one, or none."""
    return full_precision() if call.autocast is None else torch.autocast(*call.autocast)


def _device_of(module: nn.Module) -> torch.device | None:
    for p in module.parameters(recurse=False):
        return p.device
    return None
