"""The noise-scale monitor: three changed lines in an existing PyTorch training loop.

    monitor = NoiseScaleMonitor(model, per_example_loss)     # 1. per_example_loss(outputs, targets) -> (B,)
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = monitor(inputs, targets)                       # 2. replaces forward, loss and loss.backward()
        optimizer.step()
    monitor.history                                           # 3. a pandas DataFrame, one row per step

Each measured step runs the one forward and backward the training needs, leaves every ``p.grad`` exactly as
``per_example_loss(model(inputs), targets).mean().backward()`` would, and reads the per-example squared
gradient norms from it (:mod:`noisescale.per_example`). From them come the unbiased estimates of |G|^2 and
tr(Sigma) of McCandlish et al. (2018, appendix A), their exponential moving averages and B_simple =
tr(Sigma)/|G|^2 with a confidence interval (:mod:`noisescale.estimators`); every ``hessian_every`` steps the
Hessian proxies tr(H), G^T H G and B_noise = tr(H Sigma)/(G^T H G) (:mod:`noisescale.hessian`).

The monitor never changes the training it observes: the gradients are those of a plain backward, and the
Hessian probes and any torch.func fallback run on a forked random-number stream.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

from noisescale._checks import check_bool, check_confidence, check_decay, check_int, listed
from noisescale._digits import printed, printed_b_simple, rounded, significant_digits, with_significant_digits
from noisescale._gradient_norm import gradient_values, gradients_finite
from noisescale._grads import GradSnapshot
from noisescale._wrappers import ddp_of, unwrapped_module
from noisescale.batches import (batch_size_of, call_model, describe_nonfinite_counts, merge_nonfinite_counts,
                                nonfinite_counts, to_device)
from noisescale.checkpoints import atomic_write, to_plain
from noisescale.estimators import (ExponentialMovingNoiseScale, ExponentialMovingRatio, NoiseScaleAcrossRuns,
                                   micro_batch_noise_scale, noise_scale_across_runs,
                                   population_smaller_than_batch, simple_noise_scale)
from noisescale.hessian import HESSIAN_NOISE_SCALE_MIN_BATCH, HessianNoiseScale, micro_batch_hessian_noise_scale
from noisescale.per_example import PerExampleGradNorms
from noisescale.per_example.layers import batch_statistics_path
from noisescale.sampler import population_drawn_from
from noisescale.sharded import every_gradient_finite, is_sharded

HESSIAN_COLUMNS = ("trace_h", "trace_h_stderr", "g_h_g", "trace_h_sigma", "fisher_trace")


# a run whose recent loss exceeds this multiple of its first loss is reported as diverged
DIVERGED_LOSS_FACTOR = 10.0


@dataclass(frozen=True)
class NoiseScaleSummary:
    """The state of the averages after the steps seen so far.

    ``divergence`` says why the run is taken as diverged (None if it is not): its latest step had a non-finite
    loss or gradient, or the median loss of its latest steps exceeds DIVERGED_LOSS_FACTOR times its first loss.
    The noise scale of a diverged run describes no useful training, so no value and no batch size is suggested.

    ``bad_data`` names the first step whose batch itself held NaN, or Inf in its targets (None if none did): such
    steps are the data's fault, not divergence, and lowering the learning rate would not help.
    ``broken_by_bad_data``: every step since such a batch is non-finite on finite data (an optimizer step taken on
    that batch's gradient made the parameters non-finite); then, as for a diverged run, nothing is suggested
    (:func:`bad_data_of`).

    ``nonfinite_from_start`` says what was seen when every step so far, from the first, has had a non-finite loss
    on finite data (None otherwise): no run diverges before a finite step, so the model or the loss computes
    a non-finite value on this data (a softmax over a row masked entirely by -inf), or the parameters were not finite
    when the measurement began; nothing is suggested (:func:`nonfinite_from_start`).

    ``coupling`` is what an observed step's independence check found (None if nothing): outputs of the model that
    couple the examples. If the loss reads them (a contrastive loss), the examples have no per-example gradients
    and the values here are no noise scale; observe cannot see the loss, so they are reported with that warning.

    ``adaptive_optimizer``: whether the training's optimizer scales each coordinate's step (Adam and its kin,
    :func:`adapts_per_coordinate`; None: not known). B_noise = tr(H Sigma)/G^T H G is SGD's critical batch size
    (McCandlish et al. 2018, eq. 2.8); with such an optimizer the suggestion is B_simple, and the text says why.
    """

    steps: int
    examples_seen: int
    b_simple: float
    b_simple_interval: tuple[float, float]
    confidence: float
    trace_sigma: float
    grad_sqnorm: float
    b_noise: float
    nonfinite_steps: int
    divergence: str | None = None
    coupling: str | None = None
    b_noise_measurements: int = 0   # the Hessian measurements B_noise averages
    adaptive_optimizer: bool | None = None
    bad_data: str | None = None
    broken_by_bad_data: bool = False
    # Fieller's interval of B_noise's averaged ratio (NaN with fewer than 2 effective measurements; unbounded above
    # while its averaged G^T H G is not resolved from 0, and then no B_noise is suggested)
    b_noise_interval: tuple[float, float] = (math.nan, math.nan)
    nonfinite_from_start: str | None = None
    hessian_every: int = 0   # how often B_noise was to be measured (0: never)
    population_size: int | None = None   # N of the finite-population correction the averages took (None: none)

    @property
    def suggested_batch_size(self) -> float:
        """B_noise when resolved (and the optimizer is not adaptive), else B_simple when resolved: the critical batch
        size it predicts (McCandlish et al.); NaN where the text suggests none (a diverged run or one broken by bad
        data; neither estimate resolved yet)."""
        source = self.suggested_from
        return math.nan if source is None else self.b_noise if source == "b_noise" else self.b_simple

    @property
    def suggested_from(self) -> str | None:
        """Which estimate ``suggested_batch_size`` is: "b_noise" or "b_simple"; None where nothing is suggested."""
        if self._broken:
            return None
        if self._suggests_b_noise:
            return "b_noise"
        return "b_simple" if self.b_simple_resolved else None

    @property
    def b_simple_resolved(self) -> bool:
        """B_simple is finite and its interval bounded: measured over 2 or more effective steps, and the averaged
        |G|^2 resolved from 0 at this confidence (the text then suggests it, "about ... examples")."""
        return math.isfinite(self.b_simple) and math.isfinite(self.b_simple_interval[1])

    @property
    def reports_noise_scale(self) -> bool:
        """False for a run that diverged, was broken by bad data or has had no finite step
        (``nonfinite_from_start``): its values describe no useful training, and the text says why instead."""
        return not self._broken

    @property
    def _broken(self) -> bool:
        return self.divergence is not None or self.broken_by_bad_data or self.nonfinite_from_start is not None

    @property
    def b_noise_resolved(self) -> bool:
        """B_noise is finite, positive, and its interval bounded: 2 or more effective Hessian measurements, their
        averaged G^T H G resolved from 0 (one measurement, a single batch's ratio, was suggested before session 26,
        while a B_simple without an interval was not)."""
        return _resolved(self.b_noise) and math.isfinite(self.b_noise_interval[1])

    @property
    def _suggests_b_noise(self) -> bool:
        return self.b_noise_resolved and not self.adaptive_optimizer

    def __str__(self) -> str:
        return self.describe()

    def describe(self, hessian_off: str = "hessian_every=0") -> str:
        """The summary as text (``str(summary)``); ``hessian_off`` is the setting that leaves B_noise unmeasured,
        in the caller's terms (the command line's ``--hessian-every 0``)."""
        return "\n".join([self._describe(hessian_off), *self._caveats()])

    def _caveats(self) -> list[str]:
        caveats = []
        if self.bad_data is not None and not self.broken_by_bad_data:
            caveats.append(f"  warning: {self.bad_data}: check the data (remove or fix those values); such steps "
                           "are left out of the averages, and they are no divergence: the learning rate is not the "
                           "cause")
        if self.adaptive_optimizer and self.b_noise_resolved and not self._broken:
            instead = "the suggestion is B_simple" if self.b_simple_resolved else "B_noise is not suggested"
            caveats.append("  B_noise is SGD's critical batch size (McCandlish et al.); this optimizer adapts each "
                           f"coordinate's step (Adam-like), so {instead} (with AdamW, B_noise sat 24 "
                           "to 225 times below the critical batch size measured by branching: README)")
        if self.coupling is not None:
            caveats.append(f"  warning: the model couples the examples ({self.coupling}): if the loss reads those "
                           "outputs (a contrastive loss) or holds that term, there are no per-example gradients and "
                           "these numbers are no noise scale; measure it from independent micro-batches "
                           "(noisescale.estimators.two_batch_noise_scale)")
        return caveats

    def _describe(self, hessian_off: str) -> str:
        if self.broken_by_bad_data:
            return "\n".join([
                f"after {self.steps} steps ({self.examples_seen} examples):",
                f"  {self.bad_data}, and every step since has a non-finite loss or gradient: the optimizer step "
                "taken on that batch made the parameters non-finite. Check the data (remove or fix those values; "
                "a loop of your own can skip the optimizer step where last_step_finite is False); the learning rate "
                "is not the cause. "
                "No noise scale is reported and no batch size is suggested",
            ])
        if self.nonfinite_from_start is not None:
            return "\n".join([
                f"after {self.steps} steps ({self.examples_seen} examples):",
                f"  {self.nonfinite_from_start}: {_NONFINITE_FROM_START}. No noise scale is reported and no batch "
                "size is suggested",
            ])
        if self.divergence is not None:
            return "\n".join([
                f"after {self.steps} steps ({self.examples_seen} examples):",
                f"  the run diverged ({self.divergence}): its noise scale describes no useful training, so none "
                "is reported and no batch size is suggested; lower the learning rate and measure again",
                *([f"  {self.nonfinite_steps} step(s) had a non-finite loss or gradient"] if self.nonfinite_steps
                  else []),
            ])
        low, high = self.b_simple_interval
        unbounded = high == math.inf
        shown = printed_b_simple(self.b_simple, low, high, unbounded="unbounded: |G|^2 is not resolved from 0 at "
                                 "this confidence; measure longer or with larger batches")   # the digits it supports
        digits = max(2, significant_digits(self.b_simple, shown.place))   # tr(Sigma)'s and |G|^2's, at least 2
        measured = not math.isnan(self.trace_sigma)   # NaN: the average has no step yet
        if not measured and not self._suggests_b_noise:
            suggestion = "  critical batch size: not measured yet"
        elif math.isnan(high) and not self._suggests_b_noise:
            suggestion = ("  critical batch size: not resolved yet (B_simple has no interval before 2 effective "
                          "measured steps)")
        elif unbounded and not self._suggests_b_noise and math.isfinite(self.b_simple):
            bound = f"at least about {shown.low} examples" if low >= 1 else "no lower bound above 0 either"
            suggestion = f"  critical batch size: not resolved ({bound} at {self.confidence:.0%} confidence)"
        elif self._suggests_b_noise:
            suggestion = _describe_suggestion(self.b_noise, printed(self.b_noise, *self.b_noise_interval).place)
        else:
            suggestion = _describe_suggestion(self.b_simple, shown.place)
        interval = (f"({self.confidence:.0%} interval {shown.low} .. {shown.high})" if not math.isnan(high)
                    else "(no interval yet: too few measured steps)")
        undefined = measured and self.trace_sigma == 0 and self.grad_sqnorm == 0   # 0/0: no gradient at all
        b_simple = ([f"  B_simple: undefined ({_ALL_GRADIENTS_ZERO})" if undefined
                     else f"  B_simple = {shown.value}  {interval}",
                     f"  tr(Sigma) = {with_significant_digits(self.trace_sigma, digits)}, "
                     f"|G|^2 = {with_significant_digits(self.grad_sqnorm, digits)}"] if measured
                    else
                    ["  B_simple: not measured yet (no step with a finite loss and at least 2 examples, or 2 "
                     "micro-batches for a model normalising with batch statistics, which the gradient noise needs)"])
        lines = [
            f"after {self.steps} steps ({self.examples_seen} examples):",
            *b_simple,
            _describe_b_noise(self.b_noise, self.b_noise_measurements, self.b_noise_interval, self.confidence,
                              hessian_off, self.hessian_every),
            suggestion,
        ]
        if self.nonfinite_steps:
            lines.append(f"  {self.nonfinite_steps} step(s) with a non-finite loss or gradient were left out")
        return "\n".join(lines)


_ADAPTIVE_OPTIMIZERS = {"Adagrad", "RMSprop", "Adadelta", "Adafactor", "Rprop"}  # classes (or their bases) by name


def adapts_per_coordinate(optimizer: Any) -> bool:
    """Whether ``optimizer`` scales each coordinate's step by its own gradient statistics: any with ``betas`` or
    ``beta1`` in a parameter group (Adam, AdamW, NAdam, RAdam, Adamax, and third-party kin), and Adagrad, RMSprop,
    Adadelta, Adafactor (torch's or transformers') and Rprop. A wrapper (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``) is looked through to the optimizer it holds. B_noise (SGD's critical
    batch size) does not describe them."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if any(cls.__name__ in _ADAPTIVE_OPTIMIZERS for cls in type(optimizer).__mro__):
        return True
    return any("betas" in group or "beta1" in group for group in getattr(optimizer, "param_groups", ()))


