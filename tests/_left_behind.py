"""What a monitor can leave behind once training ends (shared by the integration tests): hooks on the model, and
torch.compile's ``force_eager`` stance in the process."""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_backward_hooks",
                 "_backward_pre_hooks")


def hooks_on(model: nn.Module) -> dict[tuple[str, str], int]:
    """How many hooks of each kind every module and parameter of ``model`` holds (kinds holding none left out)."""
    counts = {(name, kind): len(getattr(module, kind)) for name, module in model.named_modules()
              for kind in _MODULE_HOOKS}
    counts |= {(name, kind): len(getattr(p, kind) or {}) for name, p in model.named_parameters()
               for kind in ("_backward_hooks", "_post_accumulate_grad_hooks")}
    return {key: count for key, count in counts.items() if count}


def compiles() -> bool:
    """Whether a fresh ``torch.compile`` calls its backend (under the ``force_eager`` stance it never does)."""
    torch._dynamo.reset()
    called = []

    def backend(graph, example_inputs):
        called.append(True)
        return graph.forward

    torch.compile(lambda x: x * 2 + 1, backend=backend)(torch.ones(3))
    return bool(called)
