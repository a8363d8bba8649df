"""The gradient noise scale of DistributedDataParallel training, read from DDP's own gradient all-reduce.

Two-batch estimator across ranks (McCandlish et al. 2018, appendix A; :mod:`noisescale.estimators`). With R
ranks that each hold a local batch of b examples (micro-batch x accumulation steps on that rank), DDP's
all-reduce turns the R local mean gradients g_r into their mean g_big, the mean gradient of the global batch
of R b examples. Both are already in hand during a DDP step, so

    B_small = b,      |g_small|^2 = (1/R) sum_r |g_r|^2      (the mean over ranks lowers the variance),
    B_big   = R b,    |g_big|^2   = |all-reduced gradient|^2,

and ``two_batch_noise_scale`` turns them into unbiased |G|^2 and tr(Sigma). Both norms are taken on the same
parameters in the same step, unlike the consecutive-step estimator of gpt-neox, whose two measurements straddle
an optimizer step.

How: :class:`DDPNoiseScale` registers a DDP communication hook that wraps a reducing hook (default
:func:`mean_allreduce_hook`, DDP's own scale-then-sum all-reduce written as a hook). For every gradient bucket
it takes the squared norm of the bucket buffer before the all-reduce (this rank's local gradient; under
``no_sync()`` accumulation the buffer is filled on the synchronising backward with the accumulated local
gradient) and, in the future's callback, that of the all-reduced (averaged) bucket: one read of each bucket, no
copy. Summing over buckets gives |g_r|^2 and |g_big|^2. The ranks' |g_r|^2 must be summed too: the hook of the
last bucket (``GradBucket.is_last()``) appends the buckets' local squared norms and a flag that this rank's local
batch size changed to that bucket's own all-reduce, so the default costs no extra collective (on gloo, one more
all-reduce of a few numbers costs about as much CPU as the whole Python hook). It writes the scaled bucket into a
buffer of its own, longer by these numbers, kept from step to step: the scaling by 1/R that the in-place
reduction does anyway, so the append costs no extra pass over the bucket and no allocation. A wrapped hook of
your own, or a half-precision bucket, gets one extra asynchronous all-reduce of the numbers in float64. When the
flags sum to more than zero, every rank runs one more all-reduce of (b, b^2) to check that the local batch sizes
agree. |g_big|^2 is computed on every rank from the same all-reduced bytes. Every rank therefore decides from
identical numbers whether the step is finite (a NaN on one rank reaches all of them through the all-reduce) and
records the same estimate. The hook's all-reduces are asked of the process group directly, as DDP's C++ reducer
does. ``step_estimate`` reads the numbers with one ``tolist`` each and does the arithmetic of the estimate and
the moving average; the history's rows and their intervals (a Student-t quantile per row) are built when
``history`` or ``state_dict`` is read.

The hook leaves the gradients as the wrapped hook makes them. With the default they equal DDP without a hook: bit
for bit in the tests (3 gloo ranks with tiny buckets, float32; the float64 runs equal a one-process reference to
rtol 1e-10), since the bucket is scaled by 1/R as DDP does it (PyTorch's ``allreduce_hook`` divides by R instead,
which differs in the last bit when R is not a power of two). For R > 2 a backend that splits the lengthened last
bucket into different chunks adds an element's R terms in another order, a last-bit difference: gloo does with 3
ranks and DDP's default buckets (a survey, session 25: 19 of 20 steps differed, by up to 1.4e-17 in float64 and
7.5e-9 in float32); two ranks add in one order only.

The gradients must be the mean over the local batch (divide each micro-batch loss by the number of
accumulation steps); with AMP, pass the loss scale as ``grad_scale`` so the squared norms are unscaled.

Batches drawn without replacement (a ``DistributedSampler``: the ranks' shards of one permutation, so the global
batch holds no example twice) read |G|^2 low by tr(Sigma)/(N - 1), B_simple/N of it, and tr(Sigma) high by
N/(N - 1) (exact by enumeration). ``population_size=N`` corrects both as
:func:`~noisescale.estimators.micro_batch_noise_scale` does with ``population=N``; a global batch larger than N (a
sampler padding a small dataset) takes no correction, with a warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from noisescale._checks import check_int
from noisescale._wrappers import ddp_of, unwrapped_module
from noisescale.estimators import (
    ExponentialMovingNoiseScale,
    NoiseScaleEstimate,
    _finite_population,
    _two_batch_estimate,
    population_smaller_than_batch,
    two_batch_noise_scale,
)
from noisescale.hessian import HessianNoiseScale, mean_hessian_proxies

__all__ = [
    "DDPNoiseScale",
    "mean_allreduce_hook",
    "combine_per_example_sums",
    "all_reduce_per_example_sums",
    "all_reduce_hessian_proxies",
    "all_gather_concat",
    "broadcast_from_first_rank",
    "unwrapped_module",
]

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future]


def _squared_norm(bucket: torch.Tensor) -> torch.Tensor:
    """|bucket|^2 of a flat bucket as a scalar on its device, in one read without a copy. A float32 or float64
    bucket uses the BLAS dot product: on CPU faster than ``vector_norm`` and more accurate (1e-5 against 3e-5
    relative error in float32 over 670k entries); a half-precision one accumulates in float32."""
    if bucket.dtype in (torch.float32, torch.float64):
        return torch.dot(bucket, bucket)
    return torch.linalg.vector_norm(bucket, dtype=torch.float32).square()


def mean_allreduce_hook(process_group: dist.ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future:
    """DDP's built-in reduction as a Python hook: multiply the bucket by 1/R, then all-reduce by sum.

    PyTorch's ``allreduce_hook`` divides by R instead; x * (1/R) and x / R differ in the last bit when R is not a
    power of two, and DDP without a hook multiplies (while copying the gradients into the bucket). This hook
    keeps the gradients bit-identical to DDP without a hook for every world size.
    """
    return _mean_all_reduce(bucket.buffer(), process_group).then(_first_value)


mean_allreduce_hook.__annotations__ = {}  # DDP checks annotations and rejects the strings of __future__.annotations


def _first_value(future: torch.futures.Future) -> torch.Tensor:
    return future.value()[0]


def _mean_all_reduce(buffer: torch.Tensor, group: dist.ProcessGroup | None,
                     out: torch.Tensor | None = None) -> torch.futures.Future:
    """DDP's arithmetic on ``buffer``: times 1/R (in place, or written into the start of ``out``, whose further
    entries ride along unscaled), then an async all-reduce by sum. The future's value is [reduced tensor].

    The all-reduce is asked of the process group itself, as DDP's C++ reducer does: ``dist.all_reduce``'s checks
    in Python cost tens of microseconds per bucket on a CPU step of a few milliseconds."""
    group = dist.group.WORLD if group is None else group
    scale = 1.0 / group.size()
    if out is None:
        out = buffer.mul_(scale)
    else:
        torch.mul(buffer, scale, out=out[:buffer.numel()])
    return group.allreduce([out]).get_future()


def _world_size(group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group (torchrun sets "
            "the environment for it) before building the DistributedDataParallel model"
        )
    return dist.get_world_size(group)


class DDPNoiseScale:
    """B_simple of a DistributedDataParallel model from local vs all-reduced gradients (module docstring).

    Usage, after ``init_process_group`` and before the first backward::

        model = DistributedDataParallel(net)
        noise = DDPNoiseScale(model, local_batch_size=micro_batch * accumulation_steps)
        for step in ...:
            for k, (x, y) in enumerate(micro_batches):
                context = model.no_sync() if k < accumulation_steps - 1 else contextlib.nullcontext()
                with context:
                    (loss_fn(model(x), y) / accumulation_steps).backward()
            noise.step_estimate()          # on every rank, after each synchronising backward
            optimizer.step(); optimizer.zero_grad()
        noise.average.b_simple, noise.history

    Args:
        ddp_model: the DistributedDataParallel model; its communication hook slot must still be free.
        local_batch_size: examples per rank per optimizer step (micro-batch x accumulation steps).
        ema_decay: decay of the exponential moving averages of tr(Sigma) and |G|^2 (one update per measurement).
        measure_every: measure every k-th optimizer step; on the others the hook only calls ``wrapped_hook``
            and ``step_estimate()`` returns None, so the norms (and the extra all-reduce of a wrapped hook) cost
            1/k per step.
        wrapped_hook: the communication hook that does the actual reduction and returns the averaged bucket
            (default :func:`mean_allreduce_hook`, DDP's own arithmetic; PyTorch's ``allreduce_hook`` or
            ``fp16_compress_hook`` work too).
        population_size: N, where the global batch is drawn without replacement from a dataset of N examples (a
            shuffled ``DistributedSampler``, ``len(sampler.dataset)``; an unshuffled one is a draw only where the
            stored order is random): |G|^2 and tr(Sigma) are then corrected to be unbiased for that dataset (module
            docstring; without it |G|^2 reads low by B_simple/N of itself). None (default): batches taken as
            i.i.d. draws, no correction.

    Raises:
        TypeError: ``ddp_model`` is not a DistributedDataParallel.
        RuntimeError: torch.distributed is not initialised.
        ValueError: world size 1 (no second batch size to compare with).
    """

    def __init__(
        self,
        ddp_model: DistributedDataParallel,
        local_batch_size: int,
        *,
        ema_decay: float = 0.95,
        measure_every: int = 1,
        wrapped_hook: CommHook = mean_allreduce_hook,
        population_size: int | None = None,
    ) -> None:
        ddp = ddp_of(ddp_model)   # also inside torch.compile(DDP(model)), as accelerate builds it
        if ddp is None:
            raise TypeError(
                f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp_model).__name__}"
            )
        ddp_model = ddp
        self.population_size = None if population_size is None else check_int(population_size, "population_size", 2)
        self._warned_population = False
        self.process_group = ddp_model.process_group
        self.world_size = _world_size(self.process_group)
        if self.world_size < 2:
            raise ValueError(
                "world size is 1: local and all-reduced gradients coincide, so there is no second batch size. "
                "On one process the two-batch estimate needs gradient accumulation: pass the K micro-batch "
                "squared norms and the accumulated gradient's squared norm to "
                "noisescale.estimators.two_batch_noise_scale, or use NoiseScaleMonitor"
            )
        self.local_batch_size = local_batch_size
        self.measure_every = check_int(measure_every, "measure_every", 1)
        self.average = ExponentialMovingNoiseScale(ema_decay)
        self.step = 0
        self._wrapped_hook = wrapped_hook
        # per-bucket squared norms of this step; lists, because the reduced ones are added by future callbacks
        # that may run on several communication threads at once (list.append is atomic, a += is not)
        self._local_sqnorms: list[torch.Tensor] = []
        self._global_sqnorms: list[torch.Tensor] = []
        # (totals future, the all-reduced totals: the buckets' local squared norms and the flag, local batch size)
        self._pending: tuple[torch.futures.Future, torch.Tensor, int] | None = None
        self._last_bucket: torch.Tensor | None = None  # the scaled last bucket and the totals, reused
        self._flag_values: tuple[torch.Tensor, torch.Tensor] | None = None  # 0-d 0 and 1 for the changed flag
        self._agreed_batch_size: int | None = None  # the local batch size all ranks were last checked to share
        self._unread_backwards = 0
        self._rows: list[dict[str, Any]] = []
        # per measured step until history or state_dict is read: (step, batch, local and global squared norm,
        # estimate, skipped, the average's state after it); the rows, B_simple and intervals are built then
        self._records: list[tuple] = []
        ddp_model.register_comm_hook(self.process_group, self._hook)

    @property
    def local_batch_size(self) -> int:
        """Examples per rank per optimizer step; set it before the synchronising backward when it changes."""
        return self._local_batch_size

    @local_batch_size.setter
    def local_batch_size(self, value: int) -> None:
        self._local_batch_size = check_int(value, "local_batch_size", 1)

    # ------------------------------------------------------------------ the hook (runs inside DDP's backward)
    def _hook(self, state, bucket):  # unannotated: DDP rejects the string annotations of __future__.annotations
        """Communication hook: keep |local bucket|^2, reduce the bucket, keep |reduced bucket|^2 when done.

        The last bucket's hook also reduces this step's totals (every bucket's local squared norm and a flag for
        a changed local batch size): inside that bucket's own all-reduce when the reduction is the default
        :func:`mean_allreduce_hook` on a float32/float64 bucket, else in one extra all-reduce in float64.
        """
        measuring = (self.step + self._unread_backwards) % self.measure_every == 0
        last = bucket.is_last()
        if last:
            self._unread_backwards += 1
        if not measuring:
            return self._wrapped_hook(state, bucket)
        buffer = bucket.buffer()
        self._local_sqnorms.append(_squared_norm(buffer))  # before the reduction averages the buffer in place
        if self._wrapped_hook is mean_allreduce_hook and buffer.dtype in (torch.float32, torch.float64):
            return self._mean_allreduce(buffer, last)
        if last:
            totals = torch.stack(self._totals()).double()
            future = dist.all_reduce(totals, group=self.process_group, async_op=True).get_future()
            self._pending = (future, totals, self._local_batch_size)
        return self._wrapped_hook(state, bucket).then(lambda done: self._record_global_sqnorm(done.value()))

    def _totals(self) -> list[torch.Tensor]:
        """This step's totals as 0-d tensors: every bucket's local squared norm (all hooks have run when the last
        bucket's hook calls this), then a flag, 1 if this rank's local batch size changed since the last check."""
        local, self._local_sqnorms = self._local_sqnorms, []
        flags = self._flag_values
        if flags is None or (flags[0].dtype, flags[0].device) != (local[0].dtype, local[0].device):
            flags = self._flag_values = (local[0].new_zeros(()), local[0].new_ones(()))
        return local + [flags[self._local_batch_size != self._agreed_batch_size]]

    def _mean_allreduce(self, buffer: torch.Tensor, last: bool) -> torch.futures.Future:
        """:func:`mean_allreduce_hook` whose one callback also keeps |averaged bucket|^2. On the last bucket the
        totals ride along: the bucket, scaled by 1/R, is written into a buffer longer by the totals and kept from
        step to step (the scaling the in-place reduction does anyway, so no extra pass and no allocation), and
        the totals follow it unscaled in the bucket's dtype, written by one ``stack`` (float32 for float32
        gradients: each bucket's local squared norm is summed over ranks in float32, about 1e-7 relative). The
        future's value is the averaged bucket (a view DDP copies out)."""
        if not last:
            return _mean_all_reduce(buffer, self.process_group).then(
                lambda done: self._record_global_sqnorm(done.value()[0]))
        totals = self._totals()
        size = buffer.numel()
        padded = self._last_bucket
        if padded is None or (padded.numel(), padded.dtype, padded.device) != (
                size + len(totals), buffer.dtype, buffer.device):
            padded = self._last_bucket = buffer.new_empty(size + len(totals))  # DDP rebuilds its buckets once
        tail = torch.stack(totals, out=padded[size:])
        future = _mean_all_reduce(buffer, self.process_group, out=padded)
        self._pending = (future, tail, self._local_batch_size)
        return future.then(lambda done: self._record_global_sqnorm(done.value()[0][:size]))

    def _record_global_sqnorm(self, reduced: torch.Tensor) -> torch.Tensor:
        """Future callback: keep |all-reduced bucket|^2 for the step's global squared norm; returns the bucket."""
        self._global_sqnorms.append(_squared_norm(reduced))
        return reduced

    def _check_batch_sizes_agree(self, batch: int, device: torch.device) -> None:
        """One float64 all-reduce of (b, b^2), run by every rank when any rank's local batch size changed:
        zero variance over ranks <=> every rank has the same local batch size."""
        moments = torch.tensor([batch, batch * batch], dtype=torch.float64, device=device)
        dist.all_reduce(moments, group=self.process_group)
        batch_sum, batch_sqsum = moments.tolist()
        if batch_sqsum * self.world_size != batch_sum**2:
            self._agreed_batch_size = None
            raise ValueError(
                f"local batch sizes differ across ranks (mean {batch_sum / self.world_size:g}, this rank {batch}): "
                "DDP averages the rank gradients with equal weights, so the two-batch estimate needs equal local "
                "batches"
            )
        self._agreed_batch_size = batch

    # ------------------------------------------------------------------ per step
    def step_estimate(self, *, grad_scale: float = 1.0) -> NoiseScaleEstimate | None:
        """Estimate of this step's |G|^2 and tr(Sigma); call on every rank after each synchronising backward.

        Returns None on the steps that ``measure_every`` leaves out.
        ``grad_scale`` is the factor the gradients carry (AMP loss scale), removed from the squared norms.
        A step whose all-reduced norms are NaN or infinite is recorded as skipped on every rank and left out
        of the averages; the returned estimate is then NaN. Raises ValueError (on every rank) when the ranks'
        ``local_batch_size`` differ.
        """
        pending, global_sqnorms = self._pending, self._global_sqnorms
        self._pending, self._global_sqnorms, self._local_sqnorms = None, [], []  # nothing leaks into the next step
        if self._unread_backwards != 1:
            unread, self._unread_backwards = self._unread_backwards, 0
            raise RuntimeError(
                f"step_estimate() found {unread} synchronising backwards since the last call, "
                "expected 1: call it after the backward that runs outside no_sync(), once per optimizer step, "
                "on every rank"
            )
        self._unread_backwards = 0
        step = self.step
        self.step += 1
        if pending is None:
            return None
        future, totals, batch = pending
        future.wait()
        *local_sqnorms, changed = totals.tolist()  # the buckets' local squared norms, each summed over ranks
        if changed > 0:  # the same sum on every rank, so every rank joins the check
            self._check_batch_sizes_agree(batch, totals.device)
        if not (isinstance(grad_scale, (int, float)) and math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale must be a finite number > 0, got {grad_scale!r}")  # after the collectives

        ranks = self.world_size
        unscale = 1.0 / float(grad_scale) ** 2
        local_sqnorm = sum(local_sqnorms) / ranks * unscale
        # the buckets' all-reduces complete in any order, each rank its own: summed in sorted order, the same sum
        global_sqnorm = sum(sorted(torch.stack(global_sqnorms).tolist())) * unscale
        skipped = not (math.isfinite(local_sqnorm) and math.isfinite(global_sqnorm))
        if skipped:
            estimate = NoiseScaleEstimate(grad_sqnorm=math.nan, trace_sigma=math.nan, batch_size=ranks * batch)
        else:
            # two_batch_noise_scale's arithmetic without its input checks (tens of microseconds a step): the batch
            # sizes were checked by the setter, the norms are finite here and >= 0 by construction
            estimate = self._corrected(_two_batch_estimate(local_sqnorm, batch, global_sqnorm, ranks * batch))
        self.average.update_estimate(estimate)
        self._records.append((step, batch, local_sqnorm, global_sqnorm, estimate, skipped, self.average.state_dict()))
        return estimate

    def _corrected(self, estimate: NoiseScaleEstimate) -> NoiseScaleEstimate:
        """``estimate`` with the finite-population correction of ``population_size``; as it is for None, and for a
        global batch larger than N (it holds some example twice: warned once)."""
        population = self.population_size
        if population is None:
            return estimate
        if estimate.batch_size > population:
            if not self._warned_population:
                self._warned_population = True
                warnings.warn(population_smaller_than_batch(population, estimate.batch_size), RuntimeWarning,
                              stacklevel=3)
            return estimate
        return _finite_population(estimate, population)

    def _build_rows(self) -> None:
        """The history rows of the steps measured since the last read, with the 90% interval of each row's
        B_simple from the moving average as it was after that row: the Student-t quantile is most of the cost
        of a row, so it is paid when the history is read, not per step."""
        average = ExponentialMovingNoiseScale(self.average.decay)
        for step, batch, local_sqnorm, global_sqnorm, estimate, skipped, average_state in self._records:
            average.load_state_dict(average_state)
            low, high = average.interval()
            self._rows.append({
                "step": step,
                "local_batch_size": batch,
                "global_batch_size": self.world_size * batch,
                "local_sqnorm": local_sqnorm,
                "global_sqnorm": global_sqnorm,
                "grad_sqnorm": estimate.grad_sqnorm,
                "trace_sigma": estimate.trace_sigma,
                "b_simple_batch": estimate.b_simple if not skipped else math.nan,
                "b_simple": average.b_simple,
                "b_simple_low": low,
                "b_simple_high": high,
                "skipped": skipped,
            })
        self._records = []

    # ------------------------------------------------------------------ results
    @property
    def history(self) -> pd.DataFrame:
        """One row per step_estimate(): batch sizes, the mean local and the global squared norm, the step's
        unbiased |G|^2 and tr(Sigma), the averaged B_simple with its 90% interval, and ``skipped``."""
        self._build_rows()
        return pd.DataFrame(self._rows)

    def state_dict(self) -> dict[str, Any]:
        self._build_rows()
        return {"step": self.step, "average": self.average.state_dict(), "history": list(self._rows),
                "population_size": self.population_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"step", "average", "history"} - set(state)
        if missing:
            raise ValueError(f"state dict misses keys {sorted(missing)}")
        self.average.load_state_dict(state["average"])
        saved = state.get("population_size")   # (absent from a checkpoint of an earlier version: none taken)
        if saved != self.population_size and state["average"]["num_updates"]:
            warnings.warn(f"the checkpoint's averages were taken with population_size={saved}, this DDPNoiseScale's "
                          f"is {self.population_size}: the averages mix steps with different finite-population "
                          "corrections", RuntimeWarning, stacklevel=2)
        self.step = int(state["step"])
        self._rows, self._records = list(state["history"]), []
        self._pending, self._global_sqnorms, self._local_sqnorms, self._unread_backwards = None, [], [], 0


def combine_per_example_sums(sqnorm_sums: Any, counts: Any, grad_sqnorm: Any) -> NoiseScaleEstimate:
    """Per-example estimator over all ranks from per-rank sums: ``simple_noise_scale`` without the vectors.

    ``sqnorm_sums[r]`` = sum of s_i = |g_i|^2 over rank r's examples, ``counts[r]`` their number, and
    ``grad_sqnorm`` = |gbar|^2 of the mean gradient over all sum(counts) examples (the all-reduced DDP gradient
    when every rank holds the same count). With B = sum counts and mean s = sum s_i / B, McCandlish et al.
    (2018, app. A): tr(Sigma) ~ B/(B-1)(mean s - |gbar|^2), |G|^2 ~ |gbar|^2 - tr(Sigma)/B.
    """
    sums = torch.as_tensor(sqnorm_sums, dtype=torch.float64).reshape(-1)
    count_values = torch.as_tensor(counts).reshape(-1)
    if count_values.is_floating_point() and not torch.equal(count_values, count_values.round()):
        raise ValueError(f"counts must be whole numbers of examples, got {count_values.tolist()}")
    if sums.shape != count_values.shape:
        raise ValueError(f"sqnorm_sums and counts must have one entry per rank, got {sums.shape} and {count_values.shape}")
    if torch.any(count_values < 0):
        raise ValueError(f"counts must be >= 0, got {count_values.tolist()}")
    total = int(count_values.sum())
    if total < 2:
        raise ValueError(f"the per-example estimate needs at least 2 examples over all ranks, got {total}")
    return two_batch_noise_scale(float(sums.sum()) / total, 1, grad_sqnorm, total)


def all_reduce_per_example_sums(
    local_sqnorm_sum: Any, local_count: int, grad_sqnorm: Any, *, group: dist.ProcessGroup | None = None
) -> NoiseScaleEstimate:
    """:func:`combine_per_example_sums` across the ranks of ``group``: one all-reduce of (sum s_i, count).

    Call on every rank with that rank's sum of per-example squared norms and its example count;
    ``grad_sqnorm`` (|gbar|^2 of the global mean gradient) must be the same on every rank, e.g.
    ``DDPNoiseScale.history["global_sqnorm"]`` or the squared norm of the all-reduced gradient.
    """
    _world_size(group)
    if isinstance(local_count, bool) or not isinstance(local_count, int) or local_count < 0:
        raise ValueError(f"local_count must be an int >= 0 (examples on this rank), got {local_count!r}")
    local_sum = torch.as_tensor(local_sqnorm_sum, dtype=torch.float64).reshape(())
    totals = torch.stack([local_sum, torch.tensor(float(local_count), dtype=torch.float64, device=local_sum.device)])
    dist.all_reduce(totals, group=group)  # with NCCL, pass local_sqnorm_sum as a CUDA tensor
    total_sum, total_count = totals.tolist()
    return combine_per_example_sums([total_sum], [round(total_count)], grad_sqnorm)


def all_reduce_hessian_proxies(proxies: HessianNoiseScale, *, group: dist.ProcessGroup | None = None,
                               device: torch.device | str = "cpu") -> HessianNoiseScale:
    """The mean over the ranks of ``group`` of each rank's Hessian proxies (one all-gather of five numbers a rank).

    Each rank's proxies are unbiased estimates from its own batch at the same parameters; with probes drawn from
    a different generator on every rank they are independent, and their mean (:func:`mean_hessian_proxies`, in
    rank order) is an estimate from all R batches (its tr(H) standard error too small by up to sqrt(R) if the ranks
    share their probes). Every rank gets the same result; ``device`` holds the gathered numbers (this rank's GPU
    with NCCL).
    """
    fields = ("trace_h", "trace_h_stderr", "g_h_g", "trace_h_sigma", "fisher_trace")
    values = torch.tensor([getattr(proxies, name) for name in fields], dtype=torch.float64, device=device)
    per_rank = all_gather_concat(values, group).reshape(-1, len(fields)).tolist()
    return mean_hessian_proxies([replace(proxies, **dict(zip(fields, row))) for row in per_rank])


def all_gather_concat(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The 1-D ``tensor`` of every rank of ``group`` (equal lengths), concatenated in rank order, on every rank.

    With a global batch sharded in rank order (:class:`~noisescale.sampler.ResizableBatchSampler`), per-example
    values gathered this way come back in the order of the global batch.
    """
    parts = [torch.empty_like(tensor) for _ in range(_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def rank_sizes(size: int, group: dist.ProcessGroup | None, device: torch.device) -> list[int]:
    """Every rank's ``size`` (its share of the global batch), in rank order, by one all-gather of one number: a
    check before :func:`all_gather_concat`, which needs equal lengths (gloo aborts the process otherwise)."""
    return [int(count) for count in all_gather_concat(torch.tensor([float(size)], dtype=torch.float64,
                                                                    device=device), group).tolist()]


def broadcast_from_first_rank(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``tensor`` as the group's first rank holds it, on every rank (in place; one broadcast): one rank decides,
    the others adopt its decision, so they cannot drift apart. With NCCL the tensor must be on this rank's GPU."""
    _world_size(group)
    source = dist.get_global_rank(group, 0) if group is not None and group is not dist.group.WORLD else 0
    dist.broadcast(tensor, src=source, group=group)
    return tensor
