"""genserve.v1 tensors on the wire <-> numpy: the format the server and the client both speak.

Part of the protocol layer with `serving.protos` (the generated messages), not of the server: it
imports only numpy, PIL and the generated code, so the client uses it without pulling in the server.
Errors are WireFormatError; each side turns them into its own (the server's InvalidArgument, the
client's CodecError). Raw tensors are little-endian float32 or uint8; images are NCHW in [0, 1].
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from genserve.serving.protos import genserve_pb2 as pb

DTYPES = {pb.DATA_TYPE_FLOAT32: np.dtype("<f4"), pb.DATA_TYPE_UINT8: np.dtype("u1")}
DTYPE_NAMES = {pb.DATA_TYPE_FLOAT32: "float32", pb.DATA_TYPE_UINT8: "uint8"}
MAX_RANK = 8


class WireFormatError(ValueError):
    """A message (or an array) that does not follow the genserve.v1 tensor format; says what is wrong."""


def array_to_tensor(array: np.ndarray, into: pb.Tensor | None = None) -> pb.Tensor:
    """float32 or uint8 array -> Tensor (other float/int dtypes are converted to float32).

    With `into` (a field of the message being built) the data is written there: building a
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
    """Tensor -> read-only array, checking dtype, shape and byte size (WireFormatError otherwise)."""
    if tensor.dtype not in DTYPES:
        raise WireFormatError(
            f"{what}: dtype {pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else tensor.dtype} "
            "is not supported; use DATA_TYPE_FLOAT32 or DATA_TYPE_UINT8"
        )
    shape = list(tensor.shape)
    if not shape or len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise WireFormatError(f"{what}: shape {shape} is invalid; give 1 to {MAX_RANK} non-negative dimensions")
    dtype = DTYPES[tensor.dtype]
    expected = math.prod(shape) * dtype.itemsize
    data = tensor.data  # read once: every read of a bytes field makes a new bytes object
    if len(data) != expected:
        raise WireFormatError(
            f"{what}: {len(data)} bytes of data, but shape {shape} of {DTYPE_NAMES[tensor.dtype]} "
            f"needs {expected} bytes"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


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
