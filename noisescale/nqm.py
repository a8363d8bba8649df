"""Noisy quadratic model (NQM) of Zhang et al. 2019, "Which Algorithmic Choices Matter at Which Batch
Sizes? Insights From a Noisy Quadratic Model", section 3 and appendices B-D.

The loss is L(theta) = 1/2 sum_i h_i theta_i^2 with diagonal Hessian H = diag(h) and noisy gradients
g_B = H theta + eps, Cov(eps) = C / B with C = diag(c). Every optimizer treated here is linear in
(theta, eps), so per eigen-direction its state x (theta; the heavy-ball buffer m, eq. 5; the exponential
moving average theta~, eq. 11) evolves as x(t+1) = M x(t) + b xi(t), Var(xi) = c~/B, and the second moment
S = E[x x^T] follows exactly the linear recurrence

    vec S(t+1) = (M kron M) vec S(t) + (c~/B) vec(b b^T)          (eqs. 3, 20-21, 38 of the paper)

For a constant learning rate its solution is S(t) = T^t (S0 - S_inf) + S_inf with T = M kron M and the
geometric-sum limit S_inf = (I - T)^-1 n, so the expected risk is

    E[L(t)] = D(t) + (R_inf - Q(t)) / B,

with D, Q sums over eigen-directions of read-outs of T^t applied to S0 and to the unit-batch S_inf. The
deterministic part D and the noise part do not depend on B, which makes sweeps over batch sizes cheap.
Preconditioning by P = H^p (section 3.3) is plain dynamics with h~ = h^(1-p) and c~ = c h^(-2p) while the
risk is still measured with the original h. Eigenvalues can be quantised into bins with counts, as the
paper does (section 3.7), or kept exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from noisescale._checks import check_finite, check_int

__all__ = [
    "DEFAULT_EMA_GRID",
    "DEFAULT_LEARNING_RATES",
    "DEFAULT_MOMENTUM_GRID",
    "NoisyQuadraticModel",
    "OptimizerSetting",
    "PiecewiseConstantSchedule",
    "ScalingCurve",
    "bayes_lower_bound_risk",
    "critical_batch_size",
    "expected_risk",
    "fit_scaling_curve",
    "lower_bound_steps",
    "momentum_roots",
    "noisy_quadratic_model",
    "paper_model",
    "steady_state_risk",
    "steps_to_target",
    "steps_vs_batch_size",
]

#: Learning-rate grid of the grid search: 2^-24 ... 2^3 in steps of 2^(1/4) (109 values). Values that are
#: unstable for an optimizer (spectral radius of M >= 1) are skipped.
DEFAULT_LEARNING_RATES = 2.0 ** np.arange(-24.0, 3.0 + 1e-9, 0.25)
#: Heavy-ball momentum grid used when momentum is tuned (beta = 0 included, so tuned momentum >= SGD).
DEFAULT_MOMENTUM_GRID = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
#: EMA coefficient grid used when the averaging is tuned: gamma = 0 (no averaging) and 1 - 2^-k, k = 1..20.
DEFAULT_EMA_GRID = (0.0,) + tuple(1.0 - 2.0 ** -np.arange(1.0, 21.0))

_GRID_RESOLUTION = 32  # time grid: every step below 2*32, then 32 points per octave (gap <= 1/32 of t)
_CONFIG_CHUNK = 128  # optimizer configurations propagated at once


@dataclass(frozen=True, eq=False)
class NoisyQuadraticModel:
    """Eigen-directions of the NQM grouped in bins: curvature h, gradient-noise variance c and count per bin.

    theta_0 ~ N(0, initial_variance I). The risk is L = 1/2 sum_bins count h E[theta^2] (eq. 1).
    """

    curvatures: np.ndarray
    noise_variances: np.ndarray
    counts: np.ndarray
    initial_variance: float = 1.0

    @property
    def dim(self) -> int:
        """Number of eigen-directions d (sum of the bin counts)."""
        return int(self.counts.sum())

    @property
    def initial_risk(self) -> float:
        """E[L(theta_0)] = initial_variance / 2 * sum_i h_i."""
        return float(0.5 * self.initial_variance * np.sum(self.counts * self.curvatures))


def noisy_quadratic_model(
    curvatures: Any,
    noise_variances: Any = None,
    *,
    n_bins: int | None = None,
    initial_variance: float = 1.0,
) -> NoisyQuadraticModel:
    """NQM with the given eigenvalues h_i of H and c_i of C (default C = H, section 3.5).

    ``n_bins=None`` keeps every eigen-direction (exact mode). Otherwise the h_i are quantised into
    ``n_bins`` log-spaced bins between min h and max h (section 3.7); a bin holds the mean h and mean c of
    its members and their count (so the initial risk is preserved exactly); empty bins are dropped.
    """
    curvatures = np.asarray(curvatures, dtype=np.float64)
    if curvatures.ndim != 1 or curvatures.size == 0:
        raise ValueError(f"curvatures must be a non-empty 1-D array, got shape {curvatures.shape}")
    if not np.all(np.isfinite(curvatures)) or np.any(curvatures <= 0):
        raise ValueError("curvatures must be finite and positive (H positive definite)")
    if noise_variances is None:
        noise_variances = curvatures.copy()
    noise_variances = np.asarray(noise_variances, dtype=np.float64)
    if noise_variances.shape != curvatures.shape:
        raise ValueError(
            f"noise_variances must have the shape of curvatures {curvatures.shape}, got {noise_variances.shape}"
        )
    if not np.all(np.isfinite(noise_variances)) or np.any(noise_variances < 0):
        raise ValueError("noise_variances must be finite and non-negative")
    if not (np.isfinite(initial_variance) and initial_variance > 0):
        raise ValueError(f"initial_variance must be positive and finite, got {initial_variance!r}")
    if n_bins is None:
        counts = np.ones_like(curvatures)
        return NoisyQuadraticModel(_read_only(curvatures), _read_only(noise_variances), _read_only(counts),
                                   float(initial_variance))
    n_bins = check_int(n_bins, "n_bins", 1)
    edges = np.geomspace(curvatures.min(), curvatures.max(), n_bins + 1)
    index = np.clip(np.searchsorted(edges, curvatures, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.float64)
    sum_h = np.bincount(index, weights=curvatures, minlength=n_bins)
    sum_c = np.bincount(index, weights=noise_variances, minlength=n_bins)
    kept = counts > 0
    return NoisyQuadraticModel(
        _read_only(sum_h[kept] / counts[kept]),
        _read_only(sum_c[kept] / counts[kept]),
        _read_only(counts[kept]),
        float(initial_variance),
    )


def paper_model(dim: int = 10_000, n_bins: int | None = 100, *, initial_variance: float = 1.0) -> NoisyQuadraticModel:
    """The paper's default NQM (section 3.5): h_i = 1/i for i = 1..d, C = H, d = 10^4, 100 bins."""
    dim = check_int(dim, "dim", 1)
    return noisy_quadratic_model(1.0 / np.arange(1, dim + 1), n_bins=n_bins, initial_variance=initial_variance)


