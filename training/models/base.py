"""The interface every genserve model implements, so one trainer, one checkpoint format,
one set of pictures and one exporter serve every model kind.

A model owns its training step (VAEs take one optimizer step, GANs and AAEs alternate
between players), so the trainer stays the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from genserve.training.config import TrainConfig


@dataclass
class Batch:
    """One training or test batch, already on the model's device.

    images: float32 (B, C, H, W) in [0, 1], the clean target (binarised when the run binarises).
    inputs: what the model sees; the noisy image for the denoiser, otherwise `images` itself.
    labels: int64 (B,) or None for unlabelled data.
    """

    images: torch.Tensor
    inputs: torch.Tensor
    labels: torch.Tensor | None = None


@dataclass
class StepContext:
    """What a training step may need beyond the batch."""

    step: int  # global optimizer step, from 0
    progress: float  # fraction of the whole run done, in [0, 1] (drives KL warm-up)
    autocast: Callable[[], object]  # context manager factory: bf16 autocast on CUDA, a no-op elsewhere


class SigmoidOutput(nn.Module):
    """A logits network followed by a sigmoid: the served form of every Bernoulli decoder."""

    def __init__(self, logits: nn.Module):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class GenerativeModel(nn.Module):
    """Base class. Subclasses set `kind`, build their parts in __init__ from (image_shape, config)."""

    kind: ClassVar[str]
    preset_of: ClassVar[str | None] = None  # a named preset (a seed's published recipe) of this default kind
    default_lr: ClassVar[float] = 1e-3
    default_beta1: ClassVar[float] = 0.9
    default_latent_dim: ClassVar[int] = 16
    default_batch_size: ClassVar[int] = 128
    # "cosine": linear warm-up over the first WARMUP_FRACTION of steps, then cosine decay to 0; "constant".
    default_lr_schedule: ClassVar[str] = "cosine"
    # What the trainer and the evaluation read instead of lists of kind names:
    noisy_inputs: ClassVar[bool] = False  # the loader feeds noisy inputs against clean targets (the denoiser)
    adversarial: ClassVar[bool] = False  # two players: the adversarial pictures (both players' losses)
    # Which checkpoint is "best": "test_loss" (lowest test loss) or "fid_domain" (lowest FID of samples,
    # measured at the end of every epoch where the dataset has labels; see training/evaluation/).
    selection_metric: ClassVar[str] = "test_loss"
    # Families of final metrics (training/evaluation/__init__.py): "likelihood", "reconstruction", "samples".
    metric_families: ClassVar[tuple[str, ...]] = ()

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.config = config
        self.num_classes = num_classes
        self.latent_dim = config.latent_dim or self.default_latent_dim

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring: one line for `genserve-train --help` and the README."""
        return (cls.__dict__.get("__doc__") or cls.kind).strip().splitlines()[0].rstrip(".")

    @classmethod
    def binarize_by_default(cls, config: TrainConfig) -> bool:
        """Whether training images are dynamically binarised when config.binarize is not set."""
        return False

    def initialize_from_data(self, mean_image: torch.Tensor) -> None:
        """Called once before a fresh run with the training set's mean image (C, H, W) in [0, 1];
        e.g. a Bernoulli decoder starts its output bias at the mean logit. Default: nothing."""

    def end_of_epoch(self) -> None:
        """Called by the trainer after each epoch's steps, before the epoch is measured and saved
        (e.g. a GAN recomputes its averaged generator's batch-norm statistics). Default: nothing."""

    # --- training ---------------------------------------------------------------------------
    def adam(self, parameters, lr_scale: float = 1.0) -> torch.optim.Optimizer:
        """Adam at config.lr (else the kind's default_lr) times lr_scale, betas (config.adam_beta1, 0.999)."""
        lr = (self.config.lr or self.default_lr) * lr_scale
        beta1 = self.config.adam_beta1 if self.config.adam_beta1 is not None else self.default_beta1
        return torch.optim.Adam(parameters, lr=lr, betas=(beta1, 0.999))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers; their state is checkpointed under these names. Default: one Adam."""
        return {"model": self.adam(self.parameters())}

    def train_step(
        self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """Forward, backward and optimizer step(s). Returns detached scalar losses; key "loss" is required."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Mean losses on a test batch with the same meaning as train_step's; key "loss" is required."""
        raise NotImplementedError

    # --- capabilities (None / NotImplementedError where a kind has no such thing) -------------
    can_encode: ClassVar[bool] = False  # encode(): images -> latent means
    can_sample: ClassVar[bool] = False  # sample(): draws images from the prior / noise
    can_reconstruct: ClassVar[bool] = False

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> deterministic latent codes (B, latent_dim) (the mean for VAEs)."""
        raise NotImplementedError(f"{self.kind} has no encoder")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_dim) -> images in [0, 1]."""
        raise NotImplementedError(f"{self.kind} has no decoder")

    def reconstruct(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> images in [0, 1] (the denoised image for the denoiser)."""
        return self.decode(self.encode(inputs))

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n latents (or noise vectors) from the model's prior, on the model's device."""
        device = next(self.parameters()).device
        return torch.randn(n, self.latent_dim, generator=generator, device="cpu").to(device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images in [0, 1] from the prior."""
        return self.decode(self.prior_sample(n, generator))

    def servable_parts(self) -> dict[str, nn.Module]:
        """The parts export/ turns into ONNX graphs, keyed by part name
        ("encoder", "decoder", "generator", "denoiser"). Each maps float32 [0, 1] images or latents
        to float32 [0, 1] images or latents, is deterministic, and is in eval mode when exported."""
        raise NotImplementedError

    def prior_spec(self) -> dict[str, object]:
        """The latent prior, as plain data for the model manifest."""
        return {"distribution": "normal", "mean": 0.0, "std": 1.0, "dim": self.latent_dim}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
