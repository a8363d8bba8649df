"""Fit of the empirical model of large-batch training (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", section 2.2).

Training to a fixed target at batch size B takes S optimizer steps and E = B S training examples. Across
batch sizes the pairs (S, E) lie on the hyperbola

    (S / S_min - 1) (E / E_min - 1) = 1,

equivalently S = S_min (1 + B_crit / B) and E = E_min (1 + B / B_crit), with the critical batch size
B_crit = E_min / S_min. At B = B_crit training takes 2 S_min steps and 2 E_min examples.

:func:`fit_tradeoff` fits S_min and B_crit by nonlinear least squares in log space and gives bootstrap
confidence intervals, or says that B_crit is not resolved when the sweep shows only one end of the curve
(only perfect scaling S ~ 1/B, only saturation S ~ constant, or steps that do not fall with B);
:func:`read_sweep_csv` loads and validates a sweep of (batch size, steps) results.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import least_squares
from scipy.special import expit

from noisescale._checks import check_confidence, mark_repeated_rows
from noisescale._digits import printed

__all__ = [
    "TradeoffFit",
    "fit_tradeoff",
    "fit_tradeoff_frame",
    "read_sweep_csv",
]

MIN_DISTINCT_BATCH_SIZES = 3   # the fit's two parameters and a residual
# Data-driven starts: log B_crit on a grid over the sampled batch sizes widened by e^3 (x20) at each end.
_START_GRID_POINTS = 25
_START_GRID_MARGIN = 3.0
# A fit whose residual sum of squares is within this relative amount of a limit's has run off to that limit.
_LIMIT_RELATIVE_TOLERANCE = 1e-9
# Finite stand-in for log B_crit = +-inf in the bootstrap percentiles (exp of it gives inf or 0).
_LOG_UNBOUNDED = 1e300


@dataclass(frozen=True, eq=False)
class TradeoffFit:
    """S_min, E_min and B_crit = E_min / S_min fitted to a sweep, with bootstrap confidence intervals.

    ``batch_sizes`` and ``steps`` are the (read-only) data the fit used; ``log_residual_std`` is the
    standard deviation of the residuals of log S (n - 2 degrees of freedom), i.e. roughly the relative
    scatter of the measured steps around the model.

    ``resolved`` is False when the data do not bound B_crit on both sides; the unresolved bound of
    ``b_crit_interval`` is then 0 or inf (with S_min's lower bound 0 when B_crit may be infinite, E_min's
    when it may be 0). When the best fit is a limit of the model, the estimates are that limit: B_crit = inf,
    S_min = 0 (the steps fall like E_min / B throughout) or B_crit = 0, E_min = 0 (constant steps).
    """

    s_min: float
    e_min: float
    b_crit: float
    s_min_interval: tuple[float, float]
    e_min_interval: tuple[float, float]
    b_crit_interval: tuple[float, float]
    confidence: float
    batch_sizes: np.ndarray
    steps: np.ndarray
    log_residual_std: float
    n_bootstrap: int
    resolved: bool

    def predict_steps(self, batch_size: Any) -> np.ndarray | float:
        """Steps to the target at ``batch_size``: S = S_min (1 + B_crit / B) = S_min + E_min / B."""
        batch_size = _positive_finite_array(batch_size, "batch_size")
        return self.s_min + self.e_min / batch_size

    def predict_examples(self, batch_size: Any) -> np.ndarray | float:
        """Examples to the target at ``batch_size``: E = E_min (1 + B / B_crit) = E_min + S_min B."""
        batch_size = _positive_finite_array(batch_size, "batch_size")
        return self.e_min + self.s_min * batch_size

    @property
    def examples(self) -> np.ndarray:
        """Examples processed at each data point, E = B S."""
        return self.batch_sizes * self.steps

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dictionary (JSON-serialisable) of the estimates, intervals and data."""
        return {
            "s_min": self.s_min,
            "e_min": self.e_min,
            "b_crit": self.b_crit,
            "s_min_interval": list(self.s_min_interval),
            "e_min_interval": list(self.e_min_interval),
            "b_crit_interval": list(self.b_crit_interval),
            "confidence": self.confidence,
            "log_residual_std": self.log_residual_std,
            "n_bootstrap": self.n_bootstrap,
            "resolved": self.resolved,
            "batch_sizes": self.batch_sizes.tolist(),
            "steps": self.steps.tolist(),
        }

    def summary(self) -> str:
        """One line: the three estimates with their intervals, the number of points and the scatter; an
        unresolved B_crit says so in words after its interval."""
        percent = f"{100 * self.confidence:g}%"

        b_crit = with_interval("B_crit", self.b_crit, self.b_crit_interval)
        if not self.resolved:
            b_crit += f" ({self._unresolved()})"
        return (
            f"{with_interval('S_min', self.s_min, self.s_min_interval)}, "
            f"{with_interval('E_min', self.e_min, self.e_min_interval)}, "
            f"{b_crit} "
            f"({percent} intervals, {self.steps.size} points, log residual sd {self.log_residual_std:.3g})"
        )

    def _unresolved(self) -> str:
        """Why the B_crit interval is unbounded, in words."""
        low, high = self.b_crit_interval
        if low > 0:
            return "not resolved: no saturation in the data, the steps still fall like 1/B at the largest batch sizes"
        if high < np.inf:
            return ("not resolved: no perfect-scaling part in the data, the steps do not fall like 1/B at the "
                    "smallest batch sizes")
        return "not resolved: the data fit any B_crit from 0 to inf"

    def __str__(self) -> str:
        return self.summary()


