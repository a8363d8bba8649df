"""Unbiased estimators of the gradient noise scale B_simple = tr(Sigma)/|G|^2 and their running averages.

Source: McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of Large-Batch Training", appendix A.
G is the true (expected) gradient, Sigma the covariance of a single example's gradient, and g_B the mean
gradient of a batch of B examples drawn i.i.d. Then

    E|g_B|^2 = |G|^2 + tr(Sigma)/B.                                                          (A.1)

Two-batch estimator. Measure |g|^2 at two batch sizes B_small < B_big and solve (A.1) for the two unknowns:

    |G|^2     ~ (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (1/B_small - 1/B_big)

Unbiased, one line each, by linearity and (A.1):
    E[B_big|g_big|^2 - B_small|g_small|^2] = (B_big - B_small)|G|^2 + tr(Sigma) - tr(Sigma) = (B_big - B_small)|G|^2;
    E[|g_small|^2 - |g_big|^2] = tr(Sigma)(1/B_small - 1/B_big).
With K accumulated micro-batches of size b, B_small = b (average the K micro-batch squared norms, which
keeps the estimate unbiased and lowers its variance) and B_big = K b.

Micro-batches of any sizes. With K >= 2 micro-batches of b_k examples (B = sum_k b_k), their mean gradients g_k
and the batch's g_B = sum_k (b_k/B) g_k, weighting micro-batch k by b_k:

    tr(Sigma) ~ S = (sum_k b_k |g_k|^2 - B |g_B|^2) / (K - 1),      |G|^2 ~ |g_B|^2 - S/B,

unbiased since E[b_k |g_k|^2] = b_k |G|^2 + tr(Sigma) and E[B |g_B|^2] = B |G|^2 + tr(Sigma); S >= 0 always (|g_B|^2
is at most the b_k/B-weighted mean of the |g_k|^2). Equal sizes give the two-batch estimator above, b_k = 1 the
per-example one below.

Per-example estimator. With per-example gradients g_i, s_i = |g_i|^2 and gbar their mean, the per-example
norms are the two-batch estimator at B_small = 1, B_big = B:

    tr(Sigma) ~ S = B/(B-1) (mean_i s_i - |gbar|^2),      |G|^2 ~ |gbar|^2 - S/B.

This assumes the batch loss is the *mean* of the per-example losses (not the sum) and i.i.d. sampling. A batch
drawn without replacement from a dataset of N examples (an epoch's shuffled batches; the truth is then the
dataset's: Sigma with divisor N, G its mean gradient) has E|gbar|^2 = |G|^2 + tr(Sigma)/B (N-B)/(N-1) and E[S] =
tr(Sigma) N/(N-1), so the estimate of |G|^2 is low by tr(Sigma)/(N-1): B_simple/(N-1) of it, whatever B is
(a statistical audit, session 25: 5 % on a logistic regression with N = 8192, B_simple = 412). ``population=N``
corrects both, exactly (test by enumeration of every batch):

    tr(Sigma) ~ S (N-1)/N,      |G|^2 ~ |gbar|^2 - S/B + S/N.

Bias of the ratio. Both estimates are unbiased but their ratio is not: E[S/|G|^2 estimate] != tr(Sigma)/|G|^2
(Jensen); when |G|^2 is small relative to the noise of its estimate the single-batch ratio is heavily biased,
can be negative or infinite. :class:`ExponentialMovingNoiseScale` therefore averages numerator and denominator
separately over steps (an exponential moving average, as McCandlish et al. do) and reports the ratio of the
averages, whose bias shrinks like 1/(effective number of steps averaged).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from noisescale._checks import check_confidence, check_decay, check_int
from noisescale._digits import printed_b_simple

__all__ = [
    "NoiseScaleEstimate",
    "simple_noise_scale",
    "two_batch_noise_scale",
    "micro_batch_noise_scale",
    "ExponentialMovingRatio",
    "ExponentialMovingNoiseScale",
    "fieller_interval",
    "NoiseScaleAcrossRuns",
    "noise_scale_across_runs",
    "mean_dominates",
]

# Relative slack allowed when checking |mean g|^2 <= mean |g_i|^2 (float32 rounding in the caller).
_JENSEN_RELATIVE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """Unbiased estimates of |G|^2 and tr(Sigma) from one batch of ``batch_size`` examples."""

    grad_sqnorm: float
    trace_sigma: float
    batch_size: int

    @property
    def b_simple(self) -> float:
        """tr(Sigma)/|G|^2 of this single batch: biased and noisy, average with ExponentialMovingNoiseScale.
        +inf when the |G|^2 estimate is <= 0 with noise (the mean gradient not resolved); NaN when both are exactly 0
        (every per-example gradient is 0: no noise and no signal, 0/0)."""
        if self.grad_sqnorm == 0 and self.trace_sigma == 0:
            return math.nan
        if self.grad_sqnorm <= 0:
            return math.inf
        return self.trace_sigma / self.grad_sqnorm


def _as_float_array(value: Any, name: str, *, nonnegative: bool = True) -> np.ndarray:
    """Convert a torch tensor, numpy array, list or number to a float64 numpy array (of squared norms, >= 0, unless
    ``nonnegative`` is False)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().to("cpu").double().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a number, array or tensor, got {type(value).__name__}") from error
    if nonnegative and np.any(array < 0):
        raise ValueError(f"{name} holds squared norms and must be >= 0, got minimum {np.nanmin(array)!r}")
    return array


