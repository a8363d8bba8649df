"""Batch-size and learning-rate policies driven by the gradient noise scale.

Three pieces, each deterministic and checkpointable as a dict of plain Python types:

* :class:`NoiseScaleBatchPolicy` -- B_t = clip(kappa * noise scale, B_min, B_max) with rounding, a hold
  period, a maximum factor per change and (by default) increases only. McCandlish et al. (2018), "An
  Empirical Model of Large-Batch Training": the critical batch is about B_noise ~ B_simple.
* :class:`BatchSizeSchedule` -- epoch -> (batch size, learning rate) for the four training modes of
  Smith, Kindermans & Le (2017), "Don't Decay the Learning Rate, Increase the Batch Size": ``fixed``,
  ``lr-decay``, ``batch-increase`` and ``hybrid``. They rest on the SGD noise scale
  g ~ eps N / (B (1 - m)): decaying eps by a factor f and growing B by 1/f give the same g.
* :func:`couple_learning_rate` -- the learning rate to use when the batch size changes from B_old to B_new:
  unchanged, linear, square root, or AdaScale's gain ratio (Johnson et al. 2020, as in fairscale's
  ``AdaScale.gain``) from the estimators' tr(Sigma) and |G|^2; :func:`adascale_gain` the gain itself, which
  AdaScale takes at every step from B_0 with the current estimates.
"""

from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from noisescale._checks import check_finite, check_int, check_real


__all__ = [
    "NoiseScalePolicyState",
    "NoiseScaleBatchPolicy",
    "ScheduleValue",
    "BatchSizeSchedule",
    "SCHEDULE_MODES",
    "COUPLING_RULES",
    "round_to_multiple",
    "adascale_gain",
    "couple_learning_rate",
]


def _check_batch_size(value: Any, name: str, granularity: int) -> int:
    """A batch size: an int >= 1 that is a multiple of granularity."""
    value = check_int(value, name, 1)
    if value % granularity:
        raise ValueError(f"{name}={value} is not a multiple of granularity={granularity}")
    return value


def round_to_multiple(value: float, granularity: int) -> int:
    """Nearest multiple of granularity (halves round up), at least one granularity."""
    return max(granularity, granularity * math.floor(value / granularity + 0.5))


# --------------------------------------------------------------------------- noise-scale policy


@dataclass(frozen=True)
class NoiseScalePolicyState:
    """The batch size in use and how many steps it has been used for since it was last changed."""

    batch_size: int
    steps_since_change: int = 0


