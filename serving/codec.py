"""genserve.v1 Tensor and Images messages <-> numpy arrays (raw little-endian tensors or PNG files).

Used by the server (decoding requests, with validation that raises InvalidArgument saying what is
wrong) and by the client (the other direction). Images inside genserve are float32 NCHW in [0, 1].
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

from serving.errors import InvalidArgument
from serving.protos import genserve_pb2 as pb

DTYPES = {pb.DATA_TYPE_FLOAT32: np.dtype("<f4"), pb.DATA_TYPE_UINT8: np.dtype("u1")}
DTYPE_NAMES = {pb.DATA_TYPE_FLOAT32: "float32", pb.DATA_TYPE_UINT8: "uint8"}
MAX_RANK = 8
PNG_MODES = {1: "L", 3: "RGB"}


def array_to_tensor(array: np.ndarray, into: pb.Tensor | None = None) -> pb.Tensor:
    """float32 or uint8 array -> Tensor (other float/int dtypes are converted to float32).

    With `into` (a field of the response being built) the data is written there: building a
    Tensor and then assigning it to a field would copy the bytes once more per nesting level."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        dtype, data = pb.DATA_TYPE_UINT8, np.ascontiguousarray(array)
    else:
        dtype, data = pb.DATA_TYPE_FLOAT32, np.ascontiguousarray(array, dtype="<f4")
    tensor = pb.Tensor() if into is None else into
    tensor.dtype = dtype
    tensor.shape[:] = array.shape
    tensor.data = data.tobytes()
    return tensor


def tensor_to_array(tensor: pb.Tensor, what: str) -> np.ndarray:
    """Tensor -> read-only array, checking dtype, shape and byte size (InvalidArgument otherwise)."""
    if tensor.dtype not in DTYPES:
        raise InvalidArgument(
            f"{what}: dtype {pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else tensor.dtype} "
            "is not supported; use DATA_TYPE_FLOAT32 or DATA_TYPE_UINT8"
        )
    shape = list(tensor.shape)
    if not shape or len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: shape {shape} is invalid; give 1 to {MAX_RANK} non-negative dimensions")
    dtype = DTYPES[tensor.dtype]
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"{what}: {len(tensor.data)} bytes of data, but shape {shape} of {DTYPE_NAMES[tensor.dtype]} "
            f"needs {expected} bytes"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def latents_from_tensor(tensor: pb.Tensor, dim: int, what: str = "latents", max_abs: float = math.inf) -> np.ndarray:
    """A float32 (N, dim) array of finite values of magnitude at most max_abs, or InvalidArgument."""
    if tensor.dtype != pb.DATA_TYPE_FLOAT32:
        raise InvalidArgument(f"{what} must be DATA_TYPE_FLOAT32")
    array = tensor_to_array(tensor, what)
    if array.ndim != 2 or array.shape[1] != dim:
        raise InvalidArgument(f"{what} must have shape (N, {dim}), got {list(array.shape)}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise InvalidArgument(f"{what} contain NaN or infinite values (in {bad} of {len(array)} rows)")
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest > max_abs:
        raise InvalidArgument(f"{what} hold a value of magnitude {largest:.4g}, over limits.max_latent_abs ({max_abs:g})")
    return array


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
    if not np.isfinite(array).all():
        raise InvalidArgument(f"{what}: float32 images contain NaN or infinite values")
    low, high = float(array.min()), float(array.max())
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


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float32 [0, 1] -> uint8 [0, 255], rounding to nearest."""
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """One float32 (C, H, W) image in [0, 1] -> PNG bytes (grayscale or RGB)."""
    pixels = to_uint8(image)
    pixels = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # 2-D: L, (H, W, 3): RGB
    return buffer.getvalue()


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
    if image_format not in pb.ImageFormat.values():
        raise InvalidArgument(f"output_format {image_format} is not an ImageFormat ({', '.join(pb.ImageFormat.keys())})")


def images_from_proto(images: pb.Images) -> np.ndarray:
    """Response Images -> float32 (N, C, H, W) in [0, 1] (client side; no limits)."""
    if images.WhichOneof("encoding") == "png":
        arrays = []
        for data in images.png.png:
            image = Image.open(io.BytesIO(data))
            pixels = np.asarray(image)
            pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
            arrays.append(pixels.astype(np.float32) / np.float32(255.0))
        return np.stack(arrays) if arrays else np.zeros((0, 1, 1, 1), np.float32)
    array = tensor_to_array(images.tensor, "images")
    return array.astype(np.float32) / np.float32(255.0) if array.dtype == np.uint8 else np.array(array, np.float32)


def images_to_proto(images: np.ndarray, encoding: str = "raw") -> pb.Images:
    """Client side: (N, C, H, W) uint8 or float32 [0, 1] -> Images as a raw tensor or PNG files."""
    images = np.asarray(images)
    if encoding == "png":
        floats = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
        return pb.Images(png=pb.PngImages(png=[encode_png(image) for image in floats]))
    if encoding != "raw":
        raise ValueError(f"image encoding must be 'raw' or 'png', not {encoding!r}")
    return pb.Images(tensor=array_to_tensor(images if images.dtype == np.uint8 else images.astype(np.float32)))