def _as_scalar(value: Any, name: str) -> float:
    array = _as_float_array(value, name)
    if array.size != 1:
        raise ValueError(f"{name} must be a scalar, got shape {array.shape}")
    return float(array.reshape(()))


def mean_dominates(mean_small: float, big: float) -> bool:
    """Whether ``big`` can be |mean of vectors|^2 of vectors whose mean |vector|^2 is ``mean_small`` (Jensen, within
    float32 rounding); True for non-finite inputs, which propagate to non-finite estimates that averages skip."""
    if not (math.isfinite(big) and math.isfinite(mean_small)):
        return True
    return big <= mean_small * (1 + _JENSEN_RELATIVE_TOLERANCE) + 1e-30


def _check_mean_dominates(mean_small: float, big: float, what: str) -> None:
    """|mean of vectors|^2 <= mean of |vector|^2 always; a violation means inconsistent inputs."""
    if not mean_dominates(mean_small, big):
        raise ValueError(
            f"{what}: the squared norm of the mean gradient ({big!r}) exceeds the mean of the smaller-batch "
            f"squared norms ({mean_small!r}), impossible for a mean of those gradients; was the loss summed "
            "instead of averaged, or do the norms come from different batches?"
        )


def _two_batch_estimate(mean_small_sqnorm: float, b_small: int, big_sqnorm: float, b_big: int) -> NoiseScaleEstimate:
    """Solve E|g_B|^2 = |G|^2 + tr(Sigma)/B at B = b_small and b_big (validated inputs)."""
    grad_sqnorm = (b_big * big_sqnorm - b_small * mean_small_sqnorm) / (b_big - b_small)
    trace_sigma = (mean_small_sqnorm - big_sqnorm) / (1.0 / b_small - 1.0 / b_big)
    return NoiseScaleEstimate(grad_sqnorm=grad_sqnorm, trace_sigma=trace_sigma, batch_size=b_big)


def two_batch_noise_scale(small_sqnorms: Any, b_small: int, big_sqnorm: Any, b_big: int) -> NoiseScaleEstimate:
    """Two-batch-size estimator (module docstring): unbiased |G|^2 and tr(Sigma) from |g|^2 at two sizes.

    ``small_sqnorms`` is |g_small|^2 of one small batch (scalar) or of K micro-batches (shape (K,), averaged);
    ``big_sqnorm`` is |g_big|^2 of the batch of ``b_big`` examples. Non-finite inputs give NaN estimates.
    When the big batch is the K micro-batches together (K b_small = b_big), |g_big|^2 <= mean |g_small|^2
    is checked.
    """
    b_small = check_int(b_small, "b_small", 1)
    b_big = check_int(b_big, "b_big", 1)
    if b_big <= b_small:
        raise ValueError(f"b_big must exceed b_small, got b_small={b_small}, b_big={b_big}")
    small = _as_float_array(small_sqnorms, "small_sqnorms")
    if small.ndim > 1 or small.size == 0:
        raise ValueError(f"small_sqnorms must be a scalar or a non-empty 1-D array, got shape {small.shape}")
    big = _as_scalar(big_sqnorm, "big_sqnorm")
    mean_small = float(small.mean())
    if small.size * b_small == b_big:
        _check_mean_dominates(mean_small, big, "two_batch_noise_scale")
    return _two_batch_estimate(mean_small, b_small, big, b_big)


