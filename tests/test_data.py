from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from noisescale import data
from noisescale.data import (
    CLASS_NAMES,
    dataset_as_tensors,
    load_fashion_mnist,
    read_idx,
    resolve_fashion_mnist_source,
    stratified_subset_indices,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_idx_by_hand(path: Path, array: np.ndarray, type_code: int, *, magic_prefix: bytes = b"\x00\x00") -> None:
    """The IDX layout written independently of the reader: magic, big-endian uint32 sizes, big-endian data."""
    header = magic_prefix + bytes([type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    big_endian = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    payload = header + array.astype(big_endian).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def write_fake_fashion_mnist(directory: Path, n_train: int = 30, n_test: int = 20, seed: int = 0) -> dict:
    generator = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": generator.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(n_train, dtype=np.uint8) % 10,
        "test_images": generator.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for key, stem in data.IDX_FILE_NAMES.items():
        suffix = ".gz" if key.endswith("images") else ""  # mix raw and gzipped files
        write_idx_by_hand(directory / (stem + suffix), arrays[key], 0x08)
    return arrays


@pytest.mark.parametrize(
    ("type_code", "dtype", "suffix"),
    [(0x08, np.uint8, ".gz"), (0x09, np.int8, ""), (0x0B, np.int16, ""), (0x0C, np.int32, ".gz"),
     (0x0D, np.float32, ""), (0x0E, np.float64, ".gz")],
)
def test_read_idx_round_trip(tmp_path, type_code, dtype, suffix):
    generator = np.random.default_rng(type_code)
    array = (generator.normal(size=(3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / f"tiny-idx{suffix}"
    write_idx_by_hand(path, array, type_code)
    result = read_idx(path)
    assert result.dtype == np.dtype(dtype)
    assert result.dtype.isnative
    np.testing.assert_array_equal(result, array)


def test_read_idx_wrong_magic_names_the_file(tmp_path):
    path = tmp_path / "wrong-magic-idx1-ubyte"
    write_idx_by_hand(path, np.zeros(4, np.uint8), 0x08, magic_prefix=b"\x01\x00")
    with pytest.raises(ValueError, match=r"wrong-magic-idx1-ubyte.*magic number"):
        read_idx(path)


def test_read_idx_unknown_type_code_names_the_file(tmp_path):
    path = tmp_path / "bad-type"
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match=r"bad-type.*unknown data type code 0x07"):
        read_idx(path)


def test_read_idx_truncated_data_names_the_file(tmp_path):
    path = tmp_path / "truncated"
    write_idx_by_hand(path, np.arange(12, dtype=np.uint8).reshape(3, 4), 0x08)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"truncated.*11 data bytes.*announces 12"):
        read_idx(path)


def test_read_idx_corrupt_gzip_names_the_file(tmp_path):
    path = tmp_path / "corrupt.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match=r"corrupt\.gz"):
        read_idx(path)


def test_read_idx_too_short_names_the_file(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match=r"short.*too short"):
        read_idx(path)


@pytest.fixture(scope="module")
def shipped_subset():
    return load_fashion_mnist(source="subset")


def test_shipped_subset_shapes_dtypes_and_class_balance(shipped_subset):
    train, test = shipped_subset
    assert train.info.source == "subset" and test.info is train.info
    assert train.images.shape == (12000, 1, 28, 28) and test.images.shape == (2000, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert len(CLASS_NAMES) == 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [1200] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [200] * 10


def test_shipped_subset_is_standardised_with_training_mean_and_std(shipped_subset):
    train, test = shipped_subset
    pixels = train.images.to(torch.float64)
    assert abs(pixels.mean().item()) < 1e-6
    assert abs(pixels.std(unbiased=False).item() - 1.0) < 1e-6
    with np.load(data.SHIPPED_SUBSET_PATH) as archive:
        raw_test = archive["test_images"].astype(np.float64) / 255.0
        raw_train = archive["train_images"].astype(np.float64) / 255.0
    assert train.info.mean == pytest.approx(raw_train.mean(), rel=1e-12)
    assert train.info.std == pytest.approx(raw_train.std(), rel=1e-12)
    expected_test = (raw_test - train.info.mean) / train.info.std
    np.testing.assert_allclose(test.images[:, 0].numpy(), expected_test, rtol=0, atol=1e-6)


def test_shipped_subset_is_a_subset_of_the_debian_files():
    if not data.DEBIAN_FASHION_MNIST_DIR.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    with np.load(data.SHIPPED_SUBSET_PATH) as archive:
        subset = {key: archive[key] for key in archive.files}
    for split in ("train", "test"):
        indices = subset[f"{split}_indices"]
        assert np.all(np.diff(indices) > 0)  # distinct, original order
        stem = data.IDX_FILE_NAMES[f"{split}_images"]
        full_images = read_idx(data.DEBIAN_FASHION_MNIST_DIR / f"{stem}.gz")
        full_labels = read_idx(data.DEBIAN_FASHION_MNIST_DIR / (data.IDX_FILE_NAMES[f"{split}_labels"] + ".gz"))
        np.testing.assert_array_equal(full_images[indices], subset[f"{split}_images"])
        np.testing.assert_array_equal(full_labels[indices], subset[f"{split}_labels"])


def test_load_from_root_standardises_exactly(tmp_path):
    arrays = write_fake_fashion_mnist(tmp_path / "idx")
    train, test = load_fashion_mnist(tmp_path / "idx")
    assert train.info.source == "root" and train.info.path == tmp_path / "idx"
    assert (train.info.n_train, train.info.n_test) == (30, 20)
    scaled_train = arrays["train_images"] / 255.0
    mean, std = scaled_train.mean(), scaled_train.std()
    np.testing.assert_allclose(train.images[:, 0].numpy(), (scaled_train - mean) / std, atol=1e-6)
    np.testing.assert_allclose(test.images[:, 0].numpy(), (arrays["test_images"] / 255.0 - mean) / std, atol=1e-6)
    np.testing.assert_array_equal(test.labels.numpy(), arrays["test_labels"])


def test_source_resolution_order(tmp_path, monkeypatch):
    fake_debian = tmp_path / "debian"
    write_fake_fashion_mnist(fake_debian)
    explicit_root = tmp_path / "explicit"
    explicit_root.mkdir()
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", fake_debian)
    assert resolve_fashion_mnist_source(explicit_root) == ("root", explicit_root)
    assert resolve_fashion_mnist_source() == ("debian", fake_debian)
    assert resolve_fashion_mnist_source(source="subset") == ("subset", data.SHIPPED_SUBSET_PATH)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    assert resolve_fashion_mnist_source() == ("subset", data.SHIPPED_SUBSET_PATH)
    with pytest.raises(ValueError, match="source='debian'.*absent"):
        resolve_fashion_mnist_source(source="debian")


def test_source_resolution_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="source must be one of"):
        resolve_fashion_mnist_source(source="internet")
    with pytest.raises(ValueError, match="pass only one"):
        resolve_fashion_mnist_source(tmp_path, source="subset")
    with pytest.raises(ValueError, match="not a directory"):
        resolve_fashion_mnist_source(tmp_path / "missing")
    with pytest.raises(ValueError, match="needs a root"):
        resolve_fashion_mnist_source(source="root")
    with pytest.raises(ValueError, match=r"has neither train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path)


def test_stratified_subset_indices_balanced_and_reproducible():
    labels = np.random.default_rng(3).integers(0, 4, size=200)
    first = stratified_subset_indices(labels, 5, seed=11)
    assert np.array_equal(first, stratified_subset_indices(labels, 5, seed=11))
    assert not np.array_equal(first, stratified_subset_indices(labels, 5, seed=12))
    assert np.bincount(labels[first]).tolist() == [5, 5, 5, 5]
    assert len(np.unique(first)) == 20
    with pytest.raises(ValueError, match="fewer than per_class"):
        stratified_subset_indices(labels, 1000, seed=0)


def test_subset_script_is_byte_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("make_subset", REPO_ROOT / "analysis" / "make_fashion_mnist_subset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    write_fake_fashion_mnist(tmp_path / "idx", n_train=40, n_test=30)
    arguments = ["--source-dir", str(tmp_path / "idx"), "--train-per-class", "3", "--test-per-class", "2"]
    script.main([*arguments, "--out", str(tmp_path / "a.npz")])
    script.main([*arguments, "--out", str(tmp_path / "b.npz")])
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as archive:
        assert np.bincount(archive["train_labels"]).tolist() == [3] * 10
        assert archive["test_images"].shape == (20, 28, 28)


class _ListDataset(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_dataset_as_tensors_stacks_any_dataset_and_converts_dtype():
    items = [(torch.full((2,), float(index)), torch.tensor(index)) for index in range(5)]
    inputs, targets = dataset_as_tensors(_ListDataset(items), dtype=torch.float64)
    assert inputs.dtype == torch.float64 and inputs.shape == (5, 2)
    assert torch.equal(inputs[:, 0], torch.arange(5, dtype=torch.float64))
    assert torch.equal(targets, torch.arange(5))
    with pytest.raises(ValueError, match="floating-point"):
        dataset_as_tensors(_ListDataset(items), dtype=torch.int64)
