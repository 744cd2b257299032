"""Log-densities for the VAEs, and the importance-sampled estimate of log p(x).

Every function returns one value per image, in nats, summed over pixels or latent dimensions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from genserve.training.models.vae import VAE

LOG_2PI = math.log(2 * math.pi)


def bernoulli_log_prob(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """log p(x|z) for per-pixel Bernoulli logits; images in [0, 1] (the BCE, negated and summed)."""
    bce = F.binary_cross_entropy_with_logits(logits, images, reduction="none")
    return -bce.flatten(1).sum(1)


def gaussian_log_prob(
    mean: torch.Tensor, images: torch.Tensor, log_sigma: torch.Tensor | float
) -> torch.Tensor:
    """log N(x; mean, sigma^2 I) with one scalar std, including the log-normaliser."""
    log_sigma = torch.as_tensor(log_sigma, dtype=mean.dtype, device=mean.device)
    z = (images - mean) * torch.exp(-log_sigma)
    per_pixel = -0.5 * z.square() - log_sigma - 0.5 * LOG_2PI
    return per_pixel.flatten(1).sum(1)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), analytically."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (z.square() + LOG_2PI).sum(-1)


@torch.no_grad()
def estimate_nll(
    model: VAE,
    images: torch.Tensor,
    k: int,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Importance-sampled -log p(x) per image, in nats (Burda et al. 2016, the IWAE bound).

    log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log k, z_k ~ q(z|x).
    k=1 is a one-sample estimate of the negative ELBO; the estimate only falls as k grows.
    At most about `batch_size` decoder evaluations run at once, so k=5000 fits in memory.
    Noise comes from `generator` (drawn on its device) or else from the global torch RNG.
    Returns a float32 tensor (N,) on the model's device.
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be at least 1, got k={k}, batch_size={batch_size}")
    device = model.device
    images_per_chunk = max(1, batch_size // k)
    samples_per_chunk = min(k, batch_size)
    nlls = []
    for x in images.to(device, torch.float32).split(images_per_chunk):
        mean, logvar = model.encoder(x)
        mean, logvar = mean.float(), logvar.float()
        std = torch.exp(0.5 * logvar)
        log_weights = []
        for start in range(0, k, samples_per_chunk):
            s = min(samples_per_chunk, k - start)
            shape = (s, *mean.shape)
            if generator is None:
                eps = torch.randn(shape, device=device)
            else:
                eps = torch.randn(shape, generator=generator, device=generator.device).to(device)
            z = mean + std * eps  # (s, b, latent)
            logits = model.decoder(z.flatten(0, 1)).float()
            targets = x.expand(s, *x.shape).flatten(0, 1)
            log_px_z = model.log_likelihood(logits, targets).view(s, -1)
            log_qz = -0.5 * (eps.square() + logvar + LOG_2PI).sum(-1)
            log_weights.append(log_px_z + standard_normal_log_prob(z) - log_qz)
        log_px = torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(k)
        nlls.append(-log_px)
    return torch.cat(nlls)