def fit_tradeoff(
    batch_sizes: Any,
    steps: Any,
    *,
    confidence: float = 0.9,
    n_bootstrap: int = 1000,
    seed: int | np.random.Generator | None = 0,
) -> TradeoffFit:
    """Fit S = S_min (1 + B_crit / B) to measured steps-to-target (McCandlish et al. 2018, eq. 2.11).

    The fit minimises sum_i (log S_i - log S_min - log(1 + B_crit / B_i))^2 over the unconstrained
    parameters (log S_min, log B_crit) with scipy's Levenberg-Marquardt, so S_min, B_crit and
    E_min = S_min B_crit stay positive. Least squares in log space treats the scatter of steps as
    multiplicative, as run-to-run variation is. The start is data-driven: the best log B_crit on a grid
    over the sampled batch sizes (widened 20x at each end) with log S_min profiled out (for a fixed B_crit
    it is the mean of log S_i - log(1 + B_crit / B_i)). Repeated measurements at one batch size are separate
    points. The model has two limits, fitted in closed form: B_crit -> 0 (S = S_min, constant) and
    B_crit -> inf (S = E_min / B, perfect scaling); a fit that runs off to one (its residual sum of squares
    is no lower than the limit's) is reported as that limit.

    Intervals come from a parametric bootstrap in log space: each replicate adds normal noise to the
    fitted log S_i and refits (from its own data-driven start, limits included). The noise sd of each
    replicate is itself drawn from the sampling distribution of the residual sd,
    sigma* = s sqrt((n - 2) / chi2_{n-2}), so that the percentile intervals have Student-t rather than
    normal widths. With the ~10 batch sizes of a typical sweep a plain residual bootstrap undercovers: it
    resamples only n residuals, which are shrunk by fitting two parameters, and it ignores that s itself is
    uncertain. Intervals are the central ``confidence`` percentiles of the replicates.

    Resolution. A limit that the data do not reject is a value B_crit can take: by the profile-likelihood
    F test (Bates & Watts 1988, "Nonlinear Regression Analysis", sec. 6.1), the limit with residual sum of
    squares RSS_limit is in the ``confidence`` region when
    (RSS_limit - RSS) / (RSS / (n - 2)) <= F_{1, n-2}(confidence). Then that bound of B_crit is 0 or inf
    (and S_min's or E_min's lower bound 0), as it is when more than the tail fraction of the bootstrap
    replicates run off to the limit; ``resolved`` is False and one RuntimeWarning says so. Well-resolved
    sweeps (the bend inside the sampled batch sizes) are unaffected.

    Args:
        batch_sizes: batch size B of each run (1-D, positive, finite; at least 3 distinct values).
        steps: steps S to reach the target for each run (same length, positive, finite).
        confidence: coverage of the intervals, in (0, 1).
        n_bootstrap: number of bootstrap replicates (>= 2).
        seed: seed or ``numpy.random.Generator`` for the bootstrap.
    """
    batch_sizes = _positive_finite_array(batch_sizes, "batch_sizes", one_dimensional=True)
    steps = _positive_finite_array(steps, "steps", one_dimensional=True)
    if batch_sizes.size != steps.size:
        raise ValueError(
            f"batch_sizes and steps must have the same length, got {batch_sizes.size} and {steps.size}"
        )
    distinct = np.unique(batch_sizes)
    if distinct.size < MIN_DISTINCT_BATCH_SIZES:
        raise ValueError(
            f"fitting S_min and E_min needs at least {MIN_DISTINCT_BATCH_SIZES} distinct batch sizes, "
            f"got {distinct.size}: {distinct.tolist()}"
        )
    check_confidence(confidence)
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 2:
        raise ValueError(f"n_bootstrap must be an integer >= 2, got {n_bootstrap!r}")

    log_batch_sizes = np.log(batch_sizes)
    log_steps = np.log(steps)
    limit_params, limit_sqsums = _limit_fits(log_batch_sizes, log_steps)
    log_params, residual_sqsum = _fit_log_parameters(
        log_batch_sizes, log_steps, _profile_start(log_batch_sizes, log_steps), limit_params, limit_sqsums
    )
    fitted = _fitted_log_steps(log_params, log_batch_sizes)
    degrees_of_freedom = steps.size - 2
    log_residual_std = float(np.sqrt(residual_sqsum / degrees_of_freedom))

    replicates = _parametric_bootstrap(
        log_batch_sizes, fitted, log_residual_std, degrees_of_freedom, n_bootstrap, np.random.default_rng(seed)
    )
    tail = (1.0 - confidence) / 2.0
    bounds = np.quantile(np.clip(replicates, -_LOG_UNBOUNDED, _LOG_UNBOUNDED), [tail, 1.0 - tail], axis=0)
    with np.errstate(over="ignore"):  # a bound that runs off to a limit of the model is reported as 0 or inf
        low, high = np.exp(bounds)
        s_min, b_crit, e_min = np.exp(log_params)
    zero_in_region, infinity_in_region = _limits_in_confidence_region(
        limit_sqsums, residual_sqsum, degrees_of_freedom, confidence
    )
    if zero_in_region:
        low[1] = low[2] = 0.0
    if infinity_in_region:
        low[0] = 0.0
        high[1] = np.inf
    fit = TradeoffFit(
        s_min=float(s_min),
        e_min=float(e_min),
        b_crit=float(b_crit),
        s_min_interval=(float(low[0]), float(high[0])),
        e_min_interval=(float(low[2]), float(high[2])),
        b_crit_interval=(float(low[1]), float(high[1])),
        confidence=float(confidence),
        batch_sizes=_read_only(batch_sizes),
        steps=_read_only(steps),
        log_residual_std=log_residual_std,
        n_bootstrap=int(n_bootstrap),
        resolved=bool(0.0 < low[1] and high[1] < np.inf),
    )
    if not fit.resolved:
        warnings.warn(
            f"{with_interval('B_crit', fit.b_crit, fit.b_crit_interval)} is "
            f"{fit._unresolved()}; sample batch sizes on both sides of the bend, where the steps stop "
            "falling like 1/B",
            RuntimeWarning,
            stacklevel=2,
        )
    elif not distinct[0] <= fit.b_crit <= distinct[-1]:
        warnings.warn(
            f"fitted B_crit = {fit.b_crit:.4g} lies outside the sampled batch sizes "
            f"[{distinct[0]:g}, {distinct[-1]:g}]; S_min or E_min is an extrapolation",
            RuntimeWarning,
            stacklevel=2,
        )
    return fit


