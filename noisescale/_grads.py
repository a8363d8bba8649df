"""The gradients a failed call must leave as they were: a snapshot of p.grad, put back on failure."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["GradSnapshot"]

_HELD = threading.local()   # per thread: the ids of the parameters an enclosing snapshot holds


def _held() -> set[int]:
    if not hasattr(_HELD, "ids"):
        _HELD.ids = set()
    return _HELD.ids


class GradSnapshot:
    """p.grad of each parameter before a call, to put back if the call fails: None stays None, an existing
    gradient is copied back into the same tensor (so views into it, such as DDP's buckets, stay valid). Inside an
    enclosing snapshot's ``holding()`` block (the monitor's call around this one's), its parameters are not copied
    again: the failure reaches the enclosing one, which puts them back (one copy of an accumulated gradient, not
    two)."""

    def __init__(self, parameters: list[nn.Parameter]):
        self._saved = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in parameters
                       if id(p) not in _held()]

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Snapshots taken inside the block, in this thread, skip this one's parameters."""
        held = _held()
        ids = {id(p) for p, _, _ in self._saved} - held
        held |= ids
        try:
            yield
        finally:
            held -= ids

    def restore(self) -> None:
        for p, grad, values in self._saved:
            if grad is not None:
                with torch.no_grad():
                    grad.copy_(values)
            p.grad = grad
