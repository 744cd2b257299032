"""Latent arithmetic in numpy, never inside a graph: prior sampling, reparameterisation, interpolation.

Every random draw comes from numpy.random.Generator(PCG64(seed)) in float64 and is cast to float32
at the end, so a seed and a manifest's prior spec give the same latents on every machine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from genserve.serving.errors import FailedPrecondition

PRIOR_DISTRIBUTIONS = ("normal", "uniform", "gaussian_mixture")


def rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def check_prior(prior: dict[str, Any]) -> None:
    """Raise FailedPrecondition unless `prior` is a spec this server can sample."""
    distribution = prior.get("distribution")
    if distribution not in PRIOR_DISTRIBUTIONS:
        raise FailedPrecondition(
            f"the model's prior {distribution!r} cannot be sampled by this server "
            f"(it samples {', '.join(PRIOR_DISTRIBUTIONS)}); pass latents instead"
        )


def sample_prior(prior: dict[str, Any], count: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """`count` draws (count, dim) float32 from a manifest prior spec.

    temperature scales the spread around the prior's center: the std (normal), the half-width
    (uniform) or the component std (gaussian_mixture; components are chosen as usual).
    """
    check_prior(prior)
    dim = int(prior["dim"])
    generator = rng(seed)
    distribution = prior["distribution"]
    if distribution == "normal":
        mean = np.asarray(prior.get("mean", 0.0), dtype=np.float64)
        std = np.asarray(prior.get("std", 1.0), dtype=np.float64)
        z = mean + temperature * std * generator.standard_normal((count, dim))
    elif distribution == "uniform":
        low = np.asarray(prior["low"], dtype=np.float64)
        high = np.asarray(prior["high"], dtype=np.float64)
        center, half = (low + high) / 2, (high - low) / 2
        z = center + temperature * half * generator.uniform(-1.0, 1.0, (count, dim))
    else:
        weights = np.asarray(prior["weights"], dtype=np.float64)
        means = np.asarray(prior["means"], dtype=np.float64)
        components = generator.choice(len(weights), size=count, p=weights / weights.sum())
        z = means[components] + temperature * float(prior["std"]) * generator.standard_normal((count, dim))
    return np.ascontiguousarray(z, dtype=np.float32)


def sample_posterior(mean: np.ndarray, logvar: np.ndarray, seed: int) -> np.ndarray:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) from PCG64(seed); float32."""
    eps = rng(seed).standard_normal(mean.shape)
    z = mean.astype(np.float64) + np.exp(0.5 * logvar.astype(np.float64)) * eps
    return z.astype(np.float32)


def interpolate(start: np.ndarray, end: np.ndarray, steps: int, spherical: bool = False) -> np.ndarray:
    """`steps` points from start to end (both included), (steps, dim) float32.

    spherical: Shoemake's slerp of the vectors, falling back to linear where they are (anti)parallel
    or one is zero.
    """
    a, b = start.astype(np.float64), end.astype(np.float64)
    t = np.linspace(0.0, 1.0, steps)[:, None]
    if spherical:
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na > 0 and nb > 0:
            omega = np.arccos(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))
            sin_omega = np.sin(omega)
            if sin_omega > 1e-6:
                path = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / sin_omega
                return path.astype(np.float32)
    return ((1 - t) * a + t * b).astype(np.float32)
