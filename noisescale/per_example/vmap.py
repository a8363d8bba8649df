"""Per-example squared gradient norms by torch.func: vmap over the batch of grad of one example's loss.

Follows the torch.func per-sample-gradients recipe (functional_call + vmap(grad)), in chunks of ``chunk_size``
examples (each reduced to norms before the next) to bound the memory of the (chunk, *theta.shape)
per-example gradients; where torch.func cannot vmap the model (``.item()``, data-dependent control flow, as in
T5's relative position buckets), one example at a time. Inputs may be a tensor, a tuple of positional inputs or a
mapping of keyword inputs (:mod:`noisescale.batches`); vmap runs over every tensor leaf of the inputs and targets
with the batch in dim 0, other leaves (flags such as ``use_cache=False``, a ``None`` target, position ids (1, T)
shared by all) are passed unchanged. The model runs without activation checkpointing (HuggingFace's flag and
torch.utils.checkpoint, ``checkpointing.checkpointing_off``). It runs its own forward, so it must leave training
untouched:

- the global RNG (CPU and initialised CUDA devices) is forked, so training's random stream is not consumed; the
  dropout masks drawn here (``randomness="different"``: one per example) differ from the training pass's, so with
  dropout the norms are those of another draw of the masks;
- buffers are passed as copies, so running statistics or counters of the module are not changed; each forward
  (a chunk's, or one example's) gets fresh copies of the buffers the caller passes, those the training's pass
  found (``noisescale._buffers.BuffersBefore``), so a forward that updates them in place (spectral norm's power
  iteration in train mode) differentiates the weight the training's pass used, as a loop over single examples
  on copies of the model taken before that pass would.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from noisescale._buffers import PassBuffers
from noisescale._functional import functional_call
from noisescale._gradient_norm import dense_gradient
from noisescale._rng import isolated_rng, module_generators
from noisescale.batches import call_arguments
from noisescale.per_example.checkpointing import checkpointing_off
from noisescale.per_example.factors import per_example_sqnorm

__all__ = ["vmap_sqnorms", "quiet_torch_notes", "conversions_refused", "example_gradients"]


class _ModelAndLoss(nn.Module):
    """loss_fn(model(*args, **kwargs), targets) as one module, so that functional_call puts the given parameters in
    place for the loss too (a tied head applied inside loss_fn, a fused linear cross-entropy)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, args: tuple, kwargs: dict, targets: Any) -> Tensor:
        return self.loss_fn(self.model(*args, **kwargs), targets)


def _prefixed(values: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"model.{name}": value for name, value in values.items()}


_OWN_PASS = [0]   # how many vmap_sqnorms passes are running: their forwards are not the caller's (``outputs.py``)


def in_own_pass() -> bool:
    """Whether a forward runs inside ``vmap_sqnorms`` (not a call of the training's own)."""
    return _OWN_PASS[0] > 0


def _split_leaves(value: Any, batch_size: int) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """The tensor leaves of a pytree that hold the ``batch_size`` examples in dim 0, and a function that rebuilds
    the pytree from (new) such leaves; the other leaves (a 0-d temperature, position ids (1, T) shared by all the
    examples, flags) are kept as they are."""
    leaves, spec = tree_flatten(dict(value) if isinstance(value, Mapping) else value)
    where = [i for i, leaf in enumerate(leaves)
             if isinstance(leaf, Tensor) and leaf.dim() and leaf.shape[0] == batch_size]

    def rebuild(tensors: list[Tensor]) -> Any:
        filled = list(leaves)
        for i, tensor in zip(where, tensors):
            filled[i] = tensor
        return tree_unflatten(filled, spec)

    return [leaves[i] for i in where], rebuild