def micro_batch_noise_scale(sqnorms: Any, sizes: Any, grad_sqnorm: Any, *,
                            population: int | None = None) -> NoiseScaleEstimate:
    """Micro-batches of any sizes (module docstring): S = (sum_k b_k |g_k|^2 - B |g_B|^2) / (K - 1) and
    |G|^2 = |g_B|^2 - S/B, from ``sqnorms`` (K,) the squared norms |g_k|^2 of the K >= 2 micro-batches' mean
    gradients, ``sizes`` their example counts b_k, and ``grad_sqnorm`` |g_B|^2 of the batch's mean gradient
    sum_k (b_k/B) g_k. Non-finite inputs give NaN estimates. ``population``: as :func:`simple_noise_scale`'s, the
    same correction (E[S] = tr(Sigma) N/(N-1) here too, for micro-batches that are averages of examples drawn
    without replacement)."""
    units = _as_float_array(sqnorms, "sqnorms")
    if units.ndim != 1 or units.size < 2:
        raise ValueError(f"sqnorms must be 1-D with one entry per micro-batch, at least 2, got shape {units.shape}")
    counts = np.asarray([check_int(size, "each micro-batch size", 1) for size in np.asarray(sizes).reshape(-1)],
                        dtype=np.float64)
    if counts.shape != units.shape:
        raise ValueError(f"sizes must hold one count per micro-batch ({units.size}), got {counts.size}")
    big = _as_scalar(grad_sqnorm, "grad_sqnorm")
    batch_size = float(counts.sum())
    weighted = float(counts @ units)
    _check_mean_dominates(weighted / batch_size, big, "micro_batch_noise_scale")
    trace_sigma = (weighted - batch_size * big) / (units.size - 1)
    return _finite_population(NoiseScaleEstimate(grad_sqnorm=big - trace_sigma / batch_size, trace_sigma=trace_sigma,
                                                 batch_size=int(batch_size)), population)


def population_smaller_than_batch(population: int, batch_size: int) -> str:
    """The warning for a batch of more examples than ``population_size``, where no correction is taken (the
    monitors' and ``DDPNoiseScale``'s)."""
    return (f"population_size={population} is smaller than a batch of {batch_size} examples: it is the number of "
            "examples batches are drawn from (len(loader.dataset), not len(loader), the number of batches); a batch "
            "larger than it (a sampler padding a small dataset for its ranks) holds some example twice. Such steps "
            "take no finite-population correction (warned once)")


def _finite_population(estimate: NoiseScaleEstimate, population: int | None) -> NoiseScaleEstimate:
    """``estimate`` of a batch drawn without replacement from ``population`` examples, made unbiased for that
    dataset (module docstring: tr(Sigma) ~ S (N-1)/N, |G|^2 ~ |G|^2 estimate + S/N); itself for None."""
    if population is None:
        return estimate
    population = check_int(population, "population", estimate.batch_size)
    noise = estimate.trace_sigma
    return NoiseScaleEstimate(grad_sqnorm=estimate.grad_sqnorm + noise / population,
                              trace_sigma=noise * (population - 1) / population, batch_size=estimate.batch_size)


