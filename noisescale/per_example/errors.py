"""The one error type of per-example measurement: names the module, its type, the parameters and the backend."""

from __future__ import annotations

__all__ = ["PerExampleError"]


class PerExampleError(RuntimeError):
    """A backend could not measure some parameters; raised after every ``p.grad`` was put back as it was."""

    def __init__(self, what: str, backend: str, cause: BaseException | str, advice: str):
        self.backend = backend
        super().__init__(f"{what}: backend {backend!r} failed: {cause}. {advice}")
