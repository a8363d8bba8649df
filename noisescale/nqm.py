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

import copy
import dataclasses
import functools
import warnings
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
_FIRST_OCTAVE = (2 * _GRID_RESOLUTION).bit_length() - 1  # 2^6 - 1 = 63: the last grid time of unit steps
_CHUNK_ELEMENTS = 2**16  # configurations x bins walked at once
_SPLIT_ELEMENTS = 2**16  # walks at least this large start anew where the octave they can start at changes
_HANDOVER_BYTES = 2**27  # the octave pass hands at most this much state over to the walks (:func:`_octave_crossings`)
_HANDOVER_BINS = 16  # ... with at least this many bins (with fewer, squaring costs less than the more walks it needs)


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
class _FirstMoment:
    """x(t+1) = M x(t) + b xi(t), Var(xi) = c~ / B, for K optimizer configurations x bins; the risk reads x_r.

    Arrays keep the small matrix axes first ("structure of arrays": M is (k, k, K, bins)), which makes the
    many tiny matrix products elementwise numpy operations over (K, bins).
    """

    matrix: np.ndarray  # (k, k, K, bins) M; zero for unstable configurations
    noise_input: np.ndarray  # (k, K, bins) b
    noise_variance: np.ndarray  # (bins,) c~ (bins with equal h~ merged, see _merged_bins)
    initial: np.ndarray  # (k,) x(0) = initial * theta_0 (m = 0, theta~ = theta)
    states: tuple[int, ...]  # the states kept, of (theta, m, theta~)
    readout: int  # state read by the risk: theta, or theta~ when the average is kept
    weights: np.ndarray  # (bins,) 1/2 h count
    initial_variance: float
    modes: np.ndarray  # (3, K, bins) eigenvalues of M (complex unless all real): heavy-ball roots r1, r2 (eq. 7)
    # and gamma
    active: np.ndarray  # (3, K) whether each mode can show in the read-out (r2 needs beta > 0, gamma > 0)
    stable: np.ndarray  # (K,) spectral radius of M < 1 in every bin

    def subset(self, keep: np.ndarray) -> _FirstMoment:
        """The configurations ``keep`` (an index array); states unused by them stay, exactly 0 in the read-out."""
        return dataclasses.replace(self, matrix=self.matrix[:, :, keep], noise_input=self.noise_input[:, keep],
                                   modes=self.modes[:, keep], active=self.active[:, keep], stable=self.stable[keep])


def _first_moment(model: NoisyQuadraticModel, precondition_power: float, learning_rate: np.ndarray,
                  momentum: np.ndarray, ema: np.ndarray) -> _FirstMoment:
    """Per-direction first-moment system of SGD with heavy-ball momentum, H^-p preconditioning and an EMA.

    State (theta, m, theta~): theta' = (1 - alpha h~) theta - alpha beta m - alpha xi, m' = h~ theta + beta m
    + xi, theta~' = gamma theta~ + (1 - gamma) theta'; m and theta~ are kept only when some beta or gamma > 0.
    M is block lower-triangular, so its eigenvalues are the roots of x^2 - (1 - alpha h~ + beta) x + beta
    (r1 = 1 - alpha h~ and r2 = 0 without momentum) and gamma.
    """
    alpha, beta, gamma = (np.asarray(v, dtype=np.float64)[:, None] for v in (learning_rate, momentum, ema))
    h_eff, c_eff, weights = _effective_bins(model, float(precondition_power))
    one = np.ones_like(alpha * h_eff)
    decay = 1.0 - alpha * h_eff
    matrix_entries = {  # the nonzero M_ij and the b_i of the full state, computed for the states kept only
        (0, 0): lambda: decay, (0, 1): lambda: -alpha * beta * one,
        (1, 0): lambda: h_eff * one, (1, 1): lambda: beta * one,
        (2, 0): lambda: (1 - gamma) * decay, (2, 1): lambda: -(1 - gamma) * alpha * beta * one,
        (2, 2): lambda: gamma * one,
    }
    noise_entries = (lambda: -alpha * one, lambda: one, lambda: -(1 - gamma) * alpha * one)
    states = [0] + ([1] if np.any(beta > 0) else []) + ([2] if np.any(gamma > 0) else [])

    trace = decay + beta
    discriminant = trace**2 - 4.0 * beta * one
    root = np.sqrt(np.abs(discriminant))
    real = discriminant >= 0
    larger = 0.5 * (trace + np.copysign(root, trace))  # the real root of larger modulus (no cancellation)
    with np.errstate(divide="ignore", invalid="ignore"):
        smaller = np.where(larger != 0, beta / larger, 0.0)  # r1 r2 = beta
    if real.all():  # real arrays (no momentum, or overdamped everywhere)
        r1, r2, r3 = larger, smaller, gamma * one
    else:
        r1 = np.where(real, larger + 0j, 0.5 * (trace + 1j * root))
        r2 = np.where(real, smaller + 0j, 0.5 * (trace - 1j * root))
        r3 = gamma * one + 0j
    stable = np.maximum(np.abs(r1), np.abs(r2)).max(axis=1) < 1.0
    active = np.stack([np.ones(alpha.shape[0], dtype=bool), beta[:, 0] > 0, gamma[:, 0] > 0])

    zero = np.zeros_like(one)
    m_matrix = np.array([[matrix_entries[i, j]() if (i, j) in matrix_entries else zero for j in states]
                         for i in states])
    return _FirstMoment(
        matrix=np.where(stable[:, None], m_matrix, 0.0),
        noise_input=np.array([noise_entries[i]() for i in states]),
        noise_variance=c_eff,
        initial=np.array([1.0, 0.0, 1.0])[states],
        states=tuple(states),
        readout=len(states) - 1 if 2 in states else 0,
        weights=weights,
        initial_variance=model.initial_variance,
        modes=np.stack([r1, r2, r3]),
        active=active,
        stable=stable,
    )


@functools.lru_cache(maxsize=8)
def _effective_bins(model: NoisyQuadraticModel, precondition_power: float) -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray]:
    """(h~, c~, w) of the model's bins, merged (:func:`_merged_bins`): h~ = h^(1-p), c~ = c h^(-2p), w = 1/2 h count;
    read-only, kept for the last few models and powers (a search builds its systems many times)."""
    merged = _merged_bins(model.curvatures ** (1.0 - precondition_power),
                          model.noise_variances * model.curvatures ** (-2.0 * precondition_power),
                          0.5 * model.curvatures * model.counts)
    return tuple(_read_only(array) for array in merged)


