"""Compiled models (``torch.compile``): the passes noisescale measures run them eagerly.

A compiled graph runs none of the Python module calls and hooks the per-example norms read, Dynamo traces the hooks
into a graph when it recompiles (and fails on them), and torch.func's transforms (the Hessian-vector products)
do not run through compiled graphs. Inside ``eager()`` torch.compile's directives are ignored
(``torch.compiler.set_stance("force_eager")``), so a measured pass runs the model's own Python forward, whatever
is compiled in it: ``torch.compile(model)``, ``model.compile()``, a compiled method (Lightning's ``from_compiled``)
or a compiled function that calls its layers. Every other call of the model (a training loop's unmeasured steps)
runs compiled as before.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext

import torch


def eager() -> AbstractContextManager:
    """torch.compile's directives ignored inside (see the module's docstring); a no-op where Dynamo was never
    imported, so that nothing can have been compiled (entering the stance costs about 17 us, and would import
    Dynamo: 1.5 to 3.5 s on this project's machine)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.set_stance("force_eager")
    return nullcontext()
