"""Rebuild the shipped text corpus data/text/sympy_core.txt byte-identically from SymPy 1.14.0 (BSD licence).

The corpus is the Python source of the ``sympy/core`` package without its tests: the 38 files ``sympy/core/*.py``
of the SymPy 1.14.0 wheel, in sorted path order, each preceded by a line ``# ===== <path> =====``, about 1.1 MB of
real English-commented source code. Every file is checked against the SHA-256 that the wheel's RECORD lists for it,
and the output against :data:`noisescale.text.SHIPPED_CORPUS_SHA256`, so a rebuild either reproduces the shipped
bytes or fails.

Where the files come from, in this order:
  --wheel PATH      a downloaded wheel: ``pip download --no-deps sympy==1.14.0 -d DIR``;
  (default)         the installed ``sympy`` distribution when it is version 1.14.0 (torch depends on sympy).

    python analysis/make_text_corpus.py            # writes data/text/sympy_core.txt and data/text/LICENSE
    python analysis/make_text_corpus.py --check    # rebuilds in memory and compares with the shipped file
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from noisescale.text import SHIPPED_CORPUS_PATH, SHIPPED_CORPUS_SHA256  # noqa: E402

SYMPY_VERSION = "1.14.0"
PACKAGE_DIRECTORY = "sympy/core/"
LICENSE_PATH = f"sympy-{SYMPY_VERSION}.dist-info/licenses/LICENSE"


def selected(path: str) -> bool:
    """The corpus files: Python modules directly in sympy/core (not its tests or subpackages)."""
    return path.startswith(PACKAGE_DIRECTORY) and path.endswith(".py") and "/" not in path[len(PACKAGE_DIRECTORY):]


def record_hashes(record: str) -> dict[str, str]:
    """path -> urlsafe-base64 SHA-256 (no padding) from a wheel's RECORD (PEP 376/427: path,sha256=...,size)."""
    hashes = {}
    for line in record.splitlines():
        path, digest, _ = line.rsplit(",", 2)
        if digest.startswith("sha256="):
            hashes[path] = digest[len("sha256="):]
    return hashes


def checked(path: str, content: bytes, hashes: dict[str, str]) -> bytes:
    """``content`` if its SHA-256 is the one the wheel's RECORD gives for ``path``; else a clear error."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
    if hashes.get(path) != digest:
        raise ValueError(f"{path}: SHA-256 {digest} differs from the wheel's RECORD ({hashes.get(path)}); the "
                         f"SymPy files are not those of the {SYMPY_VERSION} wheel")
    return content


def build_corpus(files: dict[str, bytes]) -> bytes:
    """Concatenate the selected files in sorted path order, each after a ``# ===== path =====`` line."""
    parts = []
    for path in sorted(p for p in files if selected(p)):
        body = files[path]
        parts.append(f"# ===== {path} =====\n".encode() + body + (b"" if body.endswith(b"\n") else b"\n"))
    if not parts:
        raise ValueError(f"no file under {PACKAGE_DIRECTORY} found: is this a SymPy distribution?")
    return b"".join(parts)


def read_wheel(wheel: Path) -> tuple[dict[str, bytes], bytes]:
    """The checked corpus files and the licence text from a SymPy wheel."""
    with zipfile.ZipFile(wheel) as archive:
        hashes = record_hashes(archive.read(f"sympy-{SYMPY_VERSION}.dist-info/RECORD").decode())
        files = {name: checked(name, archive.read(name), hashes) for name in archive.namelist() if selected(name)}
        return files, checked(LICENSE_PATH, archive.read(LICENSE_PATH), hashes)


def read_installed() -> tuple[dict[str, bytes], bytes]:
    """The checked corpus files and the licence text from the installed sympy distribution (version 1.14.0)."""
    try:
        distribution = metadata.distribution("sympy")
    except metadata.PackageNotFoundError as error:
        raise SystemExit(f"sympy is not installed; download the wheel with `pip download --no-deps "
                         f"sympy=={SYMPY_VERSION} -d DIR` and pass --wheel DIR/sympy-{SYMPY_VERSION}-py3-none-any.whl"
                         ) from error
    if distribution.version != SYMPY_VERSION:
        raise SystemExit(f"the installed sympy is {distribution.version}, the corpus is built from {SYMPY_VERSION}: "
                         f"`pip download --no-deps sympy=={SYMPY_VERSION} -d DIR` and pass --wheel")
    hashes = {str(f): f.hash.value for f in distribution.files if f.hash is not None}
    read = {str(f): f for f in distribution.files}
    files = {path: checked(path, read[path].read_binary(), hashes) for path in read if selected(path)}
    return files, checked(LICENSE_PATH, read[LICENSE_PATH].read_binary(), hashes)


def atomic_write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "wb") as stream:
        stream.write(content)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", type=Path, default=None, help=f"a sympy-{SYMPY_VERSION} wheel (default: installed)")
    parser.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    args = parser.parse_args()
    files, license_text = read_wheel(args.wheel) if args.wheel else read_installed()
    corpus = build_corpus(files)
    digest = hashlib.sha256(corpus).hexdigest()
    print(f"{len(files)} files, {len(corpus)} bytes, SHA-256 {digest}")
    if digest != SHIPPED_CORPUS_SHA256:
        print(f"SHA-256 differs from the recorded {SHIPPED_CORPUS_SHA256}", file=sys.stderr)
        return 1
    if args.check:
        same = SHIPPED_CORPUS_PATH.exists() and SHIPPED_CORPUS_PATH.read_bytes() == corpus
        print("the shipped corpus is identical" if same else "the shipped corpus differs", file=sys.stdout)
        return 0 if same else 1
    atomic_write(SHIPPED_CORPUS_PATH, corpus)
    atomic_write(SHIPPED_CORPUS_PATH.parent / "LICENSE", license_text)
    print(f"wrote {SHIPPED_CORPUS_PATH} and its LICENSE")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
