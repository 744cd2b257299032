"""Latent priors for the adversarial autoencoder: what the discriminator learns to tell from the codes.

Each prior samples with torch (training, pictures), describes itself as plain JSON (the export
manifest: a server samples it with numpy alone), and gives marginal densities with numpy (pictures).

    gaussian  N(0, std^2 I), std = config.prior_std
    uniform   U[-half_width, half_width]^dim, half_width = config.prior_std
    mixture   k isotropic Gaussians with means evenly spaced on a circle of radius config.prior_std in
              the first two latent dimensions (0 in the others), each of std radius / 10, equal weights.
              k = the number of classes with config.supervised_prior (component i <-> class i), else 10.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from genserve.training.config import TrainConfig

PRIORS = ("gaussian", "uniform", "mixture")
DEFAULT_COMPONENTS = 10
COMPONENT_STD_FRACTION = 0.1  # mixture component std as a fraction of the circle's radius


class Prior:
    """Base class: `dim`-dimensional latent prior."""

    name: str

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"a prior needs at least one latent dimension, got {dim}")
        self.dim = dim

    def sample(
        self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """n draws (n, dim) on the CPU. `labels` (n,) picks mixture components; other priors ignore it."""
        raise NotImplementedError

    def spec(self) -> dict[str, object]:
        """Plain JSON: the distribution name, its parameters and dim."""
        raise NotImplementedError

    def marginal_density(self, points: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
        """Density of the marginal over latent dimensions `dims` at points (M, len(dims))."""
        raise NotImplementedError


def _normal_pdf(x: np.ndarray, mean: float | np.ndarray, std: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


class GaussianPrior(Prior):
    name = "gaussian"

    def __init__(self, dim: int, std: float):
        super().__init__(dim)
        if not std > 0:
            raise ValueError(f"prior_std must be positive, got {std}")
        self.std = float(std)

    def sample(self, n, generator=None, labels=None):
        return self.std * torch.randn(n, self.dim, generator=generator)

    def spec(self):
        return {"distribution": "normal", "mean": 0.0, "std": self.std, "dim": self.dim}

    def marginal_density(self, points, dims):
        return np.prod(_normal_pdf(np.asarray(points, dtype=np.float64), 0.0, self.std), axis=1)


class UniformPrior(Prior):
    name = "uniform"

    def __init__(self, dim: int, half_width: float):
        super().__init__(dim)
        if not half_width > 0:
            raise ValueError(f"prior_std (the uniform prior's half-width) must be positive, got {half_width}")
        self.half_width = float(half_width)

    def sample(self, n, generator=None, labels=None):
        return (2 * torch.rand(n, self.dim, generator=generator) - 1) * self.half_width

    def spec(self):
        return {"distribution": "uniform", "low": -self.half_width, "high": self.half_width, "dim": self.dim}

    def marginal_density(self, points, dims):
        points = np.asarray(points, dtype=np.float64)
        inside = np.all(np.abs(points) <= self.half_width, axis=1)
        return inside / (2 * self.half_width) ** points.shape[1]


class MixturePrior(Prior):
    name = "mixture"

    def __init__(self, dim: int, components: int, radius: float):
        super().__init__(dim)
        if dim < 2:
            raise ValueError("the mixture prior places its components on a circle: it needs latent_dim >= 2")
        if components < 2:
            raise ValueError(f"the mixture prior needs at least 2 components, got {components}")
        if not radius > 0:
            raise ValueError(f"prior_std (the mixture's radius) must be positive, got {radius}")
        self.components = components
        self.radius = float(radius)
        self.std = COMPONENT_STD_FRACTION * self.radius
        angles = 2 * math.pi * torch.arange(components, dtype=torch.float64) / components
        means = torch.zeros(components, dim, dtype=torch.float64)
        means[:, 0] = self.radius * torch.cos(angles)
        means[:, 1] = self.radius * torch.sin(angles)
        self.means = means.float()

    def sample(self, n, generator=None, labels=None):
        if labels is None:
            labels = torch.randint(self.components, (n,), generator=generator)
        else:
            labels = labels.cpu()
            if len(labels) != n or labels.min() < 0 or labels.max() >= self.components:
                raise ValueError(f"labels must be {n} component indices in [0, {self.components})")
        noise = torch.randn(n, self.dim, generator=generator)
        return self.means[labels] + self.std * noise

    def spec(self):
        return {
            "distribution": "gaussian_mixture",
            "weights": [1.0 / self.components] * self.components,
            "means": [[round(float(v), 12) for v in mean] for mean in self.means.double()],
            "std": self.std,
            "dim": self.dim,
        }

    def marginal_density(self, points, dims):
        points = np.asarray(points, dtype=np.float64)
        means = self.means.double().numpy()[:, list(dims)]  # (k, len(dims))
        per_component = np.prod(_normal_pdf(points[:, None, :], means[None], self.std), axis=2)  # (M, k)
        return per_component.mean(axis=1)


def build_prior(config: TrainConfig, dim: int, num_classes: int = 0) -> Prior:
    """The prior config.prior names, scaled by config.prior_std (see the module docstring)."""
    if config.supervised_prior and config.prior != "mixture":
        raise ValueError("supervised_prior ties mixture components to classes: it needs prior='mixture'")
    if config.prior == "gaussian":
        return GaussianPrior(dim, config.prior_std)
    if config.prior == "uniform":
        return UniformPrior(dim, config.prior_std)
    if config.prior == "mixture":
        if config.supervised_prior and num_classes < 2:
            raise ValueError("supervised_prior needs a labelled dataset (at least 2 classes)")
        components = num_classes if config.supervised_prior else DEFAULT_COMPONENTS
        return MixturePrior(dim, components, config.prior_std)
    raise ValueError(f"unknown prior {config.prior!r}; choose one of {', '.join(PRIORS)}")
