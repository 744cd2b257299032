"""Generative adversarial networks: the shared two-player step, and the fully connected GANs.

`GAN` holds what every GAN kind shares (dcgan.py subclasses it): a generator G from noise to images
in [-1, 1] (tanh), a discriminator D from images in [-1, 1] to one logit, two Adam optimizers, and
one training step that updates D, then G, as in pytorch/examples dcgan/main.py:

    (1) D: maximise log D(x) + log(1 - D(G(z)))   binary cross-entropy, real = real_label, fake = 0
    (2) G: maximise log D(G(z))                    the non-saturating loss: BCE of D(G(z)) against 1

The default recipes add what the literature found to stabilise that game (each a class attribute):
spectral normalisation of D's layers (Miyato et al. 2018), two time-scale learning rates (D at
d_lr_scale times G's; Heusel et al. 2017), one-sided label smoothing (real_label < 1; Salimans et al.
2016), and an exponential moving average of G's weights (ema_decay; Yazici et al. 2019), which is the
generator that samples, is measured, and is exported. The presets keep the seeds' plain recipes.

Batches hold images in [0, 1]; they are mapped to [-1, 1] for D. decode() and sample() map G's tanh
output back to [0, 1]. The noise z ~ N(0, I) of config.noise_dim is the model's latent.

Losses per step (and per test batch, without updates):
    d_loss  D's loss, summed over its real and fake halves
    g_loss  G's non-saturating loss (after D's update in training)
    d_real  mean D(x), d_fake  mean D(G(z)) (both before D's update), probabilities in [0, 1]
    loss    d_loss + g_loss: not a quantity either player minimises, but finite exactly when both
            losses are, so the trainer's NaN guard watches both players through it.
With balance (config.balance, else the kind's default_balance), a player whose loss is less than half
the other's skips its update this step (d_skipped / g_skipped are 1 when it did).
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from genserve.training.config import TrainConfig
from genserve.training.models.base import Batch, GenerativeModel, StepContext

EVAL_NOISE_SEED = 1234  # test losses use the same noise at every epoch, so they are comparable
STATISTICS_NOISE_SEED = 4321  # the noise that recomputes the averaged generator's batch-norm statistics
STATISTICS_BATCHES = 32  # batches of STATISTICS_BATCH noise vectors for those statistics
STATISTICS_BATCH = 128


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


def adversarial_report(
    d_loss: torch.Tensor, g_loss: torch.Tensor, real_logits: torch.Tensor, fake_logits: torch.Tensor,
    recon: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A step's losses as the trainer logs them: the total, the reconstruction (an AAE's), both
    players' losses, and the critic's mean belief that real and fake inputs are real."""
    d_loss, g_loss = d_loss.detach(), g_loss.detach()
    if recon is None:
        total, recon_part = d_loss + g_loss, {}
    else:
        recon = recon.detach()
        total, recon_part = recon + d_loss + g_loss, {"recon": recon}
    return {
        "loss": total,
        **recon_part,
        "d_loss": d_loss,
        "g_loss": g_loss,
        "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
        "d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
    }