def simple_noise_scale(sqnorms: Any, grad_sqnorm: Any, *, on_small_batch: str = "raise",
                       population: int | None = None) -> NoiseScaleEstimate:
    """Per-example estimator: S = B/(B-1)(mean_i s_i - |gbar|^2), |G|^2 = |gbar|^2 - S/B (McCandlish app. A).

    ``sqnorms`` (B,) are the per-example squared gradient norms s_i = |g_i|^2 and ``grad_sqnorm`` is |gbar|^2
    of their mean. B = 1 carries no variance information: ``on_small_batch="raise"`` raises ValueError,
    ``"nan"`` warns and returns NaN estimates. Non-finite inputs give NaN estimates (no error).
    ``population``: N, for a batch drawn without replacement from a dataset of N >= B examples (module
    docstring: tr(Sigma) ~ S (N-1)/N, |G|^2 ~ |gbar|^2 - S/B + S/N); None for i.i.d. draws.
    """
    if on_small_batch not in ("raise", "nan"):
        raise ValueError(f"on_small_batch must be 'raise' or 'nan', got {on_small_batch!r}")
    per_example = _as_float_array(sqnorms, "sqnorms")
    if per_example.ndim != 1:
        raise ValueError(f"sqnorms must be 1-D with one entry per example, got shape {per_example.shape}")
    mean_gradient_sqnorm = _as_scalar(grad_sqnorm, "grad_sqnorm")
    batch_size = per_example.shape[0]
    if batch_size < 2:
        message = f"simple_noise_scale needs a batch of at least 2 examples, got {batch_size}"
        if on_small_batch == "raise":
            raise ValueError(message)
        warnings.warn(message + "; returning NaN", RuntimeWarning, stacklevel=2)
        return NoiseScaleEstimate(grad_sqnorm=math.nan, trace_sigma=math.nan, batch_size=batch_size)
    mean_sqnorm = float(per_example.mean())
    _check_mean_dominates(mean_sqnorm, mean_gradient_sqnorm, "simple_noise_scale")
    return _finite_population(_two_batch_estimate(mean_sqnorm, 1, mean_gradient_sqnorm, batch_size), population)


def fieller_interval(
    num: float, den: float, var_num: float, var_den: float, cov: float, quantile: float, *, nonnegative: bool = False
) -> tuple[float, float]:
    """Fieller's (1954) interval for E[num]/E[den] from the means ``num``, ``den``, the variances and covariance
    of those means and the t (or normal) ``quantile``; the three cases and ``nonnegative`` are described in
    :class:`ExponentialMovingRatio`."""
    t2 = quantile * quantile
    quad = den * den - t2 * var_den  # q(R) = quad R^2 - 2 lin R + const
    lin = num * den - t2 * cov
    const = num * num - t2 * var_num
    disc = lin * lin - quad * const
    floor = 0.0 if nonnegative else -math.inf
    if quad > 0:  # denominator resolved from 0: q has real roots (q(num/den) <= 0) and the set lies between them
        root = lin + math.copysign(math.sqrt(max(disc, 0.0)), lin)  # stable roots: root/quad and const/root
        low, high = sorted((root / quad, const / root if root != 0 else root / quad))
        if high < floor:  # the whole interval lies below 0: no non-negative ratio fits the data
            return (floor, math.inf)
        return (max(low, floor), high)
    if not nonnegative or const <= 0 or disc <= 0:  # 0 lies in the set, or the whole line: report the hull
        return (floor, math.inf)
    # two rays around a gap that holds 0: the non-negative part is [larger root, inf)
    root = lin + math.copysign(math.sqrt(disc), lin)
    roots = [const / root] + ([root / quad] if quad < 0 else [])
    return (max(max(roots), floor), math.inf)  # quad == 0 exactly can leave only a negative root


