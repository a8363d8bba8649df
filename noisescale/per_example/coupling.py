"""Whether each example's loss reads that example alone: the condition under which g_i = dl_i/dtheta are
per-example gradients at all.

The noise scale takes the g_i for independent draws of the gradient (McCandlish et al. 2018, appendix A). A loss
that couples the examples has no per-example gradient in that sense, and the norms measured from it are neither a
loop's over single examples nor independent: a contrastive loss over the batch (CLIP, SigLIP: each l_i reads every
example's embedding), in-batch negatives, statistics of the batch inside the model.

The check, on a plan's first call: two forwards in eval mode (no dropout, no masking draws) and on
the same copy of the random streams, one of the batch and one with example 0's inputs replaced by those of another
example that differs from it (and, with three examples or more, the last example's too). Where l_i reads example
i alone, the losses of the examples left as they were do not move; the largest move, relative to the largest loss,
is the coupling (``coupled_losses``). Eval mode, because in train mode the draws of dropout or of HF Wav2Vec2's
time masks are laid out over the whole batch: one example's length or routing moves the other examples' masks
(a review found 1e-3 on Wav2Vec2 with padding), which is no coupling of their losses.

``observe`` runs the same two forwards after the caller's pass, on the model's call's inputs, and compares the
model's outputs instead, since the loss is the caller's: an output whose other examples' rows moved couples the
examples (CLIP's logits pair every image with every text), but whether the loss reads it is unknown, so a warning
(``coupled_outputs``).

What it cannot see: a coupling only in train mode (a batch statistic the model takes in training only; BatchNorm
modules are refused elsewhere), one smaller than the rounding (``_tolerance``), one that reads none of the replaced
examples, one through a batch-wide count in the targets (a loss over the batch's token count), which moves no
gradient between the examples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_leaves, tree_map

from noisescale._buffers import kept_buffers
from noisescale._modes import eval_mode
from noisescale._rng import (
    host_rng_state,
    isolated_rng,
    module_generators,
    rng_state,
    set_host_rng_state,
    set_rng_state,
)
from noisescale.batches import call_model, map_tensors, tensors_of
from noisescale.losses import example_weights_in_batch, normalised_over_the_batch, weighted_alone
from noisescale.per_example.checkpointing import checkpointing_off
from noisescale.per_example.layers import close_values, rounding_tolerance
from noisescale.per_example.vmap import quiet_torch_notes
from noisescale.sharded import sharding_kept

__all__ = ["Coupling", "coupled_losses", "coupled_on_any_rank", "coupled_outputs", "example_rows",
           "example_weights", "holds_examples", "losses_of_parts", "observed_example_weights", "outputs_without_grad",
           "replaced_examples"]


class Coupling:
    """How far the losses of the examples left as they were moved when others were replaced."""

    def __init__(self, change: float, tolerance: float, replaced: dict[int, int]):
        self.change, self.tolerance, self.replaced = change, tolerance, replaced

    @property
    def coupled(self) -> bool:
        return self.change > self.tolerance

    def error(self) -> ValueError:
        return ValueError(
            f"the per-example losses are coupled: replacing {_swaps(self.replaced)} moved the other examples' "
            f"losses by up to {self.change:.2g} of the largest loss (in eval mode; rounding allows {self.tolerance:.0e}). The loss "
            "or the model reads several examples for one example's loss (a contrastive loss such as CLIP's or "
            "SigLIP's, in-batch negatives, statistics of the batch), so dl_i/dtheta are not per-example gradients "
            "and a noise scale from them would be wrong. Measure it from independent micro-batches instead "
            "(noisescale.estimators.two_batch_noise_scale on the gradients of micro-batches that each compute "
            "their own loss), or pass check_independence=False (to PerExampleGradNorms, NoiseScaleMonitor, or "
            "AdaptiveTrainer's monitor_options) to measure anyway: each layer's share of the batch gradient through "
            "each example's own rows, which is neither a loop's over single examples nor dl_i/dtheta on the batch, "
            "and parameters the whole-model vmap measures get the loop's. (Two causes that are no coupling: a "
            "forward or loss that draws from a torch.Generator noisescale does not replay, one held other than as a "
            "module's attribute or in a list or dict attribute, draws differently in the two forwards of this "
            "check: hold it as a module's attribute, which every extra forward replays and puts back; and an input "
            "whose dim 0 has the batch's size without holding the examples, as an RNN's initial state "
            "(num_layers, B, H) at num_layers == B, is taken for the examples' rows: pass it batch-first, or use "
            "another batch size.)")


def replaced_examples(inputs: Any, batch_size: int) -> tuple[Any, dict[int, int]] | None:
    """``inputs`` with example 0's replaced by the first example whose inputs differ from it and, for three
    examples or more, the last example's likewise, with {replaced: source}; None where every example's inputs are
    example 0's (nothing to replace it with)."""
    if batch_size < 2:
        return None
    rows = [t.reshape(batch_size, -1) for t in tensors_of(inputs) if holds_examples(t, batch_size)]
    replaced = {}
    for target in (0, batch_size - 1) if batch_size >= 3 else (0,):
        differs = torch.zeros(batch_size, dtype=torch.bool)
        for values in rows:
            differs |= (values != values[target]).any(1).cpu()
        differs[list(replaced)] = False   # a source is an example left as it was
        found = differs.nonzero()
        if len(found):
            replaced[target] = int(found[0])
    if 0 not in replaced:
        return None
    index = torch.arange(batch_size)
    for target, source in replaced.items():
        index[target] = source
    return example_rows(inputs, index, batch_size), replaced


