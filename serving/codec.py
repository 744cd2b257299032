"""The server's side of genserve.v1 Tensor and Images messages: requests -> checked numpy arrays,
numpy arrays -> responses (raw little-endian tensors or PNG files).

Decoding validates everything and raises InvalidArgument saying what is wrong; the wire format
itself is serving.wire, shared with the client (clients.codec). Images inside genserve are float32
NCHW in [0, 1].
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

from genserve.serving import wire
from genserve.serving.errors import InvalidArgument
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.wire import WireFormatError, array_to_tensor, encode_png, to_uint8

PNG_MODES = {1: "L", 3: "RGB"}
IMAGE_FORMATS = frozenset(pb.ImageFormat.values())
__all__ = [
    "array_to_tensor", "check_image_format", "decode_images", "encode_images", "encode_png",
    "latents_from_tensor", "tensor_to_array", "to_uint8",
]


def tensor_to_array(tensor: pb.Tensor, what: str) -> np.ndarray:
    """Tensor -> read-only array, checking dtype, shape and byte size (InvalidArgument otherwise)."""
    try:
        return wire.tensor_to_array(tensor, what)
    except WireFormatError as error:
        raise InvalidArgument(str(error)) from None


def latents_from_tensor(tensor: pb.Tensor, dim: int, what: str = "latents", max_abs: float = math.inf) -> np.ndarray:
    """A float32 (N, dim) array of finite values of magnitude at most max_abs, or InvalidArgument."""
    if tensor.dtype != pb.DATA_TYPE_FLOAT32:
        raise InvalidArgument(f"{what} must be DATA_TYPE_FLOAT32")
    array = tensor_to_array(tensor, what)
    if array.ndim != 2 or array.shape[1] != dim:
        raise InvalidArgument(f"{what} must have shape (N, {dim}), got {list(array.shape)}")
    largest = largest_magnitude(array)
    if not math.isfinite(largest):
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise InvalidArgument(f"{what} contain NaN or infinite values (in {bad} of {len(array)} rows)")
    if largest > max_abs:
        raise InvalidArgument(f"{what} hold a value of magnitude {largest:.4g}, over limits.max_latent_abs ({max_abs:g})")
    return array


def largest_magnitude(array: np.ndarray) -> float:
    """max |x| over the array in one pass without a temporary (0 when empty); NaN or inf when any
    value is NaN or infinite (max and min propagate NaN), so it doubles as the finiteness check."""
    if not array.size:
        return 0.0
    return max(float(array.max()), -float(array.min()))


def all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity in `array`: its sum is finite then (NaN and inf propagate), which is
    cheaper than np.isfinite(array).all(); only an overflowing sum of huge values needs the full check."""
    return math.isfinite(float(array.sum())) or bool(np.isfinite(array).all())


def decode_images(images: pb.Images, image_shape: tuple[int, int, int], max_images: int, what: str = "images") -> np.ndarray:
    """Images -> float32 (N, C, H, W) in [0, 1], checked against the model's image shape."""
    kind = images.WhichOneof("encoding")
    if kind is None:
        raise InvalidArgument(f"{what}: no images given (set images.tensor or images.png)")
    count = len(images.png.png) if kind == "png" else (images.tensor.shape[0] if images.tensor.shape else 0)
    if count > max_images:
        raise InvalidArgument(f"{what}: {count} images, more than the limit of {max_images} per request")
    if count == 0:
        raise InvalidArgument(f"{what}: no images given (0 images)")
    if kind == "png":
        return np.stack([_decode_png(data, image_shape, f"{what}[{i}]") for i, data in enumerate(images.png.png)])
    array = tensor_to_array(images.tensor, what)
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(image_shape):
        c, h, w = image_shape
        raise InvalidArgument(f"{what}: shape {list(array.shape)} does not match the model's images (N, {c}, {h}, {w})")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    low, high = float(array.min()), float(array.max())  # NaN and inf show in these: no separate pass
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InvalidArgument(f"{what}: float32 images contain NaN or infinite values")
    if low < 0.0 or high > 1.0:
        raise InvalidArgument(f"{what}: float32 images must be in [0, 1], got values in [{low:.4g}, {high:.4g}]")
    return np.ascontiguousarray(array, dtype=np.float32)


def _decode_png(data: bytes, image_shape: tuple[int, int, int], what: str) -> np.ndarray:
    c, h, w = image_shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format != "PNG":
                raise InvalidArgument(f"{what}: not a PNG file (it is {image.format or 'unrecognised'})")
            if image.size != (w, h):  # checked before decoding the pixels: no decompression bombs
                raise InvalidArgument(f"{what}: PNG is {image.size[0]}x{image.size[1]}, the model takes {w}x{h} images")
            if image.mode.startswith(("I", "F")):  # 16-bit grayscale: convert() would clip it, not scale it
                raise InvalidArgument(
                    f"{what}: a 16-bit PNG (mode {image.mode}); images are 8 bits per channel: "
                    "save it as 8-bit grayscale or RGB, or send a float32 tensor"
                )
            image = image.convert(PNG_MODES[c])
    except InvalidArgument:
        raise
    except Exception as error:  # PIL raises many types on malformed files
        raise InvalidArgument(f"{what}: not a valid PNG file ({type(error).__name__}: {error})") from None
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
    return pixels.astype(np.float32) / np.float32(255.0)


def encode_images(images: np.ndarray, image_format: int, into: pb.Images | None = None) -> pb.Images:
    """float32 (N, C, H, W) in [0, 1] -> Images in the requested ImageFormat (written into `into`
    when given, as array_to_tensor)."""
    target = pb.Images() if into is None else into
    if image_format == pb.IMAGE_FORMAT_PNG:
        target.png.png[:] = [encode_png(image) for image in images]
    elif image_format == pb.IMAGE_FORMAT_UINT8:
        array_to_tensor(to_uint8(images), into=target.tensor)
    else:
        array_to_tensor(np.asarray(images, dtype=np.float32), into=target.tensor)
    return target


def check_image_format(image_format: int) -> None:
    if image_format not in IMAGE_FORMATS:
        raise InvalidArgument(f"output_format {image_format} is not an ImageFormat ({', '.join(pb.ImageFormat.keys())})")
