"""Textures: square grey crops tiled over a folder of large texture images (Brodatz D1..D112).

Each image is split by position: the bottom band (20% of the height, at least one crop) gives the
test crops and the rest the training crops, each tiled on a grid with stride = crop size, so no test
crop shares a pixel with a training crop. The label of a crop is the image it came from."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genserve.training.data.cifar import IMAGE_SUFFIXES
from genserve.training.data.errors import DatasetError, DatasetMissingError, fix_command
from genserve.training.data.types import ImageDataset

DEFAULT_CROP = 28
TEST_FRACTION = 0.2
MAX_TRAIN_CROPS = 60_000  # small crops of 112 images would give 100k+; keep a seeded subset instead
ORDER_SEED = 0  # crops are produced image by image; this fixed shuffle mixes the order


@dataclass
class TextureCrops:
    """Crops with their source image index and box (top, left, bottom, right) in that image."""

    train_images: np.ndarray  # (N, s, s) uint8
    train_labels: np.ndarray  # (N,) int64
    train_boxes: np.ndarray  # (N, 4) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    test_boxes: np.ndarray
    names: list[str]  # file stem of each texture image


def crop_boxes(height: int, width: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test boxes (top, left, bottom, right) for one `height` x `width` image."""
    band = max(round(height * TEST_FRACTION), crop)
    if height - band < crop or width < crop:
        raise DatasetError(f"textures: a {width}x{height} image is too small for {crop}px crops with a test band")
    lefts = np.arange(0, width - crop + 1, crop)

    def grid(top: int, bottom: int) -> np.ndarray:
        tops = np.arange(top, bottom - crop + 1, crop)
        t, left = (a.ravel() for a in np.meshgrid(tops, lefts, indexing="ij"))
        return np.stack([t, left, t + crop, left + crop], axis=1).astype(np.int64)

    return grid(0, height - band), grid(height - band, height)


def texture_folder(data_dir: Path) -> Path:
    """`data_dir`/textures, else `data_dir`/brodatz, else `data_dir` itself if it holds images."""
    for folder in (data_dir / "textures", data_dir / "brodatz", data_dir):
        if folder.is_dir() and _image_files(folder):
            return folder
    raise DatasetMissingError(
        f"textures: no texture images in {data_dir / 'textures'} or {data_dir / 'brodatz'}. "
        f"Fix: {fix_command('textures', data_dir)} (a mirror holding brodatz/D1.gif..D112.gif), "
        f"or put your own large texture images in {data_dir / 'textures'}/"
    )


def texture_crops(folder: Path, crop: int = DEFAULT_CROP) -> TextureCrops:
    """Tile every image in `folder` (converted to grey) into train and test crops."""
    if crop < 1:
        raise DatasetError(f"textures: crop size (image_size) must be positive, got {crop}")
    paths = _image_files(folder)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for label, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("L"))
        except (OSError, SyntaxError, ValueError) as err:
            raise DatasetError(f"textures: {path} is not a readable image: {err}") from err
        for split, boxes in zip(("train", "test"), crop_boxes(*pixels.shape, crop), strict=True):
            # every box lies on a crop-sized grid: cut them all with one reshape instead of a loop
            top, bottom = boxes[:, 0].min(), boxes[:, 2].max()
            right = boxes[:, 3].max()
            tiles = pixels[top:bottom, :right].reshape((bottom - top) // crop, crop, right // crop, crop)
            tiles = tiles.transpose(0, 2, 1, 3).reshape(-1, crop, crop)
            parts[split].append((tiles, np.full(len(tiles), label, np.int64), boxes))
    rng = np.random.default_rng(ORDER_SEED)
    out = {}
    for split, pieces in parts.items():
        images, labels, boxes = (np.concatenate(column) for column in zip(*pieces, strict=True))
        order = rng.permutation(len(images))
        if split == "train" and len(order) > MAX_TRAIN_CROPS:
            order = order[:MAX_TRAIN_CROPS]
        out[split] = images[order], labels[order], boxes[order]
    return TextureCrops(*out["train"], *out["test"], [path.stem for path in paths])


def load_textures(data_dir: Path, image_size: int | None = None) -> ImageDataset:
    """Textures dataset of `image_size` crops (default 28), 1 channel, labels = source image."""
    crops = texture_crops(texture_folder(data_dir), DEFAULT_CROP if image_size is None else image_size)
    return ImageDataset(
        "textures",
        torch.from_numpy(crops.train_images[:, None]),
        torch.from_numpy(crops.train_labels),
        torch.from_numpy(crops.test_images[:, None]),
        torch.from_numpy(crops.test_labels),
        crops.names,
    )


def _image_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    # natural order, so D2 comes before D10
    return sorted(files, key=lambda p: [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.stem)])
