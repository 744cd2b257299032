"""Variational autoencoders: a dense VAE and the Keras-style convolutional VAE.

Both share `VAE`: a Gaussian encoder q(z|x), a decoder that returns per-pixel logits, a likelihood
p(x|z) picked by config.likelihood, and the negative ELBO (with optional beta and KL warm-up) as
the loss. Images are sigmoid(logits); every shape comes from image_shape (C, H, W).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from genserve.training.config import TrainConfig
from genserve.training.models.base import Batch, GenerativeModel, SigmoidOutput, StepContext
from genserve.training.models.likelihood import bernoulli_log_prob, gaussian_kl, gaussian_log_prob

MIN_LOG_SIGMA = -6.0  # floor of the learned decoder log-std, so the Gaussian NLL cannot run to -inf


class GaussianEncoder(nn.Module):
    """A feature body followed by mean and log-variance heads: images -> (mean, logvar)."""

    def __init__(self, body: nn.Module, features: int, latent_dim: int):
        super().__init__()
        self.body = body
        self.mean = nn.Linear(features, latent_dim)
        self.logvar = nn.Linear(features, latent_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(images)
        return self.mean(h), self.logvar(h)


class VAE(GenerativeModel):
    """Shared VAE logic. Subclasses set `self.encoder` (a GaussianEncoder) and `self.decoder`
    (latents -> logits (B, C, H, W)).

    config.likelihood: "bernoulli" (BCE with logits), "gaussian" (fixed std config.gaussian_sigma
    around sigmoid(logits)) or "gaussian-learned" (one learned log-std, starting at
    log(config.gaussian_sigma), floored at MIN_LOG_SIGMA). Gaussian log-densities include the
    normaliser, so every loss is in nats per image, summed over pixels.
    """

    encoder: GaussianEncoder
    decoder: nn.Module
    can_encode = True
    can_sample = True
    can_reconstruct = True
    metric_families = ("likelihood",)

    @classmethod
    def binarize_by_default(cls, config: TrainConfig) -> bool:
        """MNIST digits are near-binary and published NLLs binarise them, for a Bernoulli likelihood."""
        return config.dataset in ("mnist", "mnist-5k") and config.likelihood == "bernoulli"

    def initialize_from_data(self, mean_image: torch.Tensor) -> None:
        """Start the output bias at the data's mean logit log(p / (1 - p)), per pixel for a dense output,
        per channel for a conv one: the first steps then spend no effort learning the background."""
        layers = [m for m in self.decoder.modules() if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)]
        bias = layers[-1].bias if layers else None  # the layer that produces the logits
        if bias is None:
            return
        p = mean_image.float().clamp(1e-3, 1 - 1e-3)
        if bias.numel() != p.numel():  # a conv output: one bias per channel
            p = p.flatten(1).mean(1)
        with torch.no_grad():
            bias.copy_(torch.log(p / (1 - p)).reshape(bias.shape).to(bias.device))

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__(image_shape, config, num_classes)
        self.likelihood = config.likelihood
        if self.likelihood == "gaussian-learned":
            self.log_sigma = nn.Parameter(torch.tensor(math.log(config.gaussian_sigma)))
        else:
            self.register_parameter("log_sigma", None)

    # --- the model --------------------------------------------------------------------------
    def reparameterize(self, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mean + std * eps with eps from the global torch RNG."""
        std = torch.exp(0.5 * logvar)
        return mean + std * torch.randn_like(std)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images -> (logits of one posterior sample, posterior mean, posterior log-variance)."""
        mean, logvar = self.encoder(inputs)
        z = self.reparameterize(mean.float(), logvar.float())
        return self.decoder(z), mean, logvar

    def log_likelihood(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per image, in nats."""
        if self.likelihood == "bernoulli":
            return bernoulli_log_prob(logits, images)
        if self.log_sigma is not None:
            log_sigma: torch.Tensor | float = self.log_sigma.clamp(min=MIN_LOG_SIGMA)
        else:
            log_sigma = math.log(self.config.gaussian_sigma)
        return gaussian_log_prob(torch.sigmoid(logits), images, log_sigma)

    def loss_terms(
        self, logits: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction NLL, KL) per image, in float32 nats."""
        recon = -self.log_likelihood(logits.float(), images)
        kl = gaussian_kl(mean.float(), logvar.float())
        return recon, kl

    def kl_weight(self, progress: float) -> float:
        """beta, ramped linearly from 0 over the first config.kl_warmup of training."""
        if self.config.kl_warmup > 0:
            return self.config.beta * min(1.0, progress / self.config.kl_warmup)
        return self.config.beta

    # --- training ---------------------------------------------------------------------------
    def train_step(
        self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        optimizer = optimizers["model"]
        with ctx.autocast():
            logits, mean, logvar = self(batch.inputs)
        recon, kl = self.loss_terms(logits, mean, logvar, batch.images)
        weight = self.kl_weight(ctx.progress)
        loss = (recon + weight * kl).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {
            "loss": loss.detach(),
            "recon": recon.detach().mean(),
            "kl": kl.detach().mean(),
            "kl_weight": torch.tensor(weight, device=loss.device),
        }

    @torch.no_grad()
    def eval_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The negative ELBO (beta=1, no warm-up) in nats per image, from one posterior sample."""
        logits, mean, logvar = self(batch.inputs)
        recon, kl = self.loss_terms(logits, mean, logvar, batch.images)
        return {"loss": (recon + kl).mean(), "recon": recon.mean(), "kl": kl.mean()}

    # --- capabilities -----------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(latents))

    def servable_parts(self) -> dict[str, nn.Module]:
        """encoder: images -> (mean, logvar); decoder: latents -> images in [0, 1]."""
        return {"encoder": self.encoder, "decoder": SigmoidOutput(self.decoder)}