class ExponentialMovingRatio:
    """Exponential moving averages of a numerator and a denominator, their ratio, and a confidence interval.

    After t accepted updates with values x_1..x_t the weights are w_k = (1 - decay) decay^(t-k) and the
    average is sum_k w_k x_k / sum_k w_k: the EMA with Adam's start-up bias correction (divide by
    1 - decay^t). The reported ratio is mean(numerator)/mean(denominator); +inf when the averaged
    denominator is <= 0 (the signal is not resolved yet), NaN when both averages are exactly 0 (0/0: every
    per-example gradient was 0, so there is neither noise nor signal to resolve).

    Interval: Fieller's (Fieller 1954, "Some problems in interval estimation", J. R. Stat. Soc. B 16:175-185),
    exact for the ratio R = E[num]/E[den] of two jointly normal means. With a = mean(num), b = mean(den) and
    v_nn, v_dd, v_nd the variances and covariance of those means, it is the set of R that a t-test of
    a - R b = 0 does not reject:

        (a - R b)^2 <= t^2 (v_nn - 2 R v_nd + R^2 v_dd),   t = t_{n_eff - 1} quantile at (1 + confidence)/2,

    i.e. q(R) = (b^2 - t^2 v_dd) R^2 - 2 (a b - t^2 v_nd) R + (a^2 - t^2 v_nn) <= 0. Three cases:
      * b^2 > t^2 v_dd (the denominator is resolved from 0): a bounded interval between the roots of q;
      * b^2 <= t^2 v_dd and q has real roots r1 < r2: the two rays (-inf, r1] and [r2, inf);
      * b^2 <= t^2 v_dd and no real roots: the whole line.
    An unbounded set is reported by its hull, (-inf, inf). With ``nonnegative=True`` (the true ratio is known
    to be >= 0, as tr(Sigma)/|G|^2 is) the set is intersected with [0, inf): the two-ray case becomes (r2, inf)
    when 0 is excluded (the numerator is resolved from 0) and (0, inf) otherwise, the whole line (0, inf), a
    bounded interval is clipped at 0, and a bounded interval wholly below 0 (the data contradict a
    non-negative ratio) is reported as (0, inf), i.e. nothing resolved. high = inf therefore means the
    denominator is not resolved from 0 at this confidence. The per-step variances and covariance are the
    weighted sample moments with the reliability-weight correction 1/(1 - sum w^2/(sum w)^2); a weighted
    mean of independent steps has variance (per-step variance)/n_eff with Kish's effective sample size
    n_eff = (sum w)^2 / sum w^2. It assumes steps are independent and stationary over the averaging
    window (1/(1 - decay) steps); correlated steps in real training make it too narrow.
    Non-finite updates are skipped and counted in ``num_skipped``.
    """

    _STATE_KEYS = ("weight_sum", "weight_sqsum", "num_sum", "den_sum", "num_sqsum", "den_sqsum", "cross_sum")

    def __init__(self, decay: float = 0.95, *, nonnegative: bool = False) -> None:
        decay = check_decay(decay)
        if not isinstance(nonnegative, bool):
            raise TypeError(f"nonnegative must be a bool, got {type(nonnegative).__name__}")
        self.decay = decay
        self.nonnegative = nonnegative
        self.num_updates = 0
        self.num_skipped = 0
        self._sums = dict.fromkeys(self._STATE_KEYS, 0.0)

    def update(self, numerator: float, denominator: float) -> bool:
        """Add one step; returns False (and counts it) when either value is NaN or infinite."""
        numerator, denominator = float(numerator), float(denominator)
        if not (math.isfinite(numerator) and math.isfinite(denominator)):
            self.num_skipped += 1
            return False
        weight, decay = 1.0 - self.decay, self.decay
        step_values = {
            "weight_sum": 1.0,
            "num_sum": numerator,
            "den_sum": denominator,
            "num_sqsum": numerator * numerator,
            "den_sqsum": denominator * denominator,
            "cross_sum": numerator * denominator,
        }
        for key, value in step_values.items():
            self._sums[key] = decay * self._sums[key] + weight * value
        self._sums["weight_sqsum"] = decay * decay * self._sums["weight_sqsum"] + weight * weight
        self.num_updates += 1
        return True

    @property
    def effective_sample_size(self) -> float:
        """Kish's n_eff = (sum w)^2 / sum w^2 of the current weights (0 before any update)."""
        if self.num_updates == 0:
            return 0.0
        return self._sums["weight_sum"] ** 2 / self._sums["weight_sqsum"]

    @property
    def numerator(self) -> float:
        """Bias-corrected EMA of the numerator (NaN before any update)."""
        return self._sums["num_sum"] / self._sums["weight_sum"] if self.num_updates else math.nan

    @property
    def denominator(self) -> float:
        """Bias-corrected EMA of the denominator (NaN before any update)."""
        return self._sums["den_sum"] / self._sums["weight_sum"] if self.num_updates else math.nan

    @property
    def ratio(self) -> float:
        """mean(numerator)/mean(denominator); +inf when mean(denominator) <= 0, NaN before any update and where both
        means are exactly 0 (undefined: :attr:`all_zero`)."""
        if self.num_updates == 0 or self.all_zero:
            return math.nan
        if self.denominator <= 0:
            return math.inf
        return self.numerator / self.denominator

    @property
    def all_zero(self) -> bool:
        """Whether both averages are exactly 0 after some update, the ratio 0/0 undefined. For B_simple (its tr(Sigma)
        estimates are >= 0) that means every step's tr(Sigma) and |G|^2 were 0: every per-example gradient was 0 (a
        perfectly fitted batch, or no trainable parameter reaches the loss)."""
        return self.num_updates > 0 and self._sums["num_sum"] == 0 and self._sums["den_sum"] == 0

    def interval(self, confidence: float = 0.9) -> tuple[float, float]:
        """Fieller's confidence interval of the ratio (class docstring); (nan, nan) until n_eff > 1.5.

        ``high`` is +inf when the averaged denominator is not resolved from 0 at this confidence.
        """
        check_confidence(confidence)
        n_eff = self.effective_sample_size
        if n_eff <= 1.5:
            return (math.nan, math.nan)
        total = self._sums["weight_sum"]
        mean_num, mean_den = self.numerator, self.denominator
        scale = 1.0 / (n_eff - 1.0)  # reliability-weight correction n_eff/(n_eff - 1), then / n_eff for the mean
        var_num = (self._sums["num_sqsum"] / total - mean_num * mean_num) * scale
        var_den = (self._sums["den_sqsum"] / total - mean_den * mean_den) * scale
        cov = (self._sums["cross_sum"] / total - mean_num * mean_den) * scale
        quantile = float(stats.t.ppf(0.5 + confidence / 2, df=n_eff - 1))
        return fieller_interval(mean_num, mean_den, max(var_num, 0.0), max(var_den, 0.0), cov, quantile,
                                nonnegative=self.nonnegative)

    def state_dict(self) -> dict[str, float | int]:
        return {"decay": self.decay, "num_updates": self.num_updates, "num_skipped": self.num_skipped, **self._sums}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        missing = {"decay", "num_updates", "num_skipped", *self._STATE_KEYS} - set(state)
        if missing:
            raise ValueError(f"state dict misses keys {sorted(missing)}")
        if float(state["decay"]) != self.decay:
            raise ValueError(f"state dict has decay {state['decay']!r}, this average has decay {self.decay!r}: the "
                             "average continues only with the EMA decay it was taken with (a monitor's ema_decay or "
                             f"hessian_ema_decay); give decay={state['decay']!r}")
        self.num_updates = int(state["num_updates"])
        self.num_skipped = int(state["num_skipped"])
        self._sums = {key: float(state[key]) for key in self._STATE_KEYS}


