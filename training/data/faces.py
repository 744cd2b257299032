"""Faces: the Olivetti .mat file (40 people x 10 images) or any folder of aligned face images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from genserve.training.data.cifar import IMAGE_SUFFIXES
from genserve.training.data.errors import DatasetError, DatasetMissingError, fix_command
from genserve.training.data.types import ImageDataset

DEFAULT_SIZE = 64
OLIVETTI_PEOPLE, OLIVETTI_PER_PERSON, OLIVETTI_TEST_PER_PERSON = 40, 10, 2
TEST_PERCENT = 10  # folders: share of images whose path hash puts them in the test split
ORDER_SEED = 0  # Olivetti is stored person by person; this fixed shuffle mixes the training order
# Folders under a data dir that belong to other datasets: such a dir is not itself a face folder.
_OTHER_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar10-jpg", "brodatz", "textures")


def load_faces(data_dir: Path, image_size: int | None = None) -> ImageDataset:
    """Faces resized to `image_size` (default 64), from the first of: `data_dir` as a .mat file,
    `data_dir`/faces/ (your own aligned faces), `data_dir`/olivetti-faces/olivettifaces.mat,
    `data_dir`/olivettifaces.mat, or `data_dir` itself as a face folder."""
    size = DEFAULT_SIZE if image_size is None else image_size
    if size < 1:
        raise DatasetError(f"faces: image_size must be positive, got {size}")
    if data_dir.is_file():
        return load_olivetti(data_dir, size, data_dir.parent)
    if (data_dir / "faces").is_dir():
        return load_face_folder(data_dir / "faces", size)
    for mat in (data_dir / "olivetti-faces" / "olivettifaces.mat", data_dir / "olivettifaces.mat"):
        if mat.is_file():
            return load_olivetti(mat, size, data_dir)
    own_folder = data_dir.is_dir() and not any((data_dir / name).exists() for name in _OTHER_DATASETS)
    if own_folder and face_images(data_dir):
        return load_face_folder(data_dir, size)
    raise DatasetMissingError(
        f"faces: found neither {data_dir / 'olivetti-faces' / 'olivettifaces.mat'} nor a folder of face "
        f"images at {data_dir / 'faces'}. Fix: {fix_command('faces', data_dir)}, "
        f"or put aligned face images in {data_dir / 'faces'}/"
    )


def load_olivetti(path: Path, size: int = DEFAULT_SIZE, data_dir: Path | None = None) -> ImageDataset:
    """Olivetti: labels are people 0..39 ("s1".."s40"); each person's last 2 images are the test split."""
    import scipy.io  # imported here: scipy.io costs a noticeable import time

    fix = fix_command("faces", data_dir if data_dir is not None else path.parent.parent)
    try:
        faces = scipy.io.loadmat(str(path), variable_names=["faces"]).get("faces")
    except Exception as err:  # scipy raises many types (ValueError, TypeError, MatReadError) on bad files
        raise DatasetError(f"faces: {path} is not a readable MATLAB file ({err}). Fix: {fix}") from err
    shape = (64 * 64, OLIVETTI_PEOPLE * OLIVETTI_PER_PERSON)
    if faces is None or faces.shape != shape:
        found = "no variable 'faces'" if faces is None else f"'faces' of shape {faces.shape}"
        raise DatasetError(f"faces: {path} has {found}, expected uint8 {shape}. Fix: {fix}")
    # column i is image i stored column-major (MATLAB): reshape then transpose
    images = faces.T.reshape(-1, 64, 64).transpose(0, 2, 1).astype(np.uint8)
    if size != 64:
        images = np.stack([_resize(Image.fromarray(image), size, "L") for image in images])
    labels = np.repeat(np.arange(OLIVETTI_PEOPLE), OLIVETTI_PER_PERSON)
    is_test = np.tile(np.arange(OLIVETTI_PER_PERSON) >= OLIVETTI_PER_PERSON - OLIVETTI_TEST_PER_PERSON, OLIVETTI_PEOPLE)
    train = np.flatnonzero(~is_test)[np.random.default_rng(ORDER_SEED).permutation(int((~is_test).sum()))]
    test = np.flatnonzero(is_test)
    return ImageDataset(
        "faces",
        torch.from_numpy(images[train][:, None].copy()),
        torch.from_numpy(labels[train]),
        torch.from_numpy(images[test][:, None].copy()),
        torch.from_numpy(labels[test]),
        [f"s{person + 1}" for person in range(OLIVETTI_PEOPLE)],
    )


def face_folder_split(relative_paths: list[str]) -> np.ndarray:
    """True where an image is in the test split: decided by a hash of its relative path, so the split of
    an image never changes when others are added; at least one image on each side when there are two."""
    digest = np.array([int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) for p in relative_paths], np.int64)
    is_test = digest % 100 < TEST_PERCENT
    if len(relative_paths) >= 2 and (is_test.all() or not is_test.any()):
        is_test[:] = False
        is_test[int(np.argmin(digest))] = True
    return is_test


def load_face_folder(folder: Path, size: int = DEFAULT_SIZE) -> ImageDataset:
    """Every image under `folder` (recursively), centre-cropped to a square and resized to `size`;
    1 channel if all images are grey, else RGB. No labels."""
    paths = face_images(folder)
    if len(paths) < 2:
        raise DatasetMissingError(f"faces: {folder} holds {len(paths)} images; a face folder needs at least 2")
    modes = []
    for path in paths:
        with _open(path) as image:  # opening reads only the header
            modes.append(image.mode)
    mode = "L" if all(m in ("1", "L", "LA", "I", "I;16", "F") for m in modes) else "RGB"
    images = np.empty((len(paths), size, size) + (() if mode == "L" else (3,)), np.uint8)
    for i, path in enumerate(paths):
        with _open(path) as image:
            images[i] = _resize(image, size, mode)
    images = images[:, None] if mode == "L" else images.transpose(0, 3, 1, 2)
    is_test = face_folder_split([p.relative_to(folder).as_posix() for p in paths])
    return ImageDataset(
        "faces",
        torch.from_numpy(np.ascontiguousarray(images[~is_test])),
        None,
        torch.from_numpy(np.ascontiguousarray(images[is_test])),
        None,
        None,
    )


def face_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order (hidden files skipped)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"faces: {path} is not a readable image: {err}") from err


def _resize(image: Image.Image, size: int, mode: str) -> np.ndarray:
    try:
        if image.format == "JPEG":
            image.draft(mode, (size, size))  # decode big JPEGs at a reduced scale: much faster
        image = image.convert(mode)
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"faces: {getattr(image, 'filename', 'an image')} cannot be decoded: {err}") from err
    return np.asarray(ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC))
