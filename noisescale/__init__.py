"""noisescale: measure the gradient noise scale of PyTorch training and choose the batch size from it.

The main names are importable from the package; each loads its module on first use, so that
``noisescale --help`` does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "NoiseScaleMonitor": "noisescale.monitor",
    "AccumulatingNoiseScaleMonitor": "noisescale.training",
    "measure": "noisescale.monitor",
    "noise_scale_across_seeds": "noisescale.monitor",
    "noise_scale_across_runs": "noisescale.estimators",
    "PerExampleGradNorms": "noisescale.per_example",
    "per_example_sqnorms": "noisescale.per_example",
    "simple_noise_scale": "noisescale.estimators",
    "two_batch_noise_scale": "noisescale.estimators",
    "hessian_noise_scale": "noisescale.hessian",
    "fit_tradeoff": "noisescale.tradeoff",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'noisescale' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    """The lazily loaded names too, for dir() and tab completion."""
    return sorted({*globals(), *__all__})
