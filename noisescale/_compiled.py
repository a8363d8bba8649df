"""Models holding ``torch.compile``'d modules: the passes noisescale measures run them eagerly.

A compiled graph runs none of the Python module calls and hooks the per-example norms read, Dynamo traces the hooks
into a graph when it recompiles (and fails on them), and torch.func's transforms (the Hessian-vector products)
do not run through compiled graphs. Inside ``eager_if_compiled(model)`` torch.compile's directives are ignored
(``torch.compiler.set_stance("force_eager")``), so such a pass runs the model's own Python forward; every other
call of the model (a training loop's unmeasured steps) runs compiled as before.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


def holds_compiled_modules(model: nn.Module) -> bool:
    """Whether ``model`` is or holds a module compiled by ``torch.compile(module)`` (an ``OptimizedModule``), by
    ``module.compile()``, or by a compiled method set on it (``module.forward = torch.compile(module.forward)``;
    Lightning's ``trainer.fit(torch.compile(lightning_module))`` compiles its forward and training_step so).
    Compiled functions that a forward calls are not seen."""
    frames = sys.modules.get("torch._dynamo.eval_frame")   # not imported: nothing was compiled
    if frames is None:
        return False
    return any(module._compiled_call_impl is not None or isinstance(module, frames.OptimizedModule)
               or any(callable(value) and hasattr(value, "_torchdynamo_orig_callable")
                      for value in vars(module).values())
               for module in model.modules())


def eager(compiled: bool) -> AbstractContextManager:
    """torch.compile's directives ignored inside where ``compiled`` (see the module's docstring); a no-op otherwise,
    and where Dynamo was never imported, so that nothing can have been compiled (entering the stance costs about
    17 us, and would import Dynamo: 1.5 to 3.5 s on this project's machine)."""
    if compiled and "torch._dynamo" in sys.modules:
        return torch.compiler.set_stance("force_eager")
    return nullcontext()


def eager_if_compiled(model: nn.Module) -> AbstractContextManager:
    """``eager(holds_compiled_modules(model))``."""
    return eager(holds_compiled_modules(model))
