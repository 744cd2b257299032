"""Cheap statistics of a batch of generated images, shared by the exporter (which measures their
reference values) and the server (which watches them on every execution). numpy only."""

from __future__ import annotations

import numpy as np

# Within half an 8-bit step of 0 or 1: the pixel is written as 0 or 255.
SATURATION_MARGIN = 0.5 / 255
DIVERSITY_ROWS = 8  # rows of a batch the diversity figure looks at (28 pairs)


def nonfinite_count(images: np.ndarray) -> int:
    """Values that are NaN or infinite."""
    return images.size - int(np.count_nonzero(np.isfinite(images)))


def saturated_count(images: np.ndarray, low: float = 0.0, high: float = 1.0) -> int:
    """Values within SATURATION_MARGIN of either end of the value range (NaN counts as neither)."""
    return int(np.count_nonzero(images <= low + SATURATION_MARGIN)) + int(
        np.count_nonzero(images >= high - SATURATION_MARGIN)
    )


def diversity(images: np.ndarray, rows: int = DIVERSITY_ROWS) -> float | None:
    """Mean root-mean-square distance between consecutive images among the first `rows` of a batch
    (rows - 1 pairs: for independent samples the same expectation as all pairs, at a fraction of the
    cost); None for fewer than 2 rows or non-finite values. A collapsed generator gives ~0."""
    n = min(rows, len(images))
    if n < 2:
        return None
    x = images[:n].reshape(n, -1)
    steps = x[1:] - x[:-1]
    squared = np.einsum("ij,ij->i", steps, steps) / x.shape[1]
    if not np.isfinite(squared).all():
        return None
    return float(np.sqrt(squared).mean())
