"""Model kinds by name: the default recipe of each kind and the named presets (the seeds' published
layer plans). Each module holds one family, reading top to bottom; every list of kinds is derived from
`model_classes()`, and what a kind can do is declared on its class (see base.py)."""

from __future__ import annotations

from functools import cache

from genserve.training.config import TrainConfig
from genserve.training.models.base import Batch, GenerativeModel, StepContext

__all__ = ["Batch", "GenerativeModel", "StepContext", "build_model", "model_class", "model_classes", "model_kinds"]


@cache
def model_classes() -> dict[str, type[GenerativeModel]]:
    """Every model kind by name: the defaults first, each followed by its presets."""
    # Imported here so that importing training.models does not import every family.
    from genserve.training.models.aae import AdversarialAutoencoder
    from genserve.training.models.autoencoder import (
        ConvAutoencoder,
        DenoisingAutoencoder,
        KerasConvAutoencoder,
        KerasDenoisingAutoencoder,
    )
    from genserve.training.models.dcgan import DCGAN, ClassicDCGAN
    from genserve.training.models.gan import MLPGAN, BalancedMLPGAN
    from genserve.training.models.vae import ConvVAE, CsnlDenseVAE, DenseVAE, KerasConvVAE

    classes = [
        ConvVAE, KerasConvVAE, DenseVAE, CsnlDenseVAE, ConvAutoencoder, KerasConvAutoencoder,
        DenoisingAutoencoder, KerasDenoisingAutoencoder, MLPGAN, BalancedMLPGAN, DCGAN, ClassicDCGAN,
        AdversarialAutoencoder,
    ]
    return {cls.kind: cls for cls in classes}


def model_kinds(presets: bool = True) -> tuple[str, ...]:
    """The kind names; with presets=False only the default recipes."""
    return tuple(kind for kind, cls in model_classes().items() if presets or cls.preset_of is None)


def model_class(kind: str) -> type[GenerativeModel]:
    classes = model_classes()
    if kind not in classes:
        raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(classes)}")
    return classes[kind]


def build_model(
    kind: str, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0
) -> GenerativeModel:
    return model_class(kind)(image_shape, config, num_classes)