class ExponentialMovingNoiseScale(ExponentialMovingRatio):
    """EMA of the unbiased tr(Sigma) and |G|^2 estimates; ``b_simple`` is the ratio of the two averages.

    Its interval is Fieller's with ``nonnegative=True``: the true tr(Sigma) and |G|^2 are >= 0, so is B_simple.
    """

    def __init__(self, decay: float = 0.95) -> None:
        super().__init__(decay, nonnegative=True)

    def update_estimate(self, estimate: NoiseScaleEstimate) -> bool:
        """Add one batch's :class:`NoiseScaleEstimate`; False if it was skipped as non-finite."""
        if not isinstance(estimate, NoiseScaleEstimate):
            raise TypeError(f"estimate must be a NoiseScaleEstimate, got {type(estimate).__name__}")
        return self.update(estimate.trace_sigma, estimate.grad_sqnorm)

    @property
    def b_simple(self) -> float:
        return self.ratio

    @property
    def trace_sigma(self) -> float:
        return self.numerator

    @property
    def grad_sqnorm(self) -> float:
        return self.denominator


@dataclass(frozen=True)
class NoiseScaleAcrossRuns:
    """B_simple of a setting, from the averages of ``runs`` independent runs of it (:func:`noise_scale_across_runs`).

    ``trace_sigma`` and ``grad_sqnorm``: the means over the runs; ``b_simple`` their ratio, and
    ``b_simple_interval`` its Fieller interval at ``confidence`` from the runs' spread.
    """

    b_simple: float
    b_simple_interval: tuple[float, float]
    trace_sigma: float
    grad_sqnorm: float
    runs: int
    confidence: float

    def __str__(self) -> str:
        value = printed_b_simple(self.b_simple, *self.b_simple_interval)
        return (f"B_simple = {value.value}  ({self.confidence:.0%} interval {value.low} .. {value.high}) over "
                f"{self.runs} runs")


