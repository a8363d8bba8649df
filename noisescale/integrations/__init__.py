"""Adapters that measure the noise scale inside third-party training frameworks (the application layer).

- :mod:`noisescale.integrations.huggingface`: ``NoiseScaleTrainer`` / ``NoiseScaleTrainerMixin`` for
  ``transformers.Trainer``;
- :mod:`noisescale.integrations.lightning`: ``NoiseScaleCallback`` for PyTorch Lightning;
- :mod:`noisescale.integrations.observer`: what both share (``NoiseScaleOptions``, the monitor fed by the
  framework's own forward and backward passes).

Each framework is imported only by its own module, so ``import noisescale`` and this package need neither.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NoiseScaleOptions": "noisescale.integrations.observer",
    "ObservingNoiseScaleMonitor": "noisescale.integrations.observer",
    "NoiseScaleTrainer": "noisescale.integrations.huggingface",
    "NoiseScaleTrainerMixin": "noisescale.integrations.huggingface",
    "NoiseScaleCallback": "noisescale.integrations.lightning",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'noisescale.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
