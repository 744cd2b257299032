"""Model kinds by name. Each module holds one family, reading top to bottom."""

from __future__ import annotations

import sys

from training.config import TrainConfig
from training.models.base import Batch, GenerativeModel, StepContext

__all__ = ["Batch", "GenerativeModel", "StepContext", "build_model", "model_class", "model_classes", "summary"]


def model_classes() -> dict[str, type[GenerativeModel]]:
    """Every model kind by name, in the order `genserve-train --help` lists them."""
    # Imported here so that importing one family does not import all of them.
    from training.models.adversarial import ADVERSARIAL_MODELS
    from training.models.autoencoder import ConvAutoencoder, DenoisingAutoencoder
    from training.models.vae import ConvVAE, DenseVAE

    classes: dict[str, type[GenerativeModel]] = {
        "vae": ConvVAE,
        "dense-vae": DenseVAE,
        "ae": ConvAutoencoder,
        "dae": DenoisingAutoencoder,
    }
    classes.update(ADVERSARIAL_MODELS)
    return classes


def summary(cls: type) -> str:
    """One line saying what a model kind is: the first line of its class docstring, else of its module's."""
    doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or cls.__name__
    return doc.strip().splitlines()[0].rstrip(".")


def model_class(kind: str) -> type[GenerativeModel]:
    classes = model_classes()
    if kind not in classes:
        raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(sorted(classes))}")
    return classes[kind]


def build_model(
    kind: str, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0
) -> GenerativeModel:
    return model_class(kind)(image_shape, config, num_classes)