class NoiseScaleBatchPolicy:
    """Choose the next batch size from a smoothed noise-scale estimate (B_simple or B_noise).

    Each call of :meth:`step` (once per training step) proposes

        target = clip(kappa * noise_scale, B_min, B_max, B / max_factor, B * max_factor),

    rounded to the nearest multiple of ``granularity`` inside those bounds, and adopts it only if it differs
    from the current B, the current B has been used for at least ``hold_steps`` steps, and it is an increase
    (unless ``allow_decrease``). A NaN, infinite or non-positive estimate (no signal resolved yet) keeps B.

    Args:
        initial_batch_size: B at step 0, a multiple of granularity in [B_min, B_max].
        min_batch_size, max_batch_size: B_min <= B_max, both multiples of granularity.
        kappa: B = kappa * noise scale (> 0); kappa = 1 aims at the critical batch B_crit ~ B_noise
            (McCandlish et al. 2018).
        granularity: batch sizes are multiples of it (e.g. num_replicas * micro-batch size).
        hold_steps: the batch is changed at most once every hold_steps steps (>= 1).
        max_factor: one change multiplies or divides B by at most this (> 1); B_min * (max_factor - 1)
            must be at least one granularity, or no change could ever be made.
        allow_decrease: also follow the estimate downwards.
    """

    def __init__(
        self,
        initial_batch_size: int,
        *,
        min_batch_size: int,
        max_batch_size: int,
        kappa: float = 1.0,
        granularity: int = 1,
        hold_steps: int = 1,
        max_factor: float = 2.0,
        allow_decrease: bool = False,
    ) -> None:
        self.granularity = check_int(granularity, "granularity", 1)
        self.min_batch_size = _check_batch_size(min_batch_size, "min_batch_size", granularity)
        self.max_batch_size = _check_batch_size(max_batch_size, "max_batch_size", granularity)
        if min_batch_size > max_batch_size:
            raise ValueError(f"min_batch_size={min_batch_size} exceeds max_batch_size={max_batch_size}")
        _check_batch_size(initial_batch_size, "initial_batch_size", granularity)
        if not min_batch_size <= initial_batch_size <= max_batch_size:
            raise ValueError(
                f"initial_batch_size={initial_batch_size} lies outside [min_batch_size, max_batch_size] = "
                f"[{min_batch_size}, {max_batch_size}]"
            )
        self.kappa = check_real(kappa, "kappa")
        if not (self.kappa > 0 and math.isfinite(self.kappa)):
            raise ValueError(f"kappa must be a finite number > 0, got {kappa!r}")
        self.hold_steps = check_int(hold_steps, "hold_steps", 1)
        self.max_factor = check_real(max_factor, "max_factor")
        if not self.max_factor > 1:
            raise ValueError(f"max_factor must be > 1, got {max_factor!r}")
        if min_batch_size * (self.max_factor - 1) < granularity:
            raise ValueError(
                f"max_factor={max_factor} cannot move min_batch_size={min_batch_size} by one granularity="
                f"{granularity}: need min_batch_size * (max_factor - 1) >= granularity"
            )
        if not isinstance(allow_decrease, bool):
            raise TypeError(f"allow_decrease must be a bool, got {type(allow_decrease).__name__}")
        self.allow_decrease = allow_decrease
        self.state = NoiseScalePolicyState(batch_size=initial_batch_size)

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def target_batch_size(self, batch_size: int, noise_scale: float) -> int:
        """kappa * noise_scale clipped to [B_min, B_max] and [B / max_factor, B * max_factor], on the grid."""
        g = self.granularity
        # the 1e-9 keeps float rounding of B * max_factor (e.g. 3 * 1.1) from losing a grid point
        low = max(self.min_batch_size, g * math.ceil(batch_size / self.max_factor / g - 1e-9))
        high = min(self.max_batch_size, g * math.floor(batch_size * self.max_factor / g + 1e-9))
        return min(max(round_to_multiple(self.kappa * noise_scale, g), low), high)

    def decide(self, state: NoiseScalePolicyState, noise_scale: float) -> NoiseScalePolicyState:
        """Pure decision: the state after one more step at ``state.batch_size`` given this estimate."""
        steps = state.steps_since_change + 1
        noise_scale = check_real(noise_scale, "noise_scale")
        if not (math.isfinite(noise_scale) and noise_scale > 0) or steps < self.hold_steps:
            return NoiseScalePolicyState(state.batch_size, steps)
        target = self.target_batch_size(state.batch_size, noise_scale)
        if target == state.batch_size or (target < state.batch_size and not self.allow_decrease):
            return NoiseScalePolicyState(state.batch_size, steps)
        return NoiseScalePolicyState(target, 0)

    def step(self, noise_scale: float) -> int:
        """Record one training step with the current estimate; returns the batch size for the next step."""
        self.state = self.decide(self.state, noise_scale)
        return self.state.batch_size

    def config(self) -> dict[str, Any]:
        return {
            "min_batch_size": self.min_batch_size,
            "max_batch_size": self.max_batch_size,
            "kappa": self.kappa,
            "granularity": self.granularity,
            "hold_steps": self.hold_steps,
            "max_factor": self.max_factor,
            "allow_decrease": self.allow_decrease,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self.state), "config": self.config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the batch size and hold counter; the saved configuration must equal this one. A state saved at
        another granularity (a run resumed on another number of processes) is this policy's where its B_min and
        B_max, rounded to the nearest multiples of this granularity, are this one's; it continues at its batch size
        rounded so too (inside [B_min, B_max], since rounding keeps the order), with a warning."""
        saved = dict(state["config"])
        saved_granularity = saved.get("granularity", self.granularity)
        if saved_granularity != self.granularity:
            saved |= {name: round_to_multiple(saved[name], self.granularity)
                      for name in ("min_batch_size", "max_batch_size")} | {"granularity": self.granularity}
        differing = sorted(name for name, value in self.config().items() if saved.get(name) != value)
        if differing:
            rounded = " (B_min and B_max rounded to this granularity)" if saved_granularity != self.granularity else ""
            raise ValueError(f"state_dict was saved with config {state['config']}, this policy has {self.config()}: "
                             f"{' and '.join(differing)} {'differs' if len(differing) == 1 else 'differ'}{rounded}")
        batch_size = _check_batch_size(state["batch_size"], "batch_size", saved_granularity)
        if batch_size % self.granularity:
            rounded = round_to_multiple(batch_size, self.granularity)
            warnings.warn(f"the policy's state was saved at granularity {saved_granularity} and continues at "
                          f"granularity {self.granularity} (another number of processes): its batch size "
                          f"{batch_size} becomes {rounded}, the nearest multiple", stacklevel=2)
            batch_size = rounded
        if not self.min_batch_size <= batch_size <= self.max_batch_size:
            raise ValueError(f"state_dict batch_size={batch_size} lies outside [min_batch_size, max_batch_size]")
        steps = check_int(state["steps_since_change"], "steps_since_change", 0)
        self.state = NoiseScalePolicyState(batch_size, steps)


# --------------------------------------------------------------------------- Smith schedules


class ScheduleValue(NamedTuple):
    batch_size: int
    learning_rate: float


SCHEDULE_MODES = ("fixed", "lr-decay", "batch-increase", "hybrid")


class BatchSizeSchedule:
    """Epoch -> (batch size, learning rate) for the training modes of Smith et al. (2017).

    With k = number of milestones <= epoch, the target SGD noise scale is

        g_k = eps_0 f^k / (B_0 (1 - m_0))          (g ~ eps N / (B (1 - m)), N constant)

    and each mode spends the factor f^k differently. The batch size grows to

        B_ideal = B_0 f^(-s k) (1 - m_0) / (1 - m),      s = 0 (lr-decay), 1 (batch-increase), s (hybrid),

    is rounded to a multiple of ``granularity`` and capped at B_max; the learning rate then carries the rest,

        eps = g_k B (1 - m),

    so eps / (B (1 - m)) equals the lr-decay schedule's value exactly, including when the cap or rounding
    takes part of the factor ("once B_max is reached, decay the learning rate instead"). ``hybrid`` with
    s = 1/2 is the sqrt(f) split of the MNIST replication (seed 004). ``fixed`` ignores the milestones.

    Momentum rule (Smith et al. section 5): with ``momentum_rule=True`` pass the momentum m in use to
    :meth:`at`; B scales by (1 - m_0) / (1 - m) so that g stays constant when m changes. Without it the
    momentum is not part of the schedule.

    Args:
        mode: one of SCHEDULE_MODES.
        base_learning_rate, base_batch_size: eps_0 and B_0 before the first milestone.
        milestones: strictly increasing epochs (>= 0) at which g is multiplied by decay_factor.
        decay_factor: f in (0, 1), e.g. 0.1 or 0.2.
        max_batch_size: B_max >= B_0 (None: no cap); a multiple of granularity.
        batch_share: s in (0, 1) for ``hybrid`` (default 1/2); fixed by the other modes.
        granularity: batch sizes are multiples of it; B_0 must be one.
        momentum_rule, base_momentum: see above; m_0 in [0, 1).
    """

    def __init__(
        self,
        mode: str,
        *,
        base_learning_rate: float,
        base_batch_size: int,
        milestones: tuple[float, ...] | list[float] = (),
        decay_factor: float = 0.1,
        max_batch_size: int | None = None,
        batch_share: float | None = None,
        granularity: int = 1,
        momentum_rule: bool = False,
        base_momentum: float = 0.0,
    ) -> None:
        if mode not in SCHEDULE_MODES:
            raise ValueError(f"mode must be one of {SCHEDULE_MODES}, got {mode!r}")
        self.mode = mode
        self.base_learning_rate = check_real(base_learning_rate, "base_learning_rate")
        if not (self.base_learning_rate > 0 and math.isfinite(self.base_learning_rate)):
            raise ValueError(f"base_learning_rate must be a finite number > 0, got {base_learning_rate!r}")
        self.granularity = check_int(granularity, "granularity", 1)
        self.base_batch_size = _check_batch_size(base_batch_size, "base_batch_size", granularity)
        self.milestones = [check_real(epoch, "milestones[i]") for epoch in milestones]
        if any(not math.isfinite(epoch) or epoch < 0 for epoch in self.milestones):
            raise ValueError(f"milestones must be finite epochs >= 0, got {list(milestones)}")
        if any(later <= earlier for earlier, later in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {list(milestones)}")
        self.decay_factor = check_real(decay_factor, "decay_factor")
        if not 0 < self.decay_factor < 1:
            raise ValueError(f"decay_factor must lie in (0, 1) (a decay), got {decay_factor!r}")
        if max_batch_size is not None:
            _check_batch_size(max_batch_size, "max_batch_size", granularity)
            if max_batch_size < base_batch_size:
                raise ValueError(f"max_batch_size={max_batch_size} is below base_batch_size={base_batch_size}")
        self.max_batch_size = max_batch_size
        self.batch_share = self._batch_share(mode, batch_share)
        if not isinstance(momentum_rule, bool):
            raise TypeError(f"momentum_rule must be a bool, got {type(momentum_rule).__name__}")
        self.momentum_rule = momentum_rule
        self.base_momentum = self._check_momentum(base_momentum, "base_momentum")

    @staticmethod
    def _batch_share(mode: str, batch_share: float | None) -> float:
        if mode != "hybrid":
            if batch_share is not None:
                raise ValueError(f"batch_share applies to mode 'hybrid' only, got it with mode {mode!r}")
            return {"fixed": 0.0, "lr-decay": 0.0, "batch-increase": 1.0}[mode]
        share = 0.5 if batch_share is None else check_real(batch_share, "batch_share")
        if not 0 < share < 1:
            raise ValueError(f"batch_share must lie in (0, 1) for mode 'hybrid', got {batch_share!r}")
        return share

    @staticmethod
    def _check_momentum(momentum: Any, name: str) -> float:
        momentum = check_real(momentum, name)
        if not 0 <= momentum < 1:
            raise ValueError(f"{name} must lie in [0, 1), got {momentum!r}")
        return momentum

    def decays_before(self, epoch: float) -> int:
        """k: how many milestones are <= epoch (0 for mode 'fixed')."""
        return 0 if self.mode == "fixed" else bisect.bisect_right(self.milestones, epoch)

    def at(self, epoch: float, momentum: float | None = None) -> ScheduleValue:
        """(batch size, learning rate) at a fractional epoch (examples seen / N); see the class docstring."""
        epoch = check_real(epoch, "epoch")
        if not (math.isfinite(epoch) and epoch >= 0):
            raise ValueError(f"epoch must be a finite number >= 0, got {epoch!r}")
        if momentum is None:
            momentum = self.base_momentum
        elif not self.momentum_rule:
            raise ValueError("momentum was given but momentum_rule=False; enable momentum_rule to use it")
        momentum = self._check_momentum(momentum, "momentum")
        decay = self.decay_factor ** self.decays_before(epoch)
        target_noise_scale = self.base_learning_rate * decay / (self.base_batch_size * (1 - self.base_momentum))
        ideal = self.base_batch_size * decay ** (-self.batch_share) * (1 - self.base_momentum) / (1 - momentum)
        batch_size = round_to_multiple(ideal, self.granularity)
        if self.max_batch_size is not None:
            batch_size = min(batch_size, self.max_batch_size)
        return ScheduleValue(batch_size, target_noise_scale * batch_size * (1 - momentum))

    __call__ = at

    def state_dict(self) -> dict[str, Any]:
        """The configuration (the schedule has no other state): a checkpoint records which schedule ran."""
        return {
            "mode": self.mode,
            "base_learning_rate": self.base_learning_rate,
            "base_batch_size": self.base_batch_size,
            "milestones": list(self.milestones),
            "decay_factor": self.decay_factor,
            "max_batch_size": self.max_batch_size,
            "batch_share": self.batch_share if self.mode == "hybrid" else None,
            "granularity": self.granularity,
            "momentum_rule": self.momentum_rule,
            "base_momentum": self.base_momentum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Become the saved schedule (validated as in the constructor)."""
        state = dict(state)
        self.__init__(state.pop("mode"), **state)


