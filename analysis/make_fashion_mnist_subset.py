"""Make the class-stratified Fashion-MNIST subset shipped in data/fashion_mnist/.

Draws ``--train-per-class`` training and ``--test-per-class`` test images of every class without
replacement (numpy ``default_rng(seed)``, see ``noisescale.data.stratified_subset_indices``), keeps them
in their original order and writes them as uint8 arrays, with their indices into the full files, to a
compressed .npz. The archive entries carry a fixed time stamp, so the same seed gives a byte-identical file.

    python3 analysis/make_fashion_mnist_subset.py            # from /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

from noisescale.data import DEBIAN_FASHION_MNIST_DIR, SHIPPED_SUBSET_PATH, read_idx_directory, stratified_subset_indices

_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def make_subset(source_dir: Path, train_per_class: int, test_per_class: int, seed: int) -> dict[str, np.ndarray]:
    """The subset's arrays: ``{split}_images``, ``{split}_labels`` (uint8) and ``{split}_indices`` (int32)."""
    full = read_idx_directory(source_dir)
    arrays = {}
    for offset, (split, per_class) in enumerate((("train", train_per_class), ("test", test_per_class))):
        indices = stratified_subset_indices(full[f"{split}_labels"], per_class, seed + offset)
        arrays[f"{split}_images"] = full[f"{split}_images"][indices]
        arrays[f"{split}_labels"] = full[f"{split}_labels"][indices]
        arrays[f"{split}_indices"] = indices.astype(np.int32)
    return arrays


def write_npz_reproducibly(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed entry time stamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_ZIP_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, buffer.getvalue(), compresslevel=9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-dir", type=Path, default=DEBIAN_FASHION_MNIST_DIR, help="directory of the IDX files")
    parser.add_argument("--out", type=Path, default=SHIPPED_SUBSET_PATH)
    parser.add_argument("--train-per-class", type=int, default=1200)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    arrays = make_subset(args.source_dir, args.train_per_class, args.test_per_class, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_npz_reproducibly(args.out, arrays)
    sizes = ", ".join(f"{name} {array.shape}" for name, array in arrays.items())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {sizes}")


if __name__ == "__main__":
    main()
