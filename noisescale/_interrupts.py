"""A block that a Ctrl-C does not cut in two: :func:`deferred_interrupt`."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["deferred_interrupt"]


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """A SIGINT (Ctrl-C) that arrives inside the block is handed to the handler that was in place when the block
    ends, so the block runs whole; later ones in the block are merged into that one. Where the block raises an
    error of its own, the KeyboardInterrupt follows it (the error is its ``__context__``). Only where Python runs a
    handler of its own (the main thread, with ``default_int_handler`` or a Python function installed): elsewhere
    nothing changes."""
    previous = (signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread()
                else None)
    if not callable(previous):   # SIG_DFL, SIG_IGN, a handler set from C, or not the main thread
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            previous(signal.SIGINT, received[0])