def coupled_losses(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: Any, targets: Any,
                   batch_size: int, parameters: list[Tensor], *, always_forward: bool = False,
                   watch: Callable[[], ContextManager] = contextlib.nullcontext) -> Coupling | None:
    """The check (module docstring) on ``loss_fn``'s (B,) losses; None where it cannot tell: nothing to replace,
    losses that are not (B,) floats (the real pass then reports it) or not finite. ``always_forward``: the two
    forwards run even where nothing can be replaced (FSDP: every rank's forwards take part in the same
    collectives). Each model call runs inside ``watch()`` (the hooks' probe of the layers' rows)."""
    forwards = _replaced_forwards(model, inputs, batch_size, parameters, lambda outputs: loss_fn(outputs, targets),
                                  always_forward, watch)
    if forwards is None:
        return None
    replaced, before, after = forwards
    if not all(isinstance(l, Tensor) and l.shape == (batch_size,) and l.is_floating_point() for l in (before, after)):
        return None
    if not bool(torch.isfinite(before).all() and torch.isfinite(after).all()):
        return None
    change = _largest_move(before, after, _kept_rows(batch_size, replaced), [0])
    return Coupling(change, _tolerance(before, parameters), replaced)


def coupled_on_any_rank(coupled: bool, device: torch.device) -> bool:
    """Whether any rank of the default process group found a coupling (one all-reduce, every rank gets the
    answer)."""
    found = torch.tensor(float(coupled), device=device)
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return bool(found)


def coupled_outputs(model: nn.Module, inputs: Any, batch_size: int, parameters: list[Tensor], *,
                    always_forward: bool = False) -> dict[str, float] | None:
    """``observe``'s check (module docstring): the outputs with a dim of B's size along which the slices of the
    examples left as they were moved beyond the rounding, for each such dim, path -> the smallest over those dims of
    the largest move relative to the output's largest value (empty where none moved); None where nothing could be
    replaced. ``always_forward``: as ``coupled_losses``'s."""
    forwards = _replaced_forwards(model, inputs, batch_size, parameters, _tensor_leaves, always_forward)
    if forwards is None:
        return None
    replaced, before, after = forwards
    kept, moved = _kept_rows(batch_size, replaced), {}
    for (path, a), (_, b) in zip(before, after):
        dims = [d for d in range(a.dim()) if a.shape[d] == batch_size] if isinstance(a, Tensor) else []
        if (dims and isinstance(b, Tensor) and a.is_floating_point() and a.shape == b.shape
                and bool(torch.isfinite(a).all())):
            # the examples may be in any dim of B's size (XLNet's memories (T, B, d) with T == B): coupled where no
            # such dim keeps the changes to the replaced examples' slices (CLIP's (B, B) logits keep neither)
            change = _largest_move(a, b, kept, dims)
            if not change <= _tolerance(a, parameters):
                moved[path or "(the output)"] = change
    return moved