class MinibatchStdDev(nn.Module):
    """Appends one feature (a column, or a map for images): the standard deviation of each feature
    across the batch, averaged (Karras et al. 2018). D can then tell a batch that lacks variety, which
    counters mode collapse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = x.float().std(dim=0, unbiased=False).mean().to(x.dtype)  # one number for the batch
        return torch.cat([x, std.expand(x.shape[0], 1, *x.shape[2:])], dim=1)


class GAN(GenerativeModel):
    """Shared GAN logic. Subclasses build `generator` (noise (B, noise_dim) -> images in [-1, 1]) and
    `discriminator` (images in [-1, 1] -> logits (B, 1)) in build_generator / build_discriminator."""

    generator: nn.Module
    discriminator: nn.Module
    generator_ema: nn.Module | None
    default_lr = 2e-4
    default_beta1 = 0.5
    default_lr_schedule = "constant"
    can_sample = True
    adversarial = True
    selection_metric = "fid_domain"
    metric_families = ("samples",)
    # The recipe (the defaults; presets switch these off):
    spectral_norm: ClassVar[bool] = True  # spectral normalisation of every D layer with weights
    d_lr_scale: ClassVar[float] = 2.0  # D's learning rate over G's (two time-scale update rule)
    real_label: ClassVar[float] = 1.0  # target for real images in D's loss (< 1: one-sided smoothing)
    ema_decay: ClassVar[float | None] = 0.999  # EMA of G's weights, the generator that samples; None: off
    default_balance: ClassVar[bool] = False
    minibatch_std: ClassVar[bool] = False  # a minibatch standard-deviation feature before D's last layer

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
        self.balance = config.balance if config.balance is not None else self.default_balance
        self.generator = self.build_generator()
        self.discriminator = self.build_discriminator()
        if self.spectral_norm:
            for module in list(self.discriminator.modules()):
                if isinstance(module, nn.Linear | nn.Conv2d):
                    spectral_norm(module)
        # The averaged generator is a frozen copy, updated after every G step; it is checkpointed with
        # the model, and it is what sample(), the metrics and the exported graph use.
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False) if self.ema_decay else None

    def build_generator(self) -> nn.Module:
        raise NotImplementedError

    def build_discriminator(self) -> nn.Module:
        raise NotImplementedError

    def train(self, mode: bool = True) -> GAN:
        super().train(mode)
        if self.generator_ema is not None:
            self.generator_ema.eval()  # batch norm in the averaged G always uses its copied statistics
        return self

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {
            "generator": self.adam(self.generator.parameters()),
            "discriminator": self.adam(self.discriminator.parameters(), lr_scale=self.d_lr_scale),
        }

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """ema <- decay * ema + (1 - decay) * G, with the decay ramped up over the first steps (so the
        average does not remember the random start). Batch-norm statistics are not averaged: they
        belong to the live weights, and end_of_epoch() recomputes them for the averaged ones."""
        if self.generator_ema is None:
            return
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        for averaged, live in zip(self.generator_ema.parameters(), self.generator.parameters(), strict=True):
            averaged.lerp_(live.detach(), 1 - decay)

    @torch.no_grad()
    def end_of_epoch(self) -> None:
        """Recompute the averaged generator's batch-norm statistics from its own activations (the
        "standing statistics" of Brock et al. 2019): copied from the live generator they would not
        match the averaged weights, and its samples would be worse than the live ones. Fixed noise, so
        the result is the same on every run and the global RNG is untouched."""
        norms = [m for m in (self.generator_ema or nn.Module()).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        generator = torch.Generator().manual_seed(STATISTICS_NOISE_SEED)
        self.generator_ema.train()
        for _ in range(STATISTICS_BATCHES):
            self.generator_ema(self.noise(STATISTICS_BATCH, generator))
        self.generator_ema.eval()
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum

    @property
    def sampler(self) -> nn.Module:
        """The generator that samples: the weight average when there is one."""
        return self.generator_ema if self.generator_ema is not None else self.generator

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
        d_loss = bce(real_logits, self.real_label) + bce(fake_logits, 0.0)
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
            # Gradients for G's weights only: D's would be thrown away by its next step. Skipping them
            # saves 8 % of a default dcgan step's FLOPs (161 -> 148 MFLOP per image, FlopCounterMode).
            g_loss.backward(inputs=list(self.generator.parameters()))
            optimizers["generator"].step()
            self.update_ema(ctx.step)
        else:
            g_loss = g_loss_before

        losses = adversarial_report(d_loss, g_loss, real_logits, fake_logits)
        if self.balance:
            device = d_loss.device
            losses["d_skipped"] = torch.tensor(float(not update_d), device=device)
            losses["g_skipped"] = torch.tensor(float(not update_g), device=device)
        return losses

    def players_to_update(self, d_loss: torch.Tensor, g_loss: torch.Tensor) -> tuple[bool, bool]:
        """(update D, update G): both, unless balancing and one player's loss is under half the other's."""
        if not self.balance:
            return True, True
        d, g = d_loss.item(), g_loss.item()
        return not d < 0.5 * g, not g < 0.5 * d

    @torch.no_grad()
    def eval_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The step's losses on a test batch, with the same noise for every call and no updates."""
        real = batch.images * 2 - 1
        noise = self.noise(len(real), torch.Generator().manual_seed(EVAL_NOISE_SEED))
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(self.generator(noise))
        d_loss = bce(real_logits, 1.0) + bce(fake_logits, 0.0)
        return adversarial_report(d_loss, bce(fake_logits, 1.0), real_logits, fake_logits)

    # --- capabilities -----------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Noise -> images in [0, 1], from the averaged generator where there is one."""
        return (self.sampler(latents) + 1) / 2

    def servable_parts(self) -> dict[str, nn.Module]:
        """generator: noise (B, noise_dim) -> images in [0, 1] (the averaged generator where there is one)."""
        return {"generator": ImageGenerator(self.sampler)}


class MLPGAN(GAN):
    """The default fully connected GAN: batch-normed MLP G, spectrally normalised MLP D, EMA of G.

    G: noise 100 -> 256 -> 512 -> 1024 -> C*H*W, batch norm and LeakyReLU 0.2 after each hidden layer, tanh.
    D: C*H*W -> 1024 -> 512 -> 256 -> 1, LeakyReLU 0.2 and dropout 0.3 after each hidden layer, a
    minibatch standard-deviation feature before the last layer, spectral norm on every layer; D learns
    at twice G's rate; real labels smoothed to 0.9.
    """

    kind = "gan"
    real_label = 0.9
    minibatch_std = True
    hidden: ClassVar[tuple[int, ...]] = (256, 512, 1024)
    generator_norm: ClassVar[bool] = True

    def build_generator(self) -> nn.Module:
        pixels = math.prod(self.image_shape)
        layers: list[nn.Module] = []
        sizes = [self.latent_dim, *self.hidden]
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            layers.append(nn.Linear(a, b))
            if self.generator_norm and i > 0:  # not on the first layer, as in DCGAN's rules
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.LeakyReLU(0.2))
        return nn.Sequential(*layers, nn.Linear(sizes[-1], pixels), nn.Tanh(), nn.Unflatten(1, self.image_shape))

    def build_discriminator(self) -> nn.Module:
        pixels = math.prod(self.image_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        sizes = [pixels, *reversed(self.hidden)]
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2), nn.Dropout(0.3)]
        if self.minibatch_std:
            layers.append(MinibatchStdDev())
        return nn.Sequential(*layers, nn.Linear(sizes[-1] + int(self.minibatch_std), 1))


class BalancedMLPGAN(MLPGAN):
    """Preset: the classic MLP GAN (Goodfellow et al. 2014's MNIST setup) with the D/G balance rule.

    G: noise 100 -> 256 -> 512 -> 1024 -> C*H*W, LeakyReLU 0.2, tanh output.
    D: C*H*W -> 1024 -> 512 -> 256 -> 1, LeakyReLU 0.2 and dropout 0.3 after each hidden layer.
    One learning rate, hard labels, no spectral norm, no weight average; balance on.
    """

    kind = "gan-balanced"
    preset_of = "gan"
    spectral_norm = False
    d_lr_scale = 1.0
    real_label = 1.0
    ema_decay = None
    default_balance = True
    generator_norm = False
    minibatch_std = False
