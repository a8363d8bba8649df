"""Writing results and checkpoints so that a kill never leaves a damaged file, and loading checkpoints without
running their code.

* :func:`atomic_write` opens a temporary file in the target's directory; when the block ends without an error
  the file is flushed, fsync'ed and moved over the target with ``os.replace`` (atomic on POSIX and Windows), so
  the target holds either its old content or the whole new one, never a stub. On an error the temporary file
  is removed and the target is left as it was.
* :func:`save_checkpoint` is ``torch.save`` through :func:`atomic_write`.
* :func:`load_checkpoint` is ``torch.load(..., weights_only=True)``: only tensors and plain Python types
  (dict, list, tuple, str, int, float, bool, None) are rebuilt, so a crafted file cannot run code. An empty,
  truncated or foreign file raises :class:`CheckpointError` naming where the path came from.
* :func:`exclusive_lock` holds an exclusive ``fcntl.flock`` on a lock file for a block, or refuses at once
  (``RuntimeError``) while another process, or another holder in this one, has it: one run at a time writes an
  output. The lock goes with the process; the empty lock file stays.
* :func:`to_plain` turns the numpy scalars that pandas and numpy hand out into Python numbers, so that
  state dicts stay loadable with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

__all__ = ["CheckpointError", "atomic_path", "atomic_write", "exclusive_lock", "load_checkpoint", "save_checkpoint",
           "to_plain"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, empty, truncated, not a checkpoint, or holding objects that
    only an unsafe (code-running) load could rebuild."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **open_options: Any) -> Iterator[IO]:
    """``with atomic_write(path) as handle: ...``: write to a temporary sibling, then fsync and os.replace it
    over ``path``; on an error ``path`` keeps its old content (or stays absent). ``mode`` is "w" or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as temporary, open(temporary, mode, **open_options) as handle:
        yield handle


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``with atomic_path(path) as temporary: frame.to_csv(temporary)``: for writers that take a path (pandas,
    matplotlib), as :func:`atomic_write`: the temporary sibling is fsynced and replaces ``path`` in one step, with
    a new file's usual permissions; on an error it is removed and ``path`` keeps its old content."""
    path = Path(path)
    # a new file beside path, with the umask's permissions (os.open with 0o666), keeping the suffix (savefig
    # takes the format from it)
    temporary = path.parent / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}"
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike[str], refusal: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock_path`` (created if absent) for the block, or raise
    ``RuntimeError(refusal)`` at once if another holder has it. flock belongs to the open file, so a second holder
    in the same process (a thread, a notebook cell) is refused too. On Windows (no flock) nothing is locked."""
    if fcntl is None:
        yield
        return
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(refusal) from None
        yield  # the lock is released when the handle closes (or the process ends)


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save(state, path)`` written atomically (the parent folder is created). Returns the path."""
    import torch  # here, so that modules writing only results (the sweep) need no torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        torch.save(dict(state), handle)
    return path


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = None, required_keys: tuple[str, ...] = (),
                    source: str = "checkpoint") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(..., weights_only=True)`` (no code runs); ``source`` names where the
    path came from in the error message (e.g. ``"--resume"``). Raises :class:`CheckpointError` when the file is
    missing, empty, damaged, holds other than tensors and plain types, or misses one of ``required_keys``."""
    import torch

    path = Path(path)
    where = f"{source} {path}"
    if not path.is_file():
        raise CheckpointError(f"{where}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{where}: the checkpoint is empty (0 bytes; a save was probably interrupted); "
                              "use an earlier checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, OSError, ... here
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{where}: cannot be loaded as a checkpoint of tensors and plain types ({cause}). The file is "
            "truncated or damaged, is not a torch checkpoint, or holds objects whose loading could run code, "
            "which is refused. Use an intact checkpoint file."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: holds a {type(state).__name__}, not a checkpoint dict")
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise CheckpointError(f"{where}: not a checkpoint of this kind, missing key(s) {missing}")
    return state


def to_plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python numbers and lists, recursively through dicts,
    lists and tuples; tensors and plain types are returned as they are."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(to_plain(item) for item in value)
    return value