def _tensor_leaves(outputs: Any) -> list[tuple[str, Tensor]]:
    """(path, tensor) of every tensor leaf of the outputs; the rest (a cache object holding the forward's keys and
    values, and with them its graph) is dropped with the outputs."""
    try:
        leaves = [(keystr(path), leaf) for path, leaf in tree_flatten_with_path(outputs)[0]]
    except ValueError:
        # a pytree node registered without flatten_with_keys_fn (diffusers' BaseOutput, an OrderedDict: UNet2DOutput
        # and the rest): a mapping's items by key, anything else's leaves by position
        if isinstance(outputs, Mapping):
            return [(f"[{key!r}]{path}", leaf) for key, value in outputs.items()
                    for path, leaf in _tensor_leaves(value)]
        leaves = [(f"[{i}]", leaf) for i, leaf in enumerate(tree_leaves(outputs))]
    return [(path, leaf) for path, leaf in leaves if isinstance(leaf, Tensor)]


def holds_examples(t: Tensor, batch_size: int) -> bool:
    """A tensor with the examples in dim 0; others (a count, position ids (1, T) shared by all, a scalar auxiliary
    loss) stay as they are where examples are picked (:func:`example_rows`)."""
    return t.dim() > 0 and t.shape[0] == batch_size


def example_rows(value: Any, index: slice | list[int] | Tensor, batch_size: int) -> Any:
    """``value`` (inputs, outputs or targets) with the examples ``index`` of every tensor that holds the
    ``batch_size`` examples in dim 0, its other leaves as they are."""
    def rows(t: Tensor) -> Tensor:
        return t[index.to(t.device) if isinstance(index, Tensor) else index] if holds_examples(t, batch_size) else t

    return map_tensors(rows, value)


def _largest_move(before: Tensor, after: Tensor, kept: Tensor, dims: list[int]) -> float:
    """min over ``dims`` of the largest |after - before| in the slices of the ``kept`` examples along that dim,
    relative to the largest |before|."""
    scale = before.abs().max().clamp_min(torch.finfo(before.dtype).tiny)
    index = kept.nonzero()[:, 0].to(before.device)
    return min(float(((after - before).index_select(d, index).abs().max() / scale).item()) for d in dims)


def _kept_rows(batch_size: int, replaced: dict[int, int]) -> Tensor:
    kept = torch.ones(batch_size, dtype=torch.bool)
    kept[list(replaced)] = False
    return kept


def _replaced_forwards(model: nn.Module, inputs: Any, batch_size: int, parameters: list[Tensor],
                       run: Callable[[Any], Any], always_forward: bool,
                       watch: Callable[[], ContextManager] = contextlib.nullcontext
                       ) -> tuple[dict[int, int], Any, Any] | None:
    """(the examples replaced, ``run`` of the forward of ``inputs``, ``run`` of the forward with those examples
    replaced: ``replaced_examples``, ``_both_forwards``); None where nothing can be replaced, after running the two
    forwards anyway (on ``inputs`` twice) where ``always_forward``."""
    found = replaced_examples(inputs, batch_size)
    if found is None and not always_forward:
        return None
    replaced_inputs, replaced = found or (inputs, {})
    before, after = _both_forwards(model, inputs, replaced_inputs, replaced, parameters, run, watch)
    return None if found is None else (replaced, before, after)


def _swaps(replaced: dict[int, int]) -> str:
    return " and ".join(f"example {i}'s inputs by example {k}'s" for i, k in replaced.items())


