"""Datasets: an IDX reader and Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) as standardised tensors.

Fashion-MNIST is found, in this order, in an explicit ``root`` directory of IDX files, in the directory
the Debian package ``dataset-fashion-mnist`` installs, or in the class-stratified subset shipped with
noisescale in ``data/fashion_mnist/`` (12,000 training and 2,000 test images, made by
``analysis/make_fashion_mnist_subset.py``).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SHIPPED_SUBSET_PATH = Path(__file__).resolve().parent.parent / "data" / "fashion_mnist" / "fashion_mnist_subset.npz"

# IDX file names as Fashion-MNIST and MNIST distribute them; each may also carry a ".gz" suffix.
IDX_FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type code (third byte of the magic number) -> big-endian numpy dtype (LeCun's MNIST page).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

SOURCES = ("auto", "root", "debian", "subset")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a numpy array in native byte order.

    Layout: magic number ``0x00 0x00 <type code> <number of dimensions>``, then one big-endian uint32
    per dimension, then the data in C order, big-endian.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            content = stream.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file {path}: {error}") from error
    if len(content) < 4:
        raise ValueError(f"IDX file {path} is too short for the 4-byte magic number ({len(content)} bytes)")
    zero_bytes, type_code, ndim = content[:2], content[2], content[3]
    if zero_bytes != b"\x00\x00":
        raise ValueError(
            f"IDX file {path} has a wrong magic number {content[:4].hex()}: the first two bytes must be zero"
        )
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in _IDX_DTYPES)
        raise ValueError(f"IDX file {path} has an unknown data type code 0x{type_code:02X} (known: {known})")
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise ValueError(f"IDX file {path} is truncated inside its header of {ndim} dimension sizes")
    shape = tuple(int(size) for size in np.frombuffer(content, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(content) - header_size
    if actual != expected:
        raise ValueError(
            f"IDX file {path} has {actual} data bytes but its header (shape {shape}, {dtype.name}) "
            f"announces {expected}"
        )
    array = np.frombuffer(content, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset came from and how it was standardised: ``x = (pixel / 255 - mean) / std``."""

    name: str
    source: str  # "root" (explicit IDX directory), "debian" or "subset"
    path: Path
    n_train: int
    n_test: int
    mean: float  # training-split pixel mean after scaling to [0, 1]
    std: float  # training-split pixel standard deviation after scaling to [0, 1]


class LabelledImages(TensorDataset):
    """A :class:`TensorDataset` of (images (N, 1, H, W) float32, labels (N,) int64) with its :class:`DatasetInfo`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo):
        super().__init__(images, labels)
        self.info = info

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]


def resolve_fashion_mnist_source(root: str | Path | None = None, source: str = "auto") -> tuple[str, Path]:
    """Pick where Fashion-MNIST is read from: explicit ``root`` > Debian directory > shipped subset.

    ``source`` forces one: ``"root"`` (needs ``root``), ``"debian"`` or ``"subset"``; ``"auto"`` applies the order.
    Returns ``(source, path)``.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if root is not None and source not in ("auto", "root"):
        raise ValueError(f"root={str(root)!r} was given together with source={source!r}; pass only one of them")
    if source == "root" and root is None:
        raise ValueError("source='root' needs a root directory of IDX files")
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root {root} is not a directory of Fashion-MNIST IDX files")
        return "root", root
    if source == "debian" or (source == "auto" and DEBIAN_FASHION_MNIST_DIR.is_dir()):
        if not DEBIAN_FASHION_MNIST_DIR.is_dir():
            raise ValueError(
                f"source='debian' but {DEBIAN_FASHION_MNIST_DIR} does not exist "
                "(install the Debian package dataset-fashion-mnist)"
            )
        return "debian", DEBIAN_FASHION_MNIST_DIR
    if not SHIPPED_SUBSET_PATH.is_file():
        raise ValueError(
            f"the shipped Fashion-MNIST subset {SHIPPED_SUBSET_PATH} is missing; noisescale looks for it next to "
            "its source tree (install with `pip install -e .`) -- or pass root= a directory of IDX files"
        )
    return "subset", SHIPPED_SUBSET_PATH


