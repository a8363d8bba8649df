"""Fit of the empirical model of large-batch training (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", section 2.2).

Training to a fixed target at batch size B takes S optimizer steps and E = B S training examples. Across
batch sizes the pairs (S, E) lie on the hyperbola

    (S / S_min - 1) (E / E_min - 1) = 1,

equivalently S = S_min (1 + B_crit / B) and E = E_min (1 + B / B_crit), with the critical batch size
B_crit = E_min / S_min. At B = B_crit training takes 2 S_min steps and 2 E_min examples.

:func:`fit_tradeoff` fits S_min and B_crit by nonlinear least squares in log space and gives bootstrap
confidence intervals; :func:`read_sweep_csv` loads and validates a sweep of (batch size, steps) results.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from scipy.special import expit

__all__ = [
    "TradeoffFit",
    "fit_tradeoff",
    "fit_tradeoff_frame",
    "read_sweep_csv",
]

_MIN_DISTINCT_BATCH_SIZES = 3


@dataclass(frozen=True, eq=False)
class TradeoffFit:
    """S_min, E_min and B_crit = E_min / S_min fitted to a sweep, with bootstrap confidence intervals.

    ``batch_sizes`` and ``steps`` are the (read-only) data the fit used; ``log_residual_std`` is the
    standard deviation of the residuals of log S (n - 2 degrees of freedom), i.e. roughly the relative
    scatter of the measured steps around the model.
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

    def predict_steps(self, batch_size: Any) -> np.ndarray | float:
        """Steps to the target at ``batch_size``: S = S_min (1 + B_crit / B)."""
        batch_size = _positive_finite_array(batch_size, "batch_size")
        return self.s_min * (1.0 + self.b_crit / batch_size)

    def predict_examples(self, batch_size: Any) -> np.ndarray | float:
        """Examples to the target at ``batch_size``: E = E_min (1 + B / B_crit)."""
        batch_size = _positive_finite_array(batch_size, "batch_size")
        return self.e_min * (1.0 + batch_size / self.b_crit)

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
            "batch_sizes": self.batch_sizes.tolist(),
            "steps": self.steps.tolist(),
        }

    def summary(self) -> str:
        """One line: the three estimates with their intervals, the number of points and the scatter."""
        percent = f"{100 * self.confidence:g}%"

        def estimate(name: str, value: float, interval: tuple[float, float]) -> str:
            return f"{name} = {value:.4g} [{interval[0]:.4g}, {interval[1]:.4g}]"

        return (
            f"{estimate('S_min', self.s_min, self.s_min_interval)}, "
            f"{estimate('E_min', self.e_min, self.e_min_interval)}, "
            f"{estimate('B_crit', self.b_crit, self.b_crit_interval)} "
            f"({percent} intervals, {self.steps.size} points, log residual sd {self.log_residual_std:.3g})"
        )

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
    multiplicative, as run-to-run variation is. The start takes S_min from the largest batch size
    (S there is S_min (1 + B_crit / B_max), just above S_min) and E_min from the smallest one (E there is
    just above E_min). Repeated measurements at one batch size are separate points.

    Intervals come from a parametric bootstrap in log space: each replicate adds normal noise to the
    fitted log S_i and refits. The noise sd of each replicate is itself drawn from the sampling
    distribution of the residual sd, sigma* = s sqrt((n - 2) / chi2_{n-2}), so that the percentile
    intervals have Student-t rather than normal widths. With the ~10 batch sizes of a typical sweep a
    plain residual bootstrap undercovers: it resamples only n residuals, which are shrunk by fitting
    two parameters, and it ignores that s itself is uncertain. Intervals are the central ``confidence``
    percentiles of the replicates.

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
    if distinct.size < _MIN_DISTINCT_BATCH_SIZES:
        raise ValueError(
            f"fitting S_min and E_min needs at least {_MIN_DISTINCT_BATCH_SIZES} distinct batch sizes, "
            f"got {distinct.size}: {distinct.tolist()}"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 2:
        raise ValueError(f"n_bootstrap must be an integer >= 2, got {n_bootstrap!r}")

    log_batch_sizes = np.log(batch_sizes)
    log_steps = np.log(steps)
    start = _starting_log_parameters(batch_sizes, steps)
    log_params = _least_squares_log_parameters(log_batch_sizes, log_steps, start)
    fitted = _model_log_steps(log_params, log_batch_sizes)
    degrees_of_freedom = steps.size - 2
    log_residual_std = float(np.sqrt(np.sum((log_steps - fitted) ** 2) / degrees_of_freedom))

    replicates = _parametric_bootstrap(
        log_batch_sizes, fitted, log_params, log_residual_std, degrees_of_freedom,
        n_bootstrap, np.random.default_rng(seed),
    )
    tail = (1.0 - confidence) / 2.0
    with np.errstate(over="ignore"):  # a bound that runs off (no bend in the data) is reported as inf
        low, high = np.exp(np.quantile(replicates, [tail, 1.0 - tail], axis=0))

    log_s_min, log_b_crit = log_params
    fit = TradeoffFit(
        s_min=float(np.exp(log_s_min)),
        e_min=float(np.exp(log_s_min + log_b_crit)),
        b_crit=float(np.exp(log_b_crit)),
        s_min_interval=(float(low[0]), float(high[0])),
        e_min_interval=(float(low[2]), float(high[2])),
        b_crit_interval=(float(low[1]), float(high[1])),
        confidence=float(confidence),
        batch_sizes=_read_only(batch_sizes),
        steps=_read_only(steps),
        log_residual_std=log_residual_std,
        n_bootstrap=int(n_bootstrap),
    )
    if not distinct[0] <= fit.b_crit <= distinct[-1]:
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
    are kept unchanged; blank lines are ignored.
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


def _starting_log_parameters(batch_sizes: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """log S_min from the steps at the largest batch size, log E_min from the examples at the smallest."""
    largest = batch_sizes == batch_sizes.max()
    smallest = batch_sizes == batch_sizes.min()
    log_s_min = np.mean(np.log(steps[largest]))
    log_e_min = np.mean(np.log(batch_sizes[smallest] * steps[smallest]))
    return np.array([log_s_min, log_e_min - log_s_min])


def _parametric_bootstrap(
    log_batch_sizes: np.ndarray,
    fitted_log_steps: np.ndarray,
    log_params: np.ndarray,
    log_residual_std: float,
    degrees_of_freedom: int,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Refits on simulated data; returns rows (log S_min, log B_crit, log E_min), one per replicate."""
    noise_stds = log_residual_std * np.sqrt(degrees_of_freedom / rng.chisquare(degrees_of_freedom, n_bootstrap))
    noise = rng.standard_normal((n_bootstrap, fitted_log_steps.size)) * noise_stds[:, None]
    replicates = np.empty((n_bootstrap, 3))
    for index in range(n_bootstrap):
        replicates[index, :2] = _least_squares_log_parameters(
            log_batch_sizes, fitted_log_steps + noise[index], log_params
        )
    replicates[:, 2] = replicates[:, 0] + replicates[:, 1]
    return replicates


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