class DenseVAE(VAE):
    """Fully connected VAE (the default dense recipe): D -> 512 -> 256 -> (mean, logvar) of a 32-d latent;
    z -> 256 -> 512 -> D logits. ReLU; output bias at the data's mean logit."""

    kind = "dense-vae"
    default_latent_dim = 32
    hidden: ClassVar[tuple[int, ...]] = (512, 256)

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__(image_shape, config, num_classes)
        pixels = math.prod(self.image_shape)
        sizes = [pixels, *self.hidden]
        body: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes, sizes[1:], strict=False):
            body += [nn.Linear(a, b), nn.ReLU()]
        self.encoder = GaussianEncoder(nn.Sequential(*body), sizes[-1], self.latent_dim)
        sizes = [self.latent_dim, *reversed(self.hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.decoder = nn.Sequential(*layers, nn.Linear(sizes[-1], pixels), nn.Unflatten(1, self.image_shape))


class CsnlDenseVAE(VAE):
    """Preset: the csnl dense VAE, D -> 420 -> 210 -> 105 -> 16-d latent; z -> 200 -> 400 -> 800 -> D."""

    kind = "dense-vae-csnl"
    preset_of = "dense-vae"
    default_latent_dim = 16
    default_lr_schedule = "constant"

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__(image_shape, config, num_classes)
        pixels = math.prod(self.image_shape)
        body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(pixels, 420),
            nn.ReLU(),
            nn.Linear(420, 210),
            nn.ReLU(),
            nn.Linear(210, 105),
            nn.ReLU(),
        )
        self.encoder = GaussianEncoder(body, 105, self.latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(self.latent_dim, 200),
            nn.ReLU(),
            nn.Linear(200, 400),
            nn.ReLU(),
            nn.Linear(400, 800),
            nn.ReLU(),
            nn.Linear(800, pixels),
            nn.Unflatten(1, self.image_shape),
        )


class ResidualBlock(nn.Module):
    """x + conv3x3(act(conv3x3(act(x)))): a pre-activation residual block at constant shape."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def downsampling_plan(height: int, width: int, base_channels: int) -> list[int]:
    """Channels after each stride-2 stage: halve H and W while both are even and at least 14
    (28 -> 14 -> 7, 32 -> 16 -> 8, 64 -> 32 -> 16 -> 8), doubling channels from base_channels."""
    channels: list[int] = []
    while height % 2 == 0 and width % 2 == 0 and min(height, width) >= 14:
        channels.append(base_channels * 2 ** len(channels))
        height, width = height // 2, width // 2
    return channels


class ConvVAE(VAE):
    """The default convolutional VAE: strided convs, a residual block at the bottom, a 32-d latent.

    Encoder: one 4x4 stride-2 conv per halving (channels 32, 64, 128...; 28 -> 14 -> 7 on MNIST), a
    residual block, dense 256, (mean, logvar). Decoder: the mirror image, dense 256 to the feature map,
    a residual block, 4x4 stride-2 transposed convs back to H x W, a 3x3 conv to C logits whose bias
    starts at the data's mean logit. SiLU throughout. About 10 M multiply-adds per 28 px image.
    """

    kind = "vae"
    default_latent_dim = 32
    base_channels: ClassVar[int] = 32
    hidden: ClassVar[int] = 256

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__(image_shape, config, num_classes)
        c, h, w = self.image_shape
        plan = downsampling_plan(h, w, self.base_channels)
        down: list[nn.Module] = []
        in_channels = c
        for out_channels in plan:  # (B, C, H, W) -> (B, plan[-1], H / 2^n, W / 2^n)
            down += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.SiLU()]
            in_channels = out_channels
        if not plan:  # odd sizes: stay at full resolution
            down += [nn.Conv2d(c, self.base_channels, 3, padding=1), nn.SiLU()]
            in_channels = self.base_channels
        scale = 2 ** len(plan)
        feature_shape = (in_channels, h // scale, w // scale)
        features = math.prod(feature_shape)
        body = nn.Sequential(
            *down, ResidualBlock(in_channels), nn.SiLU(), nn.Flatten(), nn.Linear(features, self.hidden), nn.SiLU()
        )
        self.encoder = GaussianEncoder(body, self.hidden, self.latent_dim)

        up: list[nn.Module] = []
        for out_channels in [*reversed(plan[:-1]), self.base_channels][: len(plan)]:
            up += [nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1), nn.SiLU()]
            in_channels = out_channels
        self.decoder = nn.Sequential(
            nn.Linear(self.latent_dim, self.hidden),
            nn.SiLU(),
            nn.Linear(self.hidden, features),
            nn.Unflatten(1, feature_shape),
            ResidualBlock(feature_shape[0]),
            nn.SiLU(),
            *up,
            nn.Conv2d(in_channels, c, 3, padding=1),
        )


class KerasConvVAE(VAE):
    """Preset: the Keras (Chollet) convolutional VAE with a 2-d latent.

    Encoder: conv 32, conv 64 stride 2, conv 64, conv 64 (3x3, same), dense 32, (mean, logvar).
    Decoder: dense to the encoder's feature map, transposed conv stride 2 to 32, conv 3x3 to C.
    """

    kind = "vae-keras"
    preset_of = "vae"
    default_latent_dim = 2
    default_lr_schedule = "constant"

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__(image_shape, config, num_classes)
        c, h, w = self.image_shape
        convs = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
        )
        with torch.no_grad():
            feature_shape = tuple(convs(torch.zeros(1, c, h, w)).shape[1:])  # (64, ceil(H/2), ceil(W/2))
        features = math.prod(feature_shape)
        body = nn.Sequential(convs, nn.Flatten(), nn.Linear(features, 32), nn.ReLU())
        self.encoder = GaussianEncoder(body, 32, self.latent_dim)

        # A stride-2 transposed conv maps size s to 2s - 1 + output_padding; pad back to H, W
        # (1 for even sizes, 0 for odd ones, which the stride-2 conv rounded up).
        _, fh, fw = feature_shape
        output_padding = (h - 2 * fh + 1, w - 2 * fw + 1)
        self.decoder = nn.Sequential(
            nn.Linear(self.latent_dim, features),
            nn.ReLU(),
            nn.Unflatten(1, feature_shape),
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=output_padding),
            nn.ReLU(),
            nn.Conv2d(32, c, 3, padding=1),
        )