def _merged_bins(h_eff: np.ndarray, c_eff: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """Bins with equal h~ as one bin: (h~, c~, w) with w = sum w_i and c~ = sum w_i c~_i / w (unchanged, same
    order, when all h~ differ).

    M and b depend on a bin only through h~, so such bins share v(t) = e_r M^t and A_L = c~ G_L with
    G_L = sum_{s<L} M^s b b^T M^sT; the risk sum_i w_i (sigma0^2 (v x0)^2 + c~_i v G_L v^T / B) is linear in
    (w_i, w_i c~_i), so their sums give the same risk. With p = 1 every h~ is 1: the whole model is one bin.
    """
    unique, inverse = np.unique(h_eff, return_inverse=True)
    if unique.size == h_eff.size:
        return h_eff, c_eff, weights
    merged = np.bincount(inverse, weights=weights)
    return unique, np.bincount(inverse, weights=weights * c_eff) / merged, merged


@dataclass(frozen=True, eq=False)
class _Dynamics:
    """vec S(t+1) = T vec S(t) + n / B with T = M kron M, for K optimizer configurations x bins."""

    transition: np.ndarray  # (n, n, K, bins), T = M kron M; zero for unstable configurations
    start: np.ndarray  # (n, 2, K, bins): [vec S0, vec S_inf for B = 1]
    readout: int  # index of E[readout^2] in vec S
    weights: np.ndarray  # (bins,): 1/2 h count
    stable: np.ndarray  # (K,) spectral radius of M < 1 in every bin
    risk_at_infinity: np.ndarray  # (K,): R_inf for B = 1


def _build_dynamics(model: NoisyQuadraticModel, precondition_power: float, learning_rate: np.ndarray,
                    momentum: np.ndarray, ema: np.ndarray) -> _Dynamics:
    """Second-moment recurrence of :func:`_first_moment` and its limit S_inf = (I - T)^-1 n for B = 1."""
    system = _first_moment(model, precondition_power, learning_rate, momentum, ema)
    m_matrix, b_vector = system.matrix, system.noise_input
    k = m_matrix.shape[0]
    n = k * k
    transition = np.einsum("ijab,klab->ikjlab", m_matrix, m_matrix).reshape(n, n, *m_matrix.shape[2:])
    noise = system.noise_variance * np.einsum("iab,jab->ijab", b_vector, b_vector).reshape(n, *b_vector.shape[1:])
    last_axes = np.moveaxis(np.eye(n)[:, :, None, None] - transition, (0, 1), (-2, -1))
    s_inf = np.moveaxis(np.linalg.solve(last_axes, np.moveaxis(noise, 0, -1)[..., None])[..., 0], -1, 0)
    s0 = np.broadcast_to(model.initial_variance * np.outer(system.initial, system.initial).reshape(n, 1, 1),
                         s_inf.shape)
    readout = system.readout * k + system.readout
    return _Dynamics(
        transition=transition,
        start=np.stack([s0, s_inf], 1),
        readout=readout,
        weights=system.weights,
        stable=system.stable,
        risk_at_infinity=s_inf[readout] @ system.weights,
    )


def _apply(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Product of stacks of small matrices stored matrix-axes-first: (n, n, ...) x (n, m, ...) (broadcasting)."""
    return np.einsum("ij...,jk...->ik...", left, right)


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
#
# With the row vector v(t) = e_r M^t per direction, the read-out of S(t) = M^t S0 M^tT + sum_{s<t} M^s N M^sT / B
# is E[L(t)] = D(t) + N(t) / B: D(t) = sigma0^2 sum_bins w (v(t) x0)^2, N(t) = sum_bins w sum_{s<t} v(s) N v(s)^T.
# Blocks of L steps compose: v(t + L) = v(t) M^L and N(t + L) = N(t) + v(t) A_L v(t)^T with
# A_L = sum_{s<L} M^s N M^sT, A_2L = A_L + M^L A_L M^LT (k x k per direction, against k^2 x k^2 for T).
# N(t) never decreases. D(t) = sigma0^2 sum_bins w u(t)^2 with u(t) = v(t) x0 = sum_i a_i lambda_i^(t-1) for
# t >= 1 over the eigenvalues of M, so sigma0^2 u^2 = Re sum_p c_p mu_p^(t-1) with mu = lambda_i lambda_j: a term
# is monotone when mu is real and positive and at least -|c| |mu|^(t-1) otherwise. That bounds the risk from
# below between grid times, so a dip below the target between them (momentum oscillates) is never missed.

_LEAF_STEPS = 16  # intervals this short are checked step by step ...
_LEAF_ELEMENTS = 16384  # ... or longer ones, 16 times a power of two, while steps x bins stay within this
_KEPT_STATES = 8  # states v(t), N(t) a search keeps for reuse
_MODE_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
_PAIRWISE_ELEMENTS = 4096  # floors of terms with at least this many configurations x bins go pair by pair


def _time_grid(max_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Times 0..2R-1, then R points per octave (gaps 2^e, e stored), up to the first time >= max_steps."""
    times = list(range(2 * _GRID_RESOLUTION))
    gaps = [0] * (2 * _GRID_RESOLUTION - 1)
    exponent = 1
    while times[-1] < max_steps:
        for _ in range(_GRID_RESOLUTION):
            times.append(times[-1] + 2**exponent)
            gaps.append(exponent)
        exponent += 1
    return np.array(times, dtype=np.int64), np.array(gaps, dtype=np.int64)


def _advance(v: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Row vectors times matrices, matrix axes first: (v M)_j = sum_i v_i M_ij for v (k, ...), M (k, k, ...)."""
    return np.einsum("i...,ij...->j...", v, matrix)


def _carried(matrix: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Matrices times column vectors, matrix axes first: (M y)_i = sum_j M_ij y_j for M (k, k, ...), y (k, ...)."""
    return np.einsum("ij...,j...->i...", matrix, columns)


def _quadratic(v: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """v A v^T for row vectors v (k, ...) and matrices A (k, k, ...)."""
    return np.einsum("i...,ij...,j...->...", v, matrix, v)


def _noise_block(system: _FirstMoment) -> np.ndarray:
    """A_1 = c~ b b^T, (k, k, K, bins)."""
    b = system.noise_input
    return system.noise_variance * b[:, None] * b[None, :]


def _doubled(power: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M^2L, A_2L) from (M^L, A_L): A_2L = A_L + M^L A_L M^LT."""
    grown = _apply(_apply(power, block), power.swapaxes(0, 1))
    grown += block
    return _apply(power, power), grown


def _readout_row(system: _FirstMoment) -> np.ndarray:
    v = np.zeros((system.matrix.shape[0],) + system.matrix.shape[2:])
    v[system.readout] = 1.0
    return v


def _from_start(system: _FirstMoment, v: np.ndarray) -> np.ndarray:
    """u = v x0 per direction: x0 is 1 in theta and theta~ and 0 in m, so a sum of rows of v (no products)."""
    kept = np.flatnonzero(system.initial)
    return functools.reduce(np.add, (v[i] for i in kept[1:]), v[kept[0]])


def _deterministic(system: _FirstMoment, v: np.ndarray) -> np.ndarray:
    """D = sigma0^2 sum_bins w (v x0)^2, (K,)."""
    u = _from_start(system, v)
    return (u * u) @ (system.initial_variance * system.weights)


@dataclass(frozen=True, eq=False)
class _Modes:
    """sigma0^2 u(t)^2 = Re sum_p coefficients_p values_p^(t-1) for t >= 1, per (configuration, bin); where two
    modes coincide (confluent): sigma0 u(t) = (A + B (t - 1)) lambda^(t-1) instead (coefficients 0).
    values and coefficients are real arrays when every value is real (no momentum), else complex.

    In the size form (:meth:`by_size`, ``sized``) both are real: mu and Re c for monotone terms, |mu| and |c| for
    the others, so c mu^s is tracked by its real part (monotone) or its size |c| |mu|^s (the others)."""

    values: np.ndarray  # (P, K, bins) mu = lambda_i lambda_j, for the pairs of modes in use
    coefficients: np.ndarray  # (P, K, bins)
    monotone: np.ndarray  # (P, K, bins) mu real and positive
    log_size: np.ndarray  # (P, K, bins) |log mu| (1e300 for mu = 0)
    confluent: np.ndarray  # (K, bins) the two modes in use coincide (a defective M)
    linear: np.ndarray  # (2, K, bins) A, B where confluent, else 0
    root: np.ndarray  # (K, bins) the real double root lambda where confluent, else 0
    # per pair, also valid for any subset: every term monotone; some term monotone; the least |log mu| of the
    # other terms (inf if none)
    all_monotone: tuple[bool, ...]
    any_monotone: tuple[bool, ...]
    least_log_size: tuple[float, ...]
    sized: bool = False
    unclamped: tuple[np.ndarray, np.ndarray] | None = None  # size form: weights of the terms at the start and
    # at the end of an interval in the floor of D without its clamp per bin (:func:`_settling_floor`)

    def subset(self, keep: np.ndarray) -> _Modes:
        return _Modes(self.values[:, keep], self.coefficients[:, keep], self.monotone[:, keep],
                      self.log_size[:, keep], self.confluent[keep], self.linear[:, keep], self.root[keep],
                      self.all_monotone, self.any_monotone, self.least_log_size, self.sized,
                      None if self.unclamped is None else (self.unclamped[0][:, keep], self.unclamped[1][:, keep]))

    def by_size(self, weights: np.ndarray) -> _Modes:
        """The size form: real arithmetic for the terms; its floors take every oscillating term z mu^s at -|z|,
        which is what the complex form gives once span |log mu| >= 2 (:meth:`sized_from`).

        The floor without the clamp per bin, sum_bins w sum_p (z_end if z is monotone and positive, z_start if
        monotone and negative, -|z_start| else) - 1e-10 |z_start|, then takes two dot products (``unclamped``).
        """
        values, coefficients = self.to_size(self.values), self.to_size(self.coefficients)
        positive = self.monotone & (coefficients > 0)
        at_start = np.where(positive, -1e-10, np.where(self.monotone, 1.0 + 1e-10, -1.0 - 1e-10)) * weights
        return dataclasses.replace(self, values=values, coefficients=coefficients, sized=True,
                                   unclamped=(at_start, np.where(positive, weights, 0.0)))

    def to_size(self, terms: np.ndarray) -> np.ndarray:
        """Products c mu^s (or powers mu^s) in the size form: Re for monotone terms, |.| for the others."""
        return np.where(self.monotone, terms.real, np.abs(terms))

    def sized_from(self, span: int) -> bool:
        """Whether floors over ``span`` steps lose nothing in the size form (complex terms only: real ones
        gain nothing from it)."""
        return np.iscomplexobj(self.values) and span * min(self.least_log_size) >= 2.0


def _modes(system: _FirstMoment) -> _Modes:
    """Coefficients of u(t) = sum_i a_i lambda_i^(t-1) (Lagrange on u(1), u(2), u(3), active modes only).

    Where eigenvalues coincide (a defective M) the coefficients are not finite; such a bin gets coefficient 0.
    With two modes in use (heavy-ball roots at critical damping, or r1 = gamma without momentum) the double
    root lambda is real and u(t) = (A + B (t - 1)) lambda^(t-1), A = u(1), B = u(2) / lambda - u(1), which gives
    the floor its own term; with three modes the floor of such a bin is 0 <= D_bin, still a valid (if loose) bound.
    """
    v = _readout_row(system)
    u = []
    for _ in range(3):
        v = _advance(v, system.matrix)
        u.append(_from_start(system, v))
    u1, u2, u3 = u
    l1, l2, l3 = system.modes
    second, third = system.active[1][:, None], system.active[2][:, None]
    both = second & third
    zero = l1.dtype.type(0)  # complex arithmetic only where some eigenvalue is complex
    unused = np.zeros(u1.shape, dtype=l1.dtype)  # stands for coefficients of a case no configuration has
    with np.errstate(all="ignore"):
        a1_two, ax_two = {}, {}
        for mode, other, alone in ((2, l2, second & ~third), (3, l3, third & ~second)):
            a1_two[mode], ax_two[mode] = unused, unused
            if alone.any():
                gap = l1 - other
                a1_two[mode], ax_two[mode] = (u2 - other * u1) / gap, (l1 * u1 - u2) / gap
        a1, a2, a3 = unused, unused, unused
        if both.any():
            a1 = (u3 - (l2 + l3) * u2 + l2 * l3 * u1) / ((l1 - l2) * (l1 - l3))
            a2 = (u3 - (l1 + l3) * u2 + l1 * l3 * u1) / ((l2 - l1) * (l2 - l3))
            a3 = (u3 - (l1 + l2) * u2 + l1 * l2 * u1) / ((l3 - l1) * (l3 - l2))
        coefficients = np.stack([
            np.where(both, a1, np.where(second, a1_two[2], np.where(third, a1_two[3], u1 + zero))),
            np.where(both, a2, np.where(second, ax_two[2], zero)),
            np.where(both, a3, np.where(third, ax_two[3], zero)),
        ])
        valid = np.isfinite(coefficients).all(axis=0)
        coefficients[:, ~valid] = zero  # in place (fresh arrays): a copy costs more than the few bins it changes
        used = system.active.any(axis=1)
        pairs = [(i, j) for i, j in _MODE_PAIRS if used[i] and used[j]]
        values = np.stack([system.modes[i] * system.modes[j] for i, j in pairs])
        values[:, ~system.stable] = zero  # unstable configurations are never walked
        products = np.stack([(1.0 if i == j else 2.0) * coefficients[i] * coefficients[j] for i, j in pairs])
        if np.iscomplexobj(values) and not (values.imag.any() or products.imag.any()):  # same real parts
            values, products = values.real.copy(), products.real.copy()
        log_size = _log_size(values)
        two_modes = second ^ third
        confluent = np.zeros(u1.shape, dtype=bool)
        if two_modes.any():  # (a double root needs exactly two modes in use)
            confluent = ~valid & two_modes & (l1 == np.where(second, l2, l3)) & system.stable[:, None]
        root, linear = np.zeros(u1.shape), np.zeros((2,) + u1.shape)
        if confluent.any():
            root = np.where(confluent, l1.real, 0.0)
            slope = np.where(root != 0, u2 / np.where(root != 0, root, 1.0) - u1, 0.0)
            linear = np.sqrt(system.initial_variance) * np.where(confluent, np.stack([u1, slope]), 0.0)
    monotone = (values.imag == 0) & (values.real > 0)
    log_size[~np.isfinite(log_size)] = 1e300
    least = np.where(monotone, np.inf, log_size).min(axis=(1, 2))
    return _Modes(values, system.initial_variance * products, monotone, log_size, confluent, linear, root,
                  tuple(monotone.all(axis=(1, 2))), tuple(monotone.any(axis=(1, 2))), tuple(least))


def _log_size(values: np.ndarray) -> np.ndarray:
    """|log mu| = sqrt(log^2 |mu| + arg^2 mu) (inf for mu = 0), with real logarithms (a complex one costs more)."""
    size = np.abs(np.log(np.abs(values)))
    turned = (values.real < 0) | (values.imag != 0)  # arg mu != 0 (a negative real root in a complex array too)
    if turned.any():  # in place where turned (most of an array of heavy-ball roots: an index costs more)
        np.hypot(size, np.angle(values), out=size, where=turned)
    return size


def _integer_power(values: np.ndarray, exponent: int) -> np.ndarray:
    """values^exponent by repeated squaring (exponent >= 0; ``values`` itself for 1)."""
    result, square = None, values
    while exponent:
        if exponent & 1:
            result = square if result is None else result * square
        exponent >>= 1
        if exponent:
            square = square * square
    return np.ones_like(values) if result is None else result


def _mode_power(values: np.ndarray, exponent: int) -> np.ndarray:
    """mu^exponent: exp(exponent log mu) where every mu is real and >= 0 (no momentum, or the size form), else
    :func:`_integer_power`. For the floors only, which allow for rounding: the relative error of either is of
    order exponent |log mu| times the machine epsilon."""
    if exponent == 0 or np.iscomplexobj(values) or np.any(values < 0):
        return _integer_power(values, exponent)
    with np.errstate(divide="ignore"):
        return np.exp(exponent * np.log(values))


def _deterministic_floor(modes: _Modes, weights: np.ndarray, first: np.ndarray, last: np.ndarray,
                         span: int, start: int) -> np.ndarray:
    """Lower bound of D(t) over integers t in [t0, t0 + span], t0 = start + 1, from the terms c mu^(t0 - 1)
    (first) and c mu^(t0 + span - 1) (last).

    A term with mu real and positive is monotone; any other term z mu^s (s <= span) is at least
    max(-|z|, Re z - |z| s |log mu|), since |mu^s| <= 1 and |mu^s - 1| <= s |log mu| when |mu| <= 1. A confluent
    bin, (A + B s)^2 lambda^(2s) on s in [start, start + span], is at least min over the ends of (A + B s)^2
    times lambda^(2 (start + span)) when A + B s keeps its sign there, else 0.
    """
    pairwise = first[0].size >= _PAIRWISE_ELEMENTS  # large arrays pair by pair: only the kinds of terms a pair has
    groups = (zip(range(first.shape[0]), modes.all_monotone, modes.any_monotone, modes.least_log_size) if pairwise
              else [(slice(None), all(modes.all_monotone), any(modes.any_monotone), min(modes.least_log_size))])
    # fresh arrays are updated in place: on large arrays a new one can cost more than the arithmetic (page faults)
    for group, every, some, least in groups:
        real = first[group].real
        size = np.abs(first[group])  # >= |term| on the whole interval since |mu| < 1
        if every:
            term = np.minimum(real, last[group].real)
        elif modes.sized or span * least >= 2.0:  # |mu^s - 1| <= 2 binds for every term: max(Re z - 2 |z|, -|z|) = -|z|
            term = -size
        else:
            with np.errstate(over="ignore"):
                term = np.multiply(modes.log_size[group], span)
            np.minimum(term, 2.0, out=term)  # |mu^s - 1| <= 2
            term *= size
            np.subtract(real, term, out=term)
        if some and not every:
            np.minimum(real, last[group].real, out=term, where=modes.monotone[group])
        np.maximum(term, -size, out=term)
        if not pairwise:
            terms, sizes = term.sum(axis=0), size.sum(axis=0)
        elif group == 0:
            terms, sizes = term, size
        else:
            terms += term
            sizes += size
    sizes *= 1e-10  # slack: rounding of cancelling terms
    per_bin = np.maximum(np.subtract(terms, sizes, out=terms), 0.0, out=terms)
    if modes.confluent.any():
        near, far = (modes.linear[0] + modes.linear[1] * s for s in (float(start), float(start + span)))
        with np.errstate(under="ignore"):
            decay = np.abs(modes.root) ** (2.0 * (start + span))
        per_bin = per_bin + np.where(near * far > 0, np.minimum(near * near, far * far) * decay, 0.0) * (1 - 1e-10)
    return per_bin @ weights


def _settling_floor(modes: _Modes, weights: np.ndarray, first: np.ndarray, last: np.ndarray, span: int, start: int,
                    noise_floor: np.ndarray, rows: np.ndarray, target: float) -> np.ndarray:
    """:func:`_deterministic_floor` per configuration where it decides ``rows`` (configurations x batch sizes:
    floor + noise_floor > target settles a row). In the size form the floor without the clamp per bin (at most
    the floor, max(x, 0) >= x) comes first; the floor per bin only for configurations it leaves a row open."""
    if modes.unclamped is None:
        return _deterministic_floor(modes, weights, first, last, span, start)
    floor = np.einsum("pkb,pkb->k", first, modes.unclamped[0]) + np.einsum("pkb,pkb->k", last, modes.unclamped[1])
    exact = np.nonzero((rows & ~(floor[:, None] + noise_floor > target)).any(axis=1))[0]
    if exact.size == floor.size:
        return _deterministic_floor(modes, weights, first, last, span, start)
    if exact.size:
        floor[exact] = _deterministic_floor(modes.subset(exact), weights, first[:, exact], last[:, exact], span, start)
    return floor


@dataclass(frozen=True, eq=False)
class _GridCrossings:
    """Per (configuration, batch size): the grid index whose interval (t_{j-1}, t_j] holds the first crossing
    with risk(t_j) <= target (``point``, 0 for t = 0), or the first index whose interval's interior may hold one
    while risk(t_j) > target (``doubt``); -1 when neither (never, diverges, or given up). ``before``/``at``:
    the risk at t_{j-1} and t_j of ``point``."""

    point: np.ndarray
    doubt: np.ndarray
    before: np.ndarray
    at: np.ndarray


@dataclass(frozen=True, eq=False)
class _Handover:
    """The walk's state at the grid time 2^octave - 1, as the octave pass reached it: v and N there, M^(2^e) and
    A_(2^e) with e = octave - 6 (the walk's first steps are 2^(e + 1) long), for a system that keeps ``states``."""

    octave: int
    states: tuple[int, ...]
    v: np.ndarray  # (k, K, bins)
    noise: np.ndarray  # (K,)
    power: np.ndarray  # (k, k, K, bins)
    block: np.ndarray  # (k, k, K, bins)

    @staticmethod
    def bytes_per_part(k: int, bins: int) -> int:
        """Size of one configuration's part."""
        return 8 * ((k + 2 * k * k) * bins + 1)

    @classmethod
    def joined(cls, parts: list[_Handover], states: tuple[int, ...]) -> _Handover:
        """One handover of several configurations' parts, all at one octave, for a system that keeps ``states``."""
        parts = [part.kept(states) for part in parts]
        return cls(parts[0].octave, states, *(np.concatenate([getattr(part, name) for part in parts], axis)
                                              for name, axis in (("v", 1), ("noise", 0), ("power", 2), ("block", 2))))

    def kept(self, states: tuple[int, ...]) -> _Handover:
        """The same state for a system that keeps ``states`` (the octave pass keeps a state where some configuration
        of its chunk uses it). A state this configuration does not use (m with beta = 0, theta~ with gamma = 0)
        never feeds the others: its column of M is 0, so its column of M^(2^e) is 0 and its entry of v(t) is 0 for
        t >= 1 (with gamma = 0, v = e_theta~ M^t = e_theta M^t), and taking it out or adding it as 0 changes nothing
        the walk reads."""
        if states == self.states:
            return self
        index = [self.states.index(state) if state in self.states else None for state in states]

        def taken(array, axes):
            shape = list(array.shape)
            for axis in axes:
                shape[axis] = len(states)
            out = np.zeros(shape)
            for target in np.ndindex(*(len(states),) * len(axes)):
                source = tuple(index[i] for i in target)
                if None not in source:
                    out[target] = array[source]
            return out

        return _Handover(self.octave, states, taken(self.v, [0]), self.noise, taken(self.power, [0, 1]),
                         taken(self.block, [0, 1]))


def _walk_grid(system: _FirstMoment, batch_sizes: np.ndarray, target: float, times: np.ndarray, gaps: np.ndarray,
               give_up_after: np.ndarray | None = None, walk_from: np.ndarray | None = None,
               modes: _Modes | None = None, handover: _Handover | None = None) -> _GridCrossings:
    """Walk the time grid for all configurations at once until every (configuration, batch size) is settled.

    A row is settled at its first grid crossing, at the first interval whose floor (D bounded by the modes, N by
    its value at the interval's start) reaches the target, or when N(t) / B > target (never after). Once per
    octave a row is also dropped when the floor stays above the target up to the grid time after
    ``give_up_after`` (per batch size: the best ranking time so far, lowered by the crossings found here; without
    it, the end of the grid), and with ``give_up_after`` once t_j exceeds it: such a row cannot be ranked at or
    before the best. Finished configurations are dropped from the arrays as the walk goes. ``walk_from``
    (:func:`_octave_crossings`) skips rows that need no walk (inf) and starts the walk at the grid time 2^e - 1
    (reached by repeated squaring, or taken from ``handover`` when it holds that octave's state), e the smallest of
    its values. ``modes``: :func:`_modes` of ``system`` if known.
    """
    n_configs, n_batches = system.stable.size, batch_sizes.size
    inverse_batch = 1.0 / batch_sizes
    point = np.full((n_configs, n_batches), -1)
    doubt = np.full((n_configs, n_batches), -1)
    before = np.full((n_configs, n_batches), np.nan)
    at = np.full((n_configs, n_batches), np.nan)
    weights = system.weights
    ranking = give_up_after is not None  # rows may be given up for the best found so far
    bound = np.array(give_up_after, dtype=np.float64) if ranking else np.full(n_batches, np.inf)

    v = _readout_row(system)
    noise = np.zeros(n_configs)
    risk = np.repeat(_deterministic(system, v)[:, None], n_batches, axis=1)
    start = system.stable[:, None] & (risk <= target)
    point[start], at[start] = 0, risk[start]
    active = system.stable[:, None] & ~start
    activate_at = np.zeros(active.shape, dtype=np.int64)  # grid index from which a row is walked
    if walk_from is not None:
        active &= np.isfinite(walk_from)
        activate_at = np.searchsorted(times, 2 ** np.where(active, walk_from, 0).astype(np.int64) - 1)
    if ranking:
        bound[start.any(axis=0)] = 0.0
    live = np.arange(n_configs)
    power, block = system.matrix, _noise_block(system)
    modes = _modes(system) if modes is None else modes
    single = system.matrix.shape[0] == 1  # one real mode per bin: D never increases
    clear = np.zeros_like(active)  # rows whose floor stays above the target for the rest of the octave
    base, since = modes.coefficients.copy(), 0  # c mu^(t_{j-1}) = base mu_gap^since, kept lazily: only rows
    mu_gap, mu_inner = modes.values, np.ones_like(modes.values)  # near the target need it; mu^(2^e), mu^(2^e - 2)
    exponent, start_index = 0, 0
    octave = int(np.log2(times[activate_at[active].min()] + 1)) if active.any() else 0
    if octave >= _FIRST_OCTAVE and not start.any():  # t = 2^octave - 1 is the grid time start_index, which begins
        exponent = octave - _FIRST_OCTAVE  # R intervals of 2^(exponent + 1) steps
        if handover is not None and (handover.octave, handover.states) == (octave, system.states):
            v, noise, power, block = handover.v, handover.noise, handover.power, handover.block
        else:
            for doubling in range(octave):
                if doubling == exponent:
                    power_then, block_then = power, block
                noise = noise + _quadratic(v, block) @ weights
                v = _advance(v, power)
                if doubling < octave - 1:
                    power, block = _doubled(power, block)
            power, block = power_then, block_then
        start_index = int(np.searchsorted(times, 2**octave - 1))
        risk = _deterministic(system, v)[:, None] + noise[:, None] * inverse_batch
        if np.any(active & (risk <= target)):  # not expected: the octave floors said otherwise
            return _walk_grid(system, batch_sizes, target, times, gaps, give_up_after,
                              np.where(np.isfinite(walk_from), 0.0, np.inf), modes)
        if modes.sized_from(2 ** (exponent + 1) - 2):  # every floor of the walk: real arithmetic
            modes = modes.by_size(weights)
        base = modes.coefficients * _mode_power(modes.values, 2**octave - 1)
        mu_gap, mu_inner = (_mode_power(modes.values, s) for s in (2**exponent, max(2**exponent - 2, 0)))
    pending = active & (activate_at > start_index)  # rows above the target until their first grid index
    active &= ~pending
    for j in range(start_index + 1, times.size):
        if pending.any():
            starting = pending & (activate_at <= j - 1)
            active, pending = active | starting, pending & ~starting
        busy = (active | pending).any(axis=1)
        if not busy.any():
            break
        if busy.sum() < 0.9 * live.size:  # drop configurations whose rows are all settled
            live, active, risk, clear = live[busy], active[busy], risk[busy], clear[busy]
            pending, activate_at = pending[busy], activate_at[busy]
            v, noise, power, block = v[:, busy], noise[busy], power[:, :, busy], block[:, :, busy]
            modes = modes.subset(busy)
            base, mu_gap, mu_inner = base[:, busy], mu_gap[:, busy], mu_inner[:, busy]
        if modes.sized_from(2 ** gaps[j - 1] - 2):  # the floors of this and later intervals: real arithmetic
            base, mu_gap, mu_inner = modes.to_size(base), modes.to_size(mu_gap), modes.to_size(mu_inner)
            modes = modes.by_size(weights)
        while exponent < gaps[j - 1]:
            power, block = _doubled(power, block)
            base, since = base * _integer_power(mu_gap, since), 0
            if exponent >= 1:
                mu_inner = mu_inner * mu_gap
            mu_gap = mu_gap * mu_gap
            exponent += 1
            if not single:  # one floor for the octave ahead spares most rows the floor of every interval
                # interiors of the next R intervals: [t_{j-1} + 1, t_{j-1} + R 2^e - 1], mu^(R 2^e - 2) at the end
                noise_floor = noise[:, None] * inverse_batch
                octave_floor = _settling_floor(modes, weights, base,
                                               base * mu_inner * _integer_power(mu_gap, _GRID_RESOLUTION - 1),
                                               _GRID_RESOLUTION * 2**exponent - 2, int(times[j - 1]), noise_floor,
                                               active | pending, target)
                clear = octave_floor[:, None] + noise_floor > target
        previous_noise, previous_risk = noise, risk
        noise = noise + _quadratic(v, block) @ weights
        v = _advance(v, power)
        deterministic = _deterministic(system, v)
        risk = deterministic[:, None] + noise[:, None] * inverse_batch
        hit = active & (risk <= target)
        rows, columns = np.nonzero(hit)
        point[live[rows], columns] = j
        before[live[rows], columns] = previous_risk[rows, columns]
        at[live[rows], columns] = risk[rows, columns]
        active = active & ~hit
        if ranking and rows.size:
            np.minimum.at(bound, columns, float(times[j]))  # a ranking time at or before t_j
        if exponent >= 1:  # integers strictly between t_{j-1} and t_j
            if single:
                unsure = active & ~(deterministic[:, None] + previous_noise[:, None] * inverse_batch > target)
            else:
                unsure = active & ~clear
                near = np.nonzero(unsure.any(axis=1))[0]
                noise_floor = previous_noise[near, None] * inverse_batch
                if near.size and (near.size == live.size or modes.sized):
                    # c mu^(t_{j-1}) kept from here on (in the size form the unclamped floor of every configuration
                    # costs less than taking out the near ones)
                    base, since = base * _integer_power(mu_gap, since), 0
                    floor = _settling_floor(modes, weights, base, base * mu_inner, 2**exponent - 2, int(times[j - 1]),
                                            previous_noise[:, None] * inverse_batch, unsure, target)[near]
                elif near.size:
                    first = base[:, near] * _integer_power(mu_gap[:, near], since)
                    floor = _settling_floor(modes.subset(near), weights, first, first * mu_inner[:, near],
                                            2**exponent - 2, int(times[j - 1]), noise_floor, unsure[near], target)
                if near.size:
                    unsure[near] &= ~(floor[:, None] + noise_floor > target)
            rows, columns = np.nonzero(unsure)
            doubt[live[rows], columns] = j
            active = active & ~unsure
        since += 1
        active = active & ~(noise[:, None] * inverse_batch > target)  # N never decreases: never below target
        active = active & ~(times[j] > bound)[None, :]
        pending = pending & ~(times[activate_at] > bound[None, :])
        octaves = j // _GRID_RESOLUTION  # the check passes over every term once per batch size: with many
        if j % _GRID_RESOLUTION == 0 and active.any() and (  # directions only after 1, 2, 4, 8, ... octaves
                weights.size <= 1000 or octaves & (octaves - 1) == 0):
            until = times[np.minimum(np.searchsorted(times, bound, side="right"), times.size - 1)]
            active = active & ~_hopeless(modes, base * _integer_power(mu_gap, since), weights, noise,
                                         inverse_batch, target, active, int(times[j]), until)
    return _GridCrossings(point, doubt, before, at)


def _hopeless(modes: _Modes, first: np.ndarray, weights: np.ndarray, noise: np.ndarray, inverse_batch: np.ndarray,
              target: float, active: np.ndarray, now: int, until: np.ndarray) -> np.ndarray:
    """Active rows whose risk stays above the target on every step in (now, until[column]], given the terms
    ``first`` = c mu^now.

    The floor of D on that interval: monotone terms that decrease are taken at its end, all others at its start
    (oscillating terms at -|c mu^now|), clamped at 0 per bin; N at its value now.
    """
    size = np.abs(first)
    decreasing = modes.monotone & (first.real > 0)
    shared = np.where(decreasing, 0.0, np.where(modes.monotone, first.real, -size)).sum(axis=0)
    shared -= 1e-10 * size.sum(axis=0)
    log_values = np.log(np.where(decreasing, modes.values.real, 1.0))
    hopeless = np.zeros_like(active)
    checked = active.any(axis=0) & (until > now)
    for end in np.unique(until[checked]):  # one floor per end of the interval
        columns = np.nonzero(checked & (until == end))[0]
        rows = np.nonzero(active[:, columns].any(axis=1))[0]
        decay = np.exp((end - 1 - now) * log_values[:, rows])
        late = np.where(decreasing[:, rows], first.real[:, rows] * decay, 0.0)
        floor = np.maximum(shared[rows] + late.sum(axis=0), 0.0) @ weights
        hopeless[np.ix_(rows, columns)] = (floor[:, None] + noise[rows, None] * inverse_batch[columns] > target)
    return hopeless & active


def _octave_crossings(system: _FirstMoment, batch_sizes: np.ndarray, target: float, times: np.ndarray,
                      until: np.ndarray | None = None, earliest: bool = False,
                      handovers: dict[tuple[int, int], _Handover] | None = None, budget: int = _HANDOVER_BYTES,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (configuration, batch size): the first time 2^e - 1 (a grid time) with risk <= target (inf if none),
    the risk then, and the octave e from which the grid walk must follow it (inf: never).

    The first crossing is at or before the first time, hence so is the ranking time: from ~30 steps per
    configuration, an upper bound for the grid search and a guess of which configurations will win. A row need
    not be walked before 2^e - 1 when its risk stays above the target on (0, 2^e - 1]: on each octave
    (2^i - 1, 2^(i+1) - 1] its floor (D bounded by the modes, N by its value at the octave's start) is above
    it. With ``until`` (per batch size, an upper bound of the best ranking time), rows are given up (inf) once
    they stay above the target up to the grid time after it: they can neither win nor lower the bound.
    With ``earliest`` only the earliest crossing per batch size is sought, reached.min(axis=0): a batch size is
    followed until some configuration reaches the target, no floors are computed and walk_from stays inf.
    With one real mode per direction (SGD) D never increases, so its floor on an octave is D at the octave's end.
    ``handovers`` (a dict) receives, for each configuration and octave e >= 6 its rows are to be walked from, the
    walk's state at 2^e - 1 (:class:`_Handover`), keyed (configuration, e), while they fit in ``budget`` bytes:
    the walk need not square its way there again.
    """
    weights, inverse_batch = system.weights, 1.0 / batch_sizes
    v = _readout_row(system)
    risk = np.repeat(_deterministic(system, v)[:, None], batch_sizes.size, axis=1)
    reached = np.where(system.stable[:, None] & (risk <= target), 0.0, np.inf)
    risk_then = np.where(np.isfinite(reached), risk, np.inf)
    walk_from = np.where(np.isfinite(reached), 0.0, np.inf)
    followed = system.stable[:, None] & np.isinf(reached)  # rows whose first octave crossing is still sought
    open_rows = followed.copy()  # ... and above the target on (0, time] so far
    single = system.matrix.shape[0] == 1  # one real mode per bin: D never increases
    modes = _modes(system) if until is not None or not (earliest or single) else None
    last_time = np.full(batch_sizes.size, times[-1])
    if until is not None:  # the grid time after until, as for the walk's bound
        last_time = times[np.minimum(np.searchsorted(times, until, side="right"), times.size - 1)]
        checked = followed & np.isfinite(until)[None, :]
        if checked.any():  # one floor up to the latest of those times
            latest = np.full(batch_sizes.size, last_time[np.isfinite(until)].max())
            hopeless = _hopeless(modes, modes.coefficients, weights, np.zeros(reached.shape[0]), inverse_batch,
                                 target, checked, 0, latest)
            followed &= ~hopeless
            open_rows &= ~hopeless
    floors = not (earliest or single)  # floors from the modes' terms:
    if floors:  # c mu^time, mu^time, mu^(time + 1), with time = 2^octave - 1
        term, mu_odd, mu_pow = modes.coefficients.copy(), np.ones_like(modes.values), modes.values.copy()
    noise, time, octave = np.zeros(system.stable.size), 0, 0
    power, block = system.matrix, _noise_block(system)
    live = np.arange(system.stable.size)
    ladder = {}  # octave o -> (live, M^(2^o), A_(2^o)) for the last 7 octaves, while handovers are kept
    while True:
        beyond = time >= last_time  # crossings after `time` come after the last time of interest
        followed[:, beyond] = False
        open_rows[:, beyond] = False
        busy = (followed[live] & (noise[:, None] * inverse_batch <= target)).any(axis=1)  # N never decreases
        if not busy.any():
            break
        if busy.sum() < 0.9 * live.size:
            live, v, noise, power, block = live[busy], v[:, busy], noise[busy], power[:, :, busy], block[:, :, busy]
            if floors:
                modes, term, mu_odd, mu_pow = modes.subset(busy), term[:, busy], mu_odd[:, busy], mu_pow[:, busy]
        if time > 0:  # M^(time + 1), A_(time + 1) and the terms at this time, for the configurations kept only
            power, block = _doubled(power, block)
            if floors:
                term *= mu_pow  # in place: fresh arrays cost more than the products here (page faults)
                mu_odd *= mu_pow
                mu_pow *= mu_pow
        if handovers is not None:
            ladder[octave] = (live, power, block)
            ladder.pop(octave - _FIRST_OCTAVE - 1, None)
        v_then, noise_then = v, noise
        if floors and modes.sized_from(time):  # real arithmetic from here on
            term, mu_odd, mu_pow = modes.to_size(term), modes.to_size(mu_odd), modes.to_size(mu_pow)
            modes = modes.by_size(weights)
        if floors:  # on [time + 1, 2 time + 1]
            floor = _settling_floor(modes, weights, term, term * mu_odd, time, time, noise[:, None] * inverse_batch,
                                    open_rows[live], target)
        noise_floor = noise[:, None] * inverse_batch
        noise = noise + _quadratic(v, block) @ weights
        v = _advance(v, power)
        time, octave = 2 * time + 1, octave + 1
        deterministic = _deterministic(system, v)
        risk = deterministic[:, None] + noise[:, None] * inverse_batch
        new = followed[live] & (risk <= target)
        rows, columns = np.nonzero(new)
        reached[live[rows], columns], risk_then[live[rows], columns] = time, risk[rows, columns]
        followed[live[rows], columns] = False
        if earliest:  # a later crossing at these batch sizes is not the earliest
            last_time[columns] = time
        else:
            if single:  # D(2 time + 1) (less a slack for rounding) <= D on the octave
                floor = deterministic * (1.0 - 1e-10)
            uncertain = open_rows[live] & (new | ~(floor[:, None] + noise_floor > target))
            rows, columns = np.nonzero(uncertain)
            walk_from[live[rows], columns] = octave - 1
            open_rows[live[rows], columns] = False
            if handovers is not None and octave - 1 >= _FIRST_OCTAVE and rows.size:
                _hand_over(handovers, budget, octave - 1, system.states, live, np.unique(rows), v_then, noise_then,
                           ladder)
    return reached, risk_then, walk_from


def _hand_over(handovers: dict[tuple[int, int], _Handover], budget: int, octave: int, states: tuple[int, ...],
               live: np.ndarray, positions: np.ndarray, v: np.ndarray, noise: np.ndarray, ladder: dict) -> None:
    """Keep the walk's state at 2^octave - 1 for the configurations live[positions] (v and N of the octave pass
    there, M^(2^e) and A_(2^e) from its ladder, e = octave - 6), while the handovers fit in ``budget`` bytes."""
    ladder_live, power, block = ladder[octave - _FIRST_OCTAVE]
    most = budget // _Handover.bytes_per_part(v.shape[0], v.shape[2])
    for position in positions[:max(most - len(handovers), 0)]:
        config = int(live[position])
        at = int(np.searchsorted(ladder_live, config))
        handovers[config, octave] = _Handover(octave, states, v[:, position, None].copy(),
                                              noise[position, None].copy(), power[:, :, at, None].copy(),
                                              block[:, :, at, None].copy())


def _interpolated(lower_time, upper_time, before, at, target):
    """Crossing time interpolated in log risk between grid times (the ranking of the grid search)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.clip(np.log(before / target) / np.log(before / at), 0.0, 1.0)
    return lower_time + fraction * (upper_time - lower_time)


class _RowSearch:
    """One configuration and batch size: the risk at any step (binary lifting with M^(2^e) and A_(2^e)) and the
    first step at or below the target in an interval (bisection at powers of two, pruned by the floor of the
    risk, with the last ``leaf_steps`` steps of a branch evaluated at once: 16, or more with few bins, where a
    floor of 0 (the same oscillating heavy-ball roots in every direction, as with p = 1) prunes little)."""

    def __init__(self, system: _FirstMoment, target: float, modes: _Modes | None = None):
        """``system`` of one configuration (e.g. a :meth:`_FirstMoment.subset`), ``modes`` its modes if known."""
        self.system = system
        self.modes = _modes(system) if modes is None else modes
        self.batch_size, self.target = 1.0, float(target)
        self.powers, self.blocks = [self.system.matrix], [_noise_block(self.system)]  # M^(2^e), A_(2^e) as needed
        self.leaf_steps = _LEAF_STEPS
        while 2 * self.leaf_steps * self.system.weights.size <= _LEAF_ELEMENTS:
            self.leaf_steps *= 2
        self.leaves: list[np.ndarray] = []  # M^s x0 and M^(s-1) b for s = 1..leaf_steps, built at the first leaf
        # (most searches end before one) and shared with the at_batch copies
        self.states: dict[int, tuple[np.ndarray, float]] = {}  # v(t) and N(t) of the last _KEPT_STATES times asked
        # for, shared with the at_batch copies (they do not depend on B): a row's searches at several batch sizes
        # mostly start at the same time
        self.mode_squares, self.mode_odds = [self.modes.values], [np.ones_like(self.modes.values)]  # mu^(2^e),
        # mu^(2^e - 1) as needed: a branch's terms from its parent's by one product
        eigenvalues = system.modes[system.active[:, 0]]  # those of M that can show in the read-out, (m, 1, bins)
        real = not np.iscomplexobj(eigenvalues) or not eigenvalues.imag.any()
        used = (real and eigenvalues.shape[0] > 1 and system.stable.all() and np.all(eigenvalues.real > 0)
                and self.leaf_steps > _LEAF_STEPS)  # few bins: the floor costs little next to the steps it spares
        self.largest = eigenvalues.real.max(axis=0)[0] if used else None  # (bins,) for :meth:`_ends_floor`

    def _mode_powers(self, bit: int) -> tuple[np.ndarray, np.ndarray]:
        """(mu^(2^bit), mu^(2^bit - 1))."""
        while len(self.mode_squares) <= bit:
            self.mode_odds.append(self.mode_odds[-1] * self.mode_squares[-1])
            self.mode_squares.append(self.mode_squares[-1] * self.mode_squares[-1])
        return self.mode_squares[bit], self.mode_odds[bit]

    def _leaves(self) -> tuple[np.ndarray, np.ndarray]:
        """Columns M^s x0 and M^(s-1) b for s = 1..leaf_steps, (k, leaf_steps, bins): from v(t), the risk at
        t + s is sigma0^2 sum_bins w (v M^s x0)^2 + (N(t) + sum_{r<s} sum_bins w c~ (v M^r b)^2) / B."""
        if not self.leaves:
            inputs = [self.system.noise_input]  # b, (k, 1, bins)
            starts = [np.broadcast_to(self.system.initial[:, None, None], inputs[0].shape)]  # x0
            for _ in range(_LEAF_STEPS):
                starts.append(_carried(self.powers[0], starts[-1]))
                inputs.append(_carried(self.powers[0], inputs[-1]))
            starts, inputs = np.concatenate(starts[1:], 1), np.concatenate(inputs[:-1], 1)
            while starts.shape[1] < self.leaf_steps:  # s = L+1..2L: M^L times the columns of s = 1..L
                power = self._ladder(starts.shape[1].bit_length() - 1)[0]
                starts = np.concatenate([starts, _carried(power, starts)], 1)
                inputs = np.concatenate([inputs, _carried(power, inputs)], 1)
            self.leaves.extend([starts, inputs])
        return self.leaves[0], self.leaves[1]

    def at_batch(self, batch_size: float) -> _RowSearch:
        """The same configuration at another batch size (arrays shared)."""
        other = copy.copy(self)
        other.batch_size = float(batch_size)
        return other

    def _ladder(self, bit: int) -> tuple[np.ndarray, np.ndarray]:
        """M^(2^bit) and A_(2^bit)."""
        while len(self.powers) <= bit:
            power, block = _doubled(self.powers[-1], self.blocks[-1])
            self.powers.append(power)
            self.blocks.append(block)
        return self.powers[bit], self.blocks[bit]

    def _step(self, v: np.ndarray, noise: float, bit: int) -> tuple[np.ndarray, float]:
        """(v, N) after 2^bit more steps."""
        power, block = self._ladder(bit)
        return _advance(v, power), noise + float((_quadratic(v, block) @ self.system.weights)[0])

    def state(self, t: int) -> tuple[np.ndarray, float]:
        """v(t) and N(t) (read-only: shared)."""
        t = int(t)
        if t not in self.states:
            v, noise = _readout_row(self.system), 0.0
            for bit in range(t.bit_length()):
                if (t >> bit) & 1:
                    v, noise = self._step(v, noise, bit)
            if len(self.states) >= _KEPT_STATES:
                del self.states[next(iter(self.states))]  # the oldest
            self.states[t] = (v, noise)
        return self.states[t]

    def risk(self, t: int) -> float:
        v, noise = self.state(t)
        return float(_deterministic(self.system, v)[0]) + noise / self.batch_size

    def first(self, low: int, high: int) -> int | None:
        """Smallest integer t in (low, high] with E[L(t)] <= target, or None."""
        if high <= low:
            return None
        return self._first(low, high, *self.state(low), v_high=None if self.largest is None else self.state(high)[0])

    def _first(self, low: int, high: int, v: np.ndarray, noise: float, first: np.ndarray | None = None,
               last: np.ndarray | None = None, v_high: np.ndarray | None = None) -> int | None:
        """``first``, ``last``: the terms c mu^low and c mu^(high - 1) when known (a branch gets them from its
        parent's by one product each); ``v_high``: v(high), given where :meth:`_ends_floor` applies."""
        if noise / self.batch_size > self.target:  # N never decreases
            return None
        if high - low <= self.leaf_steps:
            count = high - low
            starts, inputs = self._leaves()
            u = np.einsum("i...,i...->...", v, starts[:, :count])
            kicks = np.einsum("i...,i...->...", v, inputs[:, :count])
            weights = self.system.weights
            if weights.size == 1:  # one bin (every model with p = 1): the same numbers by products, at a fraction
                # of the cost of matrix-vector products of one column
                kicks, u = kicks[:, 0], u[:, 0]
                noises = noise + np.cumsum(kicks * kicks * (self.system.noise_variance * weights)[0])
                risks = u * u * (self.system.initial_variance * weights)[0] + noises / self.batch_size
            else:
                noises = noise + np.cumsum((kicks * kicks) @ (self.system.noise_variance * weights))
                risks = (u * u) @ (self.system.initial_variance * weights) + noises / self.batch_size
            below = np.nonzero(risks <= self.target)[0]
            return low + 1 + int(below[0]) if below.size else None
        if first is None:  # the root of a search: mu^t by repeated squaring (complex ** takes exp and log)
            first = self.modes.coefficients * _mode_power(self.modes.values, low)
        if last is None:
            last = self.modes.coefficients * _mode_power(self.modes.values, high - 1)
        floor = _deterministic_floor(self.modes, self.system.weights, first, last, high - low - 1, low)[0]
        if floor + noise / self.batch_size > self.target:
            return None
        if v_high is not None and self._ends_floor(low, high, v, v_high) + noise / self.batch_size > self.target:
            return None
        bit = (high - low - 1).bit_length() - 1  # split at low + 2^bit < high
        square, odd = self._mode_powers(bit)
        middle = None if v_high is None else self._step(v, noise, bit)  # the left branch's v(high)
        found = self._first(low, low + 2**bit, v, noise, first=first, last=first * odd,
                            v_high=None if middle is None else middle[0])
        if found is not None:
            return found
        return self._first(low + 2**bit, high, *(self._step(v, noise, bit) if middle is None else middle),
                           first=first * square, last=last, v_high=v_high)

    def _ends_floor(self, low: int, high: int, v_low: np.ndarray, v_high: np.ndarray) -> float:
        """Lower bound of D(t) on the integers t in [low, high] from u = v x0 at low, low + 1, high, high + 1, where
        every eigenvalue of M that shows in u is real and positive (0 where this does not decide).

        Then u(t) = sum_i p_i(t) lambda_i^t for t >= 3 (p_i polynomials, total degree < k <= 3), and with the
        largest lambda, w(t) = u(t) / lambda^t has the difference w(t + 1) - w(t), of the sign of
        u(t + 1) - lambda u(t), an exponential polynomial of total multiplicity <= 2: one real zero at most. Where
        it has one sign at low and at high, w is monotone on [low, high + 1]; where also u(low) and u(high) have one
        sign, |u(t)| >= lambda^t min(|w(low)|, |w(high)|) >= min(lambda^(high - low) |u(low)|, |u(high)|). The
        floors of the modes' terms lose everything where modes nearly coincide (an average of ~1/(1 - gamma) steps
        beside a learning rate as slow: huge terms that cancel); this bound does not use the terms.
        """
        if low < 4:  # eigenvalues 0 (states kept for other configurations) show in u up to t = 2
            return 0.0
        matrix, largest, slack = self.powers[0], self.largest, 1e-9
        u0, u1 = (_from_start(self.system, v)[0] for v in (v_low, v_high))
        d0, d1 = (_from_start(self.system, _advance(v, matrix))[0] - largest * u for v, u in ((v_low, u0),
                                                                                               (v_high, u1)))
        decided = ((d0 * d1 > 0) & (u0 * u1 > 0)
                   & (np.abs(d0) > slack * np.abs(u0)) & (np.abs(d1) > slack * np.abs(u1)))
        if not decided.any():
            return 0.0
        with np.errstate(divide="ignore", under="ignore"):
            decay = np.exp((high - low) * np.log(largest))
        size = np.where(decided, np.minimum(decay * np.abs(u0), np.abs(u1)), 0.0) * (1.0 - slack)
        return float((size * size) @ (self.system.initial_variance * self.system.weights))

    def estimate(self, times: np.ndarray, step: int) -> float:
        """Ranking time of a first crossing at ``step``: interpolated on the grid as for a grid crossing when
        the risk is at or below target at the next grid time, else ``step`` itself (a dip between grid times)."""
        if step == 0:
            return 0.0
        j = int(np.searchsorted(times, step))
        at = self.risk(int(times[j]))
        if at > self.target:
            return float(step)
        return float(_interpolated(times[j - 1], times[j], self.risk(int(times[j - 1])), at, self.target))


def _validate_target(target: float, max_steps: int | None = None) -> None:
    """A positive finite target risk and, unless None, an int max_steps in [1, 2^50]."""
    if not (np.isfinite(target) and target > 0):
        raise ValueError(f"target must be a positive risk, got {target!r}")
    if max_steps is not None and check_int(max_steps, "max_steps", 1) > 2**50:
        raise ValueError(f"max_steps must be <= 2^50, got {max_steps}")


def _exact_step(search: _RowSearch, times: np.ndarray, point: int, doubt: int, stop: int) -> float:
    """The first crossing of a row of :func:`_walk_grid` (inf if none up to grid index ``stop``)."""
    if point == 0:
        return 0.0
    if point > 0:
        found = search.first(int(times[point - 1]), int(times[point]))
        return float(times[point] if found is None else found)  # None only if rounding differs at t_j
    if doubt > 0:
        found = search.first(int(times[doubt - 1]), int(times[stop]))
        return np.inf if found is None else float(found)
    return np.inf


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

    Exact contract: the smallest integer t in [0, max_steps] with E[L(t)] <= target, also when the risk
    oscillates (momentum, or an average of an oscillating iterate) and dips below the target only briefly;
    inf when there is none or the learning rate diverges. The risk is evaluated in closed form on a time grid
    (every step below 64, then 32 points per octave); between grid times a lower bound of the risk (see the
    comment above :func:`_time_grid`) rules out a crossing or the interval is bisected down to single steps.
    """
    _validate_model(model)
    _validate_optimizer(optimizer)
    _validate_target(target, max_steps)
    learning_rates = _positive_1d(learning_rates, "learning_rates")
    batch_sizes = _positive_1d(batch_sizes, "batch_sizes")
    momentum, ema = _settings_arrays(optimizer, learning_rates.size)
    times, gaps = _time_grid(max_steps)
    system = _first_moment(model, optimizer.precondition_power, learning_rates, momentum, ema)
    modes = _modes(system)
    crossings = _walk_grid(system, batch_sizes, target, times, gaps, modes=modes)
    steps = np.full((learning_rates.size, batch_sizes.size), np.inf)
    searches: dict[int, _RowSearch] = {}
    for row, column in zip(*np.nonzero((crossings.point >= 0) | (crossings.doubt > 0))):
        if row not in searches:
            searches[row] = _RowSearch(system.subset([row]), target, modes.subset([row]))
        steps[row, column] = _exact_step(searches[row].at_batch(batch_sizes[column]), times,
                                         crossings.point[row, column], crossings.doubt[row, column], times.size - 1)
    steps[steps > max_steps] = np.inf
    return steps


@dataclass(frozen=True, eq=False)
class ScalingCurve:
    """Minimal steps to target per batch size with the tuned hyperparameters that achieve them.

    ``learning_rate_at_grid_edge`` flags batch sizes whose best learning rate is the smallest value of the grid,
    its largest, or the largest stable value searched at that momentum, the near-limit rates of
    :func:`steps_vs_batch_size` included (the optimum may lie outside the grid, e.g. between (1 - 2^-6) times
    the stability limit and the limit).
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
    configuration with the fewest steps, ranked by the first crossing time (the exact step when the risk dips
    below the target between grid times, else interpolated in log risk between the grid times around it; ties
    go to the configuration listed first); the winner's steps are exact, as in :func:`steps_to_target`.
    Because the best large-batch learning rate sits just below the stability limit 2 (1 + beta) / h~_max, the
    learning rates (1 - 2^-k) times that limit, k = 2..6, are searched as well. A pass over the octave times
    2^e - 1 (repeated squaring, all configurations at once) bounds the best crossing from above and, with a
    floor of the risk per octave, tells from which octave each configuration and batch size must be walked on
    the fine grid, if at all; configurations are walked fastest first, and one is given up at a batch size once
    its crossing can no longer beat the best so far. The octave pass hands each walk the state at the octave it
    starts from (with 16 bins or more, up to 128 MB in all), so that the walk need not square its way there.
    ``progress`` shows a tqdm bar over configuration chunks.
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
    configs, largest_stable = [], []
    for momentum in momenta:  # the grid plus (1 - 2^-k) of the stability limit 2 (1 + beta) / h~_max
        near_limit = 2.0 * (1.0 + momentum) / h_eff_max * (1.0 - 2.0 ** -np.arange(2.0, 7.0))
        rates = np.union1d(learning_rates, near_limit)
        stable = _first_moment(model, optimizer.precondition_power, rates, np.full(rates.size, momentum),
                               np.zeros(rates.size)).stable  # gamma < 1 leaves the spectral radius alone
        configs.append(np.stack([a.reshape(-1) for a in np.meshgrid(rates, [momentum], emas, indexing="ij")]))
        largest_stable.append(np.full(configs[-1].shape[1], rates[stable].max(initial=rates[0])))
    config_lr, config_momentum, config_ema = np.concatenate(configs, axis=1)
    # the grid's upper edge per configuration: its largest rate, or the largest stable one searched at its momentum
    config_top = np.minimum(learning_rates.max(), np.concatenate(largest_stable))
    times, gaps = _time_grid(max_steps)

    from tqdm.auto import tqdm

    n_batches = batch_sizes.size
    best_estimate = np.full(n_batches, np.inf)
    best_config = np.full(n_batches, -1)
    best_step = np.full(n_batches, np.nan)  # exact first crossing when known (a dip), else nan
    best_point = np.full(n_batches, -1)
    n_bins = _effective_bins(model, float(optimizer.precondition_power))[0].size  # after _merged_bins
    chunk = max(1, _CHUNK_ELEMENTS // n_bins)

    def system_of(index):
        return _first_moment(model, optimizer.precondition_power, config_lr[index], config_momentum[index],
                             config_ema[index])

    last_search: dict[int, _RowSearch] = {}  # the last configuration's (rows come configuration by configuration)

    def row_search(config, batch_size, walked=None):
        """The search of ``config`` at ``batch_size``, from ``walked`` = (system, modes, row) when given."""
        if config not in last_search:
            last_search.clear()
            last_search[config] = (_RowSearch(system_of([config]), target) if walked is None else
                                   _RowSearch(walked[0].subset([walked[2]]), target, walked[1].subset([walked[2]])))
        return last_search[config].at_batch(batch_size)

    handovers: dict[tuple[int, int], _Handover] = {}  # (configuration, octave): the walk's state there

    def octave_pass(configs, until=None, earliest=False):
        parts = []
        for start in range(0, configs.size, chunk):
            system, kept = system_of(configs[start:start + chunk]), None if earliest or n_bins < _HANDOVER_BINS else {}
            budget = _HANDOVER_BYTES - len(handovers) * _Handover.bytes_per_part(system.matrix.shape[0],
                                                                                 system.weights.size)
            parts.append(_octave_crossings(system, batch_sizes, target, times, until, earliest=earliest,
                                           handovers=kept, budget=budget))
            handovers.update(((int(configs[start + config]), octave), part)
                             for (config, octave), part in (kept or {}).items())
        return (np.concatenate(part) for part in zip(*parts))

    # an upper bound of the best first octave crossing from every 8th configuration lets the full octave pass
    # give up the rows that cannot reach it
    sample = np.arange(0, config_lr.size, 8)
    until = next(octave_pass(sample, earliest=True)).min(axis=0)
    reached, risk_then, walk_from = octave_pass(np.arange(config_lr.size), until)
    give_up = reached.min(axis=0)
    # one walk per configuration and octave its rows are walked from (none for rows that need no walk); the
    # configuration first (and lowest) at each batch size on the octave grid goes first, then the others by that
    # octave, the fastest first: they settle the bests early
    leading = np.zeros(config_lr.size, dtype=bool)
    for column in np.nonzero(np.isfinite(give_up))[0]:
        leading[np.lexsort((risk_then[:, column], reached[:, column]))[0]] = True
    rows, columns = np.nonzero(np.isfinite(walk_from))
    entry_config, entry_octave = np.unique(np.stack([rows, walk_from[rows, columns].astype(np.int64)]), axis=1)
    order = np.lexsort((-config_lr[entry_config], entry_octave, ~leading[entry_config]))
    entry_config, entry_octave = entry_config[order], entry_octave[order]
    handed = np.array([(config, octave) in handovers for config, octave in zip(entry_config, entry_octave)],
                      dtype=bool)
    chunks = []
    for entry in range(entry_config.size):  # a new walk where the octave changes, unless the walk so far is small
        # and must square its way to its octave anyway; and where it changes from handed-over states to others
        if (not chunks or len(chunks[-1]) >= chunk or leading[entry_config[entry]] != leading[entry_config[entry - 1]]
                or handed[entry] != handed[entry - 1]
                or (entry_octave[entry] != entry_octave[entry - 1]
                    and (handed[entry] or len(chunks[-1]) * n_bins >= _SPLIT_ELEMENTS))):
            chunks.append([])
        chunks[-1].append(entry)
    for entries in tqdm(chunks, desc=f"NQM {optimizer.label}", disable=not progress, leave=False):
        index, octaves = entry_config[entries], entry_octave[entries, None]
        system = system_of(index)
        modes = _modes(system)
        handover = (_Handover.joined([handovers.pop((config, octave)) for config, octave in
                                      zip(index, entry_octave[entries])], system.states)
                    if handed[entries[0]] else None)
        crossings = _walk_grid(system, batch_sizes, target, times, gaps,
                               give_up_after=np.minimum(give_up, best_estimate),
                               walk_from=np.where(walk_from[index] == octaves, octaves, np.inf), modes=modes,
                               handover=handover)
        point = crossings.point
        estimate = np.where(point > 0, _interpolated(times[np.maximum(point, 1) - 1], times[np.maximum(point, 0)],
                                                     crossings.before, crossings.at, target), np.inf)
        estimate[point == 0] = 0.0
        exact = np.full(estimate.shape, np.nan)
        for row, column in zip(*np.nonzero(crossings.doubt > 0)):
            search = row_search(index[row], batch_sizes[column], (system, modes, row))
            stop = min(int(np.searchsorted(times, min(give_up[column], best_estimate[column]), side="right")),
                       times.size - 1)
            found = search.first(int(times[crossings.doubt[row, column] - 1]), int(times[stop]))
            if found is not None:
                exact[row, column] = found
                estimate[row, column] = search.estimate(times, found)
        for column in range(n_batches):  # the smallest estimate, ties to the configuration listed first
            ranked = estimate[:, column]
            candidates = np.nonzero(np.isfinite(ranked) & (ranked <= best_estimate[column]))[0]
            if candidates.size == 0:
                continue
            keys = np.lexsort((index[candidates], estimate[candidates, column]))
            row = candidates[keys[0]]
            if estimate[row, column] < best_estimate[column] or index[row] < best_config[column]:
                best_estimate[column], best_config[column] = estimate[row, column], index[row]
                best_step[column], best_point[column] = exact[row, column], point[row, column]

    steps = np.full(n_batches, np.inf)
    for column in np.nonzero(best_config >= 0)[0]:
        config = best_config[column]
        if np.isnan(best_step[column]):
            search = row_search(config, batch_sizes[column])
            steps[column] = _exact_step(search, times, best_point[column], -1, times.size - 1)
        else:
            steps[column] = best_step[column]
    steps[steps > max_steps] = np.inf
    found = np.isfinite(steps)
    chosen = np.maximum(best_config, 0)
    edge = found & ((config_lr[chosen] >= config_top[chosen]) | (config_lr[chosen] <= learning_rates.min()))
    nan = np.full(n_batches, np.nan)
    return ScalingCurve(
        optimizer=optimizer,
        batch_sizes=_read_only(batch_sizes),
        steps=_read_only(steps),
        learning_rates=_read_only(np.where(found, config_lr[chosen], nan)),
        momenta=_read_only(np.where(found, config_momentum[chosen], nan)),
        emas=_read_only(np.where(found, config_ema[chosen], nan)),
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
    when B_0 << B_crit). Points with infinite or non-positive steps (never reached the target, e.g. within
    ``max_steps``) are left out with a RuntimeWarning naming them; where they are smaller than every batch size
    that reached the target, E_min is taken over larger batch sizes, so it can only be overstated and the crossing
    moves to the same or a larger batch size (the NQM at d = 30, target 0.05 with max_steps = 100: 113 instead of
    92.19, with B = 1 .. 8 left out).

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
    _warn_unreached(batch_sizes, finite,
                    "E_min = min B S is taken over larger batch sizes, so it can only be overstated and the critical "
                    "batch size is then too large or right, not too small")
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


def fit_scaling_curve(curve: ScalingCurve, *, min_steps: float = 1.0, **fit_options: Any):
    """McCandlish fit S = S_min (1 + B_crit / B) of the finite points of ``curve`` (noisescale.tradeoff).

    Batch sizes that never reached the target (infinite steps) are left out with a RuntimeWarning naming them.
    So are the batch sizes above the first whose steps are at the floor (steps <= ``min_steps``; 0 for a curve
    without one): there the steps stay at one step however the optimizer scales, a bend the fit took for a
    critical batch size (a curve of perfect scaling down to one step, 128 / B and then 1, got B_crit = 170 [123,
    248], where :func:`critical_batch_size`, which ignores them too, says not resolved); a ValueError where fewer
    than 3 batch sizes are left.

    ``fit_options`` go to :func:`noisescale.tradeoff.fit_tradeoff` (confidence, n_bootstrap, seed).
    """
    from noisescale.tradeoff import fit_tradeoff

    if not isinstance(curve, ScalingCurve):
        raise TypeError(f"curve must be a ScalingCurve, got {type(curve).__name__}")
    if check_finite(min_steps, "min_steps") < 0:
        raise ValueError(f"min_steps must be >= 0, got {min_steps!r}")
    order = np.argsort(curve.batch_sizes)
    batch_sizes, steps = curve.batch_sizes[order], curve.steps[order]
    finite = np.isfinite(steps) & (steps > 0)
    _warn_unreached(batch_sizes, finite,
                    "the fit has no point at the data-efficient end of the curve, where E_min is set, and "
                    "extrapolates there")
    batch_sizes, steps = batch_sizes[finite], steps[finite]
    at_floor = np.nonzero(steps <= min_steps)[0]
    if at_floor.size and at_floor[0] + 1 < steps.size:
        beyond = batch_sizes[at_floor[0] + 1:]
        floor = (f"batch size(s) {', '.join(f'{size:.10g}' for size in beyond)} lie above "
                 f"{batch_sizes[at_floor[0]]:.10g}, which reaches the target in {steps[at_floor[0]]:g} step(s), the "
                 "floor: their steps show the floor, not the scaling")
        batch_sizes, steps = batch_sizes[: at_floor[0] + 1], steps[: at_floor[0] + 1]
        if np.unique(batch_sizes).size < 3:
            raise ValueError(f"{floor}; without them {np.unique(batch_sizes).size} batch size(s) are left, and the "
                             "fit of S_min and E_min needs 3: sample batch sizes below the floor's (critical_batch_size "
                             "reads such a curve as not resolved), or pass min_steps=0 to fit the floor's points too")
        warnings.warn(f"{floor}, and are left out of the fit", RuntimeWarning, stacklevel=2)
    return fit_tradeoff(batch_sizes, steps, **fit_options)


def _warn_unreached(batch_sizes: np.ndarray, reached: np.ndarray, below_all: str) -> None:
    """A RuntimeWarning naming the batch sizes that never reached the target (left out), with ``below_all`` (what
    that does) where some lie below every batch size that reached it."""
    if reached.all():
        return
    left_out, kept = batch_sizes[~reached], batch_sizes[reached]
    message = (f"batch size(s) {', '.join(f'{size:.10g}' for size in left_out)} never reached the target (steps "
               f"inf: beyond max_steps, or the risk stays above the target) and are left out; the result rests on the "
               f"other {kept.size}")
    if kept.size and left_out.min() < kept.min():
        message += (f". They are smaller than every batch size that reached it (from {kept.min():g}): {below_all}; "
                    "raise max_steps to include them")
    warnings.warn(message, RuntimeWarning, stacklevel=3)


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
