"""Generative adversarial networks: the shared two-player step, and the classic fully connected GAN.

`GAN` holds what every GAN kind shares (dcgan.py subclasses it): a generator G from noise to images
in [-1, 1] (tanh), a discriminator D from images in [-1, 1] to one logit, two Adam optimizers, and
one training step that updates D, then G, as in pytorch/examples dcgan/main.py:

    (1) D: maximise log D(x) + log(1 - D(G(z)))   binary cross-entropy, real = 1, fake = 0
    (2) G: maximise log D(G(z))                    the non-saturating loss: BCE of D(G(z)) against 1

Batches hold images in [0, 1]; they are mapped to [-1, 1] for D. decode() and sample() map G's tanh
output back to [0, 1]. The noise z ~ N(0, I) of config.noise_dim is the model's latent.

Losses per step (and per test batch, without updates):
    d_loss  D's loss, summed over its real and fake halves
    g_loss  G's non-saturating loss (after D's update in training)
    d_real  mean D(x), d_fake  mean D(G(z)) (both before D's update), probabilities in [0, 1]
    loss    d_loss + g_loss: not a quantity either player minimises, but finite exactly when both
            losses are, so the trainer's NaN guard watches both players through it.
With config.balance, a player whose loss is less than half the other's skips its update this step
(d_skipped / g_skipped are 1 when it did).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainConfig
from training.models.base import Batch, GenerativeModel, StepContext

EVAL_NOISE_SEED = 1234  # test losses use the same noise at every epoch, so they are comparable


class ImageGenerator(nn.Module):
    """G followed by (x + 1) / 2: noise -> images in [0, 1] (the served generator)."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return (self.generator(noise) + 1) / 2


def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Mean binary cross-entropy of logits against a constant label (1 = real, 0 = fake), in float32."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


class GAN(GenerativeModel):
    """Shared GAN logic. Subclasses set `self.generator` (noise (B, noise_dim) -> images in [-1, 1])
    and `self.discriminator` (images in [-1, 1] -> logits (B, 1))."""

    generator: nn.Module
    discriminator: nn.Module
    default_lr = 2e-4
    default_beta1 = 0.5
    can_sample = True

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__(image_shape, config, num_classes)
        if config.noise_dim < 1:
            raise ValueError(f"noise_dim must be at least 1, got {config.noise_dim}")
        if config.latent_dim is not None and config.latent_dim != config.noise_dim:
            raise ValueError(
                f"{self.kind}: the latent is the generator's noise; set its size with noise_dim "
                f"(--noise-dim), not latent_dim ({config.latent_dim})"
            )
        self.latent_dim = config.noise_dim

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        lr = self.config.lr or self.default_lr
        beta1 = self.config.adam_beta1 if self.config.adam_beta1 is not None else self.default_beta1
        return {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(beta1, 0.999)),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(beta1, 0.999)),
        }

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.prior_sample(n, generator)

    # --- training ---------------------------------------------------------------------------
    def train_step(
        self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        real = batch.images * 2 - 1
        noise = torch.randn(len(real), self.latent_dim, device=real.device)

        # (1) Update D: maximise log D(x) + log(1 - D(G(z)))
        with ctx.autocast():
            fake = self.generator(noise)
            real_logits = self.discriminator(real)
            fake_logits = self.discriminator(fake.detach())
        d_loss = bce(real_logits, 1.0) + bce(fake_logits, 0.0)
        g_loss_before = bce(fake_logits.detach(), 1.0)  # G's loss against the current D, for balance
        update_d, update_g = self.players_to_update(d_loss.detach(), g_loss_before)
        if update_d:
            optimizers["discriminator"].zero_grad(set_to_none=True)
            d_loss.backward()
            optimizers["discriminator"].step()

        # (2) Update G: maximise log D(G(z))
        if update_g:
            with ctx.autocast():
                g_logits = self.discriminator(fake)
            g_loss = bce(g_logits, 1.0)
            optimizers["generator"].zero_grad(set_to_none=True)
            g_loss.backward()
            optimizers["generator"].step()
        else:
            g_loss = g_loss_before

        losses = self.report(d_loss, g_loss, real_logits, fake_logits)
        if self.config.balance:
            device = d_loss.device
            losses["d_skipped"] = torch.tensor(float(not update_d), device=device)
            losses["g_skipped"] = torch.tensor(float(not update_g), device=device)
        return losses

    def players_to_update(self, d_loss: torch.Tensor, g_loss: torch.Tensor) -> tuple[bool, bool]:
        """(update D, update G): both, unless config.balance and one player's loss is under half the other's."""
        if not self.config.balance:
            return True, True
        d, g = d_loss.item(), g_loss.item()
        return not d < 0.5 * g, not g < 0.5 * d

    @staticmethod
    def report(
        d_loss: torch.Tensor, g_loss: torch.Tensor, real_logits: torch.Tensor, fake_logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        d_loss, g_loss = d_loss.detach(), g_loss.detach()
        return {
            "loss": d_loss + g_loss,
            "d_loss": d_loss,
            "g_loss": g_loss,
            "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
        }

    @torch.no_grad()
    def eval_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The step's losses on a test batch, with the same noise for every call and no updates."""
        real = batch.images * 2 - 1
        noise = self.noise(len(real), torch.Generator().manual_seed(EVAL_NOISE_SEED))
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(self.generator(noise))
        d_loss = bce(real_logits, 1.0) + bce(fake_logits, 0.0)
        return self.report(d_loss, bce(fake_logits, 1.0), real_logits, fake_logits)

    # --- capabilities -----------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Noise -> images in [0, 1]."""
        return (self.generator(latents) + 1) / 2

    def servable_parts(self) -> dict[str, nn.Module]:
        """generator: noise (B, noise_dim) -> images in [0, 1]."""
        return {"generator": ImageGenerator(self.generator)}


class FullyConnectedGAN(GAN):
    """The classic GAN with fully connected players (as in Goodfellow et al. 2014's MNIST setup).

    G: noise 100 -> 256 -> 512 -> 1024 -> C*H*W, LeakyReLU 0.2, tanh output.
    D: C*H*W -> 1024 -> 512 -> 256 -> 1, LeakyReLU 0.2 and dropout 0.3 after each hidden layer.
    """

    kind = "gan"

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__(image_shape, config, num_classes)
        pixels = math.prod(self.image_shape)
        self.generator = nn.Sequential(
            nn.Linear(self.latent_dim, 256),
            nn.LeakyReLU(0.2),
            nn.Linear(256, 512),
            nn.LeakyReLU(0.2),
            nn.Linear(512, 1024),
            nn.LeakyReLU(0.2),
            nn.Linear(1024, pixels),
            nn.Tanh(),
            nn.Unflatten(1, self.image_shape),
        )
        self.discriminator = nn.Sequential(
            nn.Flatten(),
            nn.Linear(pixels, 1024),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.3),
            nn.Linear(1024, 512),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.3),
            nn.Linear(512, 256),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.3),
            nn.Linear(256, 1),
        )
