"""Pictures only the adversarial kinds get, in RUN_DIR/plots/ beside the generic ones (pictures.py):

    adversarial_losses.png     D's and G's losses over training (and the AAE's reconstruction loss)
    discriminator_outputs.png  mean D(x) against mean D(G(z)) over training (AAE: prior samples vs codes)
    aae_latent_prior.png       AAE: test codes coloured by class over the prior's density contours. A 2-D
                               latent is drawn as is; a larger one by its first two dimensions, over the
                               prior's exact marginal density in those dimensions (a PCA projection would
                               rotate the codes away from the axes the prior is defined on)
    aae_latent_histograms.png  AAE: a histogram of the test codes per latent dimension, against the prior's
                               marginal density (the first 16 dimensions)

The curves come from metrics.json "steps" (means over log_every steps); a run shorter than log_every
steps falls back to the per-epoch training means.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genserve.training import plots
from genserve.training.config import TrainConfig
from genserve.training.data.loader import DeviceLoader
from genserve.training.data.types import ImageDataset
from genserve.training.models import GenerativeModel

CODES_SHOWN = 5000
HISTOGRAM_DIMS = 16


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def curve_points(state: Any) -> list[dict[str, float]]:
    """Per-step means, or per-epoch training means (keys without "train_") when no step was logged."""
    if state.steps:
        return state.steps
    return [
        {"step": e["step"], **{k[len("train_"):]: v for k, v in e.items() if k.startswith("train_")}}
        for e in state.epochs
    ]


@torch.no_grad()
def test_codes(model: GenerativeModel, test_loader: DeviceLoader) -> tuple[np.ndarray, np.ndarray | None]:
    codes, labels = [], []
    for batch in test_loader:
        codes.append(model.encode(batch.inputs).float().cpu())
        if batch.labels is not None:
            labels.append(batch.labels.cpu())
        if sum(len(c) for c in codes) >= CODES_SHOWN:
            break
    return torch.cat(codes)[:CODES_SHOWN].numpy(), torch.cat(labels)[:CODES_SHOWN].numpy() if labels else None


def latent_prior_picture(
    path: Path, codes: np.ndarray, labels: np.ndarray | None, prior, class_names: list[str] | None, title: str
) -> Path:
    import matplotlib.pyplot as plt

    points = codes[:, :2]
    reference = prior.sample(2000, torch.Generator().manual_seed(0)).numpy()[:, :2]
    both = np.concatenate([points, reference])
    low, high = np.percentile(both, 0.5, axis=0), np.percentile(both, 99.5, axis=0)
    margin = 0.1 * (high - low)
    xs = np.linspace(low[0] - margin[0], high[0] + margin[0], 200)
    ys = np.linspace(low[1] - margin[1], high[1] + margin[1], 200)
    gx, gy = np.meshgrid(xs, ys)
    density = prior.marginal_density(np.stack([gx.ravel(), gy.ravel()], axis=1), (0, 1)).reshape(gx.shape)

    fig, ax = plt.subplots(figsize=(7, 6))
    ax.contourf(gx, gy, density, levels=12, cmap="Greys", alpha=0.35)
    ax.contour(gx, gy, density, levels=6, colors="k", linewidths=0.7, alpha=0.7)
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.6)
    else:
        cmap = plt.get_cmap("tab10" if labels.max() < 10 else "viridis")
        sc = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap=cmap, s=3, alpha=0.7)
        if class_names and len(class_names) <= 10:
            handles = [plt.Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(i)), label=n)
                       for i, n in enumerate(class_names)]
            ax.legend(handles=handles, fontsize=7, loc="best")
        else:
            fig.colorbar(sc, ax=ax, label="class")
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(ys[0], ys[-1])
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def latent_histograms_picture(path: Path, codes: np.ndarray, prior, title: str) -> Path:
    import matplotlib.pyplot as plt

    dims = min(codes.shape[1], HISTOGRAM_DIMS)
    cols = min(4, dims)
    rows = math.ceil(dims / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.3 * rows), squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= dims:
            ax.axis("off")
            continue
        values = codes[:, j]
        reference = prior.sample(4000, torch.Generator().manual_seed(j)).numpy()[:, j]
        low = min(np.percentile(values, 0.5), reference.min())
        high = max(np.percentile(values, 99.5), reference.max())
        xs = np.linspace(low, high, 300)
        ax.hist(values, bins=50, range=(low, high), density=True, alpha=0.6, label="encoder codes")
        ax.plot(xs, prior.marginal_density(xs[:, None], (j,)), "k-", lw=1.2, label="prior")
        ax.set_title(f"z[{j}]", fontsize=8)
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


@torch.no_grad()
def write_adversarial_pictures(
    model: GenerativeModel,
    dataset: ImageDataset,
    config: TrainConfig,
    run_dir: Path,
    state: Any,
    test_loader: DeviceLoader,
) -> list[Path]:
    """The pictures above for adversarial models (nothing for other kinds); returns the paths written."""
    if not model.adversarial:
        return []
    model.eval()
    out = Path(run_dir) / "plots"
    title = f"{config.model} on {dataset.name}"
    written = []
    points = curve_points(state)
    if points:
        keys = [k for k in ("d_loss", "g_loss", "recon") if any(k in p for p in points)]
        written.append(plots.series(out / "adversarial_losses.png", points, keys, f"{title}: losses", "loss"))
        ylabel = "mean D output (probability of real)"
        what = "D(prior sample) against D(encoder code)" if model.can_encode else "D(x) against D(G(z))"
        written.append(plots.series(out / "discriminator_outputs.png", points, ["d_real", "d_fake"],
                                    f"{title}: {what}", ylabel))
    if model.can_encode:  # the adversarial autoencoder: its codes against the prior it matches
        codes, labels = test_codes(model, test_loader)
        how = "2-D latent" if codes.shape[1] == 2 else f"first 2 of {codes.shape[1]} latent dims"
        written.append(latent_prior_picture(
            out / "aae_latent_prior.png", codes, labels, model.prior, dataset.class_names,
            f"{title}: test codes over the {model.prior.name} prior's density ({how})"))
        written.append(latent_histograms_picture(
            out / "aae_latent_histograms.png", codes, model.prior,
            f"{title}: test codes per latent dimension against the {model.prior.name} prior"))
    return written