def _checked_optimizer(optimizer: Any) -> Any:
    """``optimizer`` where it is an optimizer object (anything with ``param_groups``, as torch's, DeepSpeed's and the
    frameworks' wrappers have); a TypeError for its class or name, which would read as SGD."""
    if isinstance(optimizer, type) or not hasattr(optimizer, "param_groups"):
        raise TypeError(f"optimizer must be the training's optimizer object (one with param_groups), got "
                        f"{optimizer!r}: pass the instance, torch.optim.AdamW(model.parameters(), ...), not its class "
                        "or name (the summary reads from it whether the optimizer adapts each coordinate's step)")
    return optimizer


_ALL_GRADIENTS_ZERO = ("every per-example gradient is 0: a perfectly fitted batch, or no trainable parameter reaches "
                       "the loss")


def _describe_suggestion(batch_size: float, place: int) -> str:
    """The suggestion's line: ``batch_size`` rounded as its estimate is printed (at 10^``place``), to whole
    examples; for NaN (a measured B_simple of 0/0: tr(Sigma) = |G|^2 = 0) the cause."""
    if math.isnan(batch_size):
        return (f"  critical batch size: undefined (tr(Sigma) = |G|^2 = 0, B_simple is 0/0: {_ALL_GRADIENTS_ZERO}; "
                "measuring longer or with larger batches would not change it)")
    if math.isfinite(batch_size) and batch_size < 1:   # "about 0 examples" suggests nothing
        return (f"  critical batch size suggested: below one example ({batch_size:.2g}): the gradient noise is small "
                "against the mean gradient, so any batch size is past the critical one")
    if math.isfinite(batch_size):
        return f"  critical batch size suggested: about {rounded(batch_size, max(place, 0))} examples"
    return ("  critical batch size: not resolved (the averaged |G|^2 estimate is not positive: the mean gradient is "
            "lost in the noise at this batch size; measure longer or with larger batches. If it stays negative, "
            "check that each example's loss depends on that example alone: in-batch negatives, as in contrastive "
            "losses, couple them, and observe, which the HF Trainer and Lightning integrations use, does not check "
            "a loss computed outside the model)")