def example_gradients(outputs: tuple[Tensor, ...], inputs: list[Tensor], grad_outputs: list[Tensor] | None = None,
                      retain_graph: bool = False) -> list[Tensor]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs)`` of one example's re-run, dense (a sparse gradient,
    ``nn.Embedding(sparse=True)``'s, made dense) and zeros for an input no output depends on: for every input where
    none does, torch raises (an example whose forward skips the parameters, as AdaptiveLogSoftmaxWithLoss skips a
    cluster none of the example's targets falls in)."""
    kept = [k for k, output in enumerate(outputs) if output.requires_grad]
    grads = (None,) * len(inputs) if not kept else torch.autograd.grad(
        [outputs[k] for k in kept], inputs, None if grad_outputs is None else [grad_outputs[k] for k in kept],
        retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else dense_gradient(g) for t, g in zip(inputs, grads)]


@contextmanager
def quiet_torch_notes() -> Iterator[None]:
    """torch's notes on its own internals in noisescale's own passes, which a user measuring norms would take for an
    error or for a change to the training: torch.func's that an op has no batching rule (it then loops over the
    examples itself, still exact), nested tensors' prototype stage, from nn.TransformerEncoder's inference fast
    path in a forward without grad (the checks' and probes': the training's pass, with grad, never takes it), and
    the deprecation of torch.jit.script that torch's own forward-mode decompositions still call (the Hessian
    proxies' jvp: one B_noise step of a small attention model printed it 18 times)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                                "the batching rule")
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
        yield


@contextmanager
def conversions_refused() -> Iterator[None]:
    """A forward that converts its own modules (HF SwitchTransformers' and NLLB-MoE's routers run
    ``self.classifier = self.classifier.to(self.dtype)`` on every call) assigns ``.data`` to the tensors that
    functional_call put in place, and under torch.func's transforms that crashed the process (a segmentation fault,
    torch 2.13). Inside this block a conversion that changes nothing returns the module as it is, and any other
    raises a RuntimeError, on which the caller takes the examples one by one (no transform) instead."""
    original = nn.Module._apply

    def guarded(module: nn.Module, fn: Callable, recurse: bool = True) -> nn.Module:
        if all(fn(t) is t for t in [*module.parameters(recurse), *module.buffers(recurse)]):
            return module
        raise RuntimeError(f"{type(module).__name__} converts its own parameters inside the forward (Module.to, "
                           ".float(), ...), which torch.func's transforms cannot run")

    nn.Module._apply = guarded
    try:
        yield
    finally:
        nn.Module._apply = original


@contextmanager
def _own_pass(model: nn.Module) -> Iterator[None]:
    """Marks the pass as noisescale's and runs the model without activation checkpointing
    (``checkpointing.checkpointing_off``)."""
    _OWN_PASS[0] += 1
    try:
        with checkpointing_off(model):
            yield
    finally:
        _OWN_PASS[0] -= 1


def vmap_sqnorms(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: Any, targets: Any,
                 names: list[str], batch_size: int, chunk_size: int | None = None,
                 buffers: PassBuffers | None = None, weights: Tensor | None = None) -> dict[str, Tensor]:
    """(B,) squared norms |dl_i/dtheta|^2 for each parameter named in ``names`` (names of model.named_parameters).

    Parameters not in ``names`` enter as constants. Tied parameters appear once in named_parameters and are
    tied again by functional_call, so their per-example gradients already sum all uses. Tensors of ``inputs`` and
    ``targets`` without the ``batch_size`` examples in dim 0 are passed to every example's call as they are.
    ``buffers``: the model's buffers as the forward should find them, and those a forward changes in place
    (default: as they are now, none known to change); every forward starts from fresh copies of the changing ones,
    and the others are copied once per call (a forward that starts to change one cannot touch the model's own).
    ``weights``: (B,) factors of the examples' gradients, for a loss normalised over the batch, which is taken here
    on each example alone (``coupling.example_weights``); the norms are scaled by their squares.
    """
    all_parameters = dict(model.named_parameters())
    trainable = {name: all_parameters[name].detach() for name in names}
    constants = _prefixed({name: p.detach() for name, p in all_parameters.items() if name not in trainable})
    buffers = buffers or PassBuffers(dict(model.named_buffers()), frozenset())
    changing = _prefixed({name: b.detach() for name, b in buffers.values.items() if name in buffers.changing})
    copied = _prefixed({name: b.detach().clone() for name, b in buffers.values.items()
                        if name not in buffers.changing})
    (input_tensors, rebuild_inputs), (target_tensors, rebuild_targets) = (
        _split_leaves(inputs, batch_size), _split_leaves(targets, batch_size))

    with_loss = _ModelAndLoss(model, loss_fn)

    def fixed() -> dict[str, Tensor]:
        """The constants and buffers, with copies of the changing ones for one forward to update as it will."""
        return {**constants, **copied, **{name: b.clone() for name, b in changing.items()}}

    def example_loss(parameters: dict[str, Tensor], example_inputs: list[Tensor],
                     example_targets: list[Tensor]) -> Tensor:
        args, kwargs = call_arguments(rebuild_inputs([t.unsqueeze(0) for t in example_inputs]))
        targets = rebuild_targets([t.unsqueeze(0) for t in example_targets])
        return functional_call(with_loss, (_prefixed(parameters), fixed()), (args, kwargs, targets)).sum()

    def per_example_grads_by_loop(rows_inputs: list[Tensor], rows_targets: list[Tensor]) -> dict[str, Tensor]:
        """The same, one example at a time: for models torch.func cannot vmap (data-dependent control flow)."""
        rows: dict[str, list[Tensor]] = {name: [] for name in names}
        for i in range(rows_inputs[0].shape[0] if rows_inputs else batch_size):
            variables = {name: t.detach().requires_grad_() for name, t in trainable.items()}
            args, kwargs = call_arguments(rebuild_inputs([t[i:i + 1] for t in rows_inputs]))
            targets = rebuild_targets([t[i:i + 1] for t in rows_targets])
            with torch.enable_grad():
                loss = functional_call(with_loss, (_prefixed(variables), fixed()), (args, kwargs, targets)).sum()
                grads = example_gradients((loss,), list(variables.values()))
            for name, g in zip(variables, grads):
                rows[name].append(g)
        return {name: torch.stack(values) for name, values in rows.items()}

    step = batch_size if chunk_size is None else chunk_size
    chunks: dict[str, list[Tensor]] = {name: [] for name in names}
    with isolated_rng(trainable.values(), module_generators(model)), _own_pass(model), quiet_torch_notes():
        for start in range(0, batch_size, step):
            rows_inputs = [t[start:start + step] for t in input_tensors]
            rows_targets = [t[start:start + step] for t in target_tensors]
            try:
                with conversions_refused():
                    grads = vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")(
                        trainable, rows_inputs, rows_targets)
            except (RuntimeError, NotImplementedError):  # an op torch.func cannot batch (a fused RNN kernel's
                grads = per_example_grads_by_loop(rows_inputs, rows_targets)  # shape error, say): one by one
            for name, g in grads.items():
                chunks[name].append(per_example_sqnorm(g))
    sqnorms = {name: torch.cat(parts) for name, parts in chunks.items()}
    if weights is None:
        return sqnorms
    return {name: values * weights.to(values) ** 2 for name, values in sqnorms.items()}
