"""Batches straight from tensors that live on the training device.

Every dataset here fits in memory, so it is moved to the device once as uint8 and each batch is an
index into it: no per-step host-to-device copies, no worker processes. Binarisation and denoiser
noise are drawn per batch from a dedicated generator, so each epoch sees fresh draws and a resumed
run replays exactly the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from genserve.training.distributed import shard_indices, shard_size
from genserve.training.models.base import Batch


class DeviceLoader:
    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        batch_size: int,
        *,
        shuffle: bool,
        binarize: bool = False,
        noise_factor: float | None = None,
        shuffle_generator: torch.Generator | None = None,
        augment_generator: torch.Generator | None = None,
        drop_last: bool = False,
        fixed_seed: int | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceLoader takes uint8 images, got {images.dtype}")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.binarize = binarize
        self.noise_factor = noise_factor
        self.shuffle_generator = shuffle_generator  # CPU: randperm must be identical on every device
        self.augment_generator = augment_generator  # on the images' device
        self.rank, self.world_size = shard  # under torchrun: (rank, world_size); this rank's rows only
        self.drop_last = drop_last and shard_size(len(images), self.world_size) >= batch_size
        self.fixed_seed = fixed_seed  # reseed augment_generator at every pass: the same draws each time

    def __len__(self) -> int:
        n = shard_size(len(self.images), self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.images)
        device = self.images.device
        if self.fixed_seed is not None and self.augment_generator is not None:
            self.augment_generator.manual_seed(self.fixed_seed)
        if self.shuffle:
            order = torch.randperm(n, generator=self.shuffle_generator).to(device)
        else:
            order = torch.arange(n, device=device)
        order = shard_indices(order, self.rank, self.world_size)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.make_batch(self.images[index], None if self.labels is None else self.labels[index])

    def make_batch(self, images_u8: torch.Tensor, labels: torch.Tensor | None) -> Batch:
        images = images_u8.float().div_(255.0)
        if self.binarize:
            images = torch.bernoulli(images, generator=self.augment_generator)
        inputs = images
        if self.noise_factor:
            noise = torch.randn(images.shape, generator=self.augment_generator, device=images.device)
            inputs = (images + self.noise_factor * noise).clamp_(0.0, 1.0)
        return Batch(images=images, inputs=inputs, labels=labels)


def fixed_test_loader(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int,
    *,
    binarize: bool,
    noise_factor: float | None,
    seed: int = 1234,
) -> DeviceLoader:
    """A loader over the test split whose binarisation and noise are the same draws on every pass,
    so test losses of different epochs (and of resumed runs) are comparable."""
    return DeviceLoader(
        images,
        labels,
        batch_size,
        shuffle=False,
        binarize=binarize,
        noise_factor=noise_factor,
        augment_generator=torch.Generator(device=images.device),
        fixed_seed=seed,
    )