def fit_tradeoff_frame(
    frame: pd.DataFrame,
    *,
    batch_size_column: str = "batch_size",
    steps_column: str = "steps",
    **fit_options: Any,
) -> TradeoffFit:
    """:func:`fit_tradeoff` on two columns of a DataFrame (e.g. from :func:`read_sweep_csv`)."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [column for column in (batch_size_column, steps_column) if column not in frame.columns]
    if missing:
        raise ValueError(f"frame has no column {missing[0]!r}; columns are {list(frame.columns)}")
    return fit_tradeoff(
        frame[batch_size_column].to_numpy(), frame[steps_column].to_numpy(), **fit_options
    )


def read_sweep_csv(
    path: str | PathLike[str],
    batch_size_column: str = "batch_size",
    steps_column: str = "steps",
) -> pd.DataFrame:
    """Read a sweep CSV with a header line and one run per line; return it with the two columns as float64.

    Errors name the file and, for a bad value, its line in the file (the header is line 1). Other columns
    are kept unchanged; blank lines are ignored. A row equal to an earlier one in every column (the two columns
    compared as numbers, the others as text) is left out with a RuntimeWarning naming both lines, as the sweep's
    own CSV drops a repeated cell: a pasted copy would count as another measurement and narrow the intervals.
    Repeated measurements that are separate runs need a column telling them apart (e.g. a seed).
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, skip_blank_lines=False, keep_default_na=False)
    except pd.errors.EmptyDataError as error:
        raise ValueError(f"{path}: the file is empty, expected a header line") from error
    except pd.errors.ParserError as error:
        raise ValueError(f"{path}: not a well-formed CSV file ({error})") from error
    frame.index = pd.RangeIndex(2, len(frame) + 2, name="line")
    blank = frame.apply(lambda column: column.str.strip() == "").all(axis=1)
    frame = frame[~blank].copy()
    for column in (batch_size_column, steps_column):
        if column not in frame.columns:
            raise ValueError(f"{path}: missing column {column!r}; the header has {list(frame.columns)}")
        frame[column] = _parse_positive_column(frame[column], column, path)
    if frame.empty:
        raise ValueError(f"{path}: no data rows after the header")
    keys = zip(*(frame[column] if column in (batch_size_column, steps_column) else frame[column].str.strip()
                 for column in frame.columns))
    reasons = mark_repeated_rows(keys, frame.index, [None] * len(frame), "row")
    repeats = [f"line {line} {reason}" for line, reason in zip(frame.index, reasons) if reason is not None]
    if repeats:
        warnings.warn(f"{path}: {len(repeats)} repeated row(s) left out (each copy would count as another "
                      f"measurement): {'; '.join(repeats)}; give repeated runs a column that tells them apart "
                      "(e.g. seed) to keep them", RuntimeWarning, stacklevel=2)
        frame = frame[[reason is None for reason in reasons]]
    return frame.reset_index(drop=True)


