"""MNIST and Fashion-MNIST: the four IDX files, gzipped or not, checked before use."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from genserve.training.data.errors import DatasetError, DatasetMissingError, fix_command
from genserve.training.data.types import ImageDataset

MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

# The IDX type byte -> element type (big-endian, as the format specifies).
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

# Folder names under the data dir: ours first, then torchvision's layout.
_FOLDERS = {"mnist": ("mnist", "MNIST/raw"), "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw")}
_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class IdxError(DatasetError):
    """An IDX file is truncated, corrupt or not IDX at all."""


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a native-endian array, checking magic, dims and length."""
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or not 1 <= raw[3] <= 4:
        raise IdxError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated inside the header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise IdxError(
            f"{path}: {problem}: the header says {'x'.join(map(str, dims))} "
            f"({expected} bytes) but the content is {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as err:
        raise IdxError(f"{path}: truncated gzip file ({len(raw)} bytes on disk): {err}") from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise IdxError(f"{path}: corrupt gzip data: {err}") from err


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """`stem`.gz, else the uncompressed `stem` (also the `train-images.idx3-ubyte` spelling)."""
    dotted = stem.replace("-idx", ".idx")
    for candidate in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def load_idx_dataset(name: str, data_dir: Path) -> ImageDataset:
    """Load `mnist` or `fashion-mnist` from `data_dir`/`name`/ (or torchvision's `MNIST/raw`)."""
    folders = [data_dir / sub for sub in _FOLDERS[name]]
    folder = next((f for f in folders if f.is_dir()), folders[0])
    arrays: dict[str, np.ndarray] = {}
    for key, stem in _STEMS.items():
        path = find_idx_file(folder, stem)
        if path is None:
            raise DatasetMissingError(
                f"{name}: {folder / (stem + '.gz')} is missing (the uncompressed {stem} is not there "
                f"either). Fix: {fix_command(name, data_dir)}"
            )
        try:
            arrays[key] = read_idx(path)
        except IdxError as err:
            raise IdxError(f"{name}: {err}. Fix: {fix_command(name, data_dir)}") from err
        except OSError as err:
            raise DatasetError(f"{name}: cannot read {path}: {err}") from err
        _check_array(name, key, path, arrays[key], data_dir)
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise IdxError(
                f"{name}: {len(arrays[f'{split}_images'])} {split} images but "
                f"{len(arrays[f'{split}_labels'])} labels in {folder}. Fix: {fix_command(name, data_dir)}"
            )
    return ImageDataset(
        name,
        torch.from_numpy(arrays["train_images"][:, None]),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"][:, None]),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        list(MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES),
    )


def _check_array(name: str, key: str, path: Path, array: np.ndarray, data_dir: Path) -> None:
    want_ndim = 3 if key.endswith("images") else 1
    if array.dtype != np.uint8 or array.ndim != want_ndim:
        raise IdxError(
            f"{name}: {path} holds {array.dtype} {array.shape}, expected uint8 with {want_ndim} dims. "
            f"Fix: {fix_command(name, data_dir)}"
        )
    if key.endswith("labels") and array.size and int(array.max()) >= 10:
        raise IdxError(f"{name}: {path} has label {int(array.max())}, expected 0..9. Fix: {fix_command(name, data_dir)}")
