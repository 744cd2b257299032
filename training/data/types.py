"""The in-memory form every dataset loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageDataset:
    """Train and test images as uint8 tensors (N, C, H, W), with optional int64 labels (N,)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor | None
    test_images: torch.Tensor
    test_labels: torch.Tensor | None
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        for split, images in (("train", self.train_images), ("test", self.test_images)):
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(
                    f"{self.name} {split} images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(f"{self.name}: train and test images differ in shape")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width)."""
        c, h, w = self.train_images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0

    def limited(self, limit: int | None) -> ImageDataset:
        """The same dataset keeping only the first `limit` training images."""
        if limit is None:
            return self
        return ImageDataset(
            self.name,
            self.train_images[:limit],
            None if self.train_labels is None else self.train_labels[:limit],
            self.test_images,
            self.test_labels,
            self.class_names,
        )
