"""The noise scale of a training framework's own steps, read from the forward and backward passes it runs itself.

The framework (HuggingFace ``Trainer``, Lightning) keeps its loss, its scaling for gradient accumulation and mixed
precision, its DDP all-reduce and its optimizer step; noisescale runs no pass of its own (except the Hessian
proxies, when asked for, on a forked random stream). Around each micro-batch's forward and backward the ghost hooks
record |c_i|^2, the squared norm of example i's contribution c_i to the gradient that backward accumulates
(:meth:`~noisescale.per_example.PerExampleGradNorms.observe` with ``loss_scale = b``).

Per-example gradients of the step: whatever weighting the framework applies (a per-batch mean divided by the
accumulation steps, HuggingFace's token mean over the whole accumulated batch with ``num_items_in_batch``), the
gradient the optimizer sees is gbar = (1/R) sum_r sum_i c_i^r / S over the R ranks (DDP averages) and the
loss scale S of fp16. With B the examples of the optimizer step on all ranks, g_i = B c_i / (R S) satisfies
mean_i g_i = gbar exactly, so (|g_i|^2, |gbar|^2) go into :func:`~noisescale.estimators.simple_noise_scale`
(McCandlish et al. 2018, appendix A) as the per-example estimate of the whole global batch, exactly as
:class:`~noisescale.training.AccumulatingNoiseScaleMonitor` does for its own loop; |gbar|^2 is read from p.grad
after the step's last backward (accumulated, all-reduced, before clipping). For HuggingFace's token mean
g_i is the gradient of the "token" per-example loss of :func:`noisescale.losses.sequence_cross_entropy`.
Under DDP one all-gather of the per-example norms (B numbers) per step gives every rank the same estimate. Where
the framework's training DataLoader draws each global batch without replacement from its N examples (its default
samplers), the estimate is that of such a batch (``NoiseScaleOptions.population_size``, read from the loader).

Requirement: the loss is a sum of per-example terms (no in-batch coupling such as a contrastive loss).

A model that normalises with batch statistics (BatchNorm in train mode) has no per-example gradient; its
micro-batches are the units instead: tensor hooks read |C_k|^2 of each micro-batch's whole contribution C_k (before
DDP's all-reduce), the micro-batch's mean gradient is g_k = B C_k / (b_k R S) (so that the b_k/B-weighted mean of
the g_k over all ranks is gbar), and (|g_k|^2, b_k, |gbar|^2) go into
:func:`~noisescale.estimators.micro_batch_noise_scale`. A step needs 2 or more micro-batches (gradient
accumulation, or DDP ranks) for an estimate.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from noisescale._checks import check_int
from noisescale._gradient_norm import GradientSquaredNorm
from noisescale._graph import autograd_nodes
from noisescale._wrappers import unwrapped_module
from noisescale.batches import batch_size_of
from noisescale.distributed import all_gather_concat, rank_sizes
from noisescale.estimators import mean_dominates
from noisescale.monitor import check_options
from noisescale.sampler import population_drawn_from
from noisescale.training import AccumulatingNoiseScaleMonitor

__all__ = ["NoiseScaleOptions", "ObservingNoiseScaleMonitor", "batch_size_of_framework_batch", "packed_sequences",
           "split_labels"]


@dataclass(frozen=True)
class NoiseScaleOptions:
    """What the integrations measure (the arguments of :class:`~noisescale.monitor.NoiseScaleMonitor`).

    per_example_loss: ``per_example_loss(outputs, targets) -> (B,)``, needed only for B_noise (``hessian_every``),
        whose Hessian-vector products run the model again on the step's micro-batches, one at a time, for the
        estimate of its whole batch (on a forked random stream; the training's own passes and gradients are
        untouched).
    log_prefix: the prefix of the logged names (``noise_scale/b_simple``, ...).
    check_independence: on the first measured step, check that the model's outputs do not couple the examples
        (a warning naming them: :mod:`noisescale.per_example.coupling`) and that the loss the model returns holds
        no term over the whole batch (an MoE's router loss).
    population_size: N, where each global batch is drawn without replacement from a training set of N examples
        (an epoch's shuffled batches): the estimates are then unbiased for that dataset (``NoiseScaleMonitor``'s
        option; without it |G|^2 reads low by B_simple/N of itself, which matters on a small dataset only).
        ``"auto"`` (the default): len(train_dataset) where the framework's training DataLoader is one that
        :func:`~noisescale.sampler.population_drawn_from` recognises (the Trainer's and Lightning's default
        samplers, sequential, shuffled or distributed), else no correction; None: no correction.
    """

    measure_every: int = 1
    ema_decay: float = 0.95
    confidence: float = 0.9
    hessian_every: int = 0
    hessian_ema_decay: float = 0.8
    hessian_examples: int = 8
    hessian_probes: int = 8
    seed: int = 0
    per_example_loss: Callable[[Any, Any], torch.Tensor] | None = None
    log_prefix: str = "noise_scale/"
    check_independence: bool = True
    population_size: int | str | None = "auto"

    def __post_init__(self) -> None:   # out-of-range values fail here, not at the first training step
        check_options(**{key: value for key, value in self.monitor_options().items() if key != "population_size"})
        if self.per_example_loss is not None and not callable(self.per_example_loss):
            raise TypeError("per_example_loss must be callable, per_example_loss(outputs, targets) -> (B,) losses "
                            f"(or None without hessian_every), got {type(self.per_example_loss).__name__}")
        if not isinstance(self.log_prefix, str):
            raise TypeError("log_prefix must be a str, the prefix of the logged names ('noise_scale/' by default; "
                            f"'' for none), got {type(self.log_prefix).__name__}")
        if isinstance(self.population_size, str) and self.population_size != "auto":
            raise ValueError(f"population_size must be an int >= 2, 'auto' or None, got {self.population_size!r}")
        if self.population_size not in (None, "auto"):
            check_int(self.population_size, "population_size", 2)
        if self.hessian_every and self.per_example_loss is None:
            _per_example_loss_not_given(None, None)

    def monitor_options(self) -> dict[str, Any]:
        return {
            "measure_every": self.measure_every,
            "ema_decay": self.ema_decay,
            "confidence": self.confidence,
            "hessian_every": self.hessian_every,
            "hessian_ema_decay": self.hessian_ema_decay,
            "hessian_examples": self.hessian_examples,
            "hessian_probes": self.hessian_probes,
            "seed": self.seed,
            "check_independence": self.check_independence,
            "population_size": self.population_size,
        }


def _per_example_loss_not_given(outputs: Any, targets: Any) -> torch.Tensor:
    raise ValueError("hessian_every > 0 needs NoiseScaleOptions(per_example_loss=...): B_noise runs the model's "
                     "Hessian-vector products on per-example losses")


def batch_size_of_framework_batch(batch: Any) -> int:
    """B of a batch as a data loader yields it: a tensor, a tuple or list (``default_collate``'s [x, y]) or a
    mapping, every tensor with the batch in dim 0."""
    return batch_size_of(tuple(batch) if isinstance(batch, list) else batch)


def packed_sequences(batch: Any) -> int | None:
    """The number of sequences in a keyword batch whose rows each pack several, with ``position_ids`` that restart
    inside a row and no ``attention_mask`` (padding-free packing: transformers' ``DataCollatorWithFlattening``,
    TRL's ``padding_free``; the model then attends within each sequence, and a sequence starts wherever the position
    does not go up by 1, as transformers finds them); None where no row packs more than one."""
    positions = batch.get("position_ids") if isinstance(batch, Mapping) and "attention_mask" not in batch else None
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] < 2:
        return None
    starts = int((positions.diff(dim=1) != 1).sum())
    return positions.shape[0] + starts if starts else None


class ObservingNoiseScaleMonitor(AccumulatingNoiseScaleMonitor):
    """A monitor fed by the framework's own passes (module docstring): per optimizer step,
    :meth:`begin_micro_batch` / :meth:`end_micro_batch` around each micro-batch's forward and backward, then
    :meth:`end_step` after the last backward and before gradient clipping. History, summary, averages, state and
    the Hessian proxies (per rank under DDP, averaged) are the monitor's.

    ``model``: the module the framework runs (DistributedDataParallel-wrapped under DDP, whose process group is
    then used) or the user's module itself with its DDP ``process_group`` given (Lightning wraps its module in a
    DDP whose forward is the training step, so the Hessian proxies must call the module itself).
    ``train_batches``: the framework's training DataLoader, whose dataset's size is ``population_size="auto"``'s
    (:func:`~noisescale.sampler.population_drawn_from`).
    """

    _skip_advice = ("fix the data before training on: the framework takes the optimizer step on it all the same "
                    "(only a gradient scaler skips it)")

    def __init__(self, model: torch.nn.Module, options: NoiseScaleOptions, *,
                 process_group: dist.ProcessGroup | None = None, train_batches: Any = None) -> None:
        if not isinstance(options, NoiseScaleOptions):
            raise TypeError(f"options must be a NoiseScaleOptions, got {type(options).__name__}")
        monitor_options = options.monitor_options()
        if monitor_options["population_size"] == "auto":
            monitor_options["population_size"] = population_drawn_from(train_batches)
        super().__init__(model, options.per_example_loss or _per_example_loss_not_given, **monitor_options)
        if process_group is not None:
            self.process_group = process_group
        self.options = options
        self.closed = False
        self._micro_batch: contextlib.AbstractContextManager | None = None
        self._loss_checked = not options.check_independence   # check_loss, on the first measured micro-batch
        self._module_outputs: _ModuleOutputs | None = None
        self._reset_step()

    def _reset_step(self) -> None:
        self._step_open = False   # a micro-batch begun since the last row (or since the monitor was made)
        self._micro_batch_open = False   # begun, neither ended nor dropped
        self._sizes: list[int] = []
        self._sqnorms: list[torch.Tensor] = []
        self._loss: torch.Tensor | float = 0.0  # kept as a tensor: no device synchronisation per micro-batch
        self._batches: list[tuple[Any, Any]] = []  # the step's ended micro-batches, (inputs, targets): references
        self._pending: tuple[Any, Any] | None = None  # the open micro-batch's, kept once it ends
        self._by_micro_batches = False   # BatchNorm in train mode: the micro-batches are the units (module docstring)
        self._unmeasurable = False       # a micro-batch begun with measurable=False: the step is left unmeasured
        self._left_by_backward: list[tuple[int, int]] | None = None   # p.grad's versions after the last backward

    @property
    def measures_this_step(self) -> bool:
        return self.step % self.measure_every == 0

    def begin_micro_batch(self, batch_size: int, batch: tuple[Any, Any] | None = None,
                          model_inputs: Any = None, measurable: bool = True, packed: bool = False) -> None:
        """Arm the ghost hooks for the forward and backward of the next ``batch_size`` examples (a micro-batch
        begun but never ended, e.g. skipped by the framework, is dropped). ``batch``: (inputs, targets) of this
        micro-batch, kept by reference (no copy) until the step ends or the monitor closes: on Hessian steps the
        Hessian proxies run on the step's whole batch, and on a step whose loss or gradient is not finite its values
        are read to tell bad data from divergence (:meth:`_note_nonfinite`; under DDP each rank its own share).
        ``model_inputs``: what the framework calls
        the model on, for the check of dims as large as the batch and for the parameters only the whole-model vmap
        can measure (``observe``). ``measurable=False``: the caller knows the hooks would read the examples along
        the wrong dim (Lightning's sequence-first batch with a sequence as long as the batch): the step is recorded,
        unmeasured, and no hook is armed for its later micro-batches. ``packed``: the micro-batch's
        ``batch_size`` sequences are packed into fewer rows (:func:`packed_sequences`), which the layers' hooks would
        take for the examples: the step is measured from its micro-batches' gradients, as a BatchNorm model's, which
        needs 2 or more micro-batches a step."""
        self._drop_open_micro_batch("begin_micro_batch")
        if self._sizes and self._gradients_cleared():
            self._refuse_step("begin_micro_batch found p.grad cleared since the step's earlier micro-batches "
                              "ended: end_step() was not called after the last step's backward, and its micro-batches "
                              "would be counted in this step. Call monitor.end_step() after each step's last "
                              "backward, before optimizer.zero_grad()")
        self._step_open = self._micro_batch_open = True
        self._pending = batch
        self._sizes.append(batch_size)
        self._unmeasurable = self._unmeasurable or not measurable
        if packed:
            self._warn_once("packed", f"step {self.step}: its micro-batch packs {batch_size} sequences into rows "
                            "(position_ids restart inside a row: padding-free packing, DataCollatorWithFlattening or "
                            "TRL's padding_free), whose sequences the layers' hooks cannot tell apart: the steps are "
                            "measured from their micro-batches' gradients, which needs 2 or more micro-batches a step "
                            "(gradient accumulation or DDP ranks; with one, tr(Sigma) and B_simple are NaN). B_noise's "
                            "per_example_loss gets the packed rows as they are (warned once)")
        if self.measures_this_step and not self._unmeasurable:
            self._by_micro_batches = packed or self._normalises_with_batch_statistics()
            self._micro_batch = (GradientSquaredNorm(self.model, 1.0, True) if self._by_micro_batches else
                                 self.norms.observe(batch_size, loss_scale=batch_size, model_inputs=model_inputs))
            self._observed = self._micro_batch.__enter__()
            if not (self._by_micro_batches or self._loss_checked):
                self._module_outputs = _ModuleOutputs(self.model)

    @property
    def checks_loss(self) -> bool:
        """Whether :meth:`check_loss` wants the open micro-batch's loss (its first measured one)."""
        return self._module_outputs is not None

    def check_loss(self, loss: Any) -> None:
        """The framework's loss of the open micro-batch, before its backward: on the first measured micro-batch
        (``check_independence``), a warning where its graph takes a parameter directly, outside every call of the
        model's modules. A weight penalty added to the loss (an L2 term in ``training_step`` or ``compute_loss``) or
        a term kept by a module and added to it has a gradient that belongs to no example; a parameter the loss
        applies to the outputs itself (a temperature) has one that ``observe`` then refuses to measure. The hooks do
        not see such a use: the per-example norms leave its gradient out while |gbar|^2 holds it, so tr(Sigma) and
        |G|^2 are silently off (a review's classifier with an L2 term of 0.1 in its Lightning ``training_step``:
        tr(Sigma) 18 % low, |G|^2 52 % off). A model whose parameters appear only inside its modules' calls gets no
        warning; a micro-batch model (BatchNorm) is not checked, as its units' gradients hold such a term."""
        outputs = self._module_outputs
        if outputs is None or not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
            return
        self._close_module_outputs()
        names = {id(p): name for name, p in unwrapped_module(self.model).named_parameters()}
        direct = [names[id(node.variable)] for node in autograd_nodes([loss.grad_fn], stops=outputs.nodes)
                  if hasattr(node, "variable") and id(node.variable) in names]
        if direct:
            self._warn_once("loss_outside_model", f"the loss reads parameters outside the model's module calls "
                            f"({', '.join(sorted(direct)[:4])}{', ...' if len(direct) > 4 else ''}): the layers' hooks "
                            "do not see such a use, so its gradient is left out of the per-example norms while the "
                            "batch's gradient holds it, and tr(Sigma), |G|^2 and B_simple are off. A weight penalty "
                            "added to the loss is such a use, and its gradient belongs to no example: put it in the "
                            "optimizer (weight_decay); a parameter that the loss applies to the model's outputs "
                            "belongs in one of the model's modules (check_independence=False skips this check; "
                            "warned once)")

    def _close_module_outputs(self) -> None:
        """The check of the loss is made, or its micro-batch ended without the framework giving its loss: either
        way it is not tried again."""
        if self._module_outputs is not None:
            self._module_outputs.close()
            self._module_outputs, self._loss_checked = None, True

    def end_micro_batch(self, loss: torch.Tensor | float) -> None:
        """After the micro-batch's backward: keep |c_i|^2 and the loss the framework accumulated for it. Called with
        no micro-batch begun (a loop of one's own that left out ``begin_micro_batch``: its backward ran unseen by
        the hooks), the step is forgotten and a ValueError says so."""
        if not self._micro_batch_open:
            self._refuse_step("end_micro_batch was called with no micro-batch begun: its forward and backward ran "
                              "without begin_micro_batch(b, batch=(x, y)) before them, unseen by the hooks, so its "
                              "examples would be missing from the estimate while its gradient is in p.grad. Call "
                              "begin_micro_batch before each micro-batch's forward")
        self._micro_batch_open = False
        self._close_module_outputs()
        self._loss = self._loss + torch.as_tensor(loss).detach().double()
        if self._pending is not None:
            self._batches.append(self._pending)
            self._pending = None
        if self._micro_batch is not None:
            micro_batch, self._micro_batch = self._micro_batch, None
            micro_batch.__exit__(None, None, None)
            if self._by_micro_batches:   # |C_k|^2 of the micro-batch's whole contribution
                self._sqnorms.append(self._observed.sqnorm().reshape(1))
            else:
                self._sqnorms.append(self._observed.sqnorms)
                self.backend_of = dict(self._observed.backend_of)
            self._left_by_backward = self._gradient_versions()

    def _gradient_versions(self) -> list[tuple[int, int]] | None:
        """(id, in-place version) of each trainable parameter's p.grad, to tell whether a later call changed it;
        None under FSDP, whose shards are read otherwise."""
        return None if self.sharded else [(id(p.grad), p.grad._version) for p in self.model.parameters()
                                          if p.requires_grad and p.grad is not None]

    def _gradients_cleared(self) -> bool:
        """Whether no trainable parameter holds a p.grad (zero_grad() since the backward); never under FSDP, whose
        shards are read otherwise."""
        return not self.sharded and all(p.grad is None for p in self.model.parameters() if p.requires_grad)

    def _refuse_step(self, why: str) -> None:
        """Forget the open step (no row) and raise a ValueError saying ``why``: a call out of order in a loop of
        one's own, whose p.grad stays as its backward passes made it."""
        self._reset_step()
        raise ValueError(f"{why}; this step is dropped (no row), p.grad is left as the backward passes made it")

    def _drop_open_micro_batch(self, caller: str | None = None) -> None:
        """Forget a micro-batch whose backward never came (the framework skipped it or raised): its size too, on a
        step measured or not (it trained nothing). ``caller``: the method that found it open; where the hooks saw
        its backward run (a loop of one's own that left out ``end_micro_batch``), the step is forgotten and a
        ValueError names the call missing: its gradient is in p.grad, its examples would be missing from the
        estimate."""
        self._pending = None
        self._close_module_outputs()
        if self._micro_batch_open:
            self._micro_batch_open = False
            self._sizes.pop()
        if self._micro_batch is not None:
            micro_batch, self._micro_batch = self._micro_batch, None
            backward_ran = bool(self._observed.received)
            dropped = RuntimeError("micro-batch dropped")
            micro_batch.__exit__(type(dropped), dropped, None)  # removes the hooks' state, records nothing
            if backward_ran and caller is not None:
                self._refuse_step(
                    f"{caller} was called while the micro-batch begun last had run its backward without "
                    "end_micro_batch(loss) after it: its gradient is in p.grad, and its examples would be missing "
                    "from the estimate. Call monitor.end_micro_batch(loss) after each micro-batch's backward (or "
                    "monitor.drop_step() where the loop skips the step)")

    def drop_step(self) -> None:
        """Forget the open step, its micro-batches and any micro-batch left open, without a row: a loop of one's
        own that skips a step (an out-of-memory error in a backward, caught) and zeroes p.grad."""
        self._drop_open_micro_batch()
        self._reset_step()

    def close(self) -> None:
        """Remove the hooks from the model, after disarming a micro-batch left open and forgetting the step it
        began (training stopped by an exception in its middle); the history and averages stay readable."""
        self.drop_step()
        super().close()
        self.closed = True

    @property
    def micro_batch_open(self) -> bool:
        """Whether a micro-batch is begun and neither ended nor dropped."""
        return self._micro_batch_open

    @property
    def micro_batches(self) -> int:
        """The micro-batches of the open step ended so far (a framework's step that skipped one trained on the
        others only)."""
        return len(self._sizes) - self._micro_batch_open

    def end_step(self, *, contribution_scale: float = 1.0, grad_scale: float = 1.0, loss_weight: float = 1.0,
                 global_step: int | None = None) -> dict[str, Any] | None:
        """After the optimizer step's last backward (p.grad accumulated and all-reduced): one history row for the
        whole global batch, or None when no micro-batch was seen or every one was skipped. ``contribution_scale``:
        the loss scale S the backward passes ran under (fp16); ``grad_scale``: the one p.grad still holds (S, or 1
        once unscaled);
        ``loss_weight``: the factor by which the framework's summed micro-batch losses, and so its gradients, are
        the batch's mean loss times it (Lightning divides an epoch's last, shorter accumulation window of k
        micro-batches by its K all the same: k / K), taken out of the row's loss and norms; ``global_step``: the
        framework's own number of this step, kept in the row beside ``step`` (which counts from 0) to join it with
        the framework's logs. If it fails (the Hessian proxies, a Ctrl-C), the averages, counters and history are
        as before it."""
        with self._undone_on_failure(restore_grads=False):   # (p.grad is the framework's, and this changes none)
            return self._end_step(contribution_scale * loss_weight, grad_scale * loss_weight, loss_weight,
                                  global_step)

    def _end_step(self, contribution_scale: float, grad_scale: float, loss_weight: float,
                  global_step: int | None) -> dict[str, Any] | None:
        self._drop_open_micro_batch("end_step")
        if self._step_open and not self._sizes:   # every micro-batch skipped (Lightning: training_step returned
            self._reset_step()                    # None): no backward, nothing trained, no row
        if not self._step_open:
            return None
        sizes, sqnorms = self._sizes, self._sqnorms
        loss = torch.as_tensor(self._loss, dtype=torch.float64, device=self._device()).reshape(1) / loss_weight
        world_size = 1 if self.process_group is None else dist.get_world_size(self.process_group)
        measured = (self.measures_this_step and not self._unmeasurable
                    and not self._unequal_micro_batches(sizes))
        gathered = False
        if measured and self._gradients_cleared():
            self._refuse_step("end_step found no gradient in p.grad, from which it reads the step's |gbar|^2: call it "
                              "after the step's last backward and before optimizer.zero_grad() (and before clipping, "
                              "which it does not see)")
        if measured and grad_scale == contribution_scale and self._gradient_versions() != self._left_by_backward:
            self._refuse_step("end_step found p.grad changed since the step's last backward (clip_grad_norm_, "
                              "zero_grad(set_to_none=False), or unscale_), from which it reads the step's |gbar|^2: "
                              "call it right after the last backward, before clipping; after a GradScaler's "
                              "unscale_, pass contribution_scale=scaler.get_scale() and grad_scale=1")
        if measured:   # units: the examples, or the micro-batches of a model normalising with batch statistics
            units = torch.cat(sqnorms).double()
            if world_size > 1:
                (loss, units), gathered = self._gather_step(loss, units), True
            unit_sizes = sizes * world_size if self._by_micro_batches else None   # the ranks' shares are equal
            batch_size = units.shape[0] if unit_sizes is None else sum(unit_sizes)
            # g_i = B c_i / (R S), and a micro-batch's g_k = (1/b_k) sum_{i in k} g_i = B C_k / (b_k R S)
            counts = 1.0 if unit_sizes is None else torch.tensor(unit_sizes, dtype=torch.float64, device=units.device)
            units = units * (batch_size / (counts * world_size * contribution_scale)) ** 2
            grad_sqnorm = self._accumulated_grad_sqnorm(grad_scale)
            measured = self._from_its_units(units, counts, batch_size, grad_sqnorm)
        if measured:
            row = self._measure(loss, units, grad_sqnorm, batch_size, unit_sizes=unit_sizes)
        else:
            if world_size > 1 and not gathered:
                loss = all_gather_concat(loss, self.process_group)
            batch_size = sum(sizes) * world_size
            row = {"loss": loss.mean().item(), "measured": False}
        self._note_nonfinite(row, self._batches, self.process_group)
        if self._batches and self.hessian_every and self.step % self.hessian_every == 0:
            row |= self._hessian(*self._batches)
        self.examples_seen += batch_size
        row = {"step": self.step, **({} if global_step is None else {"global_step": global_step}),
               "examples_seen": self.examples_seen, "batch_size": batch_size, "micro_batches": len(sizes), **row}
        self._record(row)
        self.step += 1
        self._reset_step()
        return row

    def _unequal_micro_batches(self, sizes: list[int]) -> bool:
        """Whether the step's micro-batches differ in size (an epoch's last step, without drop_last). Lightning and
        the HF Trainer (for a loss without num_items_in_batch) weight each micro-batch's mean loss equally, 1/K,
        not b_k/B: the step's gradient is then not the mean of its examples' gradients, and g_i = B c_i / S are not
        the examples' own (a new user's step of 4 and 2 examples: tr(Sigma) 6.10 against 4.52). Such a step is
        left unmeasured, warned once. (A loss over the whole batch's tokens, num_items_in_batch, would be measured
        right, but the Trainer passes it to models that ignore it, BERT's, and the two cannot be told apart here.)"""
        if len(set(sizes)) < 2:
            return False
        self._warn_once("unequal", f"step {self.step}: its micro-batches differ in size ({sizes}); unless the loss "
                        "is normalised over the whole accumulated batch (transformers' num_items_in_batch, where the "
                        "model uses it), the framework weights each micro-batch's mean loss equally rather than by "
                        "its size, and the examples' gradients cannot be told from their contributions. Which of "
                        "the two cannot be read from the framework's loss, so the step is not measured (warned once; "
                        "drop_last=True in the data loader avoids such steps)")
        return True

    def _from_its_units(self, units: torch.Tensor, counts: torch.Tensor | float, batch_size: int,
                        grad_sqnorm: torch.Tensor) -> bool:
        """Whether |gbar|^2 can be that of the mean of the step's units (examples, or micro-batches weighted by
        their sizes): where it is larger than their mean squared norm allows, part of the gradient came from no
        unit, as a weight penalty added to the loss outside the model (``check_loss``). Such a step is left
        unmeasured, warned once: before, the estimator's ValueError ('was the loss summed instead of averaged')
        stopped the framework's training at that step, which may come late in a run, as the data's gradient shrinks
        next to the penalty's."""
        mean_sqnorm = float((units * counts).sum()) / batch_size
        if mean_dominates(mean_sqnorm, float(grad_sqnorm)):
            return True
        self._warn_once("beyond_units", f"step {self.step}: the batch's gradient (|gbar|^2 = {float(grad_sqnorm):.4g}) "
                        f"is larger than its examples' gradients allow (their mean |g_i|^2 = {mean_sqnorm:.4g}): "
                        "part of it belongs to no example, as a weight penalty added to the loss outside the model "
                        "does (or, in a loop of one's own, an end_step(contribution_scale=...) larger than the "
                        "scaling its backward passes ran under); such steps are left unmeasured and "
                        "training goes on (warned once); put the penalty in the optimizer (weight_decay) to measure "
                        "them")
        return False

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _gather_step(self, loss: torch.Tensor, sqnorms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's step loss and per-example |c_i|^2, in rank order, by one all-gather (the ranks' shares of
        the global batch must have equal sizes, as DistributedSampler and accelerate's even batches make them)."""
        device = self._device()
        counts = rank_sizes(sqnorms.shape[0], self.process_group, device)
        if len(set(counts)) > 1:
            raise ValueError(f"the ranks' batches differ in size ({counts}); the noise-scale integrations "
                             "need equal shares of the global batch (DistributedSampler pads them to equal sizes)")
        gathered = all_gather_concat(torch.cat([loss, sqnorms.to(device)]), self.process_group)
        per_rank = gathered.reshape(dist.get_world_size(self.process_group), -1)
        return per_rank[:, 0], per_rank[:, 1:].reshape(-1)

    def _hessian_proxies(self, micro_batches: list[tuple[Any, Any]]):
        """The monitor's Hessian proxies of the step's micro-batches; keyword batches (HuggingFace) are passed to
        them as positional tensors of a module that calls the model with the first micro-batch's keywords."""
        first = micro_batches[0][0]
        if not isinstance(first, Mapping):
            return super()._hessian_proxies(micro_batches)
        keys = [key for key, value in first.items() if isinstance(value, torch.Tensor)]
        constants = {key: value for key, value in first.items() if key not in keys}
        model, self.model = self.model, _KeywordCall(unwrapped_module(self.model), keys, constants)
        try:
            return super()._hessian_proxies([(tuple(inputs[key] for key in keys), targets)
                                             for inputs, targets in micro_batches])
        finally:
            self.model = model

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state in plain Python types (numpy and 0-d tensor scalars as numbers), so that a
        checkpoint holding it loads with ``torch.load(weights_only=True)``, as Lightning's resume does."""
        return _plain(super().state_dict())

    def logged_metrics(self) -> dict[str, float]:
        """What the integrations log, finite values only, named ``log_prefix + name``: B_simple with its interval,
        the moving averages of |G|^2 and tr(Sigma) (whose ratio B_simple is) and B_noise where its ratio is positive
        (its averaged tr(H Sigma) and G^T H G both positive: a negative ratio is no noise scale), with its interval
        (``b_noise_low`` and ``b_noise_high``, left out while G^T H G is not resolved from 0: the summary then calls
        B_noise not resolved); and
        ``coupled_outputs`` = 1 once the independence check found outputs that couple the examples (the summary's
        ``coupling``: the values are no noise scale if the loss reads those outputs)."""
        summary = self.summary()
        low, high = summary.b_simple_interval
        values = {"b_simple": summary.b_simple, "b_simple_low": low, "b_simple_high": high,
                  "grad_sqnorm": summary.grad_sqnorm, "trace_sigma": summary.trace_sigma,
                  "b_noise": summary.b_noise if summary.b_noise > 0 else math.nan,
                  **dict(zip(("b_noise_low", "b_noise_high"),
                             summary.b_noise_interval if summary.b_noise > 0 else (math.nan, math.nan))),
                  "coupled_outputs": math.nan if summary.coupling is None else 1.0}
        return {self.options.log_prefix + name: float(value) for name, value in values.items() if math.isfinite(value)}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value


class _ModuleOutputs:
    """While open, the autograd nodes of the outputs of every call with grad of ``model``'s modules (itself
    included): where a loss's graph enters the model (``ObservingNoiseScaleMonitor.check_loss``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.nodes: set = set()
        self._handles = [module.register_forward_hook(self._on_output) for module in unwrapped_module(model).modules()]

    def _on_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.nodes.update(t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor)
                          and t.grad_fn is not None)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _KeywordCall(torch.nn.Module):
    """``model(**dict(zip(keys, tensors)), **constants)`` as a module of positional tensors."""

    def __init__(self, model: torch.nn.Module, keys: list[str], constants: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.keys, self.constants = model, keys, constants

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.keys, tensors)), **self.constants)


def split_labels(batch: Mapping[str, Any], key: str = "labels") -> tuple[dict[str, Any], Any]:
    """(inputs without ``key``, batch[key]): a keyword batch as the Hessian proxies take it."""
    inputs = {name: value for name, value in batch.items() if name != key}
    return inputs, batch.get(key)
