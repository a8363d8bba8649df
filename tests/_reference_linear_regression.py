"""Linear regression with Gaussian inputs: closed-form G, H and per-example gradient covariance Sigma.

Model: x ~ N(0, D) in d dimensions (D symmetric positive definite), y = x^T w* + eps with eps ~ N(0, sigma^2)
independent of x, per-example loss l = 0.5 (x^T w - y)^2. Write r = w - w*, so x^T w - y = x^T r - eps.

Gradient g = x (x^T r - eps), Hessian of l = x x^T, so H = E[x x^T] = D and G = E[g] = D r.

Second moment: E[g g^T] = E[x x^T r r^T x x^T] - 2 E[eps] (...) + E[eps^2] E[x x^T]
             = E[x x^T r r^T x x^T] + sigma^2 D.
Isserlis' theorem for zero-mean Gaussians: E[x_a x_b x_c x_d] = D_ab D_cd + D_ac D_bd + D_ad D_bc, hence
    E[x x^T r r^T x x^T]_ad = sum_bc E[x_a x_b x_c x_d] r_b r_c = 2 (D r)_a (D r)_d + D_ad r^T D r.
So Sigma = E[g g^T] - G G^T = D r r^T D + (r^T D r + sigma^2) D, and
    tr(Sigma) = r^T D^2 r + (r^T D r + sigma^2) tr(D),   |G|^2 = r^T D^2 r,
    tr(H Sigma) = r^T D^3 r + (r^T D r + sigma^2) tr(D^2),   G^T H G = r^T D^3 r.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearRegressionProblem:
    covariance: np.ndarray  # D
    true_weights: np.ndarray  # w*
    noise_sd: float  # sigma
    weights: np.ndarray  # w, where G, H, Sigma are evaluated

    @property
    def offset(self) -> np.ndarray:
        return self.weights - self.true_weights

    @property
    def gradient(self) -> np.ndarray:
        return self.covariance @ self.offset

    @property
    def hessian(self) -> np.ndarray:
        return self.covariance

    @property
    def gradient_covariance(self) -> np.ndarray:
        """Sigma = D r r^T D + (r^T D r + sigma^2) D (module docstring)."""
        gradient, r = self.gradient, self.offset
        return np.outer(gradient, gradient) + (r @ self.covariance @ r + self.noise_sd**2) * self.covariance

    # Scalar closed forms of the module docstring, written with r and D only (not through gradient_covariance),
    # so that the tests can check them against the matrix expressions as well.
    def _quadratic(self, power: int) -> float:
        """r^T D^power r."""
        r = self.offset
        return float(r @ np.linalg.matrix_power(self.covariance, power) @ r)

    @property
    def _isotropic_factor(self) -> float:
        """r^T D r + sigma^2, the factor of D in Sigma."""
        return self._quadratic(1) + self.noise_sd**2

    @property
    def trace_sigma(self) -> float:
        """tr(Sigma) = r^T D^2 r + (r^T D r + sigma^2) tr(D)."""
        return self._quadratic(2) + self._isotropic_factor * float(np.trace(self.covariance))

    @property
    def grad_sqnorm(self) -> float:
        """|G|^2 = r^T D^2 r."""
        return self._quadratic(2)

    @property
    def trace_h_sigma(self) -> float:
        """tr(H Sigma) = r^T D^3 r + (r^T D r + sigma^2) tr(D^2)."""
        return self._quadratic(3) + self._isotropic_factor * float(np.trace(self.covariance @ self.covariance))

    @property
    def g_h_g(self) -> float:
        """G^T H G = r^T D^3 r."""
        return self._quadratic(3)

    @property
    def b_simple(self) -> float:
        """B_simple = tr(Sigma)/|G|^2."""
        return self.trace_sigma / self.grad_sqnorm

    @property
    def b_noise(self) -> float:
        """B_noise = tr(H Sigma)/(G^T H G)."""
        return self.trace_h_sigma / self.g_h_g

    def sample(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        inputs = rng.multivariate_normal(np.zeros(len(self.true_weights)), self.covariance, size=size)
        targets = inputs @ self.true_weights + self.noise_sd * rng.standard_normal(size)
        return inputs, targets

    def per_example_gradients(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """g_i = x_i (x_i^T w - y_i)."""
        return inputs * (inputs @ self.weights - targets)[:, None]


def random_problem(seed: int, dim: int, noise_sd: float = 0.5, offset_scale: float = 0.3) -> LinearRegressionProblem:
    """A general (non-diagonal) SPD covariance with spread-out eigenvalues, and a point w away from w*."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    covariance = rotation @ np.diag(np.geomspace(0.2, 2.0, dim)) @ rotation.T
    true_weights = rng.normal(size=dim)
    weights = true_weights + offset_scale * rng.normal(size=dim)
    return LinearRegressionProblem(covariance, true_weights, noise_sd, weights)
