"""A small per-dataset classifier: fast FID features (fid_domain) and class judgements (class_coverage).

Inception-v3 at 299x299 costs seconds per image on a CPU. This convnet (three stride-2 3x3 convs with
batch norm, a 128-unit hidden layer, a linear head) trains in seconds on MNIST on two CPU cores and its
hidden layer (before the ReLU) is the FID feature. Its numbers are only comparable between runs on the
same dataset with the same classifier, which the cache guarantees: the classifier is trained once per
(dataset, images) and stored as safetensors under $GENSERVE_CACHE/classifiers/ (else
$XDG_CACHE_HOME/genserve/classifiers/, else ~/.cache/genserve/classifiers/), written atomically, keyed
by a SHA-256 of the images and labels it was trained and tested on. Its test accuracy travels with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from genserve.training.cache import cache_dir
from genserve.training.data.types import ImageDataset
from genserve.training.files import atomic_write

log = logging.getLogger("genserve.eval")

VERSION = 1  # bump when the architecture or the training recipe changes: old cache entries are then ignored
FEATURES = 128
TRAIN_IMAGES = 20_000  # at most this many training images (the first ones), for speed
EPOCHS = 2
BATCH = 128
LR = 2e-3
SEED = 0


class DomainClassifier(nn.Module):
    """Images in [0, 1] (B, C, H, W) -> class logits; `features` gives the 128-d FID embedding."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = image_shape
        layers: list[nn.Module] = []
        channels = [c, 16, 32, 64]
        for a, b in zip(channels, channels[1:], strict=False):
            layers += [nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
            h, w = (h + 1) // 2, (w + 1) // 2
        self.convs = nn.Sequential(*layers, nn.Flatten())
        self.hidden = nn.Linear(channels[-1] * h * w, FEATURES)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(FEATURES, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.convs(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of images in [0, 1], in one pass."""
        features = self.features(images)
        return features, self.head(features)


def training_subset(dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset.train_labels is None or dataset.test_labels is None or dataset.num_classes < 2:
        raise ValueError(
            f"{dataset.name} has no class labels: fid_domain and class_coverage need a labelled dataset "
            "(mnist, fashion-mnist, cifar10, mnist-5k); use fid_inception instead"
        )
    return dataset.train_images[:TRAIN_IMAGES], dataset.train_labels[:TRAIN_IMAGES]


def cache_path(dataset: ImageDataset) -> Path:
    """The cache file for this dataset's classifier: keyed by the exact images and labels used."""
    images, labels = training_subset(dataset)
    key = hashlib.sha256(f"v{VERSION}\0{dataset.image_shape}\0{dataset.num_classes}".encode())
    for tensor in (images, labels, dataset.test_images, dataset.test_labels):
        key.update(tensor.contiguous().cpu().numpy().tobytes())
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in dataset.name)
    return cache_dir("classifiers") / f"{name}-{key.hexdigest()[:20]}.safetensors"


@torch.no_grad()
def accuracy(model: DomainClassifier, images_u8: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images_u8), 1000):
        x = images_u8[start : start + 1000].to(device).float() / 255
        correct += (model(x).argmax(1).cpu() == labels[start : start + 1000]).sum().item()
    return correct / len(images_u8)


def train_classifier(dataset: ImageDataset, device: str | torch.device = "cpu") -> tuple[DomainClassifier, float]:
    """Train a fresh classifier on (up to TRAIN_IMAGES of) the training split; (model, test accuracy)."""
    device = torch.device(device)
    images, labels = training_subset(dataset)
    generator = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):  # seeded init and dropout, without disturbing the caller's RNG
        torch.manual_seed(SEED)
        model = DomainClassifier(dataset.image_shape, dataset.num_classes).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        steps = EPOCHS * (len(images) // BATCH)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=max(1, steps))
        model.train()
        for _ in range(EPOCHS):
            order = torch.randperm(len(images), generator=generator)
            for i in range(len(images) // BATCH):
                index = order[i * BATCH : (i + 1) * BATCH]
                x = images[index].to(device).float() / 255
                loss = F.cross_entropy(model(x), labels[index].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval(), accuracy(model, dataset.test_images, dataset.test_labels, device)


def _save_atomic(path: Path, model: DomainClassifier, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:  # a reader sees no file or the whole file, never a partial one
        save_file(weights, str(tmp), metadata=metadata)


def _load(path: Path, dataset: ImageDataset, device: torch.device) -> tuple[DomainClassifier, float] | None:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        model = DomainClassifier(dataset.image_shape, dataset.num_classes)
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval(), float(metadata["test_accuracy"])
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as error:  # damaged: retrain
        warnings.warn(f"ignoring unreadable classifier cache {path}: {error}", stacklevel=2)
        return None


def domain_classifier(dataset: ImageDataset, device: str | torch.device = "cpu") -> tuple[DomainClassifier, float]:
    """The cached classifier for this dataset (trained and cached on first use); (model, test accuracy)."""
    device = torch.device(device)
    path = cache_path(dataset)
    if path.is_file():
        loaded = _load(path, dataset, device)
        if loaded is not None:
            return loaded
    log.info("training the %s domain classifier (cached in %s)", dataset.name, path)
    model, test_accuracy = train_classifier(dataset, device)
    metadata = {
        "dataset": dataset.name,
        "image_shape": json.dumps(list(dataset.image_shape)),
        "num_classes": str(dataset.num_classes),
        "train_images": str(len(training_subset(dataset)[0])),
        "test_accuracy": repr(test_accuracy),
        "version": str(VERSION),
    }
    try:
        _save_atomic(path, model, metadata)
    except OSError as error:  # a read-only cache costs time, not correctness
        warnings.warn(f"could not cache the domain classifier at {path}: {error}", stacklevel=2)
    return model, test_accuracy
