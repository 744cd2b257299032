"""Which pictures a run gets, chosen by what its model can do; drawing lives in training/plots.py.

All go to RUN_DIR/plots/: losses, reconstructions, samples, latent scatter, latent manifold,
denoising rows, and the fixed-noise samples of every epoch with a start/middle/end progress strip.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genserve.training import plots
from genserve.training.config import TrainConfig
from genserve.training.data.loader import DeviceLoader
from genserve.training.data.types import ImageDataset
from genserve.training.models import GenerativeModel

log = logging.getLogger("genserve.train")
FIXED_SAMPLES = 64
SHOWN = 16  # images per row in reconstruction and denoising pictures
MANIFOLD_STEPS = 15
SCATTER_POINTS = 5000
NORMAL_CDF_MINUS_2 = 0.022750131948179195  # P(Z < -2) for a standard normal: the manifold spans +-2 std
_PER_IMAGE = {"loss": "nats per image", "recon": "nats per image", "kl": "nats per image"}
_BCE_PER_PIXEL = {"loss": "nats per pixel", "mse": "per pixel"}
_PLAYERS = {"loss": "nats", "d_loss": "nats", "g_loss": "nats", "d_real": "probability", "d_fake": "probability"}
LOSS_UNITS = {  # by model kind: the unit of each loss the losses picture draws
    "vae": _PER_IMAGE, "dense-vae": _PER_IMAGE, "ae": _BCE_PER_PIXEL, "dae": _BCE_PER_PIXEL, "gan": _PLAYERS,
    "dcgan": _PLAYERS, "aae": {**_PLAYERS, "recon": "per pixel"},
}


def fixed_latents(model: GenerativeModel, config: TrainConfig) -> torch.Tensor:
    """The same prior draws at every epoch (and after a resume), so progress pictures are comparable."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    return model.prior_sample(FIXED_SAMPLES, generator)


def plots_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "plots"


@torch.no_grad()
def write_epoch_pictures(
    model: GenerativeModel, dataset: ImageDataset, config: TrainConfig, run_dir: Path, epoch: int, writer
) -> None:
    """Fixed-noise samples after this epoch (epoch 0: before training), to disk and TensorBoard."""
    model.eval()
    if model.can_sample:
        samples = model.decode(fixed_latents(model, config))
        plots.image_grid(
            plots_dir(run_dir) / "progress" / f"epoch-{epoch:04d}.png",
            samples,
            f"{config.model} on {dataset.name}: fixed-noise samples after epoch {epoch}",
        )
        writer.add_images("samples/fixed_noise", samples.float().cpu(), epoch)
    if model.can_reconstruct:
        test = dataset.test_images[:SHOWN].to(model.device).float() / 255
        writer.add_images("reconstructions", torch.cat([test, model.reconstruct(test).float()]).cpu(), epoch)
    model.train()


