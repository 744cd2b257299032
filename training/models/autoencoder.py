"""Convolutional autoencoders: the Keras conv autoencoder and its denoising variant.

Three stages of (conv 3x3 + ReLU + 2x2 max-pool, ceil mode) squeeze the image (28 -> 14 -> 7 -> 4
on 28 px); the decoder mirrors them with nearest-neighbour upsampling to the encoder's exact sizes
(4 -> 7 -> 14 -> 28), so any H, W works with no cropping and no checkerboard artefacts.
The loss is the binary cross-entropy averaged over pixels (and images).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainConfig
from training.models.base import Batch, GenerativeModel, StepContext


class ConvAutoencoder(GenerativeModel):
    """The Keras conv autoencoder: channels 16-8-8, down to a 4x4x8 code on 28 px.

    The latent is the flattened bottleneck, so latent_dim = channels[-1] * ceil(H/8) * ceil(W/8)
    (128 on 28 px); config.latent_dim is ignored. There is no prior, so no sample().
    """

    kind = "ae"
    channels: ClassVar[tuple[int, ...]] = (16, 8, 8)
    can_encode = True
    can_reconstruct = True

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__(image_shape, config, num_classes)
        c, h, w = self.image_shape
        sizes = [(h, w)]  # the spatial size entering each stage, then the bottleneck's
        layers: list[nn.Module] = []
        in_channels = c
        for out_channels in self.channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            in_channels = out_channels
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            sizes.append((h, w))
        self.code_shape = (in_channels, h, w)
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.latent_dim = math.prod(self.code_shape)

        layers = [nn.Unflatten(1, self.code_shape)]
        for out_channels, size in zip(reversed(self.channels), reversed(sizes[:-1]), strict=True):
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.ReLU(),
                nn.Upsample(size=size, mode="nearest"),
            ]
            in_channels = out_channels
        layers.append(nn.Conv2d(in_channels, c, 3, padding=1))
        self.decoder = nn.Sequential(*layers)  # code -> logits

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images -> reconstruction logits."""
        return self.decoder(self.encoder(inputs))

    def losses(self, logits: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean per-pixel BCE ("loss") and mean squared error ("mse") against the clean images."""
        logits = logits.float()
        return {
            "loss": F.binary_cross_entropy_with_logits(logits, images),
            "mse": F.mse_loss(torch.sigmoid(logits), images),
        }

    # --- training ---------------------------------------------------------------------------
    def train_step(
        self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """One Adam step on batch.inputs (noisy for the denoiser) against batch.images."""
        optimizer = optimizers["model"]
        with ctx.autocast():
            logits = self(batch.inputs)
        losses = self.losses(logits, batch.images)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return {name: value.detach() for name, value in losses.items()}

    @torch.no_grad()
    def eval_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.losses(self(batch.inputs), batch.images)

    # --- capabilities -----------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the flattened bottleneck (B, latent_dim)."""
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(latents))

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{self.kind} has no prior to sample from")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{self.kind} has no prior to sample from")

    def prior_spec(self) -> dict[str, object]:
        raise NotImplementedError(f"{self.kind} has no prior")

    def servable_parts(self) -> dict[str, nn.Module]:
        """encoder: images -> code; decoder: code -> images in [0, 1]."""
        return {"encoder": self.encoder, "decoder": nn.Sequential(self.decoder, nn.Sigmoid())}


class DenoisingAutoencoder(ConvAutoencoder):
    """The same autoencoder with channels 32-32-16, trained to map noisy inputs to clean images.

    The data loader adds the noise (config.noise_factor); reconstruct(x) is the denoised image.
    """

    kind = "dae"
    channels = (32, 32, 16)

    def servable_parts(self) -> dict[str, nn.Module]:
        """denoiser: noisy images -> clean images in [0, 1]."""
        return {"denoiser": nn.Sequential(self.encoder, self.decoder, nn.Sigmoid())}