def _both_forwards(model: nn.Module, inputs: Any, replaced_inputs: Any, replaced: dict[int, int],
                   parameters: list[Tensor], run: Callable[[Any], Any],
                   watch: Callable[[], ContextManager]) -> tuple[Any, Any]:
    """``run(model(inputs))`` and ``run(model(replaced_inputs))`` in eval mode, each from the same copy of the random
    streams and of the model's buffers (a step counter the forward advances), with its modes and buffers put back
    afterwards. Without grad (a forward's activations are not kept), or, where the model's forward needs grad (it
    hooks its tensors), with grad and detached at once (one forward's graph at a time, where ``run`` keeps nothing
    else of the outputs). A ValueError where the forward of the batch runs and that of the ``replaced`` examples
    does not: a tensor of B rows that are not examples (an nn.EmbeddingBag's offsets)."""
    device = next((p.device for p in parameters if p.device.type == "cuda"), None)
    generators = module_generators(model)   # (a layer that draws from a generator of its own)
    with (eval_mode(model), isolated_rng(parameters, generators), sharding_kept(model), quiet_torch_notes(),
          checkpointing_off(model)):   # (a reentrant checkpoint warns in a forward without grad)
        state, host = rng_state(device, generators), host_rng_state()

        def one(batch: Any) -> Any:
            set_rng_state(state, device, generators)
            set_host_rng_state(host)
            with kept_buffers(model):
                with watch():
                    outputs = call_model(model, batch)
                return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, run(outputs))

        def both() -> tuple[Any, Any]:
            before = one(inputs)
            try:
                return before, one(replaced_inputs)
            except Exception as error:
                if not replaced or isinstance(error, torch.OutOfMemoryError):
                    raise
                raise ValueError(
                    f"the model runs on the batch but not after replacing {_swaps(replaced)} ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); "
                    "this forward checks that each example's loss reads that example alone, and every input tensor "
                    "whose dim 0 has the batch's size is taken to hold one example per row. One that does not (an "
                    "nn.EmbeddingBag's flat input with offsets, indices into the batch) cannot be measured per "
                    "example: give the model inputs that hold the examples in dim 0 (for nn.EmbeddingBag a (B, L) "
                    "tensor of bags padded with its padding_idx, which the bag's sum or mean leaves out)") from error

        try:
            with torch.no_grad():
                return both()
        except RuntimeError as error:   # (not an out-of-memory error: the caller's, as the real forward's would be)
            if "grad" not in str(error):
                raise
            with torch.enable_grad():
                return both()


def _tolerance(values: Tensor, parameters: list[Tensor]) -> float:
    """The rounding of the lowest precision the forward computes in: the parameters', the values', half precision
    under autocast (``layers.rounding_tolerance``: 1e-10, 1e-5, 1e-2)."""
    dtypes = [p.dtype for p in parameters if p.is_floating_point()] + [values.dtype]
    if torch.is_autocast_enabled(values.device.type):
        dtypes.append(torch.bfloat16)
    return max(rounding_tolerance(dtype) for dtype in dtypes)


def losses_of_parts(loss_fn: Callable[[Any, Any], Tensor], outputs: Any, targets: Any, batch_size: int,
                    parts: list[slice]) -> Tensor | None:
    """``loss_fn`` on each part (rows) of one forward's ``outputs`` and of ``targets``, concatenated, without grad;
    None where it cannot be computed so (the loss raised, or gave no (n,) tensor for a part of n examples)."""
    pieces = []
    with torch.no_grad():
        for part in parts:
            try:
                piece = loss_fn(example_rows(outputs, part, batch_size), example_rows(targets, part, batch_size))
            except Exception:   # outputs whose examples are not in dim 0: nothing can be told
                return None
            if not (isinstance(piece, Tensor) and piece.shape == (len(range(batch_size)[part]),)):
                return None
            pieces.append(piece)
    return torch.cat(pieces)


