"""Drawing: every picture genserve writes is made by one of these functions (matplotlib, PNG).

Images are (N, C, H, W) torch tensors or numpy arrays in [0, 1]. This module imports no torch, so
the client's command line draws its pictures with it without loading torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    import torch

    Images = torch.Tensor | np.ndarray


def _pixels(images: Images) -> np.ndarray:
    """float32 numpy copy of `images`, clipped to [0, 1] (torch tensors are detached and moved to the CPU)."""
    if hasattr(images, "detach"):  # a torch tensor, recognised without importing torch
        images = images.detach().float().cpu().numpy()
    return np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)


def tile(images: Images, ncols: int, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one (rows*H, ncols*W) or (..., 3) array with `pad` pixels between tiles."""
    images = _pixels(images)
    n, c, h, w = images.shape
    nrows = -(-n // ncols)
    canvas = np.ones((c, nrows * (h + pad) - pad, ncols * (w + pad) - pad), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, ncols)
        canvas[:, r * (h + pad) : r * (h + pad) + h, col * (w + pad) : col * (w + pad) + w] = images[i]
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def _show(ax, array: np.ndarray) -> None:
    ax.imshow(array, cmap="gray" if array.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def image_grid(path: Path, images: Images, title: str, ncols: int = 8) -> Path:
    fig, ax = plt.subplots(figsize=(ncols * 0.75 + 0.5, -(-len(images) // ncols) * 0.75 + 0.6))
    _show(ax, tile(images, ncols))
    ax.set_title(title)
    return _save(fig, path)


def image_rows(path: Path, rows: Sequence[tuple[str, Images]], title: str) -> Path:
    """Rows of images, each labelled on the left (originals / reconstructions, clean / noisy / denoised)."""
    ncols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(ncols * 0.75 + 1.5, len(rows) * 0.9 + 0.6), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows, strict=True):
        _show(ax, tile(images, ncols))
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
    axes[0, 0].set_title(title)
    return _save(fig, path)


def loss_curves(path: Path, epochs: list[dict], steps: list[dict], title: str) -> Path:
    """Losses per step (light) and per epoch (train and test, marked)."""
    keys = sorted({k for s in steps for k in s if k != "step"})
    fig, ax = plt.subplots(figsize=(7, 4))
    steps_per_epoch = epochs[0]["step"] / epochs[0]["epoch"] if epochs and epochs[0].get("step") else 1
    for key in keys:
        xs = [s["step"] / steps_per_epoch for s in steps if key in s]
        ax.plot(xs, [s[key] for s in steps if key in s], alpha=0.35, label=f"{key} (train, running mean)")
    if epochs:
        ax.plot([e["epoch"] for e in epochs], [e["train_loss"] for e in epochs], "o-", label="train loss (epoch)")
        ax.plot([e["epoch"] for e in epochs], [e["test_loss"] for e in epochs], "s-", label="test loss (epoch)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def series(path: Path, steps: list[dict], keys: Sequence[str], title: str, ylabel: str) -> Path:
    """Chosen per-step series against training steps (e.g. D(x) against D(G(z)))."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        ax.plot([s["step"] for s in steps if key in s], [s[key] for s in steps if key in s], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def latent_scatter(
    path: Path,
    points: np.ndarray,
    labels: np.ndarray | None,
    class_names: Sequence[str] | None,
    title: str,
    axis_names: tuple[str, str],
) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.6)
    else:
        sc = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10" if labels.max() < 10 else "viridis", s=3, alpha=0.7)
        if class_names and len(class_names) <= 10:
            handles = [
                plt.Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(i)), label=name)
                for i, name in enumerate(class_names)
            ]
            ax.legend(handles=handles, fontsize=7, markerscale=1.2, loc="best")
        else:
            fig.colorbar(sc, ax=ax, label="class")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title)
    return _save(fig, path)


def _tick(value: float) -> str:
    return f"{round(value, 4) + 0.0:.2g}"  # + 0.0 turns -0.0 into 0; rounding hides float noise such as -8.9e-08


def manifold(
    path: Path,
    images: Images,
    x_values: Sequence[float],
    y_values: Sequence[float],
    title: str,
    axis_names: tuple[str, str],
) -> Path:
    """A grid of decoded images: rows follow y_values (top = largest), columns follow x_values."""
    n = len(x_values)
    c, h, w = images.shape[1:]
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(
        tile(images, n, pad=0),
        cmap="gray" if c == 1 else None,
        vmin=0,
        vmax=1,
        extent=(-0.5, n - 0.5, -0.5, len(y_values) - 0.5),
    )
    ax.set_xticks(range(n), [_tick(v) for v in x_values], rotation=90, fontsize=7)
    ax.set_yticks(range(len(y_values)), [_tick(v) for v in y_values], fontsize=7)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title)
    return _save(fig, path)
