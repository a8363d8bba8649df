"""noisescale.text and analysis/make_text_corpus.py: byte round-trip, split sizes, batches, the unigram baseline
against a naive count, and the shipped corpus rebuilt byte-identically from the SymPy wheel's files."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import math
from collections import Counter
from importlib import metadata
from pathlib import Path

import pytest
import torch

from noisescale.text import (
    SHIPPED_CORPUS_PATH,
    SHIPPED_CORPUS_SHA256,
    decode,
    encode,
    load_shipped_corpus,
    load_text_file,
    unigram_cross_entropy,
)

ROOT = Path(__file__).resolve().parent.parent


def _corpus_script():
    spec = importlib.util.spec_from_file_location("make_text_corpus", ROOT / "analysis" / "make_text_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_encode_decode_round_trip_every_byte_and_utf8():
    every_byte = bytes(range(256))
    assert decode(encode(every_byte)) == every_byte
    assert encode(every_byte).tolist() == list(range(256))
    text = "Gauß → ∞ and ascii"
    assert decode(encode(text)).decode("utf-8") == text
    assert len(encode(text)) == len(text.encode("utf-8"))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        decode(torch.tensor([0, 256]))


def test_text_file_split_sizes_and_contiguous_round_trip(tmp_path):
    data = bytes((7 * i) % 256 for i in range(1000))
    path = tmp_path / "user.txt"
    path.write_bytes(data)
    corpus = load_text_file(path, validation_fraction=0.1)
    assert (len(corpus.train), len(corpus.validation)) == (900, 100)
    assert decode(corpus.train) + decode(corpus.validation) == data
    corpus = load_text_file(path, validation_fraction=0.25)
    assert (len(corpus.train), len(corpus.validation)) == (750, 250)


def test_text_file_errors_name_the_cause(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text_file(tmp_path / "missing.txt")
    path = tmp_path / "short.txt"
    path.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="validation_fraction"):
        load_text_file(path, validation_fraction=1.0)
    corpus = load_text_file(path, validation_fraction=0.1)  # 10 validation bytes
    with pytest.raises(ValueError, match="validation part has only 10"):
        corpus.sample_batch(2, 16, torch.Generator().manual_seed(0))


def test_batches_are_windows_of_the_training_part_shifted_by_one(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(bytes(range(256)) * 4)  # every 17-byte window of it is a run of consecutive bytes mod 256
    corpus = load_text_file(path, validation_fraction=0.25)
    inputs, targets = corpus.sample_batch(32, 16, torch.Generator().manual_seed(3))
    assert inputs.shape == targets.shape == (32, 16) and inputs.dtype == torch.long
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert torch.equal((inputs[:, 1:] - inputs[:, :-1]) % 256, torch.ones(32, 15, dtype=torch.long))
    again, _ = corpus.sample_batch(32, 16, torch.Generator().manual_seed(3))
    assert torch.equal(inputs, again)
    x, y = corpus.validation_windows(16)
    assert x.shape == ((256 - 1) // 16, 16) and torch.equal(x.flatten(), corpus.validation[: x.numel()])
    assert torch.equal(y.flatten()[15::16], corpus.validation[16: 16 * 15 + 1: 16])  # each window's next byte
    assert corpus.validation_windows(16, max_windows=3)[0].shape == (3, 16)


def test_unigram_cross_entropy_matches_a_naive_count():
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 40, (500,), generator=generator)
    evaluated = torch.randint(0, 60, (200,), generator=generator)  # some bytes unseen in train: smoothing matters
    counts = Counter(train.tolist())
    naive = -sum(math.log((counts.get(b, 0) + 1) / (500 + 256)) for b in evaluated.tolist()) / 200
    assert unigram_cross_entropy(train, evaluated) == pytest.approx(naive, rel=1e-12)
    uniform = torch.arange(256).repeat(3)
    assert unigram_cross_entropy(uniform, uniform) == pytest.approx(math.log(256), rel=1e-12)


def test_shipped_corpus_has_its_recorded_sha256_and_splits_90_10():
    data = SHIPPED_CORPUS_PATH.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHIPPED_CORPUS_SHA256
    corpus = load_shipped_corpus()
    assert len(corpus.train) + len(corpus.validation) == len(data)
    assert len(corpus.validation) == round(0.1 * len(data))
    assert (ROOT / "data" / "text" / "LICENSE").read_text().startswith("Copyright (c) 2006-2023 SymPy")


def test_corpus_builder_orders_selects_and_checks_files():
    script = _corpus_script()
    files = {"sympy/core/b.py": b"B", "sympy/core/a.py": b"A\n", "sympy/core/tests/t.py": b"T",
             "sympy/other.py": b"O", "sympy/core/notes.txt": b"N"}
    assert script.build_corpus(files) == b"# ===== sympy/core/a.py =====\nA\n# ===== sympy/core/b.py =====\nB\n"
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"A\n").digest()).rstrip(b"=").decode()
    hashes = script.record_hashes(f"sympy/core/a.py,sha256={digest},2\nsympy-1.14.0.dist-info/RECORD,,\n")
    assert script.checked("sympy/core/a.py", b"A\n", hashes) == b"A\n"
    with pytest.raises(ValueError, match="differs from the wheel's RECORD"):
        script.checked("sympy/core/a.py", b"A changed\n", hashes)


def _sympy_version() -> str | None:
    try:
        return metadata.version("sympy")
    except metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(_sympy_version() != "1.14.0", reason="needs the installed sympy 1.14.0 to rebuild the corpus")
def test_corpus_script_rebuilds_the_shipped_file_byte_identically():
    script = _corpus_script()
    files, license_text = script.read_installed()
    corpus = script.build_corpus(files)
    assert hashlib.sha256(corpus).hexdigest() == SHIPPED_CORPUS_SHA256
    assert corpus == SHIPPED_CORPUS_PATH.read_bytes()
    assert license_text == (ROOT / "data" / "text" / "LICENSE").read_bytes()
