"""Adversarial autoencoder (Makhzani et al. 2015).

An autoencoder whose codes are pushed towards a chosen prior p(z) by a discriminator on the latent
space, instead of a KL term. Each training step has two phases on the same batch:

    (1) reconstruction   encoder + decoder minimise the reconstruction loss
    (2) regularisation   the discriminator learns to tell prior samples (real) from codes (fake),
                         then the encoder is updated to fool it (non-saturating BCE against "real")

Parts are the paper's MNIST networks: encoder C*H*W -> 1000 -> 1000 -> latent_dim, decoder
latent_dim -> 1000 -> 1000 -> C*H*W, discriminator latent_dim -> 1000 -> 1000 -> 1, all ReLU.
Reconstruction loss: per-pixel binary cross-entropy (config.likelihood "bernoulli") or mean squared
error ("gaussian"), averaged over pixels. Priors are in priors.py (config.prior, config.prior_std).
With config.supervised_prior (mixture prior, labelled data), component i is tied to class i: the
prior sample for an image of class y is drawn from component y, and the discriminator sees a one-hot
label beside every code, as in the paper's section 2.3.

Losses: recon, d_loss, g_loss (the encoder's regularisation loss), d_real (mean D on prior samples),
d_fake (mean D on codes), and loss = recon + d_loss + g_loss, finite exactly when all three are, so
the trainer's NaN guard sees every phase (it is also what picks the "best" checkpoint).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genserve.training.config import TrainConfig
from genserve.training.models.base import Batch, GenerativeModel, SigmoidOutput, StepContext
from genserve.training.models.gan import adversarial_report, bce
from genserve.training.models.priors import Prior, build_prior

HIDDEN = 1000
EVAL_PRIOR_SEED = 4321


def mlp(sizes: list[int]) -> list[nn.Module]:
    """Linear layers between consecutive sizes, ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return layers


class AdversarialAutoencoder(GenerativeModel):
    """Adversarial autoencoder (Makhzani et al. 2015): 1000-1000 MLPs, a latent matched to a std-5 Gaussian prior."""

    kind = "aae"
    default_lr = 2e-4
    default_beta1 = 0.5
    default_latent_dim = 8
    default_lr_schedule = "constant"
    can_encode = True
    can_sample = True
    can_reconstruct = True
    adversarial = True
    selection_metric = "fid_domain"
    metric_families = ("reconstruction", "samples")

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__(image_shape, config, num_classes)
        if config.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"aae reconstructs with likelihood 'bernoulli' (BCE) or 'gaussian' (MSE), not {config.likelihood!r}")
        self.prior: Prior = build_prior(config, self.latent_dim, num_classes)
        self.supervised = config.supervised_prior
        pixels = math.prod(self.image_shape)
        label_dim = num_classes if self.supervised else 0

        self.encoder = nn.Sequential(nn.Flatten(), *mlp([pixels, HIDDEN, HIDDEN, self.latent_dim]))
        self.decoder = nn.Sequential(*mlp([self.latent_dim, HIDDEN, HIDDEN, pixels]), nn.Unflatten(1, self.image_shape))
        self.discriminator = nn.Sequential(*mlp([self.latent_dim + label_dim, HIDDEN, HIDDEN, 1]))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {
            "autoencoder": self.adam([*self.encoder.parameters(), *self.decoder.parameters()]),
            "discriminator": self.adam(self.discriminator.parameters()),
            "encoder": self.adam(self.encoder.parameters()),
        }

    # --- the model --------------------------------------------------------------------------
    def recon_loss(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.config.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(logits, images)
        return F.mse_loss(torch.sigmoid(logits), images)

    def critic(self, codes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Discriminator logits for codes; with a supervised prior the one-hot label goes beside each code."""
        if self.supervised:
            if labels is None:
                raise ValueError("aae with supervised_prior needs labelled batches")
            codes = torch.cat([codes, F.one_hot(labels, self.num_classes).to(codes.dtype)], dim=1)
        return self.discriminator(codes)

    def prior_codes(self, n: int, labels: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prior draws on the model's device; with a supervised prior, from each label's component."""
        return self.prior.sample(n, generator, labels if self.supervised else None).to(self.device)

    # --- training ---------------------------------------------------------------------------
    def train_step(
        self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        images, labels = batch.images, batch.labels

        # (1) Reconstruction: encoder and decoder
        with ctx.autocast():
            logits = self.decoder(self.encoder(batch.inputs))
        recon = self.recon_loss(logits, images)
        optimizers["autoencoder"].zero_grad(set_to_none=True)
        recon.backward()
        optimizers["autoencoder"].step()

        # (2a) Regularisation, discriminator: prior samples are real, codes are fake
        real_codes = self.prior_codes(len(images), labels)
        with ctx.autocast():
            codes = self.encoder(batch.inputs)
            real_logits = self.critic(real_codes, labels)
            fake_logits = self.critic(codes.detach(), labels)
        d_loss = bce(real_logits, 1.0) + bce(fake_logits, 0.0)
        optimizers["discriminator"].zero_grad(set_to_none=True)
        d_loss.backward()
        optimizers["discriminator"].step()

        # (2b) Regularisation, encoder as generator: make the codes pass for prior samples
        with ctx.autocast():
            g_logits = self.critic(codes, labels)
        g_loss = bce(g_logits, 1.0)
        optimizers["encoder"].zero_grad(set_to_none=True)
        g_loss.backward()
        optimizers["encoder"].step()

        return adversarial_report(d_loss, g_loss, real_logits, fake_logits, recon)

    @torch.no_grad()
    def eval_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The step's losses on a test batch, with the same prior draws for every call and no updates."""
        codes = self.encoder(batch.inputs)
        recon = self.recon_loss(self.decoder(codes), batch.images)
        generator = torch.Generator().manual_seed(EVAL_PRIOR_SEED)
        real_logits = self.critic(self.prior_codes(len(codes), batch.labels, generator), batch.labels)
        fake_logits = self.critic(codes, batch.labels)
        d_loss = bce(real_logits, 1.0) + bce(fake_logits, 0.0)
        return adversarial_report(d_loss, bce(fake_logits, 1.0), real_logits, fake_logits, recon)

    # --- capabilities -----------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(latents))

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws from the prior (for the supervised mixture: from components chosen uniformly)."""
        return self.prior.sample(n, generator).to(self.device)

    def prior_spec(self) -> dict[str, object]:
        return self.prior.spec()

    def servable_parts(self) -> dict[str, nn.Module]:
        """encoder: images -> codes (B, latent_dim); decoder: codes -> images in [0, 1]."""
        return {"encoder": self.encoder, "decoder": SigmoidOutput(self.decoder)}
