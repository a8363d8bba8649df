"""Evaluation inside training: every module in eval mode, then each back to its own mode.

``model.train(was_training)`` would switch on the submodules a user keeps in eval mode (a frozen BatchNorm, a
dropout switched off). The ``training`` flags are set directly, both ways: a module's own ``train()`` (loralib's
LoRA layers merge their update into the weight on ``eval()`` and take it out on ``train()``) does not run, so the
block changes nothing but the flags."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode inside the block, and back to its own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    for module, _ in modes:
        module.training = False
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
