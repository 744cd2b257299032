"""DCGAN (Radford et al. 2015), laid out as in pytorch/examples dcgan/main.py: the default recipe with
an averaged generator and a minibatch-stddev discriminator, and the classic one as a preset.

The rules: strided convolutions instead of pooling in D; transposed convolutions to upsample in G
(or, with config.upsample == "resize", nearest-neighbour resize then a 3x3 convolution, which has no
checkerboard artefacts); batch norm everywhere except G's output and D's input; ReLU in G with a tanh
output; LeakyReLU 0.2 in D; Adam lr 2e-4, beta1 0.5 (the default `dcgan`: 6e-4); weights drawn from N(0, 0.02).

The layer plan comes from the image size: G starts at the size reached by halving H and W while both
stay even and at least 4 (7x7 for 28 px, 4x4 for 32 and 64 px), then doubles up to H x W with one
layer per doubling; channels start at 64 * 2^(doublings - 1) and halve each time. D mirrors it with
one stride-2 convolution per halving and a final convolution over the whole 7x7 or 4x4 map.
config.balance (see gan.py) skips the update of a player that is far ahead.

The default `dcgan` keeps this layer plan, adds a minibatch standard-deviation feature before D's last
layer (against mode collapse), smooths the real labels to 0.9, and samples from an exponential moving
average of G's weights with recomputed batch-norm statistics (gan.py). config.dcgan_generator_width
makes G that many times as wide as D. The preset `dcgan-classic` is
the plain recipe above.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from genserve.training.config import TrainConfig
from genserve.training.models.gan import GAN, MinibatchStdDev

BASE_CHANNELS = 64  # ngf = ndf in pytorch/examples; config.dcgan_base_channels overrides it
MIN_START = 4


def layer_plan(height: int, width: int) -> tuple[int, int, int]:
    """(start height, start width, doublings) for an H x W image; a clear error when it cannot be done."""
    doublings = 0
    h, w = height, width
    while h % 2 == 0 and w % 2 == 0 and h // 2 >= MIN_START and w // 2 >= MIN_START:
        h, w = h // 2, w // 2
        doublings += 1
    if doublings == 0:
        raise ValueError(
            f"dcgan cannot plan layers for {height}x{width} images: it halves the size with stride-2 "
            f"convolutions, so height and width must be even and at least {2 * MIN_START} (e.g. 28, 32, 64)"
        )
    return h, w, doublings


def upsample(in_channels: int, out_channels: int, mode: str) -> nn.Module:
    """Double the spatial size: a 4x4 stride-2 transposed conv, or nearest resize + 3x3 conv."""
    if mode == "transposed":
        return nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=False)
    if mode == "resize":
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
        )
    raise ValueError(f"upsample must be 'transposed' or 'resize', not {mode!r}")


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02); batch norm scales N(1, 0.02), shifts 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGAN(GAN):
    """The default DCGAN: the classic layer plan with a minibatch-stddev feature in D, label smoothing, and an EMA of G."""

    kind = "dcgan"
    # Measured on MNIST (docs/results.md): spectral norm in place of D's batch norm, and twice G's rate
    # for D, gave far worse samples at this budget (fid_domain 263 after one epoch against 163), so the
    # default keeps D's batch norm and one learning rate.
    spectral_norm = False
    discriminator_norm: ClassVar[bool] = True  # batch norm in D's hidden layers
    d_lr_scale = 1.0
    real_label = 0.9
    minibatch_std = True
    # Measured on MNIST, 5 epochs (docs/results.md): batch 64 reached fid_domain 28.2 against 31.1 at 128
    # (twice the updates for about the same time per epoch on a CPU); batch 32 led early, then stalled at 34.8.
    default_batch_size = 64
    # Measured on MNIST, 5 epochs at batch 64 (docs/results.md): Adam at 6e-4 for both players reached
    # fid_domain 17.3 and 13.1 (seeds 0 and 1) against 28.2 at pytorch/examples' 2e-4, at no cost in time; the EMA of G
    # smooths the noisier steps.
    default_lr = 6e-4

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        c, h, w = image_shape
        self.start_h, self.start_w, doublings = layer_plan(h, w)
        base = config.dcgan_base_channels or BASE_CHANNELS
        self.channels = [base * 2**i for i in reversed(range(doublings))]  # e.g. 512, 256, 128, 64
        super().__init__(image_shape, config, num_classes)

    def build_generator(self) -> nn.Module:
        """noise (as a 1x1 map) -> start_h x start_w -> ... -> H x W"""
        c = self.image_shape[0]
        # config.dcgan_generator_width: G's channels over D's. Measured on MNIST, 5 epochs at batch 64 and 2e-4
        # (docs/results.md): 2 reached fid_domain 25.5 against 28.2, ahead after every epoch, but at
        # 0.54-0.65x the images/s, past the 10-minute CPU budget; so the default stays 1.
        channels = [n * self.config.dcgan_generator_width for n in self.channels]
        mode = self.config.upsample
        layers: list[nn.Module] = [
            nn.Unflatten(1, (self.latent_dim, 1, 1)),
            nn.ConvTranspose2d(self.latent_dim, channels[0], (self.start_h, self.start_w), 1, 0, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(True),
        ]
        for in_channels, out_channels in zip(channels, channels[1:], strict=False):
            layers += [upsample(in_channels, out_channels, mode), nn.BatchNorm2d(out_channels), nn.ReLU(True)]
        layers += [upsample(channels[-1], c, mode), nn.Tanh()]
        generator = nn.Sequential(*layers)
        generator.apply(init_weights)
        return generator

    def build_discriminator(self) -> nn.Module:
        """H x W -> ... -> start_h x start_w -> one logit"""
        c = self.image_shape[0]
        channels = self.channels[::-1]  # e.g. 64, 128, 256, 512
        layers: list[nn.Module] = [nn.Conv2d(c, channels[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for in_channels, out_channels in zip(channels, channels[1:], strict=False):
            layers.append(nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=False))
            if self.discriminator_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
        if self.minibatch_std:
            layers.append(MinibatchStdDev())
        last = channels[-1] + int(self.minibatch_std)
        layers += [nn.Conv2d(last, 1, (self.start_h, self.start_w), 1, 0, bias=False), nn.Flatten()]
        discriminator = nn.Sequential(*layers)
        discriminator.apply(init_weights)
        return discriminator


class ClassicDCGAN(DCGAN):
    """Preset: the classic DCGAN (pytorch/examples, the TF tutorial): batch norm in D, one learning rate, no EMA."""

    kind = "dcgan-classic"
    preset_of = "dcgan"
    real_label = 1.0
    minibatch_std = False
    ema_decay = None
    default_batch_size = 128  # as measured in docs/results.md
    default_lr = 2e-4
