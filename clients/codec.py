"""The client's side of genserve.v1 tensors and images: numpy arrays -> requests, responses -> arrays.

Built on serving.wire (the wire format both sides share) and the generated messages only, so the
client imports no server module. Anything that cannot be converted raises CodecError, a ValueError
saying what was wrong. Images go out as uint8 or float32 [0, 1] NCHW, raw or as PNG files, and come
back as float32 [0, 1] NCHW.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from genserve.serving import wire
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.wire import array_to_tensor

IMAGE_ENCODINGS = ("raw", "png")
__all__ = ["IMAGE_ENCODINGS", "CodecError", "array_to_tensor", "images_from_proto", "images_to_proto", "tensor_to_array"]


class CodecError(ValueError):
    """An array the client cannot send, or a response it cannot read; the message says which and why."""


def tensor_to_array(tensor: pb.Tensor, what: str) -> np.ndarray:
    """A response Tensor -> read-only array, checking dtype, shape and byte size (CodecError otherwise)."""
    try:
        return wire.tensor_to_array(tensor, what)
    except wire.WireFormatError as error:
        raise CodecError(f"the server's response: {error}") from None


def images_to_proto(images: np.ndarray, encoding: str = "raw") -> pb.Images:
    """(N, C, H, W) uint8 or float32 [0, 1] -> Images as a raw tensor or PNG files."""
    if encoding not in IMAGE_ENCODINGS:
        raise CodecError(f"image encoding must be 'raw' or 'png', not {encoding!r}")
    images = np.asarray(images)
    if encoding == "png":
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise CodecError(f"PNG images must be (N, 1 or 3, H, W) arrays, got shape {list(images.shape)}")
        floats = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
        return pb.Images(png=pb.PngImages(png=[wire.encode_png(image) for image in floats]))
    return pb.Images(tensor=array_to_tensor(images if images.dtype == np.uint8 else images.astype(np.float32)))


def images_from_proto(images: pb.Images) -> np.ndarray:
    """Response Images -> float32 (N, C, H, W) in [0, 1] (no limits: the server already applied them)."""
    if images.WhichOneof("encoding") == "png":
        arrays = [_decode_png(data, f"images[{i}]") for i, data in enumerate(images.png.png)]
        return np.stack(arrays) if arrays else np.zeros((0, 1, 1, 1), np.float32)
    array = tensor_to_array(images.tensor, "images")
    return array.astype(np.float32) / np.float32(255.0) if array.dtype == np.uint8 else np.array(array, np.float32)


def _decode_png(data: bytes, what: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image)
    except Exception as error:  # PIL raises many types on malformed files
        raise CodecError(f"the server's response: {what} is not a valid PNG file ({type(error).__name__}: {error})") from None
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return pixels.astype(np.float32) / np.float32(255.0)
