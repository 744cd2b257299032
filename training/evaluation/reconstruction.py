"""Reconstruction quality: mean squared error and PSNR on images in [0, 1]."""

from __future__ import annotations

import torch


def per_image_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.float() - target.float()).pow(2).flatten(1).mean(1)


def psnr_db(mse: torch.Tensor) -> torch.Tensor:
    """PSNR for a data range of 1; an exact match is capped at 100 dB instead of infinity."""
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
