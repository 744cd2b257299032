"""DCGAN (Radford et al. 2015), laid out as in pytorch/examples dcgan/main.py.

The rules: strided convolutions instead of pooling in D; transposed convolutions to upsample in G
(or, with config.upsample == "resize", nearest-neighbour resize then a 3x3 convolution, which has no
checkerboard artefacts); batch norm everywhere except G's output and D's input; ReLU in G with a tanh
output; LeakyReLU 0.2 in D; Adam lr 2e-4, beta1 0.5; weights drawn from N(0, 0.02).

The layer plan comes from the image size: G starts at the size reached by halving H and W while both
stay even and at least 4 (7x7 for 28 px, 4x4 for 32 and 64 px), then doubles up to H x W with one
layer per doubling; channels start at 64 * 2^(doublings - 1) and halve each time. D mirrors it with
one stride-2 convolution per halving and a final convolution over the whole 7x7 or 4x4 map.
config.balance (see gan.py) skips the update of a player that is far ahead.
"""

from __future__ import annotations

from torch import nn

from training.config import TrainConfig
from training.models.gan import GAN

BASE_CHANNELS = 64  # ngf = ndf in pytorch/examples
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
    kind = "dcgan"

    def __init__(self, image_shape: tuple[int, int, int], config: TrainConfig, num_classes: int = 0):
        super().__init__(image_shape, config, num_classes)
        c, h, w = self.image_shape
        start_h, start_w, doublings = layer_plan(h, w)
        channels = [BASE_CHANNELS * 2**i for i in reversed(range(doublings))]  # e.g. 512, 256, 128, 64

        # G: noise (as a 1x1 map) -> start_h x start_w -> ... -> H x W
        layers: list[nn.Module] = [
            nn.Unflatten(1, (self.latent_dim, 1, 1)),
            nn.ConvTranspose2d(self.latent_dim, channels[0], (start_h, start_w), 1, 0, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(True),
        ]
        for in_channels, out_channels in zip(channels, channels[1:], strict=False):
            layers += [upsample(in_channels, out_channels, config.upsample), nn.BatchNorm2d(out_channels), nn.ReLU(True)]
        layers += [upsample(channels[-1], c, config.upsample), nn.Tanh()]
        self.generator = nn.Sequential(*layers)

        # D: H x W -> ... -> start_h x start_w -> one logit
        reversed_channels = channels[::-1]  # e.g. 64, 128, 256, 512
        layers = [nn.Conv2d(c, reversed_channels[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for in_channels, out_channels in zip(reversed_channels, reversed_channels[1:], strict=False):
            layers += [
                nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers += [nn.Conv2d(reversed_channels[-1], 1, (start_h, start_w), 1, 0, bias=False), nn.Flatten()]
        self.discriminator = nn.Sequential(*layers)

        self.apply(init_weights)