@dataclass(frozen=True)
class OptimizerSetting:
    """Heavy-ball momentum beta (eq. 5), preconditioner P = H^p (eq. 8) and EMA coefficient gamma (eq. 11).

    momentum = 0 is plain SGD, ema = 0 uses the last iterate; combinations are allowed.
    """

    momentum: float = 0.0
    precondition_power: float = 0.0
    ema: float = 0.0

    def __post_init__(self) -> None:
        for name in ("momentum", "ema"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.floating)) and 0.0 <= value < 1.0):
                raise ValueError(f"OptimizerSetting.{name} must be a number in [0, 1), got {value!r}")
        p = self.precondition_power
        if not (isinstance(p, (int, float, np.floating)) and 0.0 <= p <= 1.0):
            raise ValueError(f"OptimizerSetting.precondition_power must lie in [0, 1], got {p!r}")

    @property
    def label(self) -> str:
        """Short description such as ``momentum 0.9, p=0.5, ema 0.99``."""
        parts = [f"momentum {self.momentum:g}" if self.momentum else "sgd"]
        if self.precondition_power:
            parts.append(f"p={self.precondition_power:g}")
        if self.ema:
            parts.append(f"ema {self.ema:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class PiecewiseConstantSchedule:
    """Learning rate ``learning_rates[j]`` on steps [boundaries[j-1], boundaries[j]); the last one forever."""

    learning_rates: tuple[float, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        rates = tuple(float(r) for r in self.learning_rates)
        bounds = tuple(int(b) for b in self.boundaries)
        if len(rates) != len(bounds) + 1:
            raise ValueError(
                f"a schedule with {len(rates)} learning rates needs {len(rates) - 1} boundaries, got {len(bounds)}"
            )
        if any(not (np.isfinite(r) and r > 0) for r in rates):
            raise ValueError(f"schedule learning rates must be positive and finite, got {rates}")
        if any(b <= a for a, b in zip((0,) + bounds, bounds)):
            raise ValueError(f"schedule boundaries must be positive and strictly increasing, got {bounds}")
        object.__setattr__(self, "learning_rates", rates)
        object.__setattr__(self, "boundaries", bounds)


# --------------------------------------------------------------------------------------------------
# Linear second-moment dynamics


@dataclass(frozen=True, eq=False)
class _Dynamics:
    """vec S(t+1) = T vec S(t) + n / B for K optimizer configurations x bins.

    Arrays keep the small matrix axes first ("structure of arrays": T is (n, n, K, bins)), which makes the
    many tiny matrix products elementwise numpy operations over (K, bins).
    """

    transition: np.ndarray  # (n, n, K, bins), T = M kron M; zero for unstable configurations
    start: np.ndarray  # (n, 2, K, bins): [vec S0, vec S_inf for B = 1]
    readout: int  # index of E[readout^2] in vec S
    weights: np.ndarray  # (bins,): 1/2 h count
    stable: np.ndarray  # (K,) spectral radius of M < 1 in every bin
    risk_at_infinity: np.ndarray  # (K,): R_inf for B = 1


def _build_dynamics(model: NoisyQuadraticModel, precondition_power: float, learning_rate: np.ndarray,
                    momentum: np.ndarray, ema: np.ndarray) -> _Dynamics:
    """Per-direction first-moment system x(t+1) = M x(t) + b xi and its second-moment recurrence.

    State (theta, m, theta~): theta' = (1 - alpha h~) theta - alpha beta m - alpha xi, m' = h~ theta + beta m
    + xi, theta~' = gamma theta~ + (1 - gamma) theta'; m and theta~ are kept only when some beta or gamma > 0.
    """
    alpha, beta, gamma = (np.asarray(v, dtype=np.float64)[:, None] for v in (learning_rate, momentum, ema))
    h_eff = model.curvatures ** (1.0 - precondition_power)
    c_eff = model.noise_variances * model.curvatures ** (-2.0 * precondition_power)
    one = np.ones_like(alpha * h_eff)
    zero = np.zeros_like(one)
    decay = 1.0 - alpha * h_eff
    full_m = np.array([
        [decay, -alpha * beta * one, zero],
        [h_eff * one, beta * one, zero],
        [(1 - gamma) * decay, -(1 - gamma) * alpha * beta * one, gamma * one],
    ])
    full_b = np.array([-alpha * one, one, -(1 - gamma) * alpha * one])
    states = [0] + ([1] if np.any(beta > 0) else []) + ([2] if np.any(gamma > 0) else [])
    k = len(states)
    m_matrix = full_m[np.ix_(states, states)]  # (k, k, K, bins)
    b_vector = full_b[states]  # (k, K, bins)
    readout_state = k - 1 if 2 in states else 0
    initial = np.array([1.0, 0.0, 1.0])[states]

    n = k * k
    eigenvalues = np.linalg.eigvals(np.moveaxis(m_matrix, (0, 1), (-2, -1)))
    stable = np.abs(eigenvalues).max(axis=(-1, -2)) < 1.0
    transition = np.einsum("ijab,klab->ikjlab", m_matrix, m_matrix).reshape(n, n, *m_matrix.shape[2:])
    transition = np.where(stable[:, None], transition, 0.0)
    noise = c_eff * np.einsum("iab,jab->ijab", b_vector, b_vector).reshape(n, *b_vector.shape[1:])
    last_axes = np.moveaxis(np.eye(n)[:, :, None, None] - transition, (0, 1), (-2, -1))
    s_inf = np.moveaxis(np.linalg.solve(last_axes, np.moveaxis(noise, 0, -1)[..., None])[..., 0], -1, 0)
    s0 = np.broadcast_to(model.initial_variance * np.outer(initial, initial).reshape(n, 1, 1), s_inf.shape)
    readout = readout_state * k + readout_state
    weights = 0.5 * model.curvatures * model.counts
    return _Dynamics(
        transition=transition,
        start=np.stack([s0, s_inf], 1),
        readout=readout,
        weights=weights,
        stable=stable,
        risk_at_infinity=s_inf[readout] @ weights,
    )


def _risk_parts(dynamics: _Dynamics, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """D and Q of E[L] = D + (R_inf - Q) / B from propagated states (n, 2, ..., bins)."""
    read = state[dynamics.readout]
    return read[0] @ dynamics.weights, read[1] @ dynamics.weights


def _apply(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Product of stacks of small matrices stored matrix-axes-first: (n, n, ...) x (n, m, ...)."""
    out = left[:, 0, None] * right[0, None]
    for j in range(1, left.shape[1]):
        out += left[:, j, None] * right[j, None]
    return out


def _binary_powers(transition: np.ndarray, n_powers: int) -> list[np.ndarray]:
    """[T, T^2, T^4, ..., T^(2^(n_powers-1))] by repeated squaring."""
    powers = [transition]
    for _ in range(n_powers - 1):
        powers.append(_apply(powers[-1], powers[-1]))
    return powers


def _propagate(powers: list[np.ndarray], state: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """T^steps applied to ``state`` (n, m, *steps.shape, bins) with a per-row integer exponent."""
    for bit, power in enumerate(powers):
        use = ((steps >> bit) & 1).astype(bool)[..., None]
        if use.any():
            state = np.where(use, _apply(power, state), state)
    return state


def _settings_arrays(optimizer: OptimizerSetting, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, float(optimizer.momentum)), np.full(n, float(optimizer.ema))


def _validate_model(model: Any) -> None:
    if not isinstance(model, NoisyQuadraticModel):
        raise TypeError(f"model must be a NoisyQuadraticModel, got {type(model).__name__}")


def _validate_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, OptimizerSetting):
        raise TypeError(f"optimizer must be an OptimizerSetting, got {type(optimizer).__name__}")


def _positive_1d(values: Any, name: str) -> np.ndarray:
    array = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name} must be positive finite numbers (scalar or 1-D), got {values!r}")
    return array


def _steps_array(steps: Any) -> np.ndarray:
    array = np.atleast_1d(np.asarray(steps))
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or np.any(array < 0):
        raise ValueError(f"steps must be non-negative integers (scalar or 1-D), got {steps!r}")
    return array.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Expected risk over time


def expected_risk(
    model: NoisyQuadraticModel,
    optimizer: OptimizerSetting,
    learning_rate: float | PiecewiseConstantSchedule,
    batch_size: float,
    steps: Any,
) -> np.ndarray:
    """Exact E[L(theta(t))] (of the EMA iterate when ``optimizer.ema > 0``) at each of ``steps``.

    A constant learning rate uses S(t) = T^t (S0 - S_inf) + S_inf; a :class:`PiecewiseConstantSchedule` chains
    the same closed form piece by piece (the dynamic programme of section 3.7.2), carrying the momentum
    buffer and the average across boundaries. Raises ValueError for a learning rate at which the dynamics
    diverge (spectral radius of M >= 1, e.g. alpha h~_max >= 2 for SGD).
    """
    _validate_model(model)
    _validate_optimizer(optimizer)
    steps = _steps_array(steps)
    if np.ndim(batch_size) != 0:
        raise ValueError(f"batch_size must be a positive scalar, got {batch_size!r}")
    batch = float(_positive_1d(batch_size, "batch_size")[0])
    if isinstance(learning_rate, PiecewiseConstantSchedule):
        schedule = learning_rate
    else:
        schedule = PiecewiseConstantSchedule((float(_positive_1d(learning_rate, "learning_rate")[0]),), ())
    momentum, ema = _settings_arrays(optimizer, len(schedule.learning_rates))
    dynamics = _build_dynamics(model, optimizer.precondition_power, np.array(schedule.learning_rates), momentum, ema)
    if not dynamics.stable.all():
        bad = np.array(schedule.learning_rates)[~dynamics.stable]
        raise ValueError(f"learning rate(s) {bad.tolist()} diverge for {optimizer.label} on this model "
                         "(spectral radius of the update >= 1)")
    boundaries = (0,) + schedule.boundaries + (max(int(steps.max(initial=0)), schedule.boundaries[-1] if schedule.boundaries else 0) + 1,)
    second_moment = dynamics.start[:, :1, 0]  # vec S0, (n, 1, bins)
    risk = np.empty(steps.shape)
    for piece, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        s_inf = dynamics.start[:, 1:, piece] / batch
        offset = second_moment - s_inf
        powers = _binary_powers(dynamics.transition[:, :, piece, None], max(end - start, 1).bit_length())
        inside = (steps >= start) & (steps < end)
        local = _propagate(powers, np.repeat(offset[:, :, None], inside.sum(), 2), steps[inside] - start)
        risk[inside] = (local + s_inf[:, :, None])[dynamics.readout, 0] @ dynamics.weights
        second_moment = _propagate(powers, offset[:, :, None], np.array([end - start]))[:, :, 0] + s_inf
    return risk


def steady_state_risk(model: NoisyQuadraticModel, optimizer: OptimizerSetting, learning_rate: float,
                      batch_size: float) -> float:
    """lim_{t->inf} E[L(t)] = R_inf / B (the second terms of eqs. 4, 6, 9 and 12, here exact)."""
    _validate_model(model)
    _validate_optimizer(optimizer)
    learning_rate = _positive_1d(learning_rate, "learning_rate")[:1]
    batch = _positive_1d(batch_size, "batch_size")[0]
    momentum, ema = _settings_arrays(optimizer, 1)
    dynamics = _build_dynamics(model, optimizer.precondition_power, learning_rate, momentum, ema)
    if not dynamics.stable[0]:
        raise ValueError(f"learning rate {learning_rate[0]} diverges for {optimizer.label} on this model")
    return float(dynamics.risk_at_infinity[0] / batch)


def momentum_roots(learning_rate: float, curvature: float, momentum: float) -> tuple[complex, complex]:
    """r1, r2 (|r1| >= |r2|): roots of x^2 - (1 - alpha h + beta) x + beta = 0 (eq. 7, Theorem 1).

    They are the eigenvalues of the heavy-ball first-moment matrix M; the second-moment transition T = M kron M
    has eigenvalues r1^2, r1 r2 (= beta, twice) and r2^2 (eq. 22).
    """
    roots = np.roots([1.0, -(1.0 - learning_rate * curvature + momentum), momentum]).astype(complex)
    roots = roots[np.argsort(-np.abs(roots), kind="stable")]
    return complex(roots[0]), complex(roots[1])


# --------------------------------------------------------------------------------------------------
# Steps to target


def _time_grid(max_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Times 0..2R-1, then R points per octave (gaps 2^e), up to the first time >= max_steps."""
    times = list(range(2 * _GRID_RESOLUTION))
    gaps = [0] * (2 * _GRID_RESOLUTION - 1)
    exponent = 1
    while times[-1] < max_steps:
        for _ in range(_GRID_RESOLUTION):
            times.append(times[-1] + 2**exponent)
            gaps.append(exponent)
        exponent += 1
    return np.array(times, dtype=np.int64), np.array(gaps, dtype=np.int64)


def _grid_risk_parts(dynamics: _Dynamics, times: np.ndarray, gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """D(t) and Q(t) (each (K, G)) on the time grid by stepping T^(gap) from one grid time to the next."""
    powers = _binary_powers(dynamics.transition, int(gaps.max()) + 1)
    state = dynamics.start
    deterministic = np.empty((dynamics.stable.size, times.size))
    noise_decay = np.empty_like(deterministic)
    deterministic[:, 0], noise_decay[:, 0] = _risk_parts(dynamics, state)
    for index, gap in enumerate(gaps, start=1):
        state = _apply(powers[gap], state)
        deterministic[:, index], noise_decay[:, index] = _risk_parts(dynamics, state)
    return deterministic, noise_decay


def _grid_crossings(dynamics: _Dynamics, batch_sizes: np.ndarray, target: float, times: np.ndarray,
                    gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First grid index with risk <= target (-1 if none) and a log-interpolated crossing time, (K, B)."""
    deterministic, noise_decay = _grid_risk_parts(dynamics, times, gaps)
    risk = deterministic[:, None, :] + (dynamics.risk_at_infinity[:, None, None] - noise_decay[:, None, :]) / batch_sizes[None, :, None]
    below = risk <= target
    index = np.where(below.any(-1), np.argmax(below, axis=-1), -1)
    index[~dynamics.stable] = -1
    previous = np.maximum(index - 1, 0)
    hi = np.take_along_axis(risk, np.maximum(index, 0)[..., None], -1)[..., 0]
    lo = np.take_along_axis(risk, previous[..., None], -1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.clip(np.log(lo / target) / np.log(lo / hi), 0.0, 1.0)
    estimate = times[previous] + fraction * (times[np.maximum(index, 0)] - times[previous])
    estimate = np.where(index > 0, estimate, 0.0)
    estimate[index < 0] = np.inf
    return index, estimate


def _exact_crossings(model: NoisyQuadraticModel, precondition_power: float, learning_rate: np.ndarray,
                     momentum: np.ndarray, ema: np.ndarray, batch_size: np.ndarray, lower: np.ndarray,
                     upper: np.ndarray, target: float) -> np.ndarray:
    """Smallest integer t in (lower, upper] with risk <= target, one per row, by binary lifting.

    Assumes risk(lower) > target >= risk(upper) and a single crossing in between (the risk is a sum of
    decaying exponentials; between neighbouring grid times it is monotone in all the sweeps checked).
    """
    dynamics = _build_dynamics(model, precondition_power, learning_rate, momentum, ema)
    n_powers = max(int(upper.max(initial=1)).bit_length(), 1)
    powers = _binary_powers(dynamics.transition, n_powers)
    state = _propagate(powers, dynamics.start, lower)
    current = lower.copy()
    for bit in range(n_powers - 1, -1, -1):
        candidate_time = current + 2**bit
        candidate = _apply(powers[bit], state)
        deterministic, noise_decay = _risk_parts(dynamics, candidate)
        risk = deterministic + (dynamics.risk_at_infinity - noise_decay) / batch_size
        accept = (candidate_time < upper) & (risk > target)
        state = np.where(accept[:, None], candidate, state)
        current = np.where(accept, candidate_time, current)
    return current + 1


def _validate_target(target: float, max_steps: int | None = None) -> None:
    """A positive finite target risk and, unless None, an int max_steps in [1, 2^50]."""
    if not (np.isfinite(target) and target > 0):
        raise ValueError(f"target must be a positive risk, got {target!r}")
    if max_steps is not None and check_int(max_steps, "max_steps", 1) > 2**50:
        raise ValueError(f"max_steps must be <= 2^50, got {max_steps}")


def _finish_steps(model, optimizer_power, learning_rate, momentum, ema, batch_size, index, times, target,
                  max_steps) -> np.ndarray:
    """Exact integer steps for rows given their first grid crossing index (-1: never -> inf)."""
    steps = np.full(index.shape, np.inf)
    steps[index == 0] = 0.0
    refine = index > 0
    if refine.any():
        lower, upper = times[index[refine] - 1], times[index[refine]]
        steps[refine] = _exact_crossings(model, optimizer_power, learning_rate[refine], momentum[refine],
                                         ema[refine], batch_size[refine], lower, upper, target)
    steps[steps > max_steps] = np.inf
    return steps


def steps_to_target(
    model: NoisyQuadraticModel,
    optimizer: OptimizerSetting,
    learning_rates: Any,
    batch_sizes: Any,
    *,
    target: float = 0.01,
    max_steps: int = 2**30,
) -> np.ndarray:
    """First step t with E[L(t)] <= target, shape (len(learning_rates), len(batch_sizes)); inf if never.

    The risk is evaluated in closed form on a time grid (every step below 64, then 32 points per octave up
    to ``max_steps``); the first grid interval that crosses the target is then searched exactly by binary
    lifting with T^(2^k). inf: the target is not reached within ``max_steps`` or the learning rate diverges.
    """
    _validate_model(model)
    _validate_optimizer(optimizer)
    _validate_target(target, max_steps)
    learning_rates = _positive_1d(learning_rates, "learning_rates")
    batch_sizes = _positive_1d(batch_sizes, "batch_sizes")
    momentum, ema = _settings_arrays(optimizer, learning_rates.size)
    times, gaps = _time_grid(max_steps)
    dynamics = _build_dynamics(model, optimizer.precondition_power, learning_rates, momentum, ema)
    index, _ = _grid_crossings(dynamics, batch_sizes, target, times, gaps)
    rows = np.repeat(np.arange(learning_rates.size), batch_sizes.size)
    steps = _finish_steps(model, optimizer.precondition_power, learning_rates[rows], momentum[rows], ema[rows],
                          np.tile(batch_sizes, learning_rates.size), index.reshape(-1), times, target, max_steps)
    return steps.reshape(learning_rates.size, batch_sizes.size)


@dataclass(frozen=True, eq=False)
class ScalingCurve:
    """Minimal steps to target per batch size with the tuned hyperparameters that achieve them.

    ``learning_rate_at_grid_edge`` flags batch sizes whose best learning rate is the largest or smallest
    stable value of the grid (the optimum may lie outside it).
    """

    optimizer: OptimizerSetting
    batch_sizes: np.ndarray
    steps: np.ndarray
    learning_rates: np.ndarray
    momenta: np.ndarray
    emas: np.ndarray
    target: float
    learning_rate_at_grid_edge: np.ndarray = field(repr=False)

    @property
    def effective_learning_rates(self) -> np.ndarray:
        """alpha / (1 - beta), the effective learning rate of momentum SGD (section 3.2)."""
        return self.learning_rates / (1.0 - self.momenta)

    def to_frame(self) -> pd.DataFrame:
        """One row per batch size: batch_size, steps, learning_rate, effective_learning_rate, momentum, ema."""
        return pd.DataFrame({
            "batch_size": self.batch_sizes,
            "steps": self.steps,
            "learning_rate": self.learning_rates,
            "effective_learning_rate": self.effective_learning_rates,
            "momentum": self.momenta,
            "ema": self.emas,
            "learning_rate_at_grid_edge": self.learning_rate_at_grid_edge,
        })


def steps_vs_batch_size(
    model: NoisyQuadraticModel,
    optimizer: OptimizerSetting,
    batch_sizes: Any = 2.0 ** np.arange(21),
    *,
    learning_rates: Any = DEFAULT_LEARNING_RATES,
    momenta: Any = None,
    emas: Any = None,
    target: float = 0.01,
    max_steps: int = 2**30,
    progress: bool = False,
) -> ScalingCurve:
    """Steps to target vs batch size with the constant learning rate tuned by grid search (section 3.7.1).

    For every batch size the grid search picks, over ``learning_rates`` (default
    :data:`DEFAULT_LEARNING_RATES`) x ``momenta`` x ``emas`` (default: the optimizer's own beta and gamma;
    pass e.g. :data:`DEFAULT_MOMENTUM_GRID` / :data:`DEFAULT_EMA_GRID` to tune them as the paper does), the
    configuration with the fewest steps, ranked by the crossing time interpolated on the time grid; the
    winner's steps are then computed exactly. Because the best large-batch learning rate sits just below the
    stability limit 2 (1 + beta) / h~_max, the learning rates (1 - 2^-k) times that limit, k = 2..6, are
    searched as well. ``progress`` shows a tqdm bar over configuration chunks.
    """
    _validate_model(model)
    _validate_optimizer(optimizer)
    _validate_target(target, max_steps)
    batch_sizes = _positive_1d(batch_sizes, "batch_sizes")
    learning_rates = _positive_1d(learning_rates, "learning_rates")
    momenta = np.array([optimizer.momentum] if momenta is None else momenta, dtype=np.float64).reshape(-1)
    emas = np.array([optimizer.ema] if emas is None else emas, dtype=np.float64).reshape(-1)
    for name, grid in (("momenta", momenta), ("emas", emas)):
        if grid.size == 0 or np.any(grid < 0) or np.any(grid >= 1):
            raise ValueError(f"{name} must be values in [0, 1), got {grid.tolist()}")
    h_eff_max = float(np.max(model.curvatures ** (1.0 - optimizer.precondition_power)))
    configs = []
    for momentum in momenta:  # the grid plus (1 - 2^-k) of the stability limit 2 (1 + beta) / h~_max
        near_limit = 2.0 * (1.0 + momentum) / h_eff_max * (1.0 - 2.0 ** -np.arange(2.0, 7.0))
        rates = np.union1d(learning_rates, near_limit)
        configs.append(np.stack([a.reshape(-1) for a in np.meshgrid(rates, [momentum], emas, indexing="ij")]))
    config_lr, config_momentum, config_ema = np.concatenate(configs, axis=1)
    times, gaps = _time_grid(max_steps)

    from tqdm.auto import tqdm

    best_estimate = np.full(batch_sizes.size, np.inf)
    best_config = np.zeros(batch_sizes.size, dtype=np.int64)
    best_index = np.full(batch_sizes.size, -1, dtype=np.int64)
    chunks = range(0, config_lr.size, _CONFIG_CHUNK)
    for start in tqdm(chunks, desc=f"NQM {optimizer.label}", disable=not progress, leave=False):
        part = slice(start, start + _CONFIG_CHUNK)
        dynamics = _build_dynamics(model, optimizer.precondition_power, config_lr[part], config_momentum[part],
                                   config_ema[part])
        index, estimate = _grid_crossings(dynamics, batch_sizes, target, times, gaps)
        chunk_best = np.argmin(estimate, axis=0)
        chunk_estimate = estimate[chunk_best, np.arange(batch_sizes.size)]
        better = chunk_estimate < best_estimate
        best_estimate[better] = chunk_estimate[better]
        best_config[better] = start + chunk_best[better]
        best_index[better] = index[chunk_best, np.arange(batch_sizes.size)][better]

    steps = _finish_steps(model, optimizer.precondition_power, config_lr[best_config], config_momentum[best_config],
                          config_ema[best_config], batch_sizes, best_index, times, target, max_steps)
    found = np.isfinite(steps)
    edge = found & ((config_lr[best_config] >= learning_rates.max()) | (config_lr[best_config] <= learning_rates.min()))
    nan = np.full(batch_sizes.size, np.nan)
    return ScalingCurve(
        optimizer=optimizer,
        batch_sizes=_read_only(batch_sizes),
        steps=_read_only(steps),
        learning_rates=_read_only(np.where(found, config_lr[best_config], nan)),
        momenta=_read_only(np.where(found, config_momentum[best_config], nan)),
        emas=_read_only(np.where(found, config_ema[best_config], nan)),
        target=float(target),
        learning_rate_at_grid_edge=_read_only(edge),
    )


# --------------------------------------------------------------------------------------------------
# Critical batch size and bounds


def critical_batch_size(batch_sizes: Any, steps: Any, *, factor: float = 2.0, min_steps: float = 1.0) -> float:
    """Batch size where the steps first exceed perfect linear scaling by ``factor`` (log-log interpolation).

    Perfect scaling is S_lin(B) = E_min / B with E_min = min_B B S(B) (examples at the most data-efficient
    batch size, normally the smallest); the crossing is searched above that batch size. For the McCandlish
    form S = S_min (1 + B_crit / B) sampled from B_0 up, the factor-2 crossing is B_crit + 2 B_0 (so B_crit
    when B_0 << B_crit). Points with infinite or non-positive steps are ignored.

    Steps to target cannot fall below one step: once one step suffices, at B_1, every larger batch also
    takes one step, so B S grows like B and reaches ``factor`` E_min by ``factor`` B_1 at the latest, whatever
    the optimizer does; such a crossing is an artifact of the floor, not a critical batch size. Hence points at
    the floor (steps <= ``min_steps``) count towards E_min (one step of B_1 examples does reach the target)
    but cannot show the crossing, and points beyond the first of them are ignored. Pass ``min_steps=0`` for a
    continuous curve (e.g. a fitted S(B)) that has no floor.

    Returns inf when the critical batch size is not resolved by the samples: the curve stays within
    ``factor`` of perfect scaling up to the largest batch size, or up to the batch size where the steps
    reach the floor (e.g. the NQM with p = 1 preconditioning, which needs one step from B = 2^19 on).
    """
    batch_sizes = _positive_1d(batch_sizes, "batch_sizes")
    steps = np.asarray(steps, dtype=np.float64).reshape(-1)
    if steps.shape != batch_sizes.shape:
        raise ValueError(f"steps must match batch_sizes in length, got {steps.size} and {batch_sizes.size}")
    if not factor > 1:
        raise ValueError(f"factor must exceed 1, got {factor!r}")
    if check_finite(min_steps, "min_steps") < 0:
        raise ValueError(f"min_steps must be >= 0, got {min_steps!r}")
    order = np.argsort(batch_sizes)
    batch_sizes, steps = batch_sizes[order], steps[order]
    finite = np.isfinite(steps) & (steps > 0)
    if finite.sum() < 2:
        raise ValueError("critical_batch_size needs at least two batch sizes with finite positive steps")
    batch_sizes, steps = batch_sizes[finite], steps[finite]
    at_floor = np.nonzero(steps <= min_steps)[0]
    if at_floor.size:  # larger batches than the first one at the floor say nothing about the scaling
        batch_sizes, steps = batch_sizes[: at_floor[0] + 1], steps[: at_floor[0] + 1]
    log_ratio = np.log(batch_sizes * steps / np.min(batch_sizes * steps))  # log(S / S_lin)
    threshold = np.log(factor)
    most_efficient = int(np.argmin(log_ratio))
    crossing = log_ratio[most_efficient:] >= threshold
    if at_floor.size:
        crossing[-1] = False  # the point at the floor cannot show the crossing
    above = np.nonzero(crossing)[0]
    if above.size == 0:
        return float("inf")
    first = most_efficient + above[0]
    x0, x1 = np.log(batch_sizes[first - 1]), np.log(batch_sizes[first])
    y0, y1 = log_ratio[first - 1], log_ratio[first]
    return float(np.exp(x0 + (threshold - y0) * (x1 - x0) / (y1 - y0)))


def fit_scaling_curve(curve: ScalingCurve, **fit_options: Any):
    """McCandlish fit S = S_min (1 + B_crit / B) of the finite points of ``curve`` (noisescale.tradeoff).

    ``fit_options`` go to :func:`noisescale.tradeoff.fit_tradeoff` (confidence, n_bootstrap, seed).
    """
    from noisescale.tradeoff import fit_tradeoff

    if not isinstance(curve, ScalingCurve):
        raise TypeError(f"curve must be a ScalingCurve, got {type(curve).__name__}")
    finite = np.isfinite(curve.steps) & (curve.steps > 0)
    return fit_tradeoff(curve.batch_sizes[finite], curve.steps[finite], **fit_options)


def lower_bound_steps(model: NoisyQuadraticModel, batch_sizes: Any, target: float = 0.01) -> np.ndarray:
    """Information-theoretic bound of section 3.6: steps >= N / B with risk d / (2N) = target.

    With C = H the NQM is maximum-likelihood estimation of a Gaussian mean, whose risk after N examples is
    d / (2N). For general C the same estimator has risk sum_i (c_i / h_i) / (2N), used here (= d / (2N)
    when C = H). Note this ignores the N(0, I) prior on theta_0; :func:`bayes_lower_bound_risk` does not.
    """
    _validate_model(model)
    batch_sizes = _positive_1d(batch_sizes, "batch_sizes")
    _validate_target(target)
    examples = np.sum(model.counts * model.noise_variances / model.curvatures) / (2.0 * target)
    return examples / batch_sizes


def bayes_lower_bound_risk(model: NoisyQuadraticModel, n_examples: Any) -> np.ndarray:
    """Risk of the posterior mean after N gradient queries: 1/2 sum_i h_i / (1/sigma0^2 + N h_i^2 / c_i).

    Each query of direction i is an unbiased observation of h_i theta_i with variance c_i; with the Gaussian
    prior theta_i ~ N(0, sigma0^2) the posterior mean is the Bayes estimator, so no algorithm that sees N
    queries (N / B steps at batch B) can have lower expected risk. Tends to d / (2N) for large N when C = H.
    """
    _validate_model(model)
    n_examples = np.asarray(n_examples, dtype=np.float64)
    precision = 1.0 / model.initial_variance + n_examples[..., None] * model.curvatures**2 / model.noise_variances
    return 0.5 * np.sum(model.counts * model.curvatures / precision, axis=-1)


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array