def observed_example_weights(loss_fn: Callable[[Any, Any], Tensor], outputs: Any, targets: Any,
                             losses: Tensor) -> Tensor | None:
    """(B,) w_i = l_i / l_i^alone for a loss normalised over the batch it is given by a count of its targets (a
    token mean written in one's own function): ``losses`` are l_i of one forward's ``outputs``, and l_i^alone the
    same loss on example i's rows of those outputs alone, so that a pass taking one example at a time can scale its
    gradient back (``losses.example_weights_in_batch`` gives them where the loss is known). An example without a
    loss in the batch (l_i = 0) gets 0, also where alone it is 0/0.

    Ones where every example's loss alone is its loss in the batch, or where the losses of the batch's two halves
    are not the whole's times one factor within each half (no count: outputs that pair examples with each other,
    CLIP's scores, whose rows alone are not the examples' own), and for a batch of one or a loss not finite (the
    step reports it). None where the loss cannot be computed on parts."""
    batch_size = losses.shape[0]
    losses = losses.detach()
    ones = torch.ones_like(losses)
    if batch_size < 2 or not bool(torch.isfinite(losses).all()):
        return ones
    alone = losses_of_parts(loss_fn, outputs, targets, batch_size, [slice(i, i + 1) for i in range(batch_size)])
    if alone is None:
        return None
    counted = losses != 0   # an example without a loss in the batch: its gradient is 0 whatever the weight
    if bool((counted & (~torch.isfinite(alone) | (alone == 0))).any()):
        return ones   # an example with a loss in the batch has none alone: not a count of its own targets
    if close_values(torch.where(counted, alone, losses), losses):
        return ones
    half = batch_size // 2
    halves = losses_of_parts(loss_fn, outputs, targets, batch_size, [slice(0, half), slice(half, batch_size)])
    if halves is None:
        return None
    if not all(_one_factor(losses[part], halves[part]) for part in (slice(0, half), slice(half, batch_size))):
        return ones
    return torch.where(counted, losses / torch.where(counted, alone, ones), torch.zeros_like(losses))


def _one_factor(whole: Tensor, part: Tensor) -> bool:
    """Whether ``whole`` is ``part`` times one factor (a part's count over the whole batch's), where ``whole`` is not
    0 (an example without a loss: its part's loss may be 0 or 0/0)."""
    counted = whole != 0
    if not bool(torch.isfinite(part[counted]).all()) or bool((part[counted] == 0).any()):
        return False
    ratios = whole[counted] / part[counted]
    return not ratios.numel() or close_values(ratios, ratios[:1].expand_as(ratios))


def outputs_without_grad(model: nn.Module, inputs: Any) -> Any:
    """The model's outputs on ``inputs`` from a forward of noisescale's own: without grad (or, where the forward
    needs grad because it hooks its tensors, with grad and detached at once), on a copy of the random streams, with
    the buffers put back after, so the training is unchanged."""
    with isolated_rng(list(model.parameters()), module_generators(model)), quiet_torch_notes():
        try:
            with kept_buffers(model), torch.no_grad():
                return call_model(model, inputs)
        except RuntimeError as error:   # (not an out-of-memory error: the caller's, as the real forward's would be)
            if "grad" not in str(error):
                raise
        with kept_buffers(model), torch.enable_grad():
            return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, call_model(model, inputs))


def example_weights(loss_fn: Callable[[Any, Any], Tensor], model: nn.Module, inputs: Any,
                    targets: Any) -> Tensor | None:
    """(B,) weights w_i that scale example i's gradient taken alone back to its loss within the batch:
    ``losses.example_weights_in_batch`` for a loss known from its arguments (None for the shipped losses that weight
    each example alone), else read by :func:`observed_example_weights` from the outputs of a forward of its own
    (:func:`outputs_without_grad`). None (taken as 1) where the loss cannot be computed on parts of the batch; a
    loss declared ``normalised_over_the_batch`` is then refused."""
    known = example_weights_in_batch(loss_fn, targets)
    if known is not None or weighted_alone(loss_fn):   # no forward for the shipped losses
        return known
    outputs = outputs_without_grad(model, inputs)
    with torch.no_grad():
        observed = observed_example_weights(loss_fn, outputs, targets, loss_fn(outputs, targets))
    if observed is None and normalised_over_the_batch(loss_fn):   # declared, and its parts cannot be computed
        raise ValueError(
            f"loss_fn {getattr(loss_fn, '__name__', type(loss_fn).__name__)} is declared normalised over the batch "
            "(normalised_over_the_batch = True), but its losses on parts of the batch could not be computed from the "
            "model's outputs, so the passes that take one example at a time (the whole-model vmap, B_noise's "
            "per-example gradients) cannot scale each example back to the batch's normalisation; use "
            "sequence_cross_entropy(weighting='token') as a functools.partial, whose weights noisescale knows, or "
            "a loss that weights each example on its own")
    return observed
