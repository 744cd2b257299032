"""The client's codec (clients.codec) and what importing the client costs: no server module, no torch,
no matplotlib, no training code (no server needed for these tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import environment_for_subprocess
from PIL import Image

from genserve.clients import codec
from genserve.clients.client import GenserveClient
from genserve.serving import codec as server_codec
from genserve.serving.protos import genserve_pb2 as pb

# The protocol layer the client may use: the generated messages, the module that (re)builds them,
# and the wire format shared with the server. Nothing else under serving/.
PROTOCOL_MODULES = {"genserve.serving", "genserve.serving.protos", "genserve.serving.protos_build", "genserve.serving.wire"}


def layer(module: str) -> str:
    """The top-level name, with genserve's own folders named as in the source tree: genserve.serving.x -> serving."""
    return module.removeprefix("genserve.").split(".")[0]


def _imported_by(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environment_for_subprocess()
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("module", ["genserve.clients.client", "genserve.clients.cli"])
def test_client_imports_no_server_torch_or_matplotlib(module: str) -> None:
    modules = _imported_by(f"import {module}")
    assert module in modules
    heavy = sorted(m for m in modules if layer(m) in ("torch", "matplotlib", "training", "export", "onnxruntime"))
    assert heavy == []
    server = sorted(
        m for m in modules
        if layer(m) == "serving" and m not in PROTOCOL_MODULES and not m.startswith("genserve.serving.generated")
    )
    assert server == []


@pytest.mark.parametrize("images", [
    np.arange(2 * 1 * 3 * 4, dtype=np.uint8).reshape(2, 1, 3, 4) * 10,
    np.random.default_rng(0).integers(0, 256, (2, 3, 3, 4), dtype=np.uint8),
])
@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_requests_decode_on_the_server_as_sent(images: np.ndarray, encoding: str) -> None:
    floats = images.astype(np.float32) / 255
    for sent in (images, floats):
        decoded = server_codec.decode_images(codec.images_to_proto(sent, encoding), images.shape[1:], max_images=4)
        np.testing.assert_allclose(decoded, floats, atol=1e-7)


@pytest.mark.parametrize("image_format", [pb.IMAGE_FORMAT_FLOAT32, pb.IMAGE_FORMAT_UINT8, pb.IMAGE_FORMAT_PNG])
def test_responses_read_as_the_server_wrote_them(image_format: int) -> None:
    floats = np.random.default_rng(1).integers(0, 256, (3, 3, 4, 5)).astype(np.float32) / 255
    again = codec.images_from_proto(server_codec.encode_images(floats, image_format))
    assert again.dtype == np.float32 and again.shape == floats.shape
    np.testing.assert_allclose(again, floats, atol=1e-6)


def test_latents_round_trip_bit_for_bit() -> None:
    latents = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    request = pb.GenerateRequest()
    codec.array_to_tensor(latents, into=request.latents)
    np.testing.assert_array_equal(codec.tensor_to_array(request.latents, "latents"), latents)


@pytest.mark.parametrize(
    ("convert", "message"),
    [
        (lambda: codec.tensor_to_array(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 2], data=b"\0" * 15), "latents"),
         r"the server's response: latents: 15 bytes of data, but shape \[2, 2\] of float32 needs 16 bytes"),
        (lambda: codec.tensor_to_array(pb.Tensor(dtype=7, shape=[1], data=b"\0"), "mean"),
         "mean: dtype 7 is not supported"),
        (lambda: codec.images_from_proto(pb.Images(png=pb.PngImages(png=[b"not a png"]))),
         r"images\[0\] is not a valid PNG file"),
        (lambda: codec.images_to_proto(np.zeros((1, 1, 2, 2), np.uint8), "jpeg"),
         "image encoding must be 'raw' or 'png', not 'jpeg'"),
        (lambda: codec.images_to_proto(np.zeros((1, 2, 2, 2), np.uint8), "png"),
         r"PNG images must be \(N, 1 or 3, H, W\) arrays, got shape \[1, 2, 2, 2\]"),
    ],
)
def test_codec_errors_are_client_errors(convert, message: str) -> None:
    with pytest.raises(codec.CodecError, match=message) as error:
        convert()
    assert isinstance(error.value, ValueError)  # the CLI reports ValueErrors as one line, exit status 2


def test_unknown_image_encoding_is_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="image_encoding must be 'raw' or 'png', not 'gif'"):
        GenserveClient("127.0.0.1:1", image_encoding="gif")


# --- the command line's pictures ------------------------------------------------------------------
def test_cli_draws_png_pictures_without_torch(tmp_path) -> None:
    statement = (
        "import numpy as np; from genserve.clients.cli import write_images, write_rows; "
        "x = np.random.default_rng(0).random((6, 1, 28, 28), dtype=np.float32); "
        f"write_images(__import__('pathlib').Path({str(tmp_path / 'grid.png')!r}), x, 'grid', ncols=3); "
        f"write_rows(__import__('pathlib').Path({str(tmp_path / 'rows.png')!r}), [('a', x), ('b', 1 - x)], 'rows')"
    )
    modules = _imported_by(statement)
    assert "matplotlib" in modules and "genserve.training.plots" in modules
    assert sorted(m for m in modules if m.split(".")[0] == "torch") == []
    for name in ("grid.png", "rows.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.size[0] > 100


def test_pictures_tile_tensors_and_arrays_alike() -> None:
    import torch

    from genserve.training.plots import tile

    images = torch.rand(5, 3, 4, 6, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # some outside [0, 1]
    from_tensor, from_array = tile(images, ncols=2), tile(images.numpy(), ncols=2)
    assert from_tensor.shape == (3 * 4 + 2 * 2, 2 * 6 + 2, 3) and from_tensor.min() >= 0 and from_tensor.max() <= 1
    np.testing.assert_array_equal(from_tensor, from_array)
    np.testing.assert_array_equal(from_tensor[:4, :6], images[0].clamp(0, 1).permute(1, 2, 0).numpy())