# --------------------------------------------------------------------------- learning-rate coupling


COUPLING_RULES = ("none", "linear", "sqrt", "adascale")


def adascale_gain(variance: float, grad_sqnorm: float, scale: float) -> float:
    """AdaScale gain ratio r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2) (Johnson et al. 2020, eq. 3).

    sigma^2 = ``variance`` is the total variance (trace of the covariance) of the gradient of the *base*
    batch, mu^2 = ``grad_sqnorm`` = |G|^2, and S the batch size relative to the base batch. r = 1 at S = 1,
    r -> S when sigma^2 dominates, r -> 1 when mu^2 dominates. Negative estimates are clipped to 0 as in
    fairscale's AdaScale.
    """
    variance = check_finite(variance, "variance")
    grad_sqnorm = check_finite(grad_sqnorm, "grad_sqnorm")
    scale = check_finite(scale, "scale")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    variance, grad_sqnorm = max(variance, 0.0), max(grad_sqnorm, 0.0)
    if variance == 0 and grad_sqnorm == 0:
        raise ValueError("adascale_gain needs variance > 0 or grad_sqnorm > 0, got both <= 0")
    return (variance + grad_sqnorm) / (variance / scale + grad_sqnorm)


def couple_learning_rate(
    learning_rate: float,
    old_batch_size: int,
    new_batch_size: int,
    rule: str,
    *,
    trace_sigma: float | None = None,
    grad_sqnorm: float | None = None,
) -> float:
    """The learning rate after the batch size changes from B_old to B_new.

    ``none``: eps; ``linear``: eps B_new / B_old (Goyal et al. 2017; Smith's g ~ eps/B constant);
    ``sqrt``: eps sqrt(B_new / B_old) (constant update variance); ``adascale``: eps * r with the AdaScale
    gain r of S = B_new / B_old over the old batch, whose gradient variance is sigma^2 = tr(Sigma) / B_old:

        r = (tr(Sigma)/B_old + |G|^2) / (tr(Sigma)/B_new + |G|^2) = (B_simple/B_old + 1) / (B_simple/B_new + 1).

    ``trace_sigma`` is the per-example tr(Sigma) and ``grad_sqnorm`` |G|^2 as the estimators report them
    (McCandlish et al. 2018); they are needed by ``adascale`` only. ``linear`` and ``sqrt`` compose: going
    B1 -> B2 -> B3 gives the same learning rate as B1 -> B3. ``adascale`` composes only while tr(Sigma) and |G|^2
    stay fixed: with each ratio taken at the estimates of its own moment the product depends on the path and
    falls below the gain it stands for as B_simple grows (8 -> 16 at B_simple 80, then 16 -> 32 at 400: 3.53;
    8 -> 32 at 400: 3.78). AdaScale itself (and ``AdaptiveTrainer(lr_coupling="adascale")``) uses at every step
    the gain of S = B / B_0 from the base rate eps_0 with the current estimates:
    ``couple_learning_rate(eps_0, B_0, B, "adascale", ...)``, i.e. eps_0 * adascale_gain(tr(Sigma)/B_0, |G|^2,
    B/B_0).
    """
    learning_rate = check_real(learning_rate, "learning_rate")
    check_int(old_batch_size, "old_batch_size", 1)
    check_int(new_batch_size, "new_batch_size", 1)
    if rule == "none":
        return learning_rate
    if rule == "linear":
        return learning_rate * new_batch_size / old_batch_size
    if rule == "sqrt":
        return learning_rate * math.sqrt(new_batch_size / old_batch_size)
    if rule == "adascale":
        if trace_sigma is None or grad_sqnorm is None:
            raise ValueError("rule 'adascale' needs trace_sigma and grad_sqnorm (from the noise-scale estimators)")
        trace_sigma = check_real(trace_sigma, "trace_sigma")
        return learning_rate * adascale_gain(trace_sigma / old_batch_size, grad_sqnorm, new_batch_size / old_batch_size)
    raise ValueError(f"rule must be one of {COUPLING_RULES}, got {rule!r}")