def principal_axes(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, two unit principal directions (2, D), their standard deviations (2,))."""
    mean = latents.mean(0)
    centred = latents - mean
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    std = s[:2] / max(1, len(latents) - 1) ** 0.5
    return mean, v[:2], std


def prior_span(draws: torch.Tensor) -> torch.Tensor:
    """MANIFOLD_STEPS even values from one latent dimension's prior draws: between their quantiles at
    -2 and +2 standard deviations of a normal, each end rounded to two significant digits."""
    low, high = torch.quantile(draws, torch.tensor([NORMAL_CDF_MINUS_2, 1 - NORMAL_CDF_MINUS_2])).tolist()
    return torch.linspace(float(f"{low:.2g}"), float(f"{high:.2g}"), MANIFOLD_STEPS)


def latent_pictures(
    model: GenerativeModel, dataset: ImageDataset, config: TrainConfig, out: Path, latents: torch.Tensor,
    labels: np.ndarray | None,
) -> None:
    title = f"{config.model} on {dataset.name}"
    if latents.shape[1] == 2:
        plots.latent_scatter(out / "latent_scatter.png", latents.numpy(), labels, dataset.class_names,
                             f"{title}: test-set latent means", ("z[0]", "z[1]"))
    else:
        mean, axes, _ = principal_axes(latents)
        points = ((latents - mean) @ axes.T).numpy()
        plots.latent_scatter(out / "latent_scatter.png", points, labels, dataset.class_names,
                             f"{title}: test-set latents ({latents.shape[1]}-D, PCA)", ("PC 1", "PC 2"))

    if latents.shape[1] == 2 and model.can_sample:
        # Decode an even grid over the region the prior covers in each dimension: between the quantiles
        # of prior draws at +-2 standard deviations of a normal (exactly +-2 for N(0, I); wide or
        # multimodal priors, as the AAE's, are covered as well), rounded to two significant digits.
        draws = model.prior_sample(20000, torch.Generator().manual_seed(0)).float().cpu()
        xs, ys = prior_span(draws[:, 0]), prior_span(draws[:, 1])
        names = ("z[0]", "z[1]")
        span = "the prior's central 95%"
        grid = torch.stack([torch.stack([x, y]) for y in ys.flip(0) for x in xs])
    else:
        # Walk the two principal directions of the test latents, +-2 standard deviations.
        mean, axes, std = principal_axes(latents)
        xs = ys = torch.linspace(-2.0, 2.0, MANIFOLD_STEPS)
        names = ("PC 1 (standard deviations)", "PC 2 (standard deviations)")
        span = "test latents' PCA, ±2 std"
        grid = torch.stack([mean + x * std[0] * axes[0] + y * std[1] * axes[1] for y in ys.flip(0) for x in xs])
    images = model.decode(grid.to(model.device)).float().cpu()
    plots.manifold(out / "latent_manifold.png", images, xs.tolist(), ys.tolist(),
                   f"{title}: latent manifold ({span})", names)


def progress_strip(out: Path) -> None:
    """Start, middle and end of the fixed-noise progress pictures, side by side in one picture."""
    from PIL import Image

    frames = sorted((out / "progress").glob("epoch-*.png"))
    if len(frames) < 2:
        return
    chosen = [frames[0], frames[len(frames) // 2], frames[-1]] if len(frames) > 2 else frames
    images = [Image.open(f).convert("RGB") for f in chosen]
    height = max(i.height for i in images)
    strip = Image.new("RGB", (sum(i.width for i in images), height), "white")
    x = 0
    for image in images:
        strip.paste(image, (x, 0))
        x += image.width
    strip.save(out / "progress_strip.png")


@torch.no_grad()
def write_final_pictures(
    model: GenerativeModel,
    dataset: ImageDataset,
    config: TrainConfig,
    run_dir: Path,
    state: Any,
    test_loader: DeviceLoader,
) -> list[Path]:
    """Every picture the model supports; returns the paths written."""
    model.eval()
    out = plots_dir(run_dir)
    log.info("drawing the pictures into %s", out)
    title = f"{config.model} on {dataset.name}"
    plots.loss_curves(out / "losses.png", state.epochs, state.steps, f"{title}: losses", LOSS_UNITS.get(model.kind))

    first = next(iter(test_loader))
    shown = first.images[:SHOWN]
    if model.can_reconstruct and not model.noisy_inputs:
        plots.image_rows(out / "reconstructions.png",
                         [("test images", shown), ("reconstructions", model.reconstruct(shown))],
                         f"{title}: test images and their reconstructions")
    if model.noisy_inputs:
        plots.image_rows(out / "denoising.png",
                         [("clean", shown), (f"noisy ({config.noise_factor})", first.inputs[:SHOWN]),
                          ("denoised", model.reconstruct(first.inputs[:SHOWN]))],
                         f"{title}: denoising held-out test images")
    if model.can_sample:
        generator = torch.Generator().manual_seed(config.seed + 3)
        plots.image_grid(out / "samples.png", model.sample(FIXED_SAMPLES, generator), f"{title}: samples from the prior")
        progress_strip(out)
    if model.can_encode and not model.noisy_inputs:
        latents, labels = [], []
        seen = 0
        for batch in test_loader:
            latents.append(model.encode(batch.inputs).float().cpu())
            if batch.labels is not None:
                labels.append(batch.labels.cpu())
            seen += len(batch.images)
            if seen >= SCATTER_POINTS:
                break
        latent_pictures(model, dataset, config, out, torch.cat(latents).flatten(1),
                        torch.cat(labels).numpy() if labels else None)
    if model.adversarial:  # their own pictures: losses of both players, AAE latents vs prior
        from genserve.training.pictures_adversarial import write_adversarial_pictures

        write_adversarial_pictures(model, dataset, config, run_dir, state, test_loader)
    model.train()
    return sorted(out.glob("*.png"))
