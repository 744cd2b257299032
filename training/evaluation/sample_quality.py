"""Sample-quality metrics for any model that can sample: FID (domain classifier or Inception-v3), class
coverage and the Parzen-window log-likelihood.

One set of config.fid_samples images is drawn (seed config.seed + 4, so reruns agree) and quantised to
8 bits, as if saved as PNGs; every metric uses it. FIDs compare it with a fixed random subset of
min(config.fid_samples, test size) test images (recorded as fid_real_images).

    fid_domain                   FID on the 128-d features of the per-dataset classifier (classifier.py)
    domain_classifier_accuracy   that classifier's test accuracy
    class_coverage               share of the samples per class, as that classifier judges them
    class_coverage_entropy_nats  entropy of those shares (ln 10 = 2.303 nats when 10 classes are even)
    fid_inception                the standard FID (Inception-v3 pool3, 299x299; inception.py)
    parzen_ll_nats               Parzen-window log-likelihood of the test set (parzen.py); the window width
                                 is chosen on the last 1,000 training images (the datasets have no
                                 validation split)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from genserve.training.config import TrainConfig
from genserve.training.data.types import ImageDataset
from genserve.training.evaluation.fid import fid_from_features
from genserve.training.evaluation.progress import progress
from genserve.training.models import GenerativeModel

log = logging.getLogger("genserve.eval")

SAMPLE_METRICS = ("fid_domain", "class_coverage", "fid_inception", "parzen_ll_nats")
SAMPLE_BATCH = 500
INCEPTION_BATCH = 50
PARZEN_VALIDATION = 1000
REAL_SUBSET_SEED = 0
MNIST_LIKE = ("mnist", "mnist-5k", "fashion-mnist")


@torch.no_grad()
def generate_samples(model: GenerativeModel, n: int, seed: int, batch_size: int = SAMPLE_BATCH) -> torch.Tensor:
    """n samples as uint8 (n, C, H, W) on the CPU, the same for the same seed."""
    if not model.can_sample:
        raise ValueError(f"{model.kind} cannot sample, so it has no sample-quality metrics")
    if n < 2:
        raise ValueError(f"sample metrics need at least 2 samples, got fid_samples={n}")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    starts = range(0, n, batch_size)
    for start in progress(starts, len(starts), f"sample quality: drawing {n} samples"):
        images = model.sample(min(batch_size, n - start), generator).float()
        if not torch.isfinite(images).all():
            raise ValueError(f"{model.kind} produced NaN or infinite samples")
        chunks.append((images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(chunks)


def real_subset(images: torch.Tensor, n: int) -> torch.Tensor:
    """A fixed random subset of n images (test sets may be ordered by class)."""
    if n >= len(images):
        return images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(REAL_SUBSET_SEED))
    return images[order[:n]]


@torch.no_grad()
def batched(fn, images_u8: torch.Tensor, device: torch.device, batch_size: int) -> list[torch.Tensor]:
    """fn applied to [0, 1] float batches of uint8 images; the outputs on the CPU, per batch."""
    outputs = []
    for start in range(0, len(images_u8), batch_size):
        x = images_u8[start : start + batch_size].to(device).float() / 255
        out = fn(x)
        outputs.append(tuple(o.float().cpu() for o in out) if isinstance(out, tuple) else out.float().cpu())
    return outputs


def coverage(logits: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Share of each class among the predictions, and the entropy of the shares in nats."""
    counts = torch.bincount(logits.argmax(1), minlength=len(class_names)).double()
    shares = counts / counts.sum()
    entropy = max(0.0, -(shares[shares > 0] * shares[shares > 0].log()).sum().item())  # no -0.0
    return {
        "class_coverage": {name: shares[i].item() for i, name in enumerate(class_names)},
        "class_coverage_entropy_nats": entropy,
        "class_coverage_max_entropy_nats": math.log(len(class_names)),
    }


def classifier_dataset(dataset: ImageDataset, config: TrainConfig) -> ImageDataset:
    """The whole training split when the run was cut with config.limit, so that the domain classifier (and
    so fid_domain) is the same for every run on a dataset; `dataset` itself when it cannot be reloaded."""
    if config.limit is None or len(dataset.train_images) < config.limit:
        return dataset
    from genserve.training.data.registry import load_dataset

    try:
        full = load_dataset(config.dataset, config.data_dir, config.image_size)
    except (ValueError, OSError) as error:
        log.warning("domain classifier: cannot reload %s (%s); training it on the limited split", config.dataset, error)
        return dataset
    n = len(dataset.train_images)
    same = (
        full.name == dataset.name
        and full.image_shape == dataset.image_shape
        and torch.equal(full.test_images, dataset.test_images)
        and torch.equal(full.train_images[:n], dataset.train_images)
    )
    return full if same else dataset