def _idx_file(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"{directory} has neither {stem} nor {stem}.gz")


def read_idx_directory(directory: str | Path) -> dict[str, np.ndarray]:
    """Read the four Fashion-MNIST/MNIST IDX files of ``directory`` (keys as in ``IDX_FILE_NAMES``)."""
    directory = Path(directory)
    arrays = {key: read_idx(_idx_file(directory, stem)) for key, stem in IDX_FILE_NAMES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{directory}: {split} images have shape {images.shape} and labels {labels.shape}; "
                "expected (N, H, W) and (N,)"
            )
    return arrays


def _read_subset(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {key: archive[key] for key in IDX_FILE_NAMES}


def _to_labelled_images(images: np.ndarray, labels: np.ndarray, mean: float, std: float, info: DatasetInfo):
    if images.dtype != np.uint8:
        raise ValueError(f"{info.path}: images must be uint8 pixels, got {images.dtype}")
    if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{info.path}: labels must lie in 0..{len(CLASS_NAMES) - 1}, got {labels.min()}..{labels.max()}")
    scaled = torch.from_numpy(images).to(torch.float64).div_(255.0)
    standardised = ((scaled - mean) / std).to(torch.float32).unsqueeze(1)
    return LabelledImages(standardised, torch.from_numpy(labels.astype(np.int64)), info)


def load_fashion_mnist(
    root: str | Path | None = None, *, source: str = "auto"
) -> tuple[LabelledImages, LabelledImages]:
    """Fashion-MNIST as ``(train, test)`` datasets of images (N, 1, 28, 28) float32 and labels (N,) int64.

    Pixels are scaled to [0, 1] and standardised with the mean and standard deviation of the training
    split that was loaded (``train.info.mean``/``.std``): full 60,000-image training set mean 0.286041,
    std 0.353024; shipped 12,000-image subset mean 0.287031, std 0.353605. Source order: see
    :func:`resolve_fashion_mnist_source`.
    """
    resolved_source, path = resolve_fashion_mnist_source(root, source)
    arrays = _read_subset(path) if resolved_source == "subset" else read_idx_directory(path)
    train_pixels = arrays["train_images"].astype(np.float64) / 255.0
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    if std == 0.0:
        raise ValueError(f"{path}: the training images are constant, they cannot be standardised")
    info = DatasetInfo(
        name="fashion-mnist",
        source=resolved_source,
        path=path,
        n_train=len(arrays["train_labels"]),
        n_test=len(arrays["test_labels"]),
        mean=mean,
        std=std,
    )
    train = _to_labelled_images(arrays["train_images"], arrays["train_labels"], mean, std, info)
    test = _to_labelled_images(arrays["test_images"], arrays["test_labels"], mean, std, info)
    return train, test


def dataset_as_tensors(dataset: Dataset, *, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole ``dataset`` as ``(inputs, targets)`` tensors, for exact full-dataset computations.

    ``dtype`` converts the floating-point inputs (e.g. ``torch.float64`` for exactness checks).
    """
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) != 2:
            raise ValueError(f"expected a TensorDataset of (inputs, targets), got {len(dataset.tensors)} tensors")
        inputs, targets = dataset.tensors
    else:
        if not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset of type {type(dataset).__name__} has no length")
        examples = [dataset[index] for index in range(len(dataset))]
        inputs = torch.stack([torch.as_tensor(example[0]) for example in examples])
        targets = torch.stack([torch.as_tensor(example[1]) for example in examples])
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
        inputs = inputs.to(dtype)
    return inputs, targets


def stratified_subset_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` examples of every class, drawn without replacement (numpy ``default_rng(seed)``)."""
    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}")
    generator = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"class {label} has {len(members)} examples, fewer than per_class={per_class}")
        chosen.append(generator.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))