def _resolved(b_noise: float) -> bool:
    """A usable B_noise: finite and positive (its averaged tr(H Sigma) and G^T H G estimates both > 0)."""
    return math.isfinite(b_noise) and b_noise > 0


def _describe_b_noise(b_noise: float, measurements: int, interval: tuple[float, float], confidence: float,
                      hessian_off: str, hessian_every: int) -> str:
    if math.isnan(b_noise) and measurements:
        return f"  B_noise: undefined (tr(H Sigma) = G^T H G = 0: {_ALL_GRADIENTS_ZERO})"
    if math.isnan(b_noise):
        return (f"  B_noise: not measured ({hessian_off})" if not hessian_every else
                f"  B_noise: not measured yet (it is measured at steps 0, {hessian_every}, {2 * hessian_every}, ... "
                f"on batches of at least {HESSIAN_NOISE_SCALE_MIN_BATCH} examples, and none has been)")
    if math.isinf(b_noise):
        return "  B_noise: not resolved yet (the averaged G^T H G estimate is not positive)"
    if b_noise <= 0:
        return (f"  B_noise: not resolved yet (the averaged tr(H Sigma) estimate is not positive: ratio "
                f"{b_noise:.2g})")
    counted = f"{measurements} Hessian measurement{'s' if measurements != 1 else ''}"
    shown = printed(b_noise, *interval)
    if interval[1] == math.inf:
        return (f"  B_noise: not resolved yet ({shown.value} from {counted}, but their averaged G^T H G "
                f"is not resolved from 0 at {confidence:.0%} confidence)")
    if math.isnan(interval[1]):
        return f"  B_noise: not resolved yet ({shown.value} from {counted}, no interval before 2 effective ones)"
    return f"  B_noise = {shown.value}  ({confidence:.0%} interval {shown.low} .. {shown.high}, from {counted})"


def check_options(*, measure_every: int, ema_decay: float, confidence: float, hessian_every: int,
                  hessian_ema_decay: float, hessian_examples: int, hessian_probes: int, seed: int = 0,
                  check_independence: bool = True) -> None:
    """Raises on a monitor option of the wrong type or out of range (also checked by the integrations'
    ``NoiseScaleOptions`` when it is built, before any training step)."""
    check_int(seed, "seed", -2**63)   # (torch's manual_seed takes negative seeds too)
    check_bool(check_independence, "check_independence")
    check_int(measure_every, "measure_every", 1)
    check_int(hessian_every, "hessian_every", 0)
    check_int(hessian_examples, "hessian_examples", 2)
    check_int(hessian_probes, "hessian_probes", 2)
    check_confidence(confidence)
    check_decay(ema_decay, "ema_decay")
    check_decay(hessian_ema_decay, "hessian_ema_decay")


