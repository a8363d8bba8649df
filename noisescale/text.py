"""Text as byte-level tokens (vocabulary 256) for language-model training: the shipped corpus or a user's file.

A corpus is split once into a leading training part and a trailing validation part (contiguous, so no window
straddles the two). Training batches are windows of ``block_size + 1`` bytes at independent uniformly random
offsets (nanoGPT's ``get_batch``): the examples are i.i.d., as the noise-scale estimators assume (McCandlish et
al. 2018, appendix A). Inputs are the first ``block_size`` bytes, targets the next-byte shifted copy.
Validation uses the non-overlapping windows of the validation part, in order.

The shipped corpus, ``data/text/sympy_core.txt``, is the Python source of ``sympy/core`` from the SymPy 1.14.0
wheel (BSD licence, ``data/text/LICENSE``), rebuilt byte-identically by ``analysis/make_text_corpus.py``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from noisescale._checks import check_int

__all__ = [
    "VOCAB_SIZE",
    "SHIPPED_CORPUS_PATH",
    "SHIPPED_CORPUS_SHA256",
    "ByteCorpus",
    "encode",
    "decode",
    "load_text_file",
    "load_shipped_corpus",
    "unigram_cross_entropy",
]

VOCAB_SIZE = 256
SHIPPED_CORPUS_PATH = Path(__file__).resolve().parent.parent / "data" / "text" / "sympy_core.txt"
SHIPPED_CORPUS_SHA256 = "2376afaa69b194ec6b233e8956eca1ac4155b70cc531c177a08b0928ae42e0a1"


def encode(text: str | bytes) -> Tensor:
    """Bytes (a str is UTF-8 encoded) -> int64 tokens in [0, 256), one per byte."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)


def decode(tokens: Tensor) -> bytes:
    """Tokens in [0, 256) -> the bytes they stand for (the inverse of :func:`encode`)."""
    tokens = torch.as_tensor(tokens)
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
        raise ValueError(f"byte tokens must lie in [0, {VOCAB_SIZE}), got range [{int(tokens.min())}, "
                         f"{int(tokens.max())}]")
    return bytes(tokens.to(torch.uint8).cpu().tolist())


@dataclass(frozen=True)
class ByteCorpus:
    """A text's byte tokens split into a training and a validation part (module docstring)."""

    train: Tensor
    validation: Tensor
    source: str

    def check_block_size(self, block_size: int) -> int:
        """``block_size`` if both parts hold at least one window of ``block_size + 1`` bytes; else a clear error."""
        check_int(block_size, "block_size", 1)
        shortest = min(len(self.train), len(self.validation))
        if shortest < block_size + 1:
            raise ValueError(f"{self.source}: a window needs block_size + 1 = {block_size + 1} bytes but the "
                             f"{'training' if len(self.train) == shortest else 'validation'} part has only "
                             f"{shortest}; use a longer text, a smaller block_size or another validation_fraction")
        return block_size

    def sample_batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch_size`` training windows at uniform random offsets: (inputs, targets), both (B, block_size)."""
        check_int(batch_size, "batch_size", 1)
        self.check_block_size(block_size)
        starts = torch.randint(len(self.train) - block_size, (batch_size,), generator=generator)
        windows = self.train[starts[:, None] + torch.arange(block_size + 1)]
        return windows[:, :-1], windows[:, 1:]

    def validation_windows(self, block_size: int, max_windows: int | None = None) -> tuple[Tensor, Tensor]:
        """The first ``max_windows`` non-overlapping validation windows (all by default): (inputs, targets)."""
        self.check_block_size(block_size)
        count = (len(self.validation) - 1) // block_size
        count = count if max_windows is None else min(count, check_int(max_windows, "max_windows", 1))
        starts = torch.arange(count) * block_size
        windows = self.validation[starts[:, None] + torch.arange(block_size + 1)]
        return windows[:, :-1], windows[:, 1:]


def _split(tokens: Tensor, validation_fraction: float, source: str) -> ByteCorpus:
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}")
    if len(tokens) < 4:
        raise ValueError(f"{source}: the text has {len(tokens)} bytes, too few to split and train on")
    boundary = len(tokens) - max(1, round(validation_fraction * len(tokens)))
    return ByteCorpus(train=tokens[:boundary], validation=tokens[boundary:], source=source)


def load_text_file(path: str | Path, validation_fraction: float = 0.1) -> ByteCorpus:
    """A user's text file as byte tokens: the leading 1 - ``validation_fraction`` trains, the rest validates.

    Any bytes are accepted (UTF-8 text becomes its bytes, one token each).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} not found (give the path of a plain text file)")
    return _split(encode(path.read_bytes()), validation_fraction, str(path))


def load_shipped_corpus(validation_fraction: float = 0.1) -> ByteCorpus:
    """The shipped SymPy-core corpus (module docstring), checked against its recorded SHA-256."""
    if not SHIPPED_CORPUS_PATH.is_file():
        raise FileNotFoundError(f"the shipped corpus {SHIPPED_CORPUS_PATH} is missing; rebuild it with "
                                "`python analysis/make_text_corpus.py`")
    data = SHIPPED_CORPUS_PATH.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHIPPED_CORPUS_SHA256:
        raise ValueError(f"{SHIPPED_CORPUS_PATH}: SHA-256 {digest} is not the recorded {SHIPPED_CORPUS_SHA256}; "
                         "the file was changed: rebuild it with `python analysis/make_text_corpus.py`")
    return _split(encode(data), validation_fraction, "shipped corpus (SymPy 1.14.0 sympy/core, BSD)")


def unigram_cross_entropy(train: Tensor, evaluated: Tensor) -> float:
    """Cross-entropy in nats/byte of ``evaluated`` under the add-one (Laplace) smoothed byte frequencies of ``train``:

        H = -mean_t log p(x_t),   p(b) = (count_train(b) + 1) / (len(train) + 256).

    The loss of the best model that ignores context: a language model must go below it to have learnt anything.
    """
    if len(train) == 0 or len(evaluated) == 0:
        raise ValueError("unigram_cross_entropy needs non-empty train and evaluated tokens")
    counts = torch.bincount(train.long(), minlength=VOCAB_SIZE).double() + 1.0
    log_probabilities = counts.log() - math.log(counts.sum().item())
    return float(-log_probabilities[evaluated.long()].mean())