def _parse_positive_column(values: pd.Series, column: str, path: Path) -> pd.Series:
    numbers = pd.to_numeric(values.str.strip(), errors="coerce")
    for line, text, number in zip(values.index, values, numbers):
        if np.isnan(number):
            cell = text.strip()
            reason = "is empty" if cell == "" else f"is not a number: {cell!r}"
            raise ValueError(f"{path}, line {line}: column {column!r} {reason}")
        if not np.isfinite(number) or number <= 0:
            raise ValueError(f"{path}, line {line}: column {column!r} must be positive and finite, got {number}")
    return numbers.astype(np.float64)


def _model_log_steps(log_params: np.ndarray, log_batch_sizes: np.ndarray) -> np.ndarray:
    """log S = log S_min + log(1 + B_crit / B), computed stably as a softplus of log B_crit - log B."""
    log_s_min, log_b_crit = log_params
    return log_s_min + np.logaddexp(0.0, log_b_crit - log_batch_sizes)


def _model_log_steps_jacobian(log_params: np.ndarray, log_batch_sizes: np.ndarray) -> np.ndarray:
    """d log S / d (log S_min, log B_crit) = (1, B_crit / (B + B_crit)) = (1, expit(log B_crit - log B))."""
    log_b_crit = log_params[1]
    jacobian = np.empty((log_batch_sizes.size, 2))
    jacobian[:, 0] = 1.0
    jacobian[:, 1] = expit(log_b_crit - log_batch_sizes)  # no overflow when B_crit runs off to 0 in a fit
    return jacobian


