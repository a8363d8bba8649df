"""Training in which noisescale chooses the batch size: a plain loop around the existing pieces.

    trainer = AdaptiveTrainer(model, per_example_loss, optimizer, train_set,
                              policy=NoiseScaleBatchPolicy(32, min_batch_size=32, max_batch_size=1024))
    trainer.train(epochs=10)          # or trainer.step() one optimizer step at a time
    trainer.history                   # one row per optimizer step (pandas DataFrame)

Where the batch size comes from (exactly one):

* ``schedule``: a :class:`~noisescale.controller.BatchSizeSchedule` (modes fixed, lr-decay, batch-increase,
  hybrid of Smith, Kindermans & Le 2017); before every step (B, eps) = schedule.at(epoch), epoch = examples
  seen / N, and the step's learning rates are the groups' times eps / eps_0;
* ``policy``: a :class:`~noisescale.controller.NoiseScaleBatchPolicy` fed after every step with the monitor's
  moving-average B_simple (McCandlish et al. 2018); the learning rate follows ``lr_coupling`` as a factor on the
  groups' learning rates: ``linear`` and ``sqrt`` multiply it by (B_new / B_old) or its square root when B changes
  (:func:`~noisescale.controller.couple_learning_rate`); ``adascale`` sets it at every step to AdaScale's gain
  r_t of S = B / B_0 (Johnson et al. 2020; fairscale's ``AdaScale.gain``), B_0 the policy's initial batch size,
  from the monitor's moving averages of tr(Sigma) and |G|^2 after the step's measurement
  (:meth:`AdaptiveTrainer._adascale_factor`). AdaScale's scale-invariant iterations (its learning-rate schedule
  driven by tau = sum of r_t, training stopped at tau = the base run's steps) are not implemented: ``train`` counts
  epochs and a learning-rate scheduler of the user's steps as the user steps it;
* ``batch_size``: a constant batch.

The schedule's and the coupling's factor (``lr_factor``) multiplies each group's learning rate for the optimizer
step only: between steps ``param_groups`` hold the rates the user or a learning-rate scheduler set (LambdaLR,
OneCycleLR, transformers' warmup schedules recompute them from their base rates at every ``scheduler.step()``, which
overwrote the coupled rate before session 25), and the history's ``learning_rate`` is the rate the step used.

Batches come from a :class:`~noisescale.sampler.ResizableBatchSampler` (every example once per epoch whatever
B does). A batch larger than ``max_micro_batch`` runs as accumulated micro-batches
(:func:`~noisescale.sampler.split_micro_batches`): micro-batch k's mean loss is weighted by b_k / B, so p.grad
ends as the mean gradient of the whole batch, for a loss of each example alone (a loss normalised over the batch it
is given, a token mean, is refused rather than split: ``AccumulatingNoiseScaleMonitor._check_parts_add_up``). The
noise scale of the step is the per-example estimate of the *whole* batch (McCandlish et al. appendix A): the
per-example squared norms s_i of all micro-batches together and |gbar|^2 of the accumulated gradient go into
:func:`~noisescale.estimators.simple_noise_scale`. Beside it the two-batch estimate from the micro-batch norms
|g_k|^2 and |gbar|^2 is recorded (:func:`~noisescale.estimators.micro_batch_noise_scale`; with equal sizes b the
two-batch estimate at B_small = b, B_big = B). A model that normalises with batch statistics (BatchNorm in train
mode) has no per-example gradient: its steps are measured by that micro-batch estimate alone, each micro-batch
normalised by its own statistics as in any gradient accumulation (under DDP every rank's micro-batches are units of
the global batch; not under FSDP; a step in one micro-batch records no estimate).

A step whose loss or gradient is not finite (the monitor's ``last_step_finite``, and on unmeasured steps the
gradients themselves; a NaN loss whose gradients are finite, 0/0 of a mean over no terms, is stepped on as a
plain loop would) is skipped as ``GradScaler`` skips one: no optimizer step, the row marked ``skipped``,
counted in ``skipped_steps``, warned once; a policy is not stepped on it (B, the learning rate and the policy's
hold counter stay), and BatchNorm running statistics are put back as they were (a NaN input would leave them
NaN). Where the step's batch itself holds NaN (or Inf in its targets), the row's ``nonfinite_data`` and the warning
name the data and the monitor's summary reports bad data; otherwise, if such steps persist, a diverged run rather
than a noise scale.

An out-of-memory error halves ``max_micro_batch`` and runs the same step again from zeroed gradients, the random
state and the BatchNorm running statistics it started with; nothing is lost or counted twice (a BatchNorm model in
train mode then normalises smaller micro-batches, which changes its training).

DistributedDataParallel: pass the DDP-wrapped model (after ``init_process_group``; torchrun sets it up). B is the
global batch, world size x micro-batch x accumulation steps: every rank draws the same global batch from the sampler
(same seed) and trains on its equal shard, accumulating its micro-batches under ``no_sync()`` except the last, whose
backward all-reduces the gradient. One all-gather of the per-example losses and squared norms (two numbers per
example, and one per micro-batch) per step gives every rank the single-process estimate of the whole global batch,
so the history is the same on every rank and equals a single-process run with the same batches. A policy is stepped
on every rank and rank 0's state is broadcast (two integers per step), so the ranks cannot disagree on B. B must
stay divisible by the world size (the policy's granularity a multiple of it). The Hessian proxies (B_noise) are
measured on each rank's whole share of the batch, one micro-batch at a time
(:func:`~noisescale.hessian.micro_batch_hessian_noise_scale`, so max_micro_batch does not change them), and averaged
over the ranks (one all-gather of five numbers a rank). Under DDP an out-of-memory error is raised, not retried (the
other ranks already wait in the step's all-reduce).

FSDP: pass the model sharded by FSDP2 (``fully_shard``) or FSDP1 (``FullyShardedDataParallel``, flat parameters
or ``use_orig_params=True``); the process group is the sharding group (:mod:`noisescale.sharded`). Everything
above holds as under DDP (one all-gather of the per-example numbers, the policy's state broadcast, micro-batches
without gradient reduction but the last); |gbar|^2 is the squared norm of the sharded accumulated gradient, summed
over the shards by one all-reduce. Activation checkpointing inside the model and FSDP's mixed precision work (the
norms are reduced in float32 or wider). The Hessian proxies (B_noise) need torch.func on whole parameters and are
refused. Checkpoints hold the full (unsharded) model and optimizer states by parameter name
(torch.distributed.checkpoint.state_dict, gathered on every rank): they resume under FSDP on any world size, or
in one process.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import astuple
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from noisescale._buffers import RunningStatistics
from noisescale._checks import check_int, check_real
from noisescale._gradient_norm import GradientSquaredNorm, gradient_values
from noisescale._interrupts import deferred_interrupt
from noisescale._rng import isolated_rng, module_generators, rng_state, set_rng_state
from noisescale._wrappers import ddp_of, unwrapped_module
from noisescale.batches import batch_size_of, call_model, fetch_examples, split_examples, to_device
from noisescale.checkpoints import to_plain
from noisescale.controller import (
    COUPLING_RULES,
    BatchSizeSchedule,
    NoiseScaleBatchPolicy,
    NoiseScalePolicyState,
    adascale_gain,
    couple_learning_rate,
)
from noisescale.distributed import (
    all_gather_concat,
    all_reduce_hessian_proxies,
    broadcast_from_first_rank,
    rank_sizes,
)
from noisescale.estimators import ExponentialMovingNoiseScale, micro_batch_noise_scale
from noisescale.losses import IGNORE_INDEX, normalised_over_the_batch, weighted_alone
from noisescale.monitor import NoiseScaleMonitor, loss_scale_of, nonfinite_from_start
from noisescale.per_example.coupling import (
    example_rows,
    holds_examples,
    observed_example_weights,
    outputs_without_grad,
)
from noisescale.per_example.layers import batch_statistics_path, close_values
from noisescale.sampler import ResizableBatchSampler, split_micro_batches
from noisescale.sharded import (
    every_gradient_finite,
    gradient_sync,
    is_sharded,
    sharded_grad_sqnorm,
    sharding_group,
)

__all__ = [
    "AdaptiveTrainer",
    "AccumulatingNoiseScaleMonitor",
    "AMP_MODES",
    "TRAIN_MODES",
    "is_out_of_memory",
    "make_batch_size_source",
]

AMP_MODES = ("none", "bf16", "fp16")
POLICY_NOISE_SCALES = ("b_simple", "b_noise")


def is_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or a RuntimeError whose message says "out of memory" (CPU, MPS, older torch)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error)
    )


class AccumulatingNoiseScaleMonitor(NoiseScaleMonitor):
    """A :class:`~noisescale.monitor.NoiseScaleMonitor` whose step may span several accumulated micro-batches.

    :meth:`accumulate` runs the forward and backward of each micro-batch with its mean loss weighted by
    b_k / B (times ``loss_scale`` under fp16), then records the step through the monitor's own estimate,
    average and history code with the per-example estimate of the whole batch; the two-batch estimate from
    the micro-batch norms is averaged in ``two_batch_average`` and added to the row. Everything else
    (summary, history, state) is the monitor's.
    """

    _gathers_ranks = True
    equal_shares = False   # whether every rank's share of each batch is known to be equal (no check needed)

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], **options: Any) -> None:
        super().__init__(model, loss_fn, **options)
        self._parts_checked = False   # whether a split step checked that the loss's parts add up (once)
        self.two_batch_average = ExponentialMovingNoiseScale(self.average.decay)
        self.sharded = is_sharded(model)
        ddp = ddp_of(model)   # also inside torch.compile(DDP(model)), as accelerate builds it
        self.process_group = (ddp.process_group if ddp is not None
                              else sharding_group(model) if self.sharded else None)

    def accumulate(self, micro_batches: list[tuple[Any, Any]], loss_scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of the micro-batches into p.grad (which must start at zero or None: checked on the
        first three steps); one history row for the whole batch. Returns the batch's mean loss (detached)."""
        held = self._gradient_held()
        if held is not None:
            raise ValueError(f"p.grad already holds a gradient as this step begins ({held}): accumulate adds the "
                             "micro-batches' gradients to it and reads |G|^2 from the sum, which would include it; "
                             "call model.zero_grad() before each step (optimizer.zero_grad() clears the optimizer's "
                             "parameters only)")
        sizes = [batch_size_of(inputs) for inputs, _ in micro_batches]
        if len(micro_batches) > 1 or self._world_size() > 1:
            self._check_parts_add_up(micro_batches, sizes)
        with self._undone_on_failure():   # a failed step leaves p.grad and the averages as they were
            batch_size = sum(sizes)
            measured = self.step % self.measure_every == 0
            by_micro_batches = measured and self._normalises_with_batch_statistics()
            losses, sqnorms, micro_sqnorms = [], [], []
            for index, ((inputs, targets), size) in enumerate(zip(micro_batches, sizes)):
                share = size / batch_size
                # under DDP only the last micro-batch's backward all-reduces the accumulated gradient
                synchronise = self.process_group is None or index == len(sizes) - 1
                with self._gradient_sync(synchronise):
                    if measured and not by_micro_batches:
                        result = self.norms(inputs, targets, loss_scale=loss_scale * share)
                        losses.append(result.losses)
                        sqnorms.append(result.sqnorms)
                        micro_sqnorms.append(result.grad_sqnorm)
                        continue
                    # the ghost hooks are inert outside a measured pass
                    with GradientSquaredNorm(self.model, loss_scale * share, by_micro_batches) as tap:
                        micro_losses = self.loss_fn(call_model(self.model, inputs), targets)
                        (micro_losses.mean() * (loss_scale * share)).backward()
                    losses.append(micro_losses.detach())
                    if by_micro_batches:
                        micro_sqnorms.append(tap.sqnorm())
            all_losses = torch.cat(losses)
            if self.process_group is not None:
                all_losses, sqnorms, micro_sqnorms, sizes = self._gather_ranks(all_losses, sqnorms, micro_sqnorms,
                                                                               sizes)
                batch_size = sum(sizes)
            loss = all_losses.float().mean()
            if measured:
                # one micro-batch on one process: the hooks read |gbar|^2; else p.grad holds the (all-reduced) sum
                grad_sqnorm = micro_sqnorms[0] if len(sizes) == 1 else self._accumulated_grad_sqnorm(loss_scale)
                if by_micro_batches:
                    row = self._measure(all_losses, torch.stack(micro_sqnorms), grad_sqnorm, batch_size,
                                        unit_sizes=sizes)
                else:
                    row = self._measure(all_losses, torch.cat(sqnorms), grad_sqnorm, batch_size)
                    row |= self._two_batch(micro_sqnorms, sizes, grad_sqnorm)
            else:
                row = {"loss": loss.item(), "measured": False}
            self._note_nonfinite(row, micro_batches, self.process_group, losses=all_losses)
            if self.hessian_every and self.step % self.hessian_every == 0:
                row |= self._hessian(*micro_batches)
            self.examples_seen += batch_size
            self._record({"step": self.step, "examples_seen": self.examples_seen, "batch_size": batch_size,
                          "micro_batches": len(sizes), **row})
            self.step += 1
        return loss.detach()

    def _check_parts_add_up(self, micro_batches: list[tuple[Any, Any]], sizes: list[int]) -> None:
        """Refuse a loss normalised over the batch it is given (a token mean): accumulated micro-batches, and DDP's
        ranks, would each be normalised by their own count, and the step would not be the batch's. Declared
        (``losses.normalised_over_the_batch``) at every split step; otherwise looked for at split steps until one
        passes, from a forward of each micro-batch (no grad, random streams and buffers kept, so the training is
        unchanged): within each micro-batch, its examples' losses computed together and each alone differ by a
        count (``coupling.observed_example_weights``); across them, the same on a probe of every micro-batch's first
        and last examples put together: between them, a count that differs anywhere in the step (a micro-batch that
        counts alike is represented by its ends). A set of two examples is judged only by ignoring label tokens
        (its halves are single examples, whose losses alone agree with any loss's). Where the probe cannot be
        judged and no micro-batch showed a count (outputs of other
        shapes, fewer than 3 examples, a loss not computable on parts) a warning says so, once. A loss known or
        declared to weight each example alone (``losses.weighted_alone``) is not checked. Examples that all count
        alike (every sequence full) show a count only where the targets hold integer token labels, by ignoring some
        of one example's (``_masked_tokens_move_others``); otherwise nothing: declare such a loss.

        Under DDP each rank checks its own micro-batches (the forward of the module inside DDP, without DDP's buffer
        broadcast) and the ranks' verdicts are combined (one all-reduce of three flags), so that every rank
        refuses or warns alike; a count that differs only between ranks whose examples each count alike is not
        seen where the targets hold no integer token labels (each rank's token mean is then its examples' mean: the
        step is that of a per-example mean). Under
        FSDP, whose forward gathers the shards, only the declared losses are refused."""
        world_size = self._world_size()
        batch_size = sum(sizes) * world_size
        how = " and ".join(([f"split over {world_size} ranks"] if world_size > 1 else [])
                           + ([f"accumulated from {len(micro_batches)} micro-batches"] if len(micro_batches) > 1
                              else []))
        if normalised_over_the_batch(self.loss_fn):
            raise ValueError(_split_refusal(how, batch_size))
        if self._parts_checked or self.sharded or weighted_alone(self.loss_fn):
            return
        within, across, unjudged = self._counted_by_parts(micro_batches, sizes)
        if self.process_group is not None:   # every rank's verdict, so that no rank refuses alone
            flags = torch.tensor([within, across, unjudged], dtype=torch.float64,
                                 device=next(self.model.parameters()).device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
            within, across, unjudged = (bool(flag) for flag in flags.tolist())
        if within or across:
            raise ValueError(_split_refusal(how, batch_size, found=True, across=not within))
        if unjudged:
            warnings.warn(_unchecked_split(how), UserWarning, stacklevel=3)
        self._parts_checked = True   # (a refused or failed check is run again at the next split step)

    def _world_size(self) -> int:
        return 1 if self.process_group is None else dist.get_world_size(self.process_group)

    def _counted_by_parts(self, micro_batches: list[tuple[Any, Any]], sizes: list[int]) -> tuple[bool, bool, bool]:
        """This process's verdicts for :meth:`_check_parts_add_up`: whether a micro-batch's examples count by the
        batch (within), whether the probe of the micro-batches' ends does (across), and whether the parts could
        not be judged (the probe across several micro-batches, or the one micro-batch itself). The forwards are
        those of the module inside DDP (DDP's own broadcasts its buffers); under DDP every micro-batch's forward
        runs, also after a verdict, so that a forward that communicates (SyncBatchNorm) runs on every rank alike."""
        module = unwrapped_module(self.model)
        with isolated_rng(list(module.parameters()), module_generators(module)):   # a loss that draws from them
            probe, verdicts = [], []
            for (inputs, targets), size in zip(micro_batches, sizes):
                outputs = outputs_without_grad(module, inputs)   # (under DDP also after a count was found)
                if not any(verdicts):
                    verdicts.append(self._counted_by_batch(outputs, targets, size))
                    probe.append(_end_examples(outputs, targets, size, others=not probe))
                del outputs   # one micro-batch's outputs at a time
                if any(verdicts) and self.process_group is None:
                    break
            if any(verdicts):
                return True, False, False
            if len(micro_batches) == 1:
                return False, False, verdicts[0] is None
            joined = _joined_examples(probe)
            across = None if joined is None else self._counted_by_batch(*joined)
            return False, bool(across), across is None   # micro-batches alike within may differ, unseen

    def _counted_by_batch(self, outputs: Any, targets: Any, size: int) -> bool | None:
        """Whether the loss of these ``size`` examples computed together differs from each one's loss alone by a
        count (observed weights not all 1), judged on the examples whose loss is finite (an example without a
        counted token: sum / count is 0/0), and whether ignoring one example's label tokens moves the others'
        losses (``_masked_tokens_move_others``; the only test of two examples, whose halves are single examples
        that agree with any loss alone); None where it cannot tell (fewer than 3 such examples, or 2 that show
        nothing; a loss that raises without grad or is of the wrong shape, which the step reports; one that cannot
        be computed on parts)."""
        if size < 2:
            return None
        drawn = rng_state(next((p.device for p in self.model.parameters()), None))   # (a loss that draws)
        try:
            with torch.no_grad():
                whole = self.loss_fn(outputs, targets)
        except Exception as error:   # (a loss that differentiates its outputs: the step says what it needs)
            if is_out_of_memory(error):
                raise
            return None
        if not (isinstance(whole, torch.Tensor) and whole.shape == (size,) and whole.is_floating_point()):
            return None
        finite = torch.isfinite(whole)
        if not bool(finite.all()):
            kept = finite.nonzero().flatten().tolist()
            return self._counted_by_batch(example_rows(outputs, kept, size), example_rows(targets, kept, size),
                                          len(kept))
        weights = None if size == 2 else observed_example_weights(self.loss_fn, outputs, targets, whole)
        if weights is None:   # two examples, or a loss not computable on parts: only ignored tokens can show it
            return self._masked_tokens_move_others(outputs, targets, whole, drawn) or None
        return not close_values(weights, torch.ones_like(weights)) or self._masked_tokens_move_others(
            outputs, targets, whole, drawn)

    def _masked_tokens_move_others(self, outputs: Any, targets: Any, whole: torch.Tensor,
                                   drawn: dict[str, torch.Tensor]) -> bool:
        """Whether ignoring all but one of the first example's counted label tokens (-100, HuggingFace's ignore
        index) moves the other examples' losses: a count over the batch's tokens, which examples that all count
        alike (every sequence full, where later batches are padded) do not show by their losses alone; the change
        is about 1/B of each loss. Only for targets holding integer token labels (B, T, ...); False where there are
        none, or the loss cannot be computed on the masked labels. The loss runs from the random state ``drawn`` it
        computed ``whole`` from (a sampled softmax draws the same negatives)."""
        leaves, structure = tree_flatten(targets)
        size = whole.shape[0]
        found = next((k for k, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.dim() >= 2
                      and leaf.shape[0] == size and not leaf.is_floating_point() and not leaf.is_complex()
                      and leaf.dtype != torch.bool and int((leaf[0] != IGNORE_INDEX).sum()) > 1), None)
        if found is None:
            return False
        labels = leaves[found].clone()
        first = labels[0].reshape(-1)   # (a view of the copy)
        first[(first != IGNORE_INDEX).nonzero().flatten()[1:]] = IGNORE_INDEX
        set_rng_state(drawn, next((p.device for p in self.model.parameters()), None))
        try:
            with torch.no_grad():
                masked = self.loss_fn(outputs, tree_unflatten([*leaves[:found], labels, *leaves[found + 1:]],
                                                              structure))
        except Exception as error:
            if is_out_of_memory(error):
                raise
            return False
        if not (isinstance(masked, torch.Tensor) and masked.shape == whole.shape
                and bool(torch.isfinite(masked[1:]).all())):
            return False
        return not close_values(masked[1:], whole[1:])

    def _normalises_with_batch_statistics(self) -> bool:
        """Whether a module normalises with the statistics of its batch (BatchNorm in train mode): the examples'
        gradients are then coupled, and the step is measured from its micro-batches' gradients instead."""
        if batch_statistics_path(unwrapped_module(self.model)) is None:
            return False
        if self.sharded:
            raise ValueError("a model that normalises with batch statistics (BatchNorm in train mode) is measured "
                             "from its micro-batches' gradients, which are not read under FSDP; train it with DDP "
                             "(every rank's micro-batches are units) or put the BatchNorm layers in eval mode")
        return True

    def _gradient_sync(self, enabled: bool):
        """Gradients are reduced over the ranks only on the last micro-batch (DDP's no_sync, FSDP's own)."""
        if enabled or self.process_group is None:
            return contextlib.nullcontext()
        return gradient_sync(self.model, False) if self.sharded else self.model.no_sync()

    def _gather_ranks(self, losses, sqnorms, micro_sqnorms, sizes):
        """Every rank's per-example losses and squared norms and its micro-batch squared norms, in rank order
        (the order of the global batch), by one all-gather; the sizes of all ranks' micro-batches. Unless
        ``equal_shares`` (AdaptiveTrainer's sampler splits every batch equally), the ranks' batch sizes are
        checked first (one more all-gather of one number): unequal shares are refused on every rank, since DDP
        averages the ranks' mean gradients with equal weights (and gloo aborts an all-gather of unequal lengths)."""
        if not self.equal_shares:
            counts = rank_sizes(losses.shape[0], self.process_group, losses.device)
            if len(set(counts)) > 1:
                raise ValueError(f"the ranks' batches differ in size ({counts}): DDP averages the ranks' mean "
                                 "gradients with equal weights, so p.grad is not the global batch's mean gradient "
                                 "and its noise scale cannot be measured; give every rank an equal share "
                                 "(DistributedSampler pads the last batch to equal sizes)")
        local = [losses.double(), *(value.double().reshape(-1) for value in (*sqnorms, *micro_sqnorms))]
        gathered = all_gather_concat(torch.cat(local), self.process_group)
        world_size = dist.get_world_size(self.process_group)
        per_rank = gathered.reshape(world_size, -1)
        batch, parts = losses.shape[0], len(micro_sqnorms)
        all_losses = per_rank[:, :batch].reshape(-1)
        all_sqnorms = [per_rank[:, batch: 2 * batch].reshape(-1)] if sqnorms else []
        all_micro = list(per_rank[:, per_rank.shape[1] - parts:].reshape(-1)) if parts else []
        return all_losses, all_sqnorms, all_micro, sizes * world_size

    def _hessian_seed(self) -> int:
        """Under DDP every rank draws its own probes (rank r of R: (seed + step) R + r), so that the ranks'
        proxies are independent and their mean's standard error is sqrt(sum se_r^2) / R."""
        if self.process_group is None:
            return super()._hessian_seed()
        return super()._hessian_seed() * dist.get_world_size(self.process_group) + dist.get_rank(self.process_group)

    def _reduced(self, proxies):
        """Under DDP the mean of every rank's proxies (each from all its micro-batches): the same on every rank."""
        if self.process_group is None:
            return proxies
        device = next(self.model.parameters()).device
        return all_reduce_hessian_proxies(proxies, group=self.process_group, device=device)

    def _accumulated_grad_sqnorm(self, loss_scale: float) -> torch.Tensor:
        """|gbar|^2 of the batch: the squared norm of the accumulated p.grad, unscaled, accumulated in float64
        (without a float64 copy of the gradient: ten times faster on CPU); under FSDP summed over the shards."""
        if self.sharded:
            return sharded_grad_sqnorm(self.model, self.process_group) / loss_scale**2
        total = sum(torch.linalg.vector_norm(gradient_values(p.grad), dtype=torch.float64).square()
                    for p in self.model.parameters() if p.requires_grad and p.grad is not None)
        return total / loss_scale**2

    def _gradient_held(self) -> str | None:
        """The monitor's check; under FSDP, whose shards of p.grad differ by rank, agreed by every rank (one
        all-reduce on the steps the check runs), so that every rank refuses alike."""
        held = super()._gradient_held()
        if not self.sharded or self.step >= 3:
            return held
        flag = torch.tensor(float(held is not None), device=next(self.model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        return held or ("on another rank" if bool(flag) else None)

    def _two_batch(self, micro_sqnorms: list[torch.Tensor], sizes: list[int], grad_sqnorm: torch.Tensor) -> dict:
        """The estimate from the micro-batch norms (``micro_batch_noise_scale``; with equal sizes b the two-batch
        estimate at B_small = b, B_big = B) when there are >= 2 micro-batches."""
        if len(sizes) < 2 or not torch.isfinite(grad_sqnorm):
            return {}
        small = torch.stack([value.double() for value in micro_sqnorms])
        estimate = micro_batch_noise_scale(small, sizes, grad_sqnorm, population=self._population_of(sum(sizes)))
        self.two_batch_average.update_estimate(estimate)
        return {
            "grad_sqnorm_two_batch": estimate.grad_sqnorm,
            "trace_sigma_two_batch": estimate.trace_sigma,
            "b_simple_two_batch": self.two_batch_average.b_simple,
        }

    def _state(self) -> dict[str, Any]:
        return super()._state() | {"two_batch_average": self.two_batch_average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.two_batch_average.load_state_dict(state["two_batch_average"])


class AdaptiveTrainer:
    """SGD-style training whose batch size follows a schedule, a noise-scale policy or a constant (module docstring).

    Args:
        model: the model (already on ``device``).
        loss_fn: ``loss_fn(outputs, targets)`` -> per-example losses (B,); the training loss is their mean.
        optimizer: any torch optimizer over the model's parameters.
        dataset: a map-style dataset of (inputs, targets); a TensorDataset is indexed in one call.
        batch_size, schedule, policy: where B comes from -- exactly one of them.
        max_micro_batch: the most examples in one forward/backward (None: the whole batch).
        lr_coupling: with ``policy``, how the learning rate follows B: one of COUPLING_RULES (``"adascale"``:
            AdaScale's gain of B / B_0 at every step, B_0 the policy's initial batch size, for which the
            optimizer's learning rate is taken to be tuned; module docstring).
        policy_noise_scale: with ``policy``, the moving average it follows: ``"b_simple"`` (every measured step)
            or ``"b_noise"`` (tr(H Sigma)/G^T H G, measured every ``hessian_every`` steps of ``monitor_options``;
            McCandlish et al.'s better predictor of B_crit, noisier). An unresolved (infinite) value holds B.
        monitor_options: keyword arguments of :class:`~noisescale.monitor.NoiseScaleMonitor` (backend,
            measure_every, ema_decay, hessian_every, ...).
        device: where batches are moved (default: the device of the model's first parameter).
        amp: "none", "bf16" (autocast) or "fp16" (autocast and a GradScaler; CUDA only).
        seed: seed of the sampler's shuffling.
        progress: show a tqdm bar in :meth:`train`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        dataset: Dataset,
        *,
        batch_size: int | None = None,
        schedule: BatchSizeSchedule | None = None,
        policy: NoiseScaleBatchPolicy | None = None,
        max_micro_batch: int | None = None,
        lr_coupling: str = "none",
        policy_noise_scale: str = "b_simple",
        monitor_options: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        amp: str = "none",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        sources = {"batch_size": batch_size, "schedule": schedule, "policy": policy}
        given = [name for name, value in sources.items() if value is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of batch_size, schedule, policy; got {given or 'none'}")
        if schedule is not None and not isinstance(schedule, BatchSizeSchedule):
            raise TypeError(f"schedule must be a BatchSizeSchedule, got {type(schedule).__name__}")
        if policy is not None and not isinstance(policy, NoiseScaleBatchPolicy):
            raise TypeError(f"policy must be a NoiseScaleBatchPolicy, got {type(policy).__name__}")
        if lr_coupling not in COUPLING_RULES:
            raise ValueError(f"lr_coupling must be one of {COUPLING_RULES}, got {lr_coupling!r}")
        if lr_coupling != "none" and policy is None:
            source = "a schedule, which sets eps / eps_0 itself" if schedule is not None else "a constant batch_size"
            raise ValueError(f"lr_coupling={lr_coupling!r} couples the learning rate to a policy's changes of B, and "
                             f"this trainer has {source}: leave lr_coupling='none'")
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
        if policy_noise_scale not in POLICY_NOISE_SCALES:
            raise ValueError(f"policy_noise_scale must be one of {POLICY_NOISE_SCALES}, got {policy_noise_scale!r}")
        if policy_noise_scale == "b_noise" and not (monitor_options or {}).get("hessian_every"):
            raise ValueError("policy_noise_scale='b_noise' needs the Hessian proxies: pass monitor_options="
                             "{'hessian_every': k} with k >= 1")
        self.policy_noise_scale = policy_noise_scale
        self.model, self.optimizer, self.dataset = model, optimizer, dataset
        self.schedule, self.policy, self.lr_coupling = schedule, policy, lr_coupling
        if schedule is not None and schedule.momentum_rule and "momentum" not in optimizer.param_groups[0]:
            raise ValueError(f"the schedule's momentum rule (momentum_rule=True) scales B by (1 - m_0)/(1 - m) with "
                             f"the momentum m in use, and {type(optimizer).__name__} has no 'momentum' setting: use "
                             "SGD with momentum, or momentum_rule=False")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if amp == "fp16" and self.device.type != "cuda":
            raise ValueError(f"amp='fp16' needs a CUDA device (GradScaler), got device {self.device}")
        self.amp = amp
        self.grad_scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        self.max_micro_batch = None if max_micro_batch is None else check_int(max_micro_batch, "max_micro_batch", 1)
        num_examples = _map_style_size(dataset)
        first_batch = self._check_largest_batch(batch_size, num_examples)
        self.monitor = AccumulatingNoiseScaleMonitor(  # the sampler draws each epoch without replacement
            model, loss_fn, **{"optimizer": optimizer, "population_size": num_examples, **(monitor_options or {})})
        self.monitor.equal_shares = True   # the sampler splits every batch into equal shares
        if policy_noise_scale == "b_noise" and self.monitor.adaptive_optimizer:
            warnings.warn(f"policy_noise_scale='b_noise' with {type(optimizer).__name__}, which adapts each "
                          "coordinate's step: B_noise is SGD's critical batch size (with AdamW it sat 24 to 225 times "
                          "below the one measured by branching: README); 'b_simple' is the one to follow",
                          UserWarning, stacklevel=2)
        if (policy is not None and self.monitor.process_group is None
                and (self.max_micro_batch is None or self.max_micro_batch >= policy.batch_size)
                and batch_statistics_path(self.model) is not None):
            # one micro-batch gives no estimate, a policy holds B on a NaN one: B would never move
            raise ValueError(
                "a model that normalises with batch statistics (BatchNorm in train mode) is measured from its "
                f"micro-batches, and the policy's batch of {policy.batch_size} would run as one "
                f"(max_micro_batch={self.max_micro_batch}): no step would give a noise scale and the policy would "
                f"hold B at {policy.batch_size} for the whole run; set max_micro_batch below "
                f"{policy.batch_size} (e.g. {max(1, policy.batch_size // 4)}), or put the BatchNorm layers in eval "
                "mode")
        self._whole_batch_loss = normalised_over_the_batch(loss_fn)
        group = self.monitor.process_group
        world_size, rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
        if policy is not None and policy.granularity % world_size:
            raise ValueError(f"policy.granularity={policy.granularity} must be a multiple of the world size "
                             f"{world_size}: every global batch is split into equal parts, one per rank")
        self.sampler = ResizableBatchSampler(num_examples, first_batch, seed=seed, num_replicas=world_size, rank=rank)
        self.base_learning_rates = [float(group["lr"]) for group in optimizer.param_groups]  # (a tensor lr by value)
        self.lr_factor = 1.0   # the schedule's eps / eps_0 or the coupling's factor, on the groups' rates at a step
        # B_0 of lr_coupling="adascale": the batch size the optimizer's learning rate is for (checkpointed)
        self.base_batch_size = policy.batch_size if policy is not None else None
        self.base_settings = [_settings_of(group) for group in optimizer.param_groups]  # as built (no scheduler yet)
        self.steps = 0
        self.skipped_steps = 0
        self._warned_skips: set[str] = set()   # the kinds of skipped step warned about ("data", "loss")
        self.seconds = 0.0
        self.progress = progress
        self._rows: list[dict[str, Any]] = []

    def _check_largest_batch(self, batch_size: int | None, num_examples: int) -> int:
        """The first batch size; the largest one any source can ask for must fit in the dataset."""
        if batch_size is not None:
            first = largest = check_int(batch_size, "batch_size", 1)
        elif self.policy is not None:
            first, largest = self.policy.batch_size, self.policy.max_batch_size
        else:
            epochs = [0.0, *self.schedule.milestones]
            momentum = self._schedule_momentum()
            first = self.schedule.at(0.0, momentum).batch_size
            largest = max(self.schedule.at(e, momentum).batch_size for e in epochs)
        if largest > num_examples:
            raise ValueError(f"the batch size can reach {largest} but the dataset has only {num_examples} examples; "
                             "lower batch_size or the schedule's / policy's max_batch_size (the commands' "
                             "--batch-size and --max-batch-size)")
        return first

    # ------------------------------------------------------------------ one step
    @property
    def epoch(self) -> float:
        """Fractional epoch: examples seen / dataset size."""
        return self.sampler.epoch

    def _learning_rates(self) -> list[float]:
        """The groups' learning rates as numbers (a tensor lr, as fused and capturable Adam take, read by value)."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def _set_learning_rates(self, rates: list[float]) -> None:
        """Set each group's learning rate; a tensor lr is filled in place and stays the optimizer's tensor."""
        for group, rate in zip(self.optimizer.param_groups, rates):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate

    @contextlib.contextmanager
    def _factor_applied(self) -> Iterator[None]:
        """The groups' learning rates times ``lr_factor`` inside the block (the optimizer step), put back as they
        were after it, by value (no rounding of a division)."""
        rates = self._learning_rates()
        if self.lr_factor != 1.0:
            self._set_learning_rates([rate * self.lr_factor for rate in rates])
        try:
            yield
        finally:
            if self.lr_factor != 1.0:
                self._set_learning_rates(rates)

    def _schedule_momentum(self) -> float | None:
        """The momentum in use (the first group's), for a schedule with Smith et al.'s momentum rule; else None."""
        return float(self.optimizer.param_groups[0]["momentum"]) if self.schedule.momentum_rule else None

    def _batch_size_for_step(self) -> int:
        """B for the coming step; a schedule also sets ``lr_factor`` to eps / eps_0."""
        if self.schedule is not None:
            momentum = self._schedule_momentum()
            batch_size, rate = self.schedule.at(self.epoch, momentum)
            if batch_size > self.sampler.num_examples:   # a scheduler moved the momentum (OneCycleLR cycles it)
                raise ValueError(f"the schedule's momentum rule asks for B = {batch_size} at momentum {momentum:g}, "
                                 f"more than the dataset's {self.sampler.num_examples} examples: give the schedule "
                                 f"a max_batch_size of at most {self.sampler.num_examples}")
            self.lr_factor = rate / self.schedule.base_learning_rate
            return batch_size
        if self.policy is not None:
            return self.policy.batch_size
        return self.sampler.batch_size

    def step(self) -> dict[str, Any]:
        """One optimizer step on the next batch; returns its history row. A step that raises (an error in the
        model or the loss, Ctrl-C) takes no batch: the sampler, the random stream and the learning rates are put
        back, p.grad is cleared and the monitor puts back its averages, so the next call draws the same batch and
        counts it once (before, the batch was lost from the epoch). From the optimizer step on, a Ctrl-C (SIGINT, in
        the main thread) is held until the step and its history row are complete, and raised then
        (``noisescale._interrupts``); an error raised by ``optimizer.step()`` itself, or a kill, still leaves the
        parameters moved and the batch taken with no history row: resume such a run from its last checkpoint."""
        started = time.perf_counter()
        sampler_state, rng_before, factor = self.sampler.state_dict(), rng_state(self.device), self.lr_factor
        statistics = RunningStatistics(self.model)   # put back on a failed, retried or skipped step
        try:
            batch_size = self._batch_size_for_step()
            self.sampler.set_batch_size(batch_size)
            local_batch_size = self.sampler.local_batch_size  # this rank's share (all of it on one process)
            self._check_whole_batch_loss(batch_size, local_batch_size, self.max_micro_batch)
            inputs, targets = to_device(fetch_examples(self.dataset, next(iter(self.sampler))), self.device)
            self._accumulate_with_retry(inputs, targets, local_batch_size, statistics)
            if self.lr_coupling == "adascale":   # the gain with this step's measurement in the averages
                self.lr_factor = self._adascale_factor(batch_size)
        except BaseException:
            self.sampler.load_state_dict(sampler_state)
            set_rng_state(rng_before, self.device)
            self.lr_factor = factor   # a schedule set the failed step's
            statistics.restore()
            self._clear_gradients()
            raise
        with deferred_interrupt():   # a Ctrl-C from here on comes after the step and its row
            finite = self.monitor.last_step_finite and (self.monitor.last_row["measured"] or every_gradient_finite(
                self.model, self.monitor.sharded, self.monitor.process_group))
            learning_rate = self._learning_rates()[0] * self.lr_factor
            if not finite:
                statistics.restore()
                self._skip_step(self.monitor.last_row)
            elif self.grad_scaler is not None:
                with self._factor_applied():
                    self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                with self._factor_applied():
                    self.optimizer.step()
            self._clear_gradients()
            if self.policy is not None and finite:  # a skipped step moves nothing: not B, lr nor the hold counter
                self._follow_policy(batch_size)
            self.steps += 1
            self.seconds += time.perf_counter() - started
            row = {**self.monitor.last_row, "epoch": self.epoch, "learning_rate": learning_rate,
                   "micro_batch_size": min(self.max_micro_batch or local_batch_size, local_batch_size),
                   "seconds": self.seconds, "skipped": not finite}
            self._rows.append(row)
        return row

    def _check_whole_batch_loss(self, batch_size: int, local_batch_size: int, max_micro_batch: int | None) -> None:
        """Refuse, before the batch is drawn, to split a batch whose loss is declared normalised over the whole
        batch (``losses.normalised_over_the_batch``): each part would be normalised by its own count."""
        if not self._whole_batch_loss:
            return
        parts = []
        if local_batch_size < batch_size:
            parts.append(f"over {batch_size // local_batch_size} ranks")
        if max_micro_batch is not None and local_batch_size > max_micro_batch:
            parts.append(f"into micro-batches of at most {max_micro_batch}")
        if parts:
            raise ValueError(_split_refusal(f"split {' and '.join(parts)}", batch_size))

    def _skip_step(self, row: dict[str, Any]) -> None:
        """A step whose loss or gradient is not finite changes nothing (as GradScaler skips it); under fp16 the
        loss scale backs off as GradScaler would. Counted in ``skipped_steps``; warned once for a batch that holds
        NaN or Inf (the monitor's ``row`` says so in ``nonfinite_data``: check the data), once where no step has
        been finite yet (the model or the loss, not the learning rate: ``nonfinite_from_start``) and once for any
        other (if it keeps happening the run has diverged)."""
        self.skipped_steps += 1
        if self.grad_scaler is not None:
            self.grad_scaler.update(self.grad_scaler.get_scale() * self.grad_scaler.get_backoff_factor())
        examples = row.get("nonfinite_examples")
        cause = "the loss or gradient is not finite" + (f" ({examples})" if examples is not None else "")
        if row.get("nonfinite_data") is not None:
            key, cause = "data", f"the batch holds {row['nonfinite_data']}"
            advice = "Check the data (remove or fix those values): the learning rate is not the cause"
        elif nonfinite_from_start([*self._rows, row]) is not None:   # (this step's row is not in the history yet)
            key, advice = "start", ("No step has been finite yet: the model or the loss computes a non-finite value "
                                    "on this data, not the learning rate (the monitor's summary says more)")
        else:
            key, advice = "loss", "If it keeps happening the run has diverged: lower the learning rate"
        if key not in self._warned_skips:
            self._warned_skips.add(key)
            warnings.warn(f"step {self.steps}: {cause}; the optimizer step is skipped (as GradScaler does) and its "
                          "history row is marked skipped; trainer.skipped_steps counts such steps (warned once). "
                          f"{advice}", RuntimeWarning, stacklevel=3)

    def _clear_gradients(self) -> None:
        """p.grad of every parameter set to None: the optimizer's, and the model's trainable parameters it does not
        step (an optimizer over a fine-tuned head alone), whose gradients would otherwise add up over steps into
        the |G|^2 the monitor reads from the accumulated p.grad."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def _accumulate_with_retry(self, inputs: Any, targets: Any, batch_size: int,
                               statistics: RunningStatistics) -> torch.Tensor:
        """Accumulate the batch's gradient; on out-of-memory halve max_micro_batch and run the step again, from the
        BatchNorm running statistics the step started with."""
        self._clear_gradients()
        rng_at_start = rng_state(self.device)
        while True:
            sizes = split_micro_batches(batch_size, self.max_micro_batch or batch_size)
            micro_batches = list(zip(split_examples(inputs, sizes), split_examples(targets, sizes)))
            scale = loss_scale_of(self.grad_scaler, self.device)
            try:
                with self._autocast():
                    return self.monitor.accumulate(micro_batches, loss_scale=scale)
            except Exception as error:
                if not is_out_of_memory(error) or max(sizes) == 1 or self.monitor.process_group is not None:
                    raise  # under DDP the other ranks are already waiting in this step's all-reduce
                self._check_whole_batch_loss(batch_size, batch_size, max(1, max(sizes) // 2))
                self.max_micro_batch = max(1, max(sizes) // 2)
                warnings.warn(f"step {self.steps}: out of memory with micro-batches of {max(sizes)}; retrying the "
                              f"step with max_micro_batch={self.max_micro_batch}", RuntimeWarning, stacklevel=3)
                del micro_batches, error
                self._clear_gradients()
                set_rng_state(rng_at_start, self.device)
                statistics.restore()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _autocast(self):
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _follow_policy(self, batch_size: int) -> None:
        """Feed the policy the smoothed B_simple or B_noise; couple the learning rates when it changes B."""
        average = self.monitor.average
        if self.policy_noise_scale == "b_noise":
            followed = self.monitor.hessian_average
            noise_scale = followed.ratio if followed.num_updates else math.nan
        else:
            noise_scale = average.b_simple if average.num_updates else math.nan
        new_batch_size = self.policy.step(noise_scale)
        if self.monitor.process_group is not None:  # every rank adopts rank 0's policy state: one decision
            state = torch.tensor(astuple(self.policy.state), dtype=torch.int64, device=self.device)
            decided = broadcast_from_first_rank(state, self.monitor.process_group).tolist()
            self.policy.state = NoiseScalePolicyState(*decided)
            new_batch_size = self.policy.batch_size
        if new_batch_size != batch_size and self.lr_coupling != "adascale":   # adascale's: at every step
            self.lr_factor = couple_learning_rate(self.lr_factor, batch_size, new_batch_size, self.lr_coupling)

    def _adascale_factor(self, batch_size: int) -> float:
        """AdaScale's gain r_t = (sigma^2 + mu^2) / (sigma^2 / S + mu^2) of the step's S = B / B_0 (Johnson et al.
        2020; fairscale's ``AdaScale.gain``), with sigma^2 = tr(Sigma) / B_0 the variance of a B_0 batch's gradient
        and mu^2 = |G|^2, both the monitor's moving averages (``trace_sigma_ema``, ``grad_sqnorm_ema`` of the
        history) after this step's measurement, as fairscale reads its averages after the backward pass. Recomputed
        at every step, so it depends on B and the averages of the step, not on the path B took. Unresolved
        estimates, as fairscale clips them: an averaged |G|^2 <= 0 gives the upper bound r = S (all noise); an
        averaged tr(Sigma) <= 0 the lower bound r = 1. No average yet (no measured step had a finite estimate), a
        non-finite one, or both exactly 0 (every per-example gradient 0: the gain is 0/0, not the bound S): the
        factor in use is kept (1 at the start, where fairscale's initial state also gives r = 1)."""
        average = self.monitor.average
        trace_sigma, grad_sqnorm = average.trace_sigma, average.grad_sqnorm
        if not (average.num_updates and math.isfinite(trace_sigma) and math.isfinite(grad_sqnorm)) or (
                trace_sigma == 0 and grad_sqnorm == 0):
            return self.lr_factor
        scale = batch_size / self.base_batch_size
        if grad_sqnorm <= 0:
            return scale
        return adascale_gain(trace_sigma / self.base_batch_size, grad_sqnorm, scale)

    # ------------------------------------------------------------------ loops and results
    def train(self, epochs: float, *, callback: Callable[[AdaptiveTrainer], None] | None = None) -> pd.DataFrame:
        """Take steps until ``epochs`` epochs in total have been seen (a resumed run continues to the same
        total); ``callback(trainer)`` after every completed epoch. Returns the history."""
        epochs = check_real(epochs, "epochs")
        if not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
        total = len(self.dataset)
        with tqdm(total=round(epochs * total), initial=min(self.sampler.examples_seen, round(epochs * total)),
                  unit="ex", desc="train", disable=not self.progress) as bar:
            while self.epoch < epochs:
                completed = int(self.epoch)
                row = self.step()
                bar.update(min(row["batch_size"], bar.total - bar.n))
                bar.set_postfix(B=row["batch_size"], lr=f"{row['learning_rate']:.3g}", loss=f"{row['loss']:.3f}")
                if callback is not None and int(self.epoch) > completed:
                    callback(self)
        return self.history

    @property
    def history(self) -> pd.DataFrame:
        """One row per optimizer step: step, epoch, examples_seen, batch_size, micro_batches, micro_batch_size,
        learning_rate (used by the step), loss, seconds (training wall-clock so far), skipped (True where the loss
        or gradient was not finite and no optimizer step was taken), and the monitor's columns
        (b_simple, trace_sigma, grad_sqnorm, ..., b_simple_two_batch when micro-batches were used)."""
        return pd.DataFrame(self._rows)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue identically: tensors and plain Python types only (the
        history rows as dicts of numbers and strings), so that it loads with ``torch.load(..., weights_only=True)``
        (:func:`noisescale.checkpoints.save_checkpoint` and :func:`~noisescale.checkpoints.load_checkpoint`)."""
        model_state, optimizer_state = _model_and_optimizer_state(self.model, self.optimizer, self.monitor.sharded)
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "sampler": self.sampler.state_dict(),
            "policy": self.policy.state_dict() if self.policy is not None else None,
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "monitor": self.monitor.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "base_learning_rates": list(self.base_learning_rates),
            "lr_factor": self.lr_factor,
            "base_batch_size": self.base_batch_size,
            "base_settings": self.base_settings,
            "max_micro_batch": self.max_micro_batch,
            "settings": self._settings(),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "seconds": self.seconds,
            "history": [to_plain(row) for row in self._rows],
            "rng": rng_state(self.device),
        }

    def _settings(self) -> dict[str, Any]:
        """The trainer's settings that a resumed run must share with the checkpoint to continue it exactly."""
        return {"lr_coupling": self.lr_coupling, "policy_noise_scale": self.policy_noise_scale,
                "measure_every": self.monitor.measure_every, "hessian_every": self.monitor.hessian_every}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; the trainer must be built with the same kind of batch-size source and
        the same ``lr_coupling``, ``policy_noise_scale``, ``measure_every`` and ``hessian_every`` (a checkpoint of
        an earlier version, without them, is not checked for those).
        A ``max_micro_batch`` given to this trainer is kept (a smaller GPU: micro-batches change the step only in
        the last bits); without one it is the checkpoint's (which an out-of-memory error may have halved). The
        learning rates and other optimizer settings are the checkpoint's (its optimizer state and base rates),
        with a warning that names each one this trainer's optimizer had differently."""
        for name in ("policy", "schedule"):
            if (state[name] is None) != (getattr(self, name) is None):
                raise ValueError(f"the checkpoint was saved {'with' if state[name] is not None else 'without'} a "
                                 f"{name}, this trainer has {'one' if getattr(self, name) is not None else 'none'}")
        if self.schedule is not None and state["schedule"] != self.schedule.state_dict():
            raise ValueError(f"the checkpoint's schedule {state['schedule']} differs from this trainer's "
                             f"{self.schedule.state_dict()}")
        saved, settings = state.get("settings", {}), self._settings()   # (absent in earlier versions' checkpoints)
        differing = [f"{name}={saved[name]!r} there, {settings[name]!r} here" for name in settings
                     if name in saved and saved[name] != settings[name]]
        if differing:
            raise ValueError(f"the checkpoint was saved with other settings: {'; '.join(differing)}")
        changes = _changed_settings(self.base_learning_rates, self.base_settings, state)
        if changes:
            warnings.warn(f"resuming with the checkpoint's optimizer settings, not this trainer's: "
                          f"{'; '.join(changes)}. An exact resume continues the checkpointed run; to change them, "
                          "start a new run (in your own code you may also set optimizer.param_groups after "
                          "load_state_dict)", UserWarning, stacklevel=2)
        model_state = copy.copy(state["model"])  # keeps the state dict's version metadata; the caller's is untouched
        for prefix in ("_orig_mod.", "module.", "_orig_mod."):   # checkpoints of earlier versions: the names under
            consume_prefix_in_state_dict_if_present(model_state, prefix)   # DDP and torch.compile, either order
        # the parts that check the checkpoint against this trainer (the sampler's seed and size, the policy's
        # settings) first, and put back if anything fails, so that a refused checkpoint leaves the trainer as it was
        # (it loaded the model and the optimizer first, then refused another seed's sampler)
        parts = [(self.policy, state["policy"])] if self.policy is not None else []
        parts += [(self.sampler, state["sampler"]), (self.monitor, state["monitor"])]
        parts += [(self.grad_scaler, state["grad_scaler"])] if (
            self.grad_scaler is not None and state["grad_scaler"] is not None) else []
        before = [(part, copy.deepcopy(part.state_dict())) for part, _ in parts]
        try:
            for part, values in parts:
                if part is self.sampler and self.policy is not None and values["batch_size"] % part.num_replicas:
                    # saved on another number of processes: the last batch cannot be split over these; the next
                    # step's is the policy's, which it rounded to a multiple of them
                    values = {**values, "batch_size": self.policy.batch_size}
                part.load_state_dict(values)
            _load_model_and_optimizer(self.model, self.optimizer, model_state, state["optimizer"],
                                      self.monitor.sharded)
        except BaseException:
            for part, values in before:
                part.load_state_dict(values)
            raise
        self.base_learning_rates = list(state["base_learning_rates"])
        if "lr_factor" in state:
            self.lr_factor = float(state["lr_factor"])
        else:   # earlier versions set the factor into the groups' rates: a policy's stays there, factor 1
            self.lr_factor = 1.0
            if self.schedule is not None:   # a schedule's is set again at each step, on the base rates
                self._set_learning_rates(self.base_learning_rates)
        if state.get("base_batch_size") is not None:   # absent in checkpoints of earlier versions
            self.base_batch_size = int(state["base_batch_size"])
        if self.max_micro_batch is None:
            self.max_micro_batch = state["max_micro_batch"]
        self.steps = int(state["steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))  # absent in checkpoints of earlier versions
        self.seconds = float(state["seconds"])
        self._rows = list(state["history"])
        set_rng_state(state["rng"], self.device)

    def close(self) -> None:
        """Remove the monitor's hooks from the model."""
        self.monitor.close()

    def __enter__(self) -> AdaptiveTrainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _map_style_size(dataset: Any) -> int:
    """len(dataset), where it is a map-style dataset the trainer can draw batches of any size from; a TypeError
    naming what to pass instead for a DataLoader, an iterable dataset or anything without len and indexing."""
    if isinstance(dataset, DataLoader):
        raise TypeError("dataset is a DataLoader: AdaptiveTrainer draws its own batches, whose size changes, from "
                        "a map-style dataset; pass loader.dataset (items are stacked as they are, without the "
                        "loader's collate_fn)")
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"dataset must be map-style, len(dataset) and dataset[i] -> (inputs, targets), so that "
                        f"batches of any size can be drawn from it; got a {type(dataset).__name__}. Load an iterable "
                        "or streamed dataset into memory, or into a Dataset whose __getitem__ reads example i")
    return len(dataset)


def _settings_of(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's hyperparameters other than the learning rate (momentum, betas, weight decay, ...)."""
    return {key: value.detach().clone() if isinstance(value, torch.Tensor) else value
            for key, value in group.items() if key not in ("params", "lr", "initial_lr")}


def _changed_settings(base_learning_rates: list[Any], base_settings: list[dict[str, Any]],
                      state: dict[str, Any]) -> list[str]:
    """What a checkpoint's optimizer settings change in this trainer's, as "group 0: lr 0.1 (this trainer: 0.05)":
    the learning rates and other hyperparameters of each group as both trainers' optimizers were built (a scheduler
    that moves momentum or betas during the run moves neither); checkpoints of earlier versions: the rates only."""
    saved_rates, saved_settings = state["base_learning_rates"], state.get("base_settings", [])
    if len(saved_rates) != len(base_learning_rates):
        return [f"{len(saved_rates)} parameter groups (this trainer: {len(base_learning_rates)})"]
    changes = [f"group {index}: lr {_shown(saved)} (this trainer: {_shown(given)})"
               for index, (saved, given) in enumerate(zip(saved_rates, base_learning_rates)) if _differs(saved, given)]
    for index, (saved, given) in enumerate(zip(saved_settings, base_settings)):
        changes += [f"group {index}: {key} {_shown(saved[key])} (this trainer: {_shown(given[key])})"
                    for key in sorted(given) if key in saved and _differs(saved[key], given[key])]
    return changes


def _differs(saved: Any, given: Any) -> bool:
    """Whether two hyperparameter values differ; a checkpoint may hold a tuple as a list, a number as a tensor."""
    if isinstance(saved, (list, tuple)) and isinstance(given, (list, tuple)):
        return len(saved) != len(given) or any(map(_differs, saved, given))
    if isinstance(saved, torch.Tensor) or isinstance(given, torch.Tensor):
        return not torch.equal(torch.as_tensor(saved).cpu().double(), torch.as_tensor(given).cpu().double())
    return saved != given


def _shown(value: Any) -> str:
    """A hyperparameter as a person reads it: 6 significant digits (a float32 tensor lr 0.01, not 0.00999999977)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (list, tuple)):
        return f"({', '.join(map(_shown, value))})"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _model_and_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                               sharded: bool) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts, without DDP's ``module.`` prefix. Under FSDP the full
    (unsharded) ones on every rank, through torch.distributed.checkpoint.state_dict: parameter names without
    FSDP's or the activation-checkpoint wrappers' prefixes, the optimizer's state keyed by those names, so a
    checkpoint resumes on any world size (and its model state loads into an unsharded model)."""
    if not sharded:
        return unwrapped_module(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def _load_model_and_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                              optimizer_state: dict, sharded: bool) -> None:
    """Load the states of :func:`_model_and_optimizer_state`. One saved under FSDP (the optimizer's state keyed
    by parameter names) loads through torch.distributed.checkpoint.state_dict into an FSDP model on any world size
    (every rank reads its own full copy and keeps its shards) or into an unsharded one; one saved without FSDP
    (keyed by parameter index) loads without FSDP only."""
    groups = optimizer_state.get("param_groups") or [{"params": []}]
    keyed_by_name = any(isinstance(name, str) for group in groups for name in group["params"])
    if not (sharded or keyed_by_name):
        unwrapped_module(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    if not keyed_by_name:
        raise ValueError("this checkpoint was saved without FSDP (its optimizer state is keyed by parameter index): "
                         "resume it without FSDP, or under FSDP from a checkpoint saved under FSDP")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------- named batch-size sources

TRAIN_MODES = ("fixed", "lr-decay", "batch-increase", "hybrid", "noise-adaptive")

def make_batch_size_source(
    mode: str,
    *,
    epochs: float,
    batch_size: int,
    max_batch_size: int,
    learning_rate: float,
    milestones: list[float] | None = None,
    decay_factor: float = 0.2,
    kappa: float = 1.0,
    hold_steps: int = 10,
    granularity: int = 1,
) -> dict[str, Any]:
    """``{"schedule": BatchSizeSchedule}`` or ``{"policy": NoiseScaleBatchPolicy}`` for a TRAIN_MODES name.

    Default milestones: 30 %, 55 % and 80 % of the epochs with decay_factor 0.2 (factor-5 stages as in the
    MNIST replication of Smith et al., seed 004). noise-adaptive grows B to kappa * B_simple, at most doubling
    every ``hold_steps`` steps, between ``batch_size`` and ``max_batch_size``, in multiples of ``granularity``
    (the world size under DDP).
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"mode must be one of {TRAIN_MODES}, got {mode!r}")
    if mode == "noise-adaptive":
        return {"policy": NoiseScaleBatchPolicy(batch_size, min_batch_size=batch_size, max_batch_size=max_batch_size,
                                                kappa=kappa, hold_steps=hold_steps, granularity=granularity)}
    if milestones is None:
        milestones = [round(epochs * share, 3) for share in (0.3, 0.55, 0.8)]
    return {"schedule": BatchSizeSchedule(mode, base_learning_rate=learning_rate, base_batch_size=batch_size,
                                          milestones=[] if mode == "fixed" else milestones,
                                          decay_factor=decay_factor, max_batch_size=max_batch_size)}


def _split_refusal(how: str, batch_size: int, found: bool = False, across: bool = False) -> str:
    seen = ("the losses of examples from different micro-batches, computed together, differ from their losses alone"
            if across else "a micro-batch's losses differ when its examples are computed alone, or move when another "
            "example's label tokens are ignored" if found else
            "sequence_cross_entropy with weighting='token'")
    return (f"the loss normalises each example's loss by a count over the whole batch it is given ({seen}: a "
            f"token mean), and the batch of {batch_size} would be {how}: each part would be normalised by its own "
            "count, and the step would not be the batch's. Use a loss of each example alone (sequence_cross_entropy's "
            "weighting='example'; a loss of your own: each sequence's mean over its own tokens), or do not split the "
            "batch (one micro-batch; AdaptiveTrainer: one process and max_micro_batch=None). A loss of each example "
            "alone taken for a token mean here can say so: loss_fn.normalised_over_the_batch = False")


def _unchecked_split(how: str) -> str:
    return (f"accumulate could not check whether loss_fn normalises each example's loss by a count over the batch it "
            f"is given (a token mean, as HuggingFace's num_items_in_batch) for a step {how}: the examples of its "
            "parts could not be put together (outputs that differ in shape beyond dim 0, as sequences padded to "
            "each micro-batch's own length do, fewer than 3 examples in all or on a rank, or a loss that cannot be "
            "computed on parts of a batch). If it does, each part is normalised by its own count and the step is "
            "not the batch's. Declare it: loss_fn.normalised_over_the_batch = True has such a split refused; False "
            "(each example's loss is its own) silences this warning")


def _end_examples(outputs: Any, targets: Any, size: int, others: bool) -> tuple[list[Any], list[bool], Any, int]:
    """A micro-batch's part of the probe across micro-batches, flattened: the leaves of (outputs, targets), of each
    tensor that holds the examples in dim 0 (``coupling.holds_examples``) the rows of its first and last examples,
    the other leaves (a scalar auxiliary loss, router logits of every token) only where ``others`` (the first
    micro-batch's, which the probe takes); which leaves hold examples; the tree's structure; the number taken."""
    ends = [0, size - 1] if size > 1 else [0]
    leaves, structure = tree_flatten((outputs, targets))
    rows = [isinstance(leaf, torch.Tensor) and holds_examples(leaf, size) for leaf in leaves]
    picked = [leaf[ends] if held else leaf if others else None for leaf, held in zip(leaves, rows)]
    return picked, rows, structure, len(ends)


def _joined_examples(parts: list[tuple[list[Any], list[bool], Any, int]]) -> tuple[Any, Any, int] | None:
    """The micro-batches' end examples put together (outputs, targets, number), the other leaves the first
    micro-batch's; None where the micro-batches' outputs differ in structure or in shape beyond dim 0 (sequences
    padded to each micro-batch's own length)."""
    _, rows, structure, _ = parts[0]
    if any(part[1] != rows or part[2] != structure for part in parts):
        return None
    try:
        leaves = [torch.cat(column) if held else column[0]
                  for column, held in zip(zip(*(part[0] for part in parts)), rows)]
    except RuntimeError:
        return None
    outputs, targets = tree_unflatten(leaves, structure)
    return outputs, targets, sum(part[3] for part in parts)
