"""Convolutional autoencoders and their denoising variants: the default strided-conv recipe, and the
Keras conv autoencoder and denoiser as presets.

Every autoencoder here maps images to a spatial code and back; the latent is the flattened code.
The loss is the binary cross-entropy averaged over pixels (and images), against the clean images
(the data loader makes the denoisers' noisy inputs). There is no prior, so no sample().
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from genserve.training.config import TrainConfig
from genserve.training.models.base import Batch, GenerativeModel, SigmoidOutput, StepContext
from genserve.training.models.vae import ResidualBlock, downsampling_plan


class Autoencoder(GenerativeModel):
    """Shared autoencoder logic. Subclasses set `self.encoder` (images -> flat code), `self.decoder`
    (flat code -> logits (B, C, H, W)) and `self.latent_dim`."""

    encoder: nn.Module
    decoder: nn.Module
    can_encode = True
    can_reconstruct = True
    metric_families = ("reconstruction",)

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
        """Images -> the flattened code (B, latent_dim)."""
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
        """encoder: images -> code; decoder: code -> images in [0, 1] (the denoiser: one graph)."""
        if self.noisy_inputs:
            return {"denoiser": SigmoidOutput(nn.Sequential(self.encoder, self.decoder))}
        return {"encoder": self.encoder, "decoder": SigmoidOutput(self.decoder)}


class ConvAutoencoder(Autoencoder):
    """The default conv autoencoder: strided convs and a residual block down to a 7x7x4 code on 28 px.

    Encoder: one 4x4 stride-2 conv per halving (channels 32, 64...; 28 -> 14 -> 7), a residual block,
    a 1x1 conv to `code_channels`. Decoder: a 3x3 conv back to the feature width, a residual block,
    4x4 stride-2 transposed convs to H x W, a 3x3 conv to C logits. SiLU throughout.
    """

    kind = "ae"
    code_channels: ClassVar[int] = 4
    base_channels: ClassVar[int] = 32

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__(image_shape, config, num_classes)
        c, h, w = self.image_shape
        plan = downsampling_plan(h, w, self.base_channels) or [self.base_channels]
        stride = 2 if downsampling_plan(h, w, self.base_channels) else 1
        layers: list[nn.Module] = []
        in_channels = c
        for out_channels in plan:  # (B, C, H, W) -> (B, plan[-1], H / 2^n, W / 2^n)
            layers += [nn.Conv2d(in_channels, out_channels, 4 if stride == 2 else 3, stride, 1), nn.SiLU()]
            in_channels = out_channels
        width = in_channels
        layers += [ResidualBlock(width), nn.SiLU(), nn.Conv2d(width, self.code_channels, 1)]
        scale = stride ** len(plan)
        self.code_shape = (self.code_channels, h // scale, w // scale)
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.latent_dim = math.prod(self.code_shape)

        layers = [nn.Unflatten(1, self.code_shape), nn.Conv2d(self.code_channels, width, 3, padding=1), ResidualBlock(width), nn.SiLU()]
        in_channels = width
        if stride == 2:
            for out_channels in [*reversed(plan[:-1]), self.base_channels]:
                layers += [nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1), nn.SiLU()]
                in_channels = out_channels
        layers.append(nn.Conv2d(in_channels, c, 3, padding=1))
        self.decoder = nn.Sequential(*layers)  # code -> logits


class DenoisingAutoencoder(ConvAutoencoder):
    """The default denoiser: the conv autoencoder with a 7x7x16 code, trained on noisy inputs against clean images."""

    kind = "dae"
    code_channels = 16
    noisy_inputs = True


class KerasConvAutoencoder(Autoencoder):
    """Preset: the Keras conv autoencoder, conv 3x3 + 2x2 max-pool stages 16-8-8 down to a 4x4x8 code on 28 px.

    Three stages of (conv 3x3 + ReLU + 2x2 max-pool, ceil mode) squeeze the image (28 -> 14 -> 7 -> 4
    on 28 px); the decoder mirrors them with nearest-neighbour upsampling to the encoder's exact sizes
    (4 -> 7 -> 14 -> 28), so any H, W works with no cropping and no checkerboard artefacts.
    The latent is the flattened bottleneck, so latent_dim = channels[-1] * ceil(H/8) * ceil(W/8)
    (128 on 28 px); config.latent_dim is ignored.
    """

    kind = "ae-keras"
    preset_of = "ae"
    default_lr_schedule = "constant"
    channels: ClassVar[tuple[int, ...]] = (16, 8, 8)

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


class KerasDenoisingAutoencoder(KerasConvAutoencoder):
    """Preset: the Keras denoising autoencoder, the same shape with channels 32-32-16, on noisy inputs."""

    kind = "dae-keras"
    preset_of = "dae"
    channels = (32, 32, 16)
    noisy_inputs = True