def _least_squares_log_parameters(
    log_batch_sizes: np.ndarray, log_steps: np.ndarray, start: np.ndarray
) -> np.ndarray:
    result = least_squares(
        lambda log_params: _model_log_steps(log_params, log_batch_sizes) - log_steps,
        start,
        jac=lambda log_params: _model_log_steps_jacobian(log_params, log_batch_sizes),
        method="lm",
        xtol=1e-12,
        ftol=1e-12,
        gtol=1e-12,
    )
    return result.x


def _limit_fits(log_batch_sizes: np.ndarray, log_steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form least squares at the two limits of the model, for data ``log_steps`` of shape (..., n).

    Returns (log S_min, log B_crit, log E_min) of shape (..., 2, 3) and the residual sums of squares (..., 2)
    of B_crit -> 0 (log S = log S_min, the mean of log S) and B_crit -> inf (log S = log E_min - log B).
    """
    log_examples = log_steps + log_batch_sizes
    log_s_min, log_e_min = log_steps.mean(axis=-1), log_examples.mean(axis=-1)
    sqsums = np.stack(
        [
            np.sum((log_steps - log_s_min[..., None]) ** 2, axis=-1),
            np.sum((log_examples - log_e_min[..., None]) ** 2, axis=-1),
        ],
        axis=-1,
    )
    infinite = np.full_like(log_s_min, np.inf)
    params = np.stack(
        [np.stack([log_s_min, -infinite, -infinite], axis=-1), np.stack([-infinite, infinite, log_e_min], axis=-1)],
        axis=-2,
    )
    return params, sqsums


def _fit_log_parameters(
    log_batch_sizes: np.ndarray, log_steps: np.ndarray, start: np.ndarray, limit_params: np.ndarray,
    limit_sqsums: np.ndarray,
) -> tuple[np.ndarray, float]:
    """(log S_min, log B_crit, log E_min) minimising the residual sum of squares, and that sum: the
    Levenberg-Marquardt fit from ``start``, or the better limit (from :func:`_limit_fits` of the same data)
    when the fit is no better than it."""
    log_s_min, log_b_crit = _least_squares_log_parameters(log_batch_sizes, log_steps, start)
    log_params = np.array([log_s_min, log_b_crit, log_s_min + log_b_crit])
    residual_sqsum = float(np.sum((_model_log_steps(log_params[:2], log_batch_sizes) - log_steps) ** 2))
    best_limit = int(np.argmin(limit_sqsums))
    if limit_sqsums[best_limit] <= residual_sqsum * (1.0 + _LIMIT_RELATIVE_TOLERANCE):
        return limit_params[best_limit], float(limit_sqsums[best_limit])
    return log_params, residual_sqsum


def _fitted_log_steps(log_params: np.ndarray, log_batch_sizes: np.ndarray) -> np.ndarray:
    """log S of the fit (log S_min, log B_crit, log E_min) at each batch size, the two limits included."""
    log_s_min, log_b_crit, log_e_min = log_params
    if log_b_crit == -np.inf:
        return np.full_like(log_batch_sizes, log_s_min)
    if log_b_crit == np.inf:
        return log_e_min - log_batch_sizes
    return _model_log_steps(log_params[:2], log_batch_sizes)


def _profile_start(log_batch_sizes: np.ndarray, log_steps: np.ndarray) -> np.ndarray:
    """Data-driven starts (log S_min, log B_crit) for data ``log_steps`` of shape (..., n): the best log B_crit
    on a grid over the sampled batch sizes, with log S_min profiled out (the mean of log S - log(1 + B_crit/B))."""
    grid = np.linspace(
        log_batch_sizes.min() - _START_GRID_MARGIN, log_batch_sizes.max() + _START_GRID_MARGIN, _START_GRID_POINTS
    )
    shapes = np.logaddexp(0.0, grid[:, None] - log_batch_sizes[None, :])  # (grid, n)
    residuals = log_steps[..., None, :] - shapes  # (..., grid, n)
    log_s_min = residuals.mean(axis=-1)
    sqsums = np.sum((residuals - log_s_min[..., None]) ** 2, axis=-1)
    best = np.argmin(sqsums, axis=-1)[..., None]
    return np.stack([np.take_along_axis(log_s_min, best, axis=-1)[..., 0], grid[best[..., 0]]], axis=-1)


def _limits_in_confidence_region(
    limit_sqsums: np.ndarray, residual_sqsum: float, degrees_of_freedom: int, confidence: float
) -> tuple[bool, bool]:
    """Whether B_crit -> 0 and B_crit -> inf (residual sums of squares ``limit_sqsums``) pass the
    profile-likelihood F test at ``confidence``: (RSS_limit - RSS) / (RSS / (n - 2)) <= F_{1, n-2}(confidence)."""
    threshold = residual_sqsum * (1.0 + stats.f.ppf(confidence, 1, degrees_of_freedom) / degrees_of_freedom)
    return bool(limit_sqsums[0] <= threshold), bool(limit_sqsums[1] <= threshold)


def _parametric_bootstrap(
    log_batch_sizes: np.ndarray,
    fitted_log_steps: np.ndarray,
    log_residual_std: float,
    degrees_of_freedom: int,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Refits on simulated data; returns rows (log S_min, log B_crit, log E_min), one per replicate (+-inf at a
    limit of the model)."""
    noise_stds = log_residual_std * np.sqrt(degrees_of_freedom / rng.chisquare(degrees_of_freedom, n_bootstrap))
    noise = rng.standard_normal((n_bootstrap, fitted_log_steps.size)) * noise_stds[:, None]
    simulated = fitted_log_steps + noise
    starts = _profile_start(log_batch_sizes, simulated)
    limit_params, limit_sqsums = _limit_fits(log_batch_sizes, simulated)
    replicates = np.empty((n_bootstrap, 3))
    for index in range(n_bootstrap):
        replicates[index], _ = _fit_log_parameters(
            log_batch_sizes, simulated[index], starts[index], limit_params[index], limit_sqsums[index]
        )
    return replicates


def with_interval(name: str, value: float, interval: tuple[float, float]) -> str:
    """'name = value [low, high]', each rounded to the digits the interval supports (``noisescale._digits``)."""
    shown = printed(value, *interval)
    return f"{name} = {shown.value} [{shown.low}, {shown.high}]"


def _positive_finite_array(values: Any, name: str, *, one_dimensional: bool = False) -> np.ndarray | float:
    """float64 copy of ``values`` after checking it is numeric, finite and positive (scalars stay scalars)."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be numeric, got {type(values).__name__}: {error}") from error
    if one_dimensional and array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    bad = ~(np.isfinite(array) & (array > 0))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        position = f" at index {where[0] if len(where) == 1 else where}" if where else ""
        raise ValueError(f"{name} must be positive and finite, got {array[where]}{position}")
    return float(array) if array.ndim == 0 else array


def _read_only(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flags.writeable = False
    return array
