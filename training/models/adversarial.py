"""The adversarial model kinds by name: the GANs (gan.py, dcgan.py) and the adversarial autoencoder (aae.py)."""

from __future__ import annotations

from training.models.aae import AdversarialAutoencoder
from training.models.base import GenerativeModel
from training.models.dcgan import DCGAN
from training.models.gan import GAN, FullyConnectedGAN

ADVERSARIAL_MODELS: dict[str, type[GenerativeModel]] = {
    "gan": FullyConnectedGAN,
    "dcgan": DCGAN,
    "aae": AdversarialAutoencoder,
}
GAN_KINDS = tuple(kind for kind, cls in ADVERSARIAL_MODELS.items() if issubclass(cls, GAN))  # ("gan", "dcgan")

__all__ = ["ADVERSARIAL_MODELS", "GAN_KINDS"]
