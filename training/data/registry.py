"""Dataset names -> loaders, and where the data dir is."""

from __future__ import annotations

import os
from pathlib import Path

from genserve.training.data.cifar import load_cifar10
from genserve.training.data.embedded import load_mnist_5k
from genserve.training.data.errors import DatasetError
from genserve.training.data.faces import load_faces
from genserve.training.data.idx import load_idx_dataset
from genserve.training.data.textures import load_textures
from genserve.training.data.types import ImageDataset

DATASETS = ("mnist", "fashion-mnist", "cifar10", "faces", "textures", "mnist-5k")
# Datasets kept at their native size: image_size must be None or equal to it.
NATIVE_SIZES = {"mnist": 28, "fashion-mnist": 28, "cifar10": 32, "mnist-5k": 28}


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """`data_dir` (--data-dir) if given, else $GENSERVE_DATA, else ./data."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("GENSERVE_DATA")
    return Path(env).expanduser() if env else Path("data")


def load_dataset(name: str, data_dir: str | Path | None = None, image_size: int | None = None) -> ImageDataset:
    """Load dataset `name` (one of DATASETS) as uint8 (N, C, H, W) tensors.

    `image_size` is the resize target for "faces" (default 64) and the crop size for "textures"
    (default 28). mnist, fashion-mnist, mnist-5k (28) and cifar10 (32) keep their native size:
    for them any other image_size raises DatasetError rather than silently resampling.
    Raises DatasetError (a ValueError) with the fix command when data is missing or corrupt.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    native = NATIVE_SIZES.get(name)
    if native is not None and image_size not in (None, native):
        raise DatasetError(
            f"{name} images are {native}x{native}; image_size={image_size} is only supported for "
            f"faces (resize) and textures (crop size). Leave image_size unset for {name}."
        )
    if name == "mnist-5k":
        return load_mnist_5k()
    root = resolve_data_dir(data_dir)
    if name in ("mnist", "fashion-mnist"):
        return load_idx_dataset(name, root)
    if name == "cifar10":
        return load_cifar10(root)
    if name == "faces":
        return load_faces(root, image_size)
    return load_textures(root, image_size)