def domain_metrics(
    samples: torch.Tensor, real: torch.Tensor, dataset: ImageDataset, wanted: Sequence[str], device: torch.device
) -> dict[str, Any]:
    from genserve.training.evaluation.classifier import domain_classifier

    classifier, test_accuracy = domain_classifier(dataset, device)
    fake = batched(classifier.embed, samples, device, SAMPLE_BATCH)
    fake_features, fake_logits = torch.cat([f for f, _ in fake]), torch.cat([lg for _, lg in fake])
    metrics: dict[str, Any] = {"domain_classifier_accuracy": test_accuracy}
    if "fid_domain" in wanted:
        real_features = torch.cat([f for f, _ in batched(classifier.embed, real, device, SAMPLE_BATCH)])
        metrics["fid_domain"] = fid_from_features(real_features, fake_features)
    if "class_coverage" in wanted:
        names = dataset.class_names or [str(i) for i in range(dataset.num_classes)]
        metrics.update(coverage(fake_logits, names))
    return metrics


def inception_fid(samples: torch.Tensor, real: torch.Tensor, device: torch.device) -> float:
    from genserve.training.evaluation.inception import load_inception

    network = load_inception(device)
    real_features = torch.cat(batched(network, real, device, INCEPTION_BATCH))
    fake_features = torch.cat(batched(network, samples, device, INCEPTION_BATCH))
    return fid_from_features(real_features, fake_features)


def parzen(samples: torch.Tensor, dataset: ImageDataset, device: torch.device) -> dict[str, Any]:
    from genserve.training.evaluation.parzen import parzen_metrics

    def to_float(images: torch.Tensor) -> torch.Tensor:
        return images.to(device).float().div_(255)

    validation = dataset.train_images[-PARZEN_VALIDATION:]
    return parzen_metrics(to_float(samples), to_float(validation), to_float(dataset.test_images))


def default_sample_metrics(model: GenerativeModel, dataset: ImageDataset) -> list[str]:
    """What a training run reports by itself: the cheap metrics that apply. fid_inception only on CUDA
    (seconds per image on a CPU: compute it later with genserve-eval --metrics fid_inception)."""
    from genserve.training.evaluation.inception import InceptionWeightsError, weights_path

    chosen = []
    if dataset.num_classes >= 2 and dataset.train_labels is not None and dataset.test_labels is not None:
        chosen += ["fid_domain", "class_coverage"]
    if dataset.name in MNIST_LIKE:
        chosen.append("parzen_ll_nats")
    if model.device.type == "cuda":
        try:
            weights_path()
            chosen.append("fid_inception")
        except InceptionWeightsError as error:
            log.warning("skipping fid_inception: %s", error)
    return chosen


def sample_quality_metrics(
    model: GenerativeModel,
    dataset: ImageDataset,
    config: TrainConfig,
    metrics: Sequence[str],
    classifier_data: ImageDataset | None = None,
) -> dict[str, Any]:
    """The requested SAMPLE_METRICS for `model` on `dataset` (the run's, --limit applied), with the counts
    they rest on. `classifier_data` trains the domain classifier; default: classifier_dataset()."""
    unknown = sorted(set(metrics) - set(SAMPLE_METRICS))
    if unknown:
        raise ValueError(f"unknown sample metrics {unknown}; choose from {', '.join(SAMPLE_METRICS)}")
    if not metrics:
        return {}
    device = model.device
    samples = generate_samples(model, config.fid_samples, config.seed + 4)
    if tuple(samples.shape[1:]) != dataset.image_shape:
        raise ValueError(f"samples are {tuple(samples.shape[1:])} but {dataset.name} images are {dataset.image_shape}")
    real = real_subset(dataset.test_images, config.fid_samples)
    out: dict[str, Any] = {"fid_samples": len(samples)}
    if "fid_domain" in metrics or "fid_inception" in metrics:
        out["fid_real_images"] = len(real)
    if "fid_domain" in metrics or "class_coverage" in metrics:
        labelled = classifier_data if classifier_data is not None else classifier_dataset(dataset, config)
        log.info("sample quality: fid_domain and class_coverage on %d samples and %d test images", len(samples), len(real))
        out.update(domain_metrics(samples, real, labelled, metrics, device))
    if "fid_inception" in metrics:
        log.info("sample quality: Inception-v3 FID on %d samples and %d test images", len(samples), len(real))
        out["fid_inception"] = inception_fid(samples, real, device)
    if "parzen_ll_nats" in metrics:
        log.info("sample quality: Parzen-window log-likelihood of %d test images under %d samples",
                 len(dataset.test_images), len(samples))
        out.update(parzen(samples, dataset, device))
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}