class NoiseScaleMonitor:
    """Measures the gradient noise scale of the training it is called in (module docstring).

    On a DDP model each rank measures its own share of the batch (warned once at construction):
    :class:`~noisescale.training.AccumulatingNoiseScaleMonitor` measures the global batch.

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(outputs, targets)`` -> per-example losses of shape (B,); the training loss is their mean.
        backend: per-example norm backend, ``"auto"`` | ``"ghost"`` | ``"vmap"`` (:mod:`noisescale.per_example`).
        measure_every: measure every k-th step; the other steps run a plain forward and backward.
        ema_decay: decay of the moving averages of tr(Sigma) and |G|^2 (averaging window ~ 1/(1 - decay) steps).
        confidence: level of the B_simple interval (Fieller's, :class:`~noisescale.estimators.ExponentialMovingRatio`).
        hessian_every: run the Hessian proxies every k-th step (0: never).
        hessian_ema_decay: decay of the moving averages of tr(H Sigma) and G^T H G, whose ratio is B_noise
            (they are measured only every ``hessian_every`` steps, hence a shorter memory than ``ema_decay``).
        hessian_examples: examples of the batch used for tr(H Sigma) (per-example Hessian-vector products).
        hessian_probes: Rademacher probes of the Hutchinson trace.
        grad_scaler: a ``torch.amp.GradScaler`` under mixed precision: gradients are scaled as
            ``scaler.scale(loss).backward()`` would scale them, and the norms are measured unscaled.
        writer: anything with ``add_scalar(tag, value, step)`` (a TensorBoard ``SummaryWriter``).
        seed: seed of the Hessian probes.
        chunk_size: examples per chunk of the whole-model vmap, where it runs.
        check_independence: on the first measured step, check that each example's loss reads that example alone
            (two more forwards; :mod:`noisescale.per_example.coupling`), and refuse a coupled loss
            (contrastive).
        optimizer: the training's optimizer, if you want the summary to know it: with one that adapts each
            coordinate's step (Adam, AdamW, ...: :func:`adapts_per_coordinate`) the suggested batch size is
            B_simple, not B_noise (SGD's). Sets ``adaptive_optimizer`` (None when not given).
        population_size: N, where each batch is drawn without replacement from a dataset of N examples (shuffled
            epochs): the per-example estimates are then corrected to be unbiased for that dataset's tr(Sigma) and
            |G|^2 (:func:`~noisescale.estimators.simple_noise_scale`; without it |G|^2 reads low by B_simple/N of
            itself), and the Hessian proxies for its G^T H G and tr(H Sigma) (:mod:`noisescale.hessian`, "Finite
            population"; without it G^T H G reads low by about B_noise/N of itself, and more from the dependence
            of the batch's two halves). None: batches taken as i.i.d. draws. AdaptiveTrainer and :func:`measure`
            over a DataLoader pass it themselves.
    """

    # what the warnings of a step holding bad data advise about its optimizer step (the loop is the caller's)
    _skip_advice = "skip its optimizer step where last_step_finite is False"

    _gathers_ranks = False   # a subclass that measures the global batch under DDP sets it

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        backend: str = "auto",
        measure_every: int = 1,
        ema_decay: float = 0.95,
        confidence: float = 0.9,
        hessian_every: int = 0,
        hessian_ema_decay: float = 0.8,
        hessian_examples: int = 8,
        hessian_probes: int = 8,
        grad_scaler: Any = None,
        writer: Any = None,
        seed: int = 0,
        chunk_size: int | None = None,
        check_independence: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        population_size: int | None = None,
    ) -> None:
        check_options(measure_every=measure_every, ema_decay=ema_decay, confidence=confidence,
                      hessian_every=hessian_every, hessian_ema_decay=hessian_ema_decay,
                      hessian_examples=hessian_examples, hessian_probes=hessian_probes, seed=seed,
                      check_independence=check_independence)
        if hessian_every and batch_statistics_path(model) is not None:
            raise ValueError("the Hessian proxies (B_noise) need per-example gradients, which are undefined for a "
                             "model that normalises with batch statistics (BatchNorm in train mode); set "
                             "hessian_every=0 (AdaptiveTrainer measures B_simple from its micro-batches)")
        if hessian_every and is_sharded(model):
            raise ValueError("the Hessian proxies (B_noise) need torch.func on whole parameters, which cannot run "
                             "on an FSDP-sharded model; set hessian_every=0 (B_simple is measured as usual)")
        self.model = model
        self.loss_fn = loss_fn
        self.norms = PerExampleGradNorms(model, loss_fn, backend=backend, chunk_size=chunk_size,
                                         check_independence=check_independence)
        self.average = ExponentialMovingNoiseScale(ema_decay)
        self.hessian_average = ExponentialMovingRatio(hessian_ema_decay)
        self.measure_every = measure_every
        self.confidence = confidence
        self.hessian_every = hessian_every
        self.hessian_examples = hessian_examples
        self.hessian_probes = hessian_probes
        self.grad_scaler = grad_scaler
        self.writer = writer
        self.seed = seed
        self.step = 0
        self.examples_seen = 0
        self.nonfinite_steps = 0
        self._rows: list[dict[str, Any]] = []
        self.backend_of: dict[str, str] = {}
        self._warned: set[str] = set()
        self.adaptive_optimizer = None if optimizer is None else adapts_per_coordinate(_checked_optimizer(optimizer))
        self.population_size = _checked_population(population_size)
        self._rank_local = not self._gathers_ranks and ddp_of(model) is not None
        if self._rank_local:
            warnings.warn("NoiseScaleMonitor on a DDP model measures each rank's own share of the batch: its "
                          "tr(Sigma) and |G|^2 are estimates from that share's examples alone, and the ranks' "
                          "histories differ. AccumulatingNoiseScaleMonitor(...).accumulate([(inputs, targets)]) "
                          "measures the global batch (the ranks' per-example norms gathered), as AdaptiveTrainer "
                          "does; last_step_finite here reads the all-reduced p.grad, so that every rank decides "
                          "alike whether to step", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ the training step
    def __call__(self, inputs: Any, targets: Any) -> torch.Tensor:
        """Forward, per-example loss, backward (p.grad as a plain backward would leave it); returns the mean loss.

        ``inputs``: a tensor, a tuple of positional inputs or a mapping of keyword inputs (``model(**inputs)``,
        a HuggingFace batch), every tensor batch-first (:mod:`noisescale.batches`); ``targets``: any pytree of
        batch-first tensors, or None when the loss needs none. After a measured step ``backend_of`` maps each
        trainable parameter name to the backend that measured it ("ghost", "module" or "vmap")."""
        loss_scale = loss_scale_of(self.grad_scaler, next(self.model.parameters()).device)
        batch_size = batch_size_of(inputs)
        measured = self.step % self.measure_every == 0
        held = self._gradient_held()
        if held is not None:
            self._warn_once("gradient_held", f"step {self.step}: p.grad already holds a gradient as this call begins "
                            f"({held}); the call adds this batch's mean gradient to it, as loss.backward() does, and "
                            "records this batch alone. Where each call is one micro-batch of an accumulated step, "
                            "p.grad becomes the sum of the micro-batches' mean gradients (K times the batch's) and "
                            "each micro-batch gets a row of its own: AccumulatingNoiseScaleMonitor(...).accumulate"
                            "([(x1, y1), (x2, y2)]) weights them and records the step once. Where no gradient is "
                            "meant, call model.zero_grad() before each step (optimizer.zero_grad() clears the "
                            "optimizer's parameters only); where one is (another loss's backward before this call), "
                            "ignore this (warned once)")
        with self._undone_on_failure():
            if measured:
                result = self.norms(inputs, targets, loss_scale=loss_scale)
                self.backend_of = dict(result.backend_of)
                loss = result.loss
                losses = result.losses
                row = self._measure(losses, result.sqnorms, result.grad_sqnorm, batch_size)
            else:
                losses = self.loss_fn(call_model(self.model, inputs), targets)  # the hooks are inert here
                (losses.mean() * loss_scale).backward()
                loss = losses.detach().mean()
                row = {"loss": loss.item(), "measured": False}
            self._note_nonfinite(row, [(inputs, targets)], losses=losses.detach())
            if self.hessian_every and self.step % self.hessian_every == 0:
                row |= self._hessian((inputs, targets))
            self.examples_seen += batch_size
            row = {"step": self.step, "examples_seen": self.examples_seen, "batch_size": batch_size, **row}
            self._record(row)
            self.step += 1
        return loss

    def _gradient_held(self) -> str | None:
        """On the first three steps, the names of the trainable parameters whose p.grad is not zero as a step
        begins (a call per micro-batch, a missing zero_grad), listed; None where none is, or from the fourth step
        on (the check reads every p.grad)."""
        if self.step >= 3:
            return None
        held = [name for name, p in self.model.named_parameters()
                if p.requires_grad and p.grad is not None and bool(gradient_values(p.grad).any())]
        return listed(held) if held else None

    @contextlib.contextmanager
    def _undone_on_failure(self, restore_grads: bool = True) -> Iterator[None]:
        """If the block raises (KeyboardInterrupt included), p.grad (with ``restore_grads``) and the monitor's state
        (averages, counters, history) are put back as before it: the Hessian proxies, say, fail after the step's
        backward, and a retried step must count its batch once."""
        grads = GradSnapshot(list(self.model.parameters()) if restore_grads else [])
        state, rows, backend_of = self._state(), len(self._rows), self.backend_of
        try:
            with grads.holding():
                yield
        except BaseException:
            grads.restore()
            self.load_state_dict(state | {"history": self._rows[:rows]})
            self.backend_of = backend_of
            raise

    def _measure(self, losses, sqnorms, grad_sqnorm, batch_size: int,
                 unit_sizes: list[int] | None = None) -> dict[str, Any]:
        """The row of a measured step: ``sqnorms`` are the per-example |g_i|^2 (``simple_noise_scale``), or with
        ``unit_sizes`` the squared norms of the batch's micro-batches' mean gradients (``micro_batch_noise_scale``:
        a model that normalises with batch statistics, measured by ``AccumulatingNoiseScaleMonitor``)."""
        loss = losses.mean().item()
        gradient_finite = bool(torch.isfinite(sqnorms).all()) and math.isfinite(grad_sqnorm.item())
        if not (math.isfinite(loss) and gradient_finite):
            self.nonfinite_steps += 1
            row = {"loss": loss, "measured": True, "nonfinite": True}
            if math.isnan(loss) and gradient_finite:
                row["finite_gradient"] = True   # a NaN that never reached the gradient (0/0), unless bad data
            return row
        if unit_sizes is not None and len(unit_sizes) < 2:
            self._warn_once("micro1", f"step {self.step}: a model that normalises with batch statistics (or a batch "
                            "of sequences packed into rows) is measured from its micro-batches' gradients, and this "
                            "batch ran as one: tr(Sigma) and B_simple are recorded as NaN for such steps; set "
                            "max_micro_batch below the batch size (in a framework: gradient accumulation) "
                            "(warned once)")
            return {"loss": loss, "measured": True, "nonfinite": False, "trace_sigma": math.nan}
        if batch_size < 2:
            self._warn_once("batch1", "a batch of 1 example carries no gradient-variance information: tr(Sigma) "
                            "and B_simple are recorded as NaN for such steps (warned once)")
            return {"loss": loss, "measured": True, "nonfinite": False, "trace_sigma": math.nan}
        population = self._population_of(batch_size)
        estimate = (simple_noise_scale(sqnorms, grad_sqnorm, population=population) if unit_sizes is None
                    else micro_batch_noise_scale(sqnorms, unit_sizes, grad_sqnorm, population=population))
        if estimate.trace_sigma == 0 and estimate.grad_sqnorm == 0:
            self._warn_once("all_zero", f"step {self.step}: tr(Sigma) = |G|^2 = 0, so B_simple is undefined (NaN): "
                            f"{_ALL_GRADIENTS_ZERO} (warned once)")
        self.average.update_estimate(estimate)
        low, high = self.average.interval(self.confidence)
        return {
            "loss": loss,
            "measured": True,
            "nonfinite": False,
            "grad_sqnorm": estimate.grad_sqnorm,
            "trace_sigma": estimate.trace_sigma,
            "b_simple_batch": estimate.b_simple,
            "grad_sqnorm_ema": self.average.grad_sqnorm,
            "trace_sigma_ema": self.average.trace_sigma,
            "b_simple": self.average.b_simple,
            "b_simple_low": low,
            "b_simple_high": high,
        }

    def _note_nonfinite(self, row: dict[str, Any], micro_batches: list[tuple[Any, Any]],
                        group: dist.ProcessGroup | None = None, losses: torch.Tensor | None = None) -> None:
        """On a step whose loss or gradient is not finite, tell bad data from divergence: where the step's batch
        itself holds NaN, or Inf in its targets, the row's ``nonfinite_data`` says what and where
        (:func:`~noisescale.batches.nonfinite_counts`) and the warning names the data; otherwise it names the loss or
        gradient, and, given the batch's per-example ``losses``, the examples whose loss is not finite when others'
        is (``nonfinite_examples``). Non-finite on finite data from the first step
        on is no divergence (:func:`nonfinite_from_start`). Each warned once. A finite step pays nothing here;
        nothing of the training is changed. Under DDP (``group``: the ranks' row is the same, so all of them are
        here) each rank holds its share of the batch: their counts are exchanged, and under FSDP, on an unmeasured
        step whose loss is NaN, whether every rank's shards of p.grad are finite (one all-reduce), on this path
        only."""
        if not _is_nonfinite(row):
            return
        counts = nonfinite_counts(*micro_batches)
        if group is not None:
            shares: list[Any] = [None] * dist.get_world_size(group)
            device = next(self.model.parameters()).device   # NCCL sends objects from the current CUDA device
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                dist.all_gather_object(shares, counts, group=group)
            counts = merge_nonfinite_counts(shares)
        cause = describe_nonfinite_counts(counts)   # the counts of the whole batch
        if cause is not None:
            row.pop("finite_gradient", None)   # bad data, whatever its gradient (a clipped residual's is 0)
        else:
            if not row["measured"] and math.isnan(row["loss"]) and every_gradient_finite(
                    self.model, group is not None and is_sharded(self.model), group):
                row["finite_gradient"] = True   # unmeasured: read from p.grad (under FSDP every rank's shards)
            examples = None if losses is None else _nonfinite_examples(losses)
            if examples is not None:
                row["nonfinite_examples"] = examples
        if _finite_gradient(row):
            self._warn_once("nonfinite_loss", f"step {self.step}: the loss is NaN"
                            f"{'' if examples is None else f' ({examples})'} while every gradient is finite: a NaN "
                            "that never reaches the gradient, as 0/0 of a mean over no terms gives (a sequence or "
                            "batch whose every label is ignored, -100; clamp the mean's count to at least 1 where "
                            "such examples are meant). p.grad is finite and can be stepped on (last_step_finite); "
                            "the step is left out of the averages, and it is no sign of divergence (warned once)")
            return
        if cause is None:
            if self._rows and _caused_by_data(self._rows)[-1]:
                self._warn_once("nonfinite_after_data", f"step {self.step}: non-finite loss or gradient on finite "
                                f"data, after a step whose batch held bad values ({bad_data_of(self._rows)[0]}): an "
                                "optimizer step taken on that batch made the parameters non-finite; check the data "
                                f"and {self._skip_advice} (warned once)")
            elif nonfinite_from_start([*self._rows, row]) is not None:
                self._warn_once("nonfinite_start", f"step {self.step}: non-finite loss on finite data, with no "
                                f"finite step before{'' if examples is None else f'; {examples}'}: "
                                f"{_NONFINITE_FROM_START}. The step is marked in the history and left out of the "
                                "averages (warned once)")
            else:
                self._warn_once("nonfinite", f"step {self.step}: non-finite loss or gradient"
                                f"{'' if examples is None else f' on finite data; {examples}'}; the step is marked "
                                "in the history and left out of the averages (warned once)")
            return
        row["nonfinite_data"] = cause
        self._warn_once("nonfinite_data", f"step {self.step}: the batch holds {cause}: check the data (remove or fix "
                        "those values; this is no divergence, the learning rate is not the cause); the step's loss or "
                        "gradient is non-finite, so it is marked in the history (nonfinite_data) and left out of the "
                        f"averages; {self._skip_advice} (warned once)")

    def _hessian(self, *micro_batches: tuple[Any, Any]) -> dict[str, float]:
        """The Hessian proxies' history columns for this step's batch, given as its (inputs, targets)
        micro-batches (:func:`~noisescale.hessian.micro_batch_hessian_noise_scale`: the estimate of the whole batch
        whether or not it is split); none (warned once) below the minimum batch."""
        batch_size = sum(batch_size_of(inputs) for inputs, _ in micro_batches)
        if batch_size < HESSIAN_NOISE_SCALE_MIN_BATCH:
            self._warn_once("hessian_batch", f"step {self.step}: B_noise needs a batch of at least "
                            f"{HESSIAN_NOISE_SCALE_MIN_BATCH} examples, got {batch_size}; the Hessian proxies "
                            "are skipped on such steps (warned once)")
            return {}
        proxies = self._reduced(self._hessian_proxies(list(micro_batches)))
        self.hessian_average.update(proxies.trace_h_sigma, proxies.g_h_g)
        row = {column: getattr(proxies, column) for column in HESSIAN_COLUMNS}
        return row | {"b_noise_batch": proxies.b_noise, "b_noise": self.hessian_average.ratio}

    def _hessian_seed(self) -> int:
        """Seed of this step's Hutchinson probes and Sigma subsample: reproducible, new at every step."""
        return self.seed + self.step

    def _reduced(self, proxies: HessianNoiseScale) -> HessianNoiseScale:
        """The step's proxies as recorded: this process's (subclasses average them over the ranks)."""
        return proxies

    def _hessian_proxies(self, micro_batches: list[tuple[Any, Any]]) -> HessianNoiseScale:
        """The proxies of this process's batch; with ``population_size``, corrected for a batch drawn without
        replacement from that dataset (:mod:`noisescale.hessian`, "Finite population"), as B_simple is."""
        batch_size = sum(batch_size_of(inputs) for inputs, _ in micro_batches)
        return micro_batch_hessian_noise_scale(
            unwrapped_module(self.model),  # no all-reduce
            self.loss_fn,
            micro_batches,
            num_probes=self.hessian_probes,
            num_sigma_examples=self.hessian_examples,
            generator=torch.Generator().manual_seed(self._hessian_seed()),
            population=self._population_of(batch_size),
        )

    def _record(self, row: dict[str, Any]) -> None:
        """Keep ``row`` in the history and write its finite numbers to the writer, except a B_noise ratio that is
        not positive (not resolved: no noise scale)."""
        self._rows.append(row)
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "measured", "nonfinite") and isinstance(value, (int, float)):
                    if math.isfinite(value) and (key not in ("b_noise", "b_noise_batch") or _resolved(value)):
                        self.writer.add_scalar(f"noisescale/{key}", value, self.step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ results
    @property
    def history(self) -> pd.DataFrame:
        """One row per step: step, examples_seen, batch_size, loss, the batch and averaged estimates, the
        B_simple interval, and the Hessian proxies on the steps where they ran (NaN elsewhere)."""
        return pd.DataFrame(self._rows)

    def to_csv(self, path: str | Path) -> Path:
        """Write the history as CSV, atomically (a temporary file replaced into ``path``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, newline="") as handle:
            self.history.to_csv(handle, index=False)
        return path

    def summary(self) -> NoiseScaleSummary:
        bad_data, broken_by_bad_data = bad_data_of(self._rows)
        return NoiseScaleSummary(
            steps=self.step,
            examples_seen=self.examples_seen,
            b_simple=self.average.b_simple,
            b_simple_interval=self.average.interval(self.confidence),
            confidence=self.confidence,
            trace_sigma=self.average.trace_sigma,
            grad_sqnorm=self.average.grad_sqnorm,
            b_noise=self.hessian_average.ratio if self.hessian_average.num_updates else math.nan,
            b_noise_measurements=self.hessian_average.num_updates,
            nonfinite_steps=self.nonfinite_steps,
            divergence=divergence_of(self._rows),
            coupling=self.norms.coupling,
            adaptive_optimizer=self.adaptive_optimizer,
            bad_data=bad_data,
            broken_by_bad_data=broken_by_bad_data,
            b_noise_interval=(self.hessian_average.interval(self.confidence) if self.hessian_average.num_updates
                              else (math.nan, math.nan)),
            nonfinite_from_start=nonfinite_from_start(self._rows),
            hessian_every=self.hessian_every,
            population_size=self.population_size,
        )

    @property
    def last_row(self) -> dict[str, Any]:
        """The history row of the latest step (``history.iloc[-1]`` without building the DataFrame)."""
        if not self._rows:
            raise RuntimeError("no step has been taken yet")
        return self._rows[-1]

    @property
    def last_step_finite(self) -> bool:
        """Whether the latest step's loss (and, on a measured step, every per-example gradient norm and the
        mean gradient) was finite. When False, p.grad may hold inf or NaN: skip ``optimizer.step()`` as
        ``GradScaler`` does, or stop. True for a step whose loss alone was NaN while every gradient was finite
        (0/0 of a mean over no terms: ``finite_gradient``), whose p.grad a plain loop steps on: a loop that skipped
        such steps skipped every batch holding one fully masked sequence. On a DDP model measured rank by rank it
        is whether p.grad, all-reduced and the same on every rank, is finite: another rank's batch may have made
        it NaN while this rank's step was finite, and one rank's row may be non-finite (a per-example norm past
        float32's range) while p.grad is not; every rank must decide alike."""
        if not self._rows:
            raise RuntimeError("no step has been taken yet")
        if self._rank_local:   # the all-reduced p.grad, the same on every rank: one decision, no collective
            return gradients_finite(self.model)
        return not _is_nonfinite(self._rows[-1]) or _finite_gradient(self._rows[-1])

    def state_dict(self) -> dict[str, Any]:
        """Plain Python types only (history rows included): loadable with ``torch.load(..., weights_only=True)``."""
        return self._state() | {"history": [to_plain(row) for row in self._rows]}

    def _state(self) -> dict[str, Any]:
        """``state_dict`` without the history."""
        return {
            "step": self.step,
            "examples_seen": self.examples_seen,
            "nonfinite_steps": self.nonfinite_steps,
            "average": self.average.state_dict(),
            "hessian_average": self.hessian_average.state_dict(),
            "population_size": self.population_size,
            "b_noise_population_corrected": True,   # since 58a7566 B_noise takes the correction too
        }

    def _population_of(self, batch_size: int) -> int | None:
        """``population_size`` for a batch of ``batch_size`` examples; None (warned once) for a batch larger than it,
        which holds some example twice (a sampler that pads a small dataset for its ranks) and so is no draw without
        replacement."""
        if self.population_size is not None and batch_size > self.population_size:
            self._warn_once("population", population_smaller_than_batch(self.population_size, batch_size))
            return None
        return self.population_size

    def set_population_size(self, population_size: int | None) -> None:
        """Take ``population_size`` for the steps from now on (a framework's training set, read again when its
        DataLoader is rebuilt). Averages taken with another are continued with a warning, as on a resume."""
        population_size = _checked_population(population_size)
        if population_size != self.population_size and self.average.num_updates:
            _warn_population_changed(f"the averages so far were taken with population_size={self.population_size}",
                                     f"the steps from now on with {population_size}")
        self.population_size = population_size

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`. Averages taken with another ``population_size`` (or, from a version
        before session 25, without one: no finite-population correction) are continued with a warning: their
        steps' |G|^2 differs from the later ones' by B_simple/N of it; so are B_noise averages of a version before
        B_noise took the correction (58a7566). Averages taken with another ``ema_decay`` or
        ``hessian_ema_decay`` are refused, naming the option and the checkpoint's value, before anything is changed."""
        for name, average, saved_average in (("ema_decay", self.average, state["average"]),
                                             ("hessian_ema_decay", self.hessian_average, state["hessian_average"])):
            if float(saved_average["decay"]) != average.decay:
                raise ValueError(f"the checkpoint's averages were taken with {name}={saved_average['decay']!r} and "
                                 f"this monitor's {name} is {average.decay!r}: give {name}="
                                 f"{saved_average['decay']!r} (the checkpoint's) to continue them (NoiseScaleOptions "
                                 "too), or start without the checkpoint's noise-scale state")
        saved = state.get("population_size", "missing")
        if saved != self.population_size and state["average"]["num_updates"]:
            taken = ("without the finite-population correction (a checkpoint of an earlier version)"
                     if saved in ("missing", None) else f"with population_size={saved}")
            _warn_population_changed(f"the checkpoint's averages were taken {taken}",
                                     f"this monitor's population_size is {self.population_size}")
        elif (self.population_size is not None and state["hessian_average"]["num_updates"]
              and not state.get("b_noise_population_corrected")):
            warnings.warn("the checkpoint's B_noise averages were taken by an earlier version, before B_noise took "
                          f"the finite-population correction (population_size={self.population_size}): their "
                          "G^T H G read low by about B_noise/N of it, and the averages continued here mix both",
                          RuntimeWarning, stacklevel=2)
        self.step = int(state["step"])
        self.examples_seen = int(state["examples_seen"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.average.load_state_dict(state["average"])
        self.hessian_average.load_state_dict(state["hessian_average"])
        self._rows = list(state["history"])

    def close(self) -> None:
        """Remove the hooks from the model."""
        self.norms.close()

    def __enter__(self) -> NoiseScaleMonitor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _is_nonfinite(row: dict[str, Any]) -> bool:
    """Whether a history row's loss (or, on a measured step, a gradient norm) was not finite."""
    return row.get("nonfinite", False) or not math.isfinite(row["loss"])


def _finite_gradient(row: dict[str, Any]) -> bool:
    """Whether a history row's loss was NaN while every gradient was finite, on finite data (``finite_gradient``):
    a NaN that never reached the gradient, as 0/0 of a mean over no terms gives. No sign of divergence, whether the
    step was measured or not. An infinite loss is not one (a blown-up critic's -D(x) at an infinite bias, a dead
    ReLU under a log loss: their gradients are finite too, and they are divergence)."""
    return row.get("finite_gradient") is True


def _holds_bad_data(row: dict[str, Any]) -> bool:
    """Whether a history row's batch held bad values: its ``nonfinite_data`` is a text (absent, None or NaN on the
    other rows)."""
    return isinstance(row.get("nonfinite_data"), str)


def _caused_by_data(rows: list[dict[str, Any]]) -> list[bool]:
    """For each history row: whether it is non-finite by the data's doing: its batch held NaN or Inf
    (``nonfinite_data``), or it follows such a step with no finite step between (an optimizer step taken on that
    batch's gradient made the parameters non-finite)."""
    caused, previous = [], False
    for row in rows:
        previous = _is_nonfinite(row) and (_holds_bad_data(row) or previous)
        caused.append(previous)
    return caused


def bad_data_of(rows: list[dict[str, Any]]) -> tuple[str | None, bool]:
    """(what, broken) for the history ``rows``: ``what`` names the first step whose batch held NaN or Inf and how
    many did (None if none did); ``broken``: the latest step is non-finite on finite data and every step back to
    such a batch is non-finite too, so the data broke the parameters (an optimizer step on that batch)."""
    bad = [row for row in rows if _holds_bad_data(row)]
    if not bad:
        return None, False
    what = f"the batch of step {bad[0]['step']} holds {bad[0]['nonfinite_data']}"
    if len(bad) > 1:
        what += f", and {len(bad) - 1} more steps' batches"
    broken = _caused_by_data(rows)[-1] and not _holds_bad_data(rows[-1])
    return what, broken


_NONFINITE_FROM_START = (
    "no run diverges before a finite step, so the model or the loss computes a non-finite value on this data (a "
    "softmax over a row masked entirely by -inf, as a fully padded sequence gives it; log(0); 0/0), or the "
    "parameters were not finite when the measurement began; the learning rate is not the cause. "
    "torch.autograd.detect_anomaly() names the operation")


def _nonfinite_examples(losses: torch.Tensor) -> str | None:
    """Which of a batch's per-example ``losses`` are not finite, where some are and some are not ("1 of its 16
    examples is not finite (index 3)", at most 5 indices named); None where all or none are."""
    bad = (~torch.isfinite(losses.reshape(-1))).nonzero().flatten().tolist()
    if not bad or len(bad) == losses.numel():
        return None
    named = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    return (f"the loss of {len(bad)} of its {losses.numel()} examples is not finite "
            f"({'index' if len(bad) == 1 else 'indices'} {named})")


def nonfinite_from_start(rows: list[dict[str, Any]]) -> str | None:
    """What the history ``rows`` show when every step, from the first, has a non-finite loss on finite data (no
    batch held NaN or Inf), or None: such a run never had a finite step to diverge from (the summary's
    ``nonfinite_from_start``). A finite loss with a non-finite gradient is not counted: fp16's loss scale overflows
    so at the start of a run, and GradScaler backs off."""
    if not rows or not all(not math.isfinite(row["loss"]) and not _holds_bad_data(row) for row in rows):
        return None
    seen = f"the loss has not been finite at any of the {len(rows)} steps, on finite data"
    examples = rows[0].get("nonfinite_examples")
    return seen + (f"; at the first, {examples}" if isinstance(examples, str) else "")


def divergence_of(rows: list[dict[str, Any]]) -> str | None:
    """Why the history ``rows`` show a diverged run, or None. The latest steps are the last fifth of the rows (1 to
    10 of them): the run diverged when more than half of them had a non-finite loss or gradient (one skipped step,
    an fp16 overflow say, is not divergence), or when the median finite loss over as many latest steps exceeds
    DIVERGED_LOSS_FACTOR times the first finite loss (the loss at the start of the measurement). Non-finite steps
    the data caused (:func:`_caused_by_data`: a batch holding NaN or Inf, and the steps it broke) are no
    divergence (:func:`bad_data_of` reports them), nor are the steps of a run that never had a finite one
    (:func:`nonfinite_from_start`), nor steps whose loss alone was not finite (:func:`_finite_gradient`: a batch
    whose every label is ignored, which the HF Trainer's token mean takes as 0/0)."""
    if not rows or nonfinite_from_start(rows) is not None:
        return None
    count = min(10, max(1, len(rows) // 5))
    latest = rows[-count:]
    nonfinite = [row for row, by_data in zip(latest, _caused_by_data(rows)[-count:])
                 if _is_nonfinite(row) and not by_data and not _finite_gradient(row)]
    if 2 * len(nonfinite) > len(latest):
        if len(latest) == 1:
            return f"the loss or gradient of the latest step ({latest[0]['step']}) is not finite"
        return f"the loss or gradient is not finite in {len(nonfinite)} of the latest {len(latest)} steps"
    losses = [row["loss"] for row in rows if math.isfinite(row["loss"])]
    if not losses:   # every step non-finite by the data's doing
        return None
    first = losses[0]
    window = min(10, max(1, len(losses) // 5))
    recent = statistics.median(losses[-window:])
    if first > 0 and recent > DIVERGED_LOSS_FACTOR * first:
        return (f"the loss rose from {first:.4g} at the first step to {recent:.4g} over the latest {window} "
                f"step(s), more than {DIVERGED_LOSS_FACTOR:g} times")
    return None


def loss_scale_of(grad_scaler: Any, device: torch.device) -> float:
    """The factor ``grad_scaler.scale(loss)`` multiplies a loss by (1.0 without a scaler).

    Asked of the scaler itself rather than read with ``get_scale()``: like ``scaler.scale(loss)``, this creates the
    scaler's scale tensor on ``device`` on first use, which ``scaler.step`` and ``scaler.update`` require.
    """
    if grad_scaler is None:
        return 1.0
    return float(grad_scaler.scale(torch.ones((), device=device)))


def _checked_population(population_size: int | None) -> int | None:
    """The N of the finite-population correction: None (none) or an int of at least 2."""
    return None if population_size is None else check_int(population_size, "population_size", 2)


def _warn_population_changed(before: str, after: str) -> None:
    warnings.warn(f"{before}, and {after}: the steps before and after differ in |G|^2 by about B_simple/N of it, and "
                  "the averages mix both", RuntimeWarning, stacklevel=3)


def noise_scale_across_seeds(summaries: Sequence[NoiseScaleSummary], *,
                             confidence: float | None = None) -> NoiseScaleAcrossRuns:
    """B_simple of a training setting from the summaries of K >= 2 runs of it that differ only in their seed
    (``monitor.summary()`` of each, after the same number of steps), with an interval from the runs' spread
    (:func:`~noisescale.estimators.noise_scale_across_runs`). One run's interval is that run's: other seeds spread
    1.2 to 1.65 times as widely (README, quick start). ``confidence``: the summaries' own unless given.

    A run that diverged, was broken by bad data or measured no step is refused by its index: leave it out (and
    say so), since dropping runs selects them."""
    summaries = list(summaries)
    for index, summary in enumerate(summaries):
        if not isinstance(summary, NoiseScaleSummary):
            raise TypeError(f"summaries[{index}] must be a NoiseScaleSummary (monitor.summary()), got "
                            f"{type(summary).__name__}; for the commands' JSON summaries use "
                            "noisescale.estimators.noise_scale_across_runs")
        if not summary.reports_noise_scale:
            raise ValueError(f"summaries[{index}] reports no noise scale (the run diverged, was broken by bad data or "
                             "never had a finite step: its text says which); leave it out")
        if not (math.isfinite(summary.trace_sigma) and math.isfinite(summary.grad_sqnorm)):
            raise ValueError(f"summaries[{index}] has no measured step yet (tr(Sigma) {summary.trace_sigma}, |G|^2 "
                             f"{summary.grad_sqnorm})")
    if len({summary.population_size for summary in summaries}) > 1:
        warnings.warn(f"the summaries' averages were taken with different finite-population corrections "
                      f"(population_size {[s.population_size for s in summaries]}): their |G|^2 differ by about "
                      "B_simple/N of it for that reason alone", RuntimeWarning, stacklevel=2)
    if len({summary.steps for summary in summaries}) > 1:
        warnings.warn(f"the summaries were taken after different numbers of steps ({[s.steps for s in summaries]}): "
                      "B_simple changes as training goes on, so their spread mixes seeds with stages of training",
                      RuntimeWarning, stacklevel=2)
    if confidence is None:
        confidences = {summary.confidence for summary in summaries}
        if len(confidences) > 1:
            raise ValueError(f"the summaries were taken at different confidences ({sorted(confidences)}): give "
                             "confidence=")
        confidence = confidences.pop() if confidences else 0.9
    return noise_scale_across_runs([summary.trace_sigma for summary in summaries],
                                   [summary.grad_sqnorm for summary in summaries], confidence=confidence)


def _pair(batch: Any, index: int) -> tuple[Any, Any]:
    """``measure``'s batch as (inputs, targets), or a TypeError saying what it got and how to give pairs."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    got = (f"a mapping with keys {listed(list(batch))} (a HuggingFace collator's batch?)" if isinstance(batch, Mapping)
           else f"a {type(batch).__name__}" + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""))
    raise TypeError(f"measure() takes batches of (inputs, targets) pairs, got {got} as batch {index}; for batches "
                    "of keyword inputs that hold their labels pass ((batch, batch['labels']) for batch in loader) "
                    "with population_size=len(loader.dataset) (a generator has no dataset for measure to count)")


def measure(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batches: Any,
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **monitor_options: Any,
) -> NoiseScaleMonitor:
    """Noise scale of a trained checkpoint: run the monitor over ``batches`` (a DataLoader or any iterable of
    (inputs, targets)) without taking optimizer steps. The model's parameters and gradients are left as they
    were. Returns the monitor: ``.summary()`` and ``.history`` hold the result.

    With ``ema_decay`` close to 1 the averages approach the plain means over the batches seen, which is the
    right average here since the parameters do not move (default 0.999 unless given). A DataLoader whose batches
    are drawn without replacement (its default sequential or shuffled sampler) gives ``population_size`` its
    dataset's length unless given.
    """
    from tqdm.auto import tqdm

    monitor_options.setdefault("ema_decay", 0.999)
    monitor_options.setdefault("population_size", population_drawn_from(batches))
    saved_grads = {name: p.grad for name, p in model.named_parameters()}   # set to None, not written to, below
    try:
        with NoiseScaleMonitor(model, loss_fn, **monitor_options) as monitor:
            for index, batch in enumerate(tqdm(batches, total=max_batches, disable=not progress)):
                if max_batches is not None and index >= max_batches:
                    break
                inputs, targets = _pair(batch, index)
                if device is not None:
                    inputs, targets = to_device(inputs, device), to_device(targets, device)
                model.zero_grad(set_to_none=True)
                monitor(inputs, targets)
    finally:   # also when interrupted (a KeyboardInterrupt from the loader)
        for name, p in model.named_parameters():
            p.grad = saved_grads[name]
    return monitor
