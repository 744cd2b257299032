"""Fréchet distance between two sets of features: the FID of Heusel et al. (2017).

    FID = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

with means and (unbiased) covariances of the two feature sets, all in float64. The trace of the matrix
square root never goes through scipy.linalg.sqrtm of the non-symmetric product (which can return
complex noise when the covariances are singular, i.e. fewer samples than feature dimensions):

  - from covariances: with A = S_1^(1/2) (symmetric, from eigh), tr((S_1 S_2)^(1/2)) is the sum of the
    square roots of the eigenvalues of A S_2 A, which is symmetric positive semi-definite;
  - from features, when n_1 * n_2 <= D^2 (few samples, e.g. Inception's 2048-d features): with the
    centred features X_i scaled by 1/sqrt(n_i - 1), S_i = X_i^T X_i and tr((S_1 S_2)^(1/2)) is the sum of
    the singular values of the small n_1 x n_2 matrix X_1 X_2^T (the nuclear norm), and tr(S_i) = |X_i|^2.
    Same value, far cheaper than two D x D eigendecompositions.

Which features (Inception-v3 pool3, or the domain classifier's) is up to the caller.
"""

from __future__ import annotations

import numpy as np
import torch


def _features(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"FID needs at least 2 feature vectors (N, D), got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("FID features contain NaN or infinity (did the model produce NaN images?)")
    return features


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D), in float64."""
    features = _features(features)
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding-error eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for covariance matrices."""
    root = _sqrt_psd(sigma1)
    middle = root @ sigma2 @ root
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); never negative."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched FID statistics: means {mu1.shape}, {mu2.shape}; covariances {sigma1.shape}, {sigma2.shape}")
    distance = float(np.sum((mu1 - mu2) ** 2)) + float(np.trace(sigma1) + np.trace(sigma2))
    distance -= 2 * trace_sqrt_product(sigma1, sigma2)
    return max(0.0, distance)


def fid_from_features(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    x1, x2 = _features(features1), _features(features2)
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"mismatched FID features: {x1.shape[1]} and {x2.shape[1]} dimensions")
    n1, n2, d = len(x1), len(x2), x1.shape[1]
    if n1 * n2 > d * d:
        return frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    a = (x1 - mu1) / np.sqrt(n1 - 1)
    b = (x2 - mu2) / np.sqrt(n2 - 1)
    trace_sqrt = float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
    distance = float(np.sum((mu1 - mu2) ** 2)) + float(np.sum(a * a) + np.sum(b * b)) - 2 * trace_sqrt
    return max(0.0, distance)
