"""Which pictures a run gets, chosen by what its model can do; drawing lives in training/plots.py.

All go to RUN_DIR/plots/: losses, reconstructions, samples, latent scatter, latent manifold,
denoising rows, and the fixed-noise samples of every epoch with a start/middle/end progress strip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import plots
from training.config import TrainConfig
from training.data.loader import DeviceLoader
from training.data.types import ImageDataset
from training.models import GenerativeModel

FIXED_SAMPLES = 64
SHOWN = 16  # images per row in reconstruction and denoising pictures
MANIFOLD_STEPS = 15
SCATTER_POINTS = 5000


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
        # Decode a grid over the prior's quantiles in each dimension (Kingma & Welling 2014, fig. 4);
        # quantiles of prior draws, so wide or multimodal priors (AAE) are covered as well as N(0, I).
        draws = model.prior_sample(20000, torch.Generator().manual_seed(0)).float().cpu()
        quantiles = torch.linspace(0.05, 0.95, MANIFOLD_STEPS)
        xs, ys = torch.quantile(draws[:, 0], quantiles), torch.quantile(draws[:, 1], quantiles)
        names = ("z[0] (prior quantiles 5-95%)", "z[1] (prior quantiles 5-95%)")
        grid = torch.stack([torch.stack([x, y]) for y in ys.flip(0) for x in xs])
    else:
        # Walk the two principal directions of the test latents, +-2 standard deviations.
        mean, axes, std = principal_axes(latents)
        xs = ys = torch.linspace(-2.0, 2.0, MANIFOLD_STEPS)
        names = ("PC 1 (standard deviations)", "PC 2 (standard deviations)")
        grid = torch.stack([mean + x * std[0] * axes[0] + y * std[1] * axes[1] for y in ys.flip(0) for x in xs])
    images = model.decode(grid.to(model.device)).float().cpu()
    plots.manifold(out / "latent_manifold.png", images, xs.tolist(), ys.tolist(),
                   f"{title}: latent manifold", names)


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
    title = f"{config.model} on {dataset.name}"
    plots.loss_curves(out / "losses.png", state.epochs, state.steps, f"{title}: losses")

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
        from training.pictures_adversarial import write_adversarial_pictures

        write_adversarial_pictures(model, dataset, config, run_dir, state, test_loader)
    model.train()
    return sorted(out.glob("*.png"))