def noise_scale_across_runs(trace_sigmas: Any, grad_sqnorms: Any, *, confidence: float = 0.9) -> NoiseScaleAcrossRuns:
    """B_simple of the setting that K >= 2 independent runs share (seeds of one configuration, each measured over the
    same stretch of training): the ratio of the mean over runs of their averaged tr(Sigma) and |G|^2, with Fieller's
    interval from the runs' own spread (the sample covariance of the K pairs over K, Student's t with K - 1 degrees
    of freedom; ``nonnegative``, as :class:`ExponentialMovingNoiseScale`).

    Why: one run's interval is of that run's own average over its window. Runs from other seeds follow other
    trajectories, and their B_simple spread 1.2 to 1.65 times as widely as that interval says (a statistical audit,
    session 25: a logistic regression and an MLP on Fashion-MNIST, 100 to 150 seeds; the 90 % interval covered
    0.57 to 0.82 of other seeds' values). This interval, from K = 3, 5 or 10 of those runs, covered the ratio of
    the mean tr(Sigma) and |G|^2 over all seeds 0.90 to 0.94 of the time at confidence 0.9.

    It is exact where the runs' values are jointly normal, and held 0.89 to 0.92 for lognormal (coefficient of
    variation up to 0.3) and t_3 values at K = 2 to 10, but 0.80 to 0.85 where the runs' |G|^2 are strongly skewed
    (lognormal, coefficient of variation 1; a review's Monte-Carlo, session 26). K = 2 is valid but wide: t_1 at
    0.95 is 6.3, and half of such intervals were unbounded above at a 30 % spread.
    """
    # averages of unbiased estimates: |G|^2 may be < 0 (not resolved from 0), and so may a two-batch tr(Sigma)
    numerators = _as_float_array(trace_sigmas, "trace_sigmas", nonnegative=False)
    denominators = _as_float_array(grad_sqnorms, "grad_sqnorms", nonnegative=False)
    if numerators.ndim != 1 or numerators.shape != denominators.shape:
        raise ValueError(f"trace_sigmas and grad_sqnorms must be 1-D and of one length (one value per run), got "
                         f"shapes {numerators.shape} and {denominators.shape}")
    runs = len(numerators)
    zero = np.flatnonzero((numerators == 0) & (denominators == 0)).tolist()
    if zero:
        raise ValueError(f"runs {zero} have tr(Sigma) = |G|^2 = 0: every per-example gradient was 0 (a perfectly "
                         "fitted batch, or no trainable parameter reaches the loss), so their B_simple is undefined "
                         "(0/0); leave them out")
    if runs < 2:
        raise ValueError(f"the spread across runs needs at least 2 runs (3 or more for a useful interval), got {runs}")
    if not (np.isfinite(numerators).all() and np.isfinite(denominators).all()):
        raise ValueError("every run's tr(Sigma) and |G|^2 must be finite: leave out a run that diverged or measured "
                         "nothing")
    confidence = check_confidence(confidence)
    # in units of the largest value of each (the ratio's interval scales exactly): no overflow in the squares
    num_unit, den_unit = (float(np.abs(values).max()) or 1.0 for values in (numerators, denominators))
    scaled_num, scaled_den = numerators / num_unit, denominators / den_unit
    covariance = np.cov(scaled_num, scaled_den) / runs   # of the two means
    if not covariance.any():
        warnings.warn(f"the {runs} runs' tr(Sigma) and |G|^2 are identical, so the interval has no width: were they "
                      "given different seeds?", RuntimeWarning, stacklevel=2)
    mean_num, mean_den = float(numerators.mean()), float(denominators.mean())
    quantile = float(stats.t.ppf(0.5 + confidence / 2, df=runs - 1))
    low, high = fieller_interval(float(scaled_num.mean()), float(scaled_den.mean()), float(covariance[0, 0]),
                                 float(covariance[1, 1]), float(covariance[0, 1]), quantile, nonnegative=True)
    interval = (low * num_unit / den_unit, high * num_unit / den_unit)
    ratio = math.inf if mean_den <= 0 else max(mean_num / mean_den, 0.0)
    return NoiseScaleAcrossRuns(b_simple=ratio, b_simple_interval=interval, trace_sigma=mean_num,
                                grad_sqnorm=mean_den, runs=runs, confidence=float(confidence))
