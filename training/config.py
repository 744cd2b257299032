"""Training configuration: one flat dataclass, loadable from YAML or TOML, saved with every run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genserve.training.files import read_config_mapping


@dataclass
class TrainConfig:
    model: str = "vae"
    dataset: str = "mnist-5k"
    data_dir: str | None = None  # --data-dir, else $GENSERVE_DATA, else ./data
    out: str = "runs/default"
    epochs: int = 10
    batch_size: int | None = None  # None: the model kind's default (128; 64 for dcgan)
    lr: float | None = None  # None: the model kind's documented default
    lr_schedule: str | None = None  # cosine | constant; None: the model kind's default (cosine; constant for GANs)
    adam_beta1: float | None = None  # None: the model kind's default (0.9; 0.5 for GANs)
    latent_dim: int | None = None  # None: the model kind's default
    limit: int | None = None  # use only the first N training images
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    compile: bool = False  # torch.compile the model
    amp: bool = True  # bf16 autocast, on CUDA only
    image_size: int | None = None  # resize (faces) or crop size (textures); None: dataset default
    # data options
    binarize: bool | None = None  # dynamic binarisation; None: on for MNIST-like data with a Bernoulli likelihood
    noise_factor: float = 0.5  # Gaussian noise std for the denoiser, clipped to [0, 1]
    # VAE options
    likelihood: str = "bernoulli"  # bernoulli | gaussian | gaussian-learned
    gaussian_sigma: float = 0.1  # fixed decoder std for the gaussian likelihood
    beta: float = 1.0
    kl_warmup: float = 0.0  # fraction of training over which the KL weight rises linearly from 0 to beta
    # adversarial options
    noise_dim: int = 100
    balance: bool | None = None  # skip the update of a player far ahead; None: the kind's default
    upsample: str = "transposed"  # transposed | resize
    dcgan_base_channels: int | None = None  # DCGAN width (ngf = ndf); None: 64
    dcgan_generator_width: int = 1  # DCGAN: G's channels over D's (2: about 1.6x the time per epoch)
    prior: str = "gaussian"  # aae prior: gaussian | uniform | mixture
    prior_std: float = 5.0
    supervised_prior: bool = False
    # evaluation
    nll_k: int = 100
    nll_images: int = 1000
    fid_samples: int = 2000
    log_every: int = 50  # steps between TensorBoard scalar writes
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown config keys {unknown}; valid keys are: {', '.join(sorted(known))}"
            )
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        from genserve.training.models import model_class

        model_class(self.model)  # a clear error naming every kind when it is unknown
        if self.lr_schedule not in (None, "cosine", "constant"):
            raise ValueError(f"lr_schedule must be cosine or constant, not {self.lr_schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.likelihood not in ("bernoulli", "gaussian", "gaussian-learned"):
            raise ValueError(f"likelihood must be bernoulli, gaussian or gaussian-learned, not {self.likelihood!r}")
        for name in ("epochs", "batch_size", "dcgan_base_channels", "dcgan_generator_width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if not 0.0 <= self.kl_warmup <= 1.0:
            raise ValueError(f"kl_warmup is a fraction of training in [0, 1], got {self.kl_warmup}")
        if self.noise_factor < 0:
            raise ValueError(f"noise_factor must be >= 0, got {self.noise_factor}")


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or TOML config file into a dict of TrainConfig fields (dashes become underscores)."""
    return {key.replace("-", "_"): value for key, value in read_config_mapping(path).items()}
