"""Variational autoencoders: a dense VAE and the Keras-style convolutional VAE.

Both share `VAE`: a Gaussian encoder q(z|x), a decoder that returns per-pixel logits, a likelihood
p(x|z) picked by config.likelihood, and the negative ELBO (with optional beta and KL warm-up) as
the loss. Images are sigmoid(logits); every shape comes from image_shape (C, H, W).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import TrainConfig
from training.models.base import Batch, GenerativeModel, StepContext
from training.models.likelihood import bernoulli_log_prob, gaussian_kl, gaussian_log_prob

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


class ImageDecoder(nn.Module):
    """A logits decoder followed by a sigmoid: latents -> images in [0, 1] (the served decoder)."""

    def __init__(self, logits_decoder: nn.Module):
        super().__init__()
        self.logits_decoder = logits_decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits_decoder(latents))


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
        return {"encoder": self.encoder, "decoder": ImageDecoder(self.decoder)}


class DenseVAE(VAE):
    """Fully connected VAE: D -> 420 -> 210 -> 105 -> (mean, logvar); z -> 200 -> 400 -> 800 -> D."""

    kind = "dense-vae"
    default_latent_dim = 16

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


class ConvVAE(VAE):
    """The Keras (Chollet) convolutional VAE.

    Encoder: conv 32, conv 64 stride 2, conv 64, conv 64 (3x3, same), dense 32, (mean, logvar).
    Decoder: dense to the encoder's feature map, transposed conv stride 2 to 32, conv 3x3 to C.
    """

    kind = "vae"
    default_latent_dim = 16

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
