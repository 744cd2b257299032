"""Parzen-window log-likelihood of test images under generated samples (Goodfellow et al. 2014,
Makhzani et al. 2015): an isotropic Gaussian of width sigma on every sample,

    log p(x) = logsumexp_i( -|x - s_i|^2 / (2 sigma^2) ) - log N - (D / 2) log(2 pi sigma^2)

in nats per image, with pixels in [0, 1]. sigma is the grid value with the highest mean log-likelihood
on a validation split. The estimate is known to be poor in high dimensions; it is reported because the
GAN and AAE papers do, and the numbers are comparable only at equal sample counts.

Distances are computed |x|^2 + |s|^2 - 2 x.s in chunks of test points, so 10k samples x 10k test images
of 784 pixels run in bounded memory on a CPU; every sigma of the grid reuses the same distances.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SIGMAS = tuple(float(s) for s in torch.logspace(-1.3, 0.0, 14).tolist())  # 0.05 .. 1 for pixels in [0, 1]
CHUNK_ELEMENTS = 4_000_000  # test points per chunk = this / number of samples


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.detach().flatten(1).float()


def parzen_log_likelihoods(
    samples: torch.Tensor, points: torch.Tensor, sigmas: Sequence[float] = SIGMAS
) -> torch.Tensor:
    """log p(point) under the Parzen window on `samples`, for each sigma: (len(sigmas), len(points)) in nats."""
    samples, points = _flat(samples), _flat(points).to(samples.device)
    if samples.shape[1] != points.shape[1]:
        raise ValueError(f"samples have {samples.shape[1]} values each but points have {points.shape[1]}")
    if len(samples) == 0 or len(points) == 0:
        raise ValueError("Parzen estimates need at least one sample and one point")
    if any(not s > 0 for s in sigmas):
        raise ValueError(f"Parzen window widths must be positive, got {list(sigmas)}")
    n, d = samples.shape
    sigma = torch.tensor(sigmas, dtype=torch.float64, device=samples.device)
    const = -math.log(n) - 0.5 * d * torch.log(2 * math.pi * sigma**2)  # (S,)
    sample_norms = samples.pow(2).sum(1)
    chunk = max(1, CHUNK_ELEMENTS // n)
    out = []
    for start in range(0, len(points), chunk):
        x = points[start : start + chunk]
        distances = (x.pow(2).sum(1, keepdim=True) + sample_norms - 2 * x @ samples.T).clamp_min(0).double()
        out.append(torch.stack([torch.logsumexp(-distances / (2 * s**2), dim=1) for s in sigma]) + const[:, None])
    return torch.cat(out, dim=1)


def select_sigma(samples: torch.Tensor, validation: torch.Tensor, sigmas: Sequence[float] = SIGMAS) -> float:
    """The window width with the highest mean validation log-likelihood."""
    scores = parzen_log_likelihoods(samples, validation, sigmas).mean(1)
    return float(sigmas[int(scores.argmax())])


def parzen_metrics(
    samples: torch.Tensor, validation: torch.Tensor, test: torch.Tensor, sigmas: Sequence[float] = SIGMAS
) -> dict[str, float | int]:
    """Mean test log-likelihood (nats per image) with its standard error, at the validation-chosen sigma."""
    sigma = select_sigma(samples, validation, sigmas)
    values = parzen_log_likelihoods(samples, test, [sigma])[0]
    stderr = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {
        "parzen_ll_nats": values.mean().item(),
        "parzen_ll_stderr_nats": stderr,
        "parzen_sigma": sigma,
        "parzen_samples": len(samples),
        "parzen_test_images": len(test),
        "parzen_validation_images": len(validation),
    }
