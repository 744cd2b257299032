"""The `final` metrics of a run, chosen by what the model can do. Units are in the names."""

from __future__ import annotations

import logging
from typing import Any

import torch

from genserve.training.config import TrainConfig
from genserve.training.data.loader import DeviceLoader
from genserve.training.data.types import ImageDataset
from genserve.training.evaluation.progress import progress
from genserve.training.evaluation.reconstruction import per_image_mse, psnr_db
from genserve.training.models import GenerativeModel

log = logging.getLogger("genserve.eval")
NLL_DECODES_PER_CHUNK = 1024  # estimate_nll's batch_size: decoder evaluations at once
NLL_CHUNKS_PER_STEP = 10  # of those per progress step


@torch.no_grad()
def vae_likelihood_metrics(model: GenerativeModel, config: TrainConfig, test_loader: DeviceLoader) -> dict[str, Any]:
    from genserve.training.models.likelihood import estimate_nll

    model.eval()
    elbo_sum, count, nll_images = 0.0, 0, []
    for batch in progress(test_loader, len(test_loader), "test ELBO over the test set"):
        n = len(batch.images)
        elbo_sum += model.eval_losses(batch)["loss"].item() * n
        count += n
        if sum(len(x) for x in nll_images) < config.nll_images:
            nll_images.append(batch.images)
    images = torch.cat(nll_images)[: config.nll_images]
    # In chunks, for progress; a multiple of estimate_nll's own chunk, so the noise drawn is the same.
    chunks = images.split(max(1, NLL_DECODES_PER_CHUNK // config.nll_k) * NLL_CHUNKS_PER_STEP)
    what = f"test NLL: {config.nll_k} importance samples on each of {len(images)} test images"
    nll = torch.cat([estimate_nll(model, chunk, k=config.nll_k, batch_size=NLL_DECODES_PER_CHUNK)
                     for chunk in progress(chunks, len(chunks), what)])
    return {
        "test_elbo_nats": elbo_sum / count,
        "test_nll_nats": nll.mean().item(),
        "nll_k": config.nll_k,
        "nll_images": len(images),
        "binarized": bool(config.binarize),
    }


@torch.no_grad()
def reconstruction_metrics(model: GenerativeModel, test_loader: DeviceLoader, noisy: bool) -> dict[str, Any]:
    model.eval()
    mse, noisy_mse = [], []
    for batch in progress(test_loader, len(test_loader), "reconstruction error over the test set"):
        mse.append(per_image_mse(model.reconstruct(batch.inputs), batch.images))
        if noisy:
            noisy_mse.append(per_image_mse(batch.inputs, batch.images))
    mse_all = torch.cat(mse)
    metrics: dict[str, Any] = {
        "test_mse": mse_all.mean().item(),
        "test_psnr_db": psnr_db(mse_all).mean().item(),  # mean of per-image PSNR
    }
    if noisy:
        metrics["noisy_psnr_db"] = psnr_db(torch.cat(noisy_mse)).mean().item()
    return metrics


def final_metrics(
    model: GenerativeModel, dataset: ImageDataset, config: TrainConfig, test_loader: DeviceLoader
) -> dict[str, Any]:
    """The metric families the model declares (model.metric_families), in that order."""
    log.info("final evaluation of %s on the %s test set (metrics.json `final`)", config.model, dataset.name)
    metrics: dict[str, Any] = {}
    families = model.metric_families
    if "likelihood" in families:
        metrics.update(vae_likelihood_metrics(model, config, test_loader))
    if "reconstruction" in families:
        metrics.update(reconstruction_metrics(model, test_loader, noisy=model.noisy_inputs))
        if model.noisy_inputs:
            metrics["noise_factor"] = config.noise_factor
    if "samples" in families:
        # Sample quality (see sample_quality.py): fid_domain, class_coverage, parzen_ll_nats where they
        # apply; fid_inception on CUDA only (genserve-eval computes any of them later, for any sampler).
        from genserve.training.evaluation.sample_quality import default_sample_metrics, sample_quality_metrics

        metrics.update(sample_quality_metrics(model, dataset, config, default_sample_metrics(model, dataset)))
    return metrics
