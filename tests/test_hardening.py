"""Hardening (issue 18): what an adversarial client or one bad repository file must not be able to do.

The models here are tiny ONNX graphs built with onnx.helper (no training, no torch): a decoder
latents (N, 4) -> images (N, 1, 2, 2) and a denoiser with symbolic image axes, published through
Repository.publish like any other tool would. Repository cases use real files: FIFOs, symlinks,
swapped files, manifests with oversized numbers and deep nesting.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import json
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from export import FileEntry, Manifest, ManifestError, PartSpec, Repository, TensorSpec, VariantSpec
from serving import codec
from serving.errors import InvalidArgument
from serving.models import parse_version
from serving.protos import genserve_pb2 as pb
from serving.protos import genserve_pb2_grpc, grpc_service_pb2_grpc
from serving.protos import grpc_service_pb2 as ip
from test_serving_support import RunningServer, server_config, wait_until

Code = grpc.StatusCode
LATENT = 4
GOOD, OTHER = "tiny-vae", "tiny-other"
MiB = 1 << 20


# --- tiny graphs and versions -------------------------------------------------------------------
def decoder_graph(activation: str = "Sigmoid", seed: int = 0) -> bytes:
    """latents (batch, 4) -> images (batch, 1, 2, 2): activation(latents @ W)."""
    weights = np.random.default_rng(seed).standard_normal((LATENT, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["latents", "w"], ["flat"]),
        helper.make_node(activation, ["flat"], ["act"]),
        helper.make_node("Reshape", ["act", "shape"], ["images"]),
    ]
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("latents", TensorProto.FLOAT, ["batch", LATENT])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights.flatten()),
         helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 1, 2, 2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def denoiser_graph() -> bytes:
    """images (batch, c, h, w) -> images: Identity, every axis symbolic."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["noisy"], ["images"])], "denoiser",
        [helper.make_tensor_value_info("noisy", TensorProto.FLOAT, ["batch", "c", "h", "w"])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", "c", "h", "w"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def decoder_manifest(name: str, version: int, latent_shape: int = LATENT, image_shape=(1, 2, 2)) -> Manifest:
    return Manifest(
        name=name, version=version, kind="vae", created_at="2026-01-01T00:00:00+00:00", image_shape=image_shape,
        latent_dim=latent_shape, prior={"distribution": "normal", "mean": 0.0, "std": 1.0, "dim": latent_shape},
        dataset="tiny", class_names=None,
        parts={"decoder": PartSpec(
            (TensorSpec("latents", "float32", ("batch", latent_shape)),),
            (TensorSpec("images", "float32", ("batch", *image_shape), (0.0, 1.0)),),
            {"fp32": VariantSpec("decoder.onnx", "float32", ("CPUExecutionProvider",))},
        )},
    )


def denoiser_manifest(name: str, version: int, image_shape=(1, 2, 2)) -> Manifest:
    return Manifest(
        name=name, version=version, kind="dae", created_at="2026-01-01T00:00:00+00:00", image_shape=image_shape,
        latent_dim=None, prior=None, dataset="tiny", class_names=None,
        parts={"denoiser": PartSpec(
            (TensorSpec("noisy", "float32", ("batch", *image_shape), (0.0, 1.0)),),
            (TensorSpec("images", "float32", ("batch", *image_shape), (0.0, 1.0)),),
            {"fp32": VariantSpec("denoiser.onnx", "float32", ("CPUExecutionProvider",))},
        )},
    )


def publish(repo: Repository, name: str, manifest=decoder_manifest, graph: bytes | None = None, **kwargs) -> int:
    def build(staging: Path, version: int) -> Manifest:
        made = manifest(name, version, **kwargs)
        part = next(iter(made.parts))
        (staging / f"{part}.onnx").write_bytes(graph if graph is not None else
                                               (denoiser_graph() if part == "denoiser" else decoder_graph()))
        return made

    return repo.publish(name, build)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    repository = Repository(tmp_path / "repo", create=True)
    publish(repository, GOOD)
    return repository


def start(repo: Repository, **overrides) -> RunningServer:
    return RunningServer(server_config(repo.root, **overrides)).start(timeout=60)


def write_manifest_text(repo: Repository, name: str, text: str | bytes, version: int = 1) -> Path:
    """A version directory whose manifest.json holds `text` (written by hand, as damage would)."""
    vdir = repo.version_dir(name, version)
    vdir.mkdir(parents=True)
    path = vdir / "manifest.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    return path


def good_manifest_dict(repo: Repository) -> dict:
    return json.loads(repo.load_manifest(GOOD, 1).to_json())


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def index(server: RunningServer) -> list[tuple[str, str, str]]:
    with server.channel() as channel:
        response = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            ip.RepositoryIndexRequest(), timeout=10)
    return [(m.name, m.version, m.state) for m in response.models]


def generate(server: RunningServer, model: str = GOOD, **fields) -> pb.GenerateResponse:
    with server.channel() as channel:
        return genserve_pb2_grpc.GenserveStub(channel).Generate(pb.GenerateRequest(model=model, **fields), timeout=10)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# --- High 1: memory held by rejected requests ---------------------------------------------------
def _requests_left_for_the_collector(server: RunningServer, metadata=(), calls: int = 4, size: int = 2 * MiB):
    """How many of `calls` rejected Encode requests of `size` bytes are still in memory once their
    calls have ended, held only by reference cycles (with the collector off, they would stay until
    some later collection: the 3 GiB the issue measured). Returns (that count, the status codes)."""
    request = pb.EncodeRequest(model="no-such-model", images=pb.Images(
        tensor=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[size], data=b"\x01" * size)))
    with server.channel() as channel:
        stub = genserve_pb2_grpc.GenserveStub(channel)
        codes = set()
        gc.collect()
        gc.disable()
        try:
            for _ in range(calls):
                codes.add(rpc_error(stub.Encode, request, metadata=metadata, timeout=30).code())
            wait_until(lambda: server.server.state.in_flight == 0, what="the calls to end")
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, pb.EncodeRequest) and o.ByteSize() >= size]
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
            gc.enable()
    return len(left), codes


def test_rejected_large_requests_are_freed_when_the_call_ends(repo: Repository) -> None:
    server = start(repo)
    try:
        left, codes = _requests_left_for_the_collector(server)
        assert codes == {Code.NOT_FOUND}
        assert left == 0, f"{left} of 4 rejected 2 MiB requests were held by reference cycles after their calls"
    finally:
        server.stop()


def test_requests_without_the_token_are_refused_before_their_body(repo: Repository) -> None:
    server = start(repo, auth_token="s3cret")
    try:
        left, codes = _requests_left_for_the_collector(server)
        assert codes == {Code.UNAUTHENTICATED}
        assert left == 0, f"{left} of 4 unauthenticated 2 MiB requests were decoded and held after their calls"
        with server.channel() as channel:
            ok = genserve_pb2_grpc.GenserveStub(channel).Generate(
                pb.GenerateRequest(model=GOOD, count=1), metadata=(("authorization", "Bearer s3cret"),), timeout=10)
        assert ok.model.version == 1
    finally:
        server.stop()
