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
import matplotlib.lines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
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


# Per-step series that are weights, schedules or probabilities (0-1): drawn on their own axis, where
# the losses (hundreds of nats for a VAE) would flatten them onto zero.
PROPORTIONS = ("kl_weight", "d_real", "d_fake", "d_skipped", "g_skipped")
SAME_SCALE = 0.3  # a term is drawn beside the loss when its typical size is at least this share of the loss's
READABLE = {"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10}


def _typical(values: Sequence[float]) -> float:
    return float(np.median(np.abs(values))) if len(values) else 0.0


def _values(key: str, epochs: list[dict], steps: list[dict]) -> list[float]:
    return [s[key] for s in steps if key in s] + [e[f"{p}_{key}"] for e in epochs for p in ("train", "test")
                                                 if f"{p}_{key}" in e]


def loss_panels(epochs: list[dict], steps: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """The keys of the losses picture by where they are drawn: (beside the loss, the smaller terms, the
    0-1 series). Keys come from the per-step points and from the epochs' train_* entries."""
    step_keys = [k for k in dict.fromkeys(k for s in steps for k in s) if k != "step"]
    epoch_keys = [k[len("train_"):] for e in epochs[:1] for k in e if k.startswith("train_")]
    keys = list(dict.fromkeys(["loss", *step_keys, *epoch_keys]))
    loss_size = _typical(_values("loss", epochs, steps))
    proportions = [k for k in keys if k in PROPORTIONS]
    beside = [k for k in keys if k not in proportions
              and (k == "loss" or _typical(_values(k, epochs, steps)) >= SAME_SCALE * loss_size)]
    smaller = [k for k in keys if k not in proportions and k not in beside]
    return beside, smaller, proportions


def loss_curves(
    path: Path, epochs: list[dict], steps: list[dict], title: str, units: dict[str, str] | None = None
) -> Path:
    """Losses per epoch (train and test, marked) over their running means per step (light).

    Panel 1: the loss and the terms of about its size. Panel 2, when there are any: the smaller terms
    (the KL of a VAE, the MSE of an autoencoder) on the left axis, and the 0-1 series (KL weight, D's
    probabilities) on a right-hand axis. `units` maps a key to its unit, shown in the axis labels."""
    units = units or {}
    steps_per_epoch = epochs[0]["step"] / epochs[0]["epoch"] if epochs and epochs[0].get("step") else 1
    beside, smaller, proportions = loss_panels(epochs, steps)
    panels = [beside] + ([smaller or proportions] if smaller or proportions else [])

    def label(names: list[str]) -> str:
        unit = {units.get(k) for k in names}
        suffix = f" ({unit.pop()})" if len(unit) == 1 and None not in unit else ""
        return ", ".join(names) + suffix

    def draw(ax, key: str, color: str) -> None:
        xs = [s["step"] / steps_per_epoch for s in steps if key in s]
        if xs:
            ax.plot(xs, [s[key] for s in steps if key in s], color=color, alpha=0.35, lw=1)
        for prefix, marker, fill in (("train", "o", color), ("test", "s", "white")):
            marked = [(e["epoch"], e[f"{prefix}_{key}"]) for e in epochs if f"{prefix}_{key}" in e]
            if marked:
                ax.plot(*zip(*marked, strict=True), marker=marker, ms=7, mfc=fill, mec=color, mew=1.5, color=color,
                        lw=1.5, ls="-" if prefix == "train" else "--", zorder=3)
        ax.plot([], [], color=color, lw=2.5, label=key)  # the legend names the key by its colour

    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    with plt.rc_context(READABLE):
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.4 * len(panels) + 1.0), sharex=True, squeeze=False)
        axes = axes[:, 0]
        for ax, names in zip(axes, panels, strict=True):
            for key in names:
                draw(ax, key, next(colors))
            ax.set_ylabel(label(names))
            ax.grid(alpha=0.3)
            ax.legend(loc="best", framealpha=0.9)
        if smaller and proportions:  # the 0-1 series on a right-hand axis of the second panel
            right = axes[-1].twinx()
            for key in proportions:
                draw(right, key, next(colors))
            right.set_ylim(-0.05, 1.05)
            right.set_ylabel(", ".join(proportions) + " (0-1)")
            handles, labels = axes[-1].get_legend_handles_labels()
            more_handles, more_labels = right.get_legend_handles_labels()
            axes[-1].get_legend().remove()
            right.legend(handles + more_handles, labels + more_labels, loc="best", framealpha=0.9)
        grey = "0.35"
        styles = [
            matplotlib.lines.Line2D([], [], color=grey, alpha=0.5, lw=1, label="train, running mean of steps"),
            matplotlib.lines.Line2D([], [], color=grey, marker="o", ms=7, lw=1.5, label="train, epoch mean"),
            matplotlib.lines.Line2D([], [], color=grey, marker="s", ms=7, mfc="white", ls="--", lw=1.5,
                                    label="test, epoch mean"),
        ]
        fig.legend(handles=styles, loc="lower center", ncol=3, frameon=False)
        fig.subplots_adjust(bottom=0.8 / fig.get_figheight())
        axes[-1].set_xlabel("epoch")
        last = max([1.0] + [e["epoch"] for e in epochs] + [s["step"] / steps_per_epoch for s in steps])
        axes[-1].set_xlim(0, last + 0.3)  # from the start of training, so that one epoch is not a lone dot
        axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axes[0].set_title(title)
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


def manifold(
    path: Path,
    images: Images,
    x_values: Sequence[float],
    y_values: Sequence[float],
    title: str,
    axis_names: tuple[str, str],
) -> Path:
    """A grid of decoded images: rows follow y_values (top = largest), columns follow x_values.

    Both value lists must be evenly spaced: each image is drawn centred on its latent coordinates,
    so the axes read in latent units and carry a few round ticks instead of one label per column."""
    x_values, y_values = np.asarray(x_values, dtype=np.float64), np.asarray(y_values, dtype=np.float64)
    for name, values in (("x_values", x_values), ("y_values", y_values)):
        gaps = np.diff(values)
        if len(values) < 2 or not np.allclose(gaps, gaps[0], rtol=1e-4) or gaps[0] <= 0:
            raise ValueError(f"manifold {name} must be at least 2 increasing, evenly spaced values")
    n = len(x_values)
    c = images.shape[1]
    dx, dy = x_values[1] - x_values[0], y_values[1] - y_values[0]
    with plt.rc_context(READABLE):
        fig, ax = plt.subplots(figsize=(7, 7.3))
        ax.imshow(
            tile(images, n, pad=0),
            cmap="gray" if c == 1 else None,
            vmin=0,
            vmax=1,
            extent=(x_values[0] - dx / 2, x_values[-1] + dx / 2, y_values[0] - dy / 2, y_values[-1] + dy / 2),
            aspect=dx / dy,  # square tiles whatever the two spans
        )
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
        ax.set_xlabel(axis_names[0])
        ax.set_ylabel(axis_names[1])
        ax.set_title(title)
        return _save(fig, path)
