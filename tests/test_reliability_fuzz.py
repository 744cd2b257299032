"""Property-based fuzzing of every genserve.v1 RPC and the main Open Inference Protocol RPCs.

Random shapes, dtypes, byte lengths, NaN and infinity, huge counts and dims, empty and malformed
messages, unknown enum values, and random bytes on the wire (a raw channel sending garbage to each
method path with identity serializers). Every call has a deadline and must end with a status code
that describes a client error (or OK): never UNKNOWN, INTERNAL, UNAVAILABLE or a missed deadline
(a hang). Afterwards the server must still be SERVING and answer a valid Generate. The number of
cases sent is printed in the terminal summary. Bounded: about 600 cases; a few seconds on an idle 2-core machine, well under a minute on a loaded one.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    RunningServer,
    copy_repository,
    server_config,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc, grpc_service_pb2_grpc
from genserve.serving.protos import grpc_service_pb2 as ip

MODELS = ["mnist-vae", "mnist-dae", "mnist-dcgan", "mnist-ae"]
DEADLINE_S = 10.0
# Codes a client error (or success) may end with; anything else is a server bug or a hang.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
CASES: collections.Counter[str] = collections.Counter()  # cases sent, by RPC
CODES: collections.Counter[str] = collections.Counter()  # and the status codes they got


class _Summary:
    """Prints the case counts in pytest's terminal summary."""

    @staticmethod
    def pytest_terminal_summary(terminalreporter) -> None:
        if CASES:
            terminalreporter.write_sep("-", f"reliability fuzz: {sum(CASES.values())} cases sent")
            terminalreporter.write_line("  by RPC: " + ", ".join(f"{k} {n}" for k, n in sorted(CASES.items())))
            terminalreporter.write_line("  by status: " + ", ".join(f"{k} {n}" for k, n in CODES.most_common()))


@pytest.fixture(scope="module", autouse=True)
def _count_cases(request: pytest.FixtureRequest):
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "genserve-reliability-fuzz-summary")
    yield
    # unregistered at exit by pytest; the summary hook runs after the session


@pytest.fixture(scope="module")
def server(golden_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = copy_repository(golden_repository, tmp_path_factory.mktemp("fuzz") / "repo", MODELS)
    running = RunningServer(server_config(repo.root)).start()
    yield running
    running.stop()


def check(kind: str, call, request) -> grpc.StatusCode:
    """Send one case; the answer must be a status code from ALLOWED (a response counts as OK)."""
    try:
        call(request, timeout=DEADLINE_S)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        assert code in ALLOWED, f"{kind}: {code.name} ({error.details()}) for {str(request)[:600]!r}"
    finally:
        CASES[kind] += 1
    CODES[code.name] += 1
    return code


# --- strategies ---------------------------------------------------------------------------------
model_names = st.one_of(  # mostly real models, so that cases get past the model lookup
    st.sampled_from(MODELS),
    st.sampled_from(MODELS),
    st.sampled_from(MODELS),
    st.sampled_from(["", "nope", "../mnist-vae", "mnist-vae/../x", "/etc/passwd", "mnist-vae\x00", "a" * 300, "m\u00e9"]),
    st.text(max_size=20),
)
versions = st.one_of(st.just(0), st.just(0), st.integers(-3, 3), st.sampled_from([2**31, 2**63 - 1, -(2**63)]))
int64s = st.one_of(st.integers(-3, 300), st.sampled_from([1024, 1025, 10**6, 2**31, 2**62, 2**63 - 1, -(2**63)]))
dims = st.one_of(st.integers(-2, 70), st.sampled_from([784, 10**6, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
enum_values = st.one_of(st.integers(0, 4), st.integers(5, 2**31 - 1), st.integers(-(2**31), -1))


@st.composite
def tensor_bytes(draw, shape: list[int] | None = None) -> bytes:
    """Random bytes, or float32 data (with NaN, inf, out-of-range values) matching a small shape."""
    if shape is not None and all(0 < d <= 4096 for d in shape) and math.prod(shape) <= 16384 and draw(st.booleans()):
        n = math.prod(shape)
        fill = draw(st.sampled_from(["uniform", "special", "mixed"]))
        values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(n, dtype=np.float32)
        if fill != "uniform":
            specials = np.array([np.nan, np.inf, -np.inf, -1.0, 2.0, 1e38], dtype=np.float32)
            idx = np.random.default_rng(n).integers(0, n, size=max(1, n // 7 if fill == "mixed" else n))
            values[idx] = specials[idx % len(specials)]
        return values.tobytes()
    return draw(st.binary(max_size=4096))


@st.composite
def tensors(draw, latent: bool = False) -> pb.Tensor:
    kind = draw(st.sampled_from(["image", "latent", "random"]))
    if kind == "image":
        shape = [draw(st.integers(0, 5)), 1, draw(st.sampled_from([28, 27, 1])), 28]
    elif kind == "latent" or latent:
        shape = [draw(st.integers(0, 5)), draw(st.sampled_from([2, 16, 32, 64, 100, 0]))]
    else:
        shape = draw(st.lists(dims, max_size=6))
    dtype = draw(st.one_of(st.sampled_from([pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_UINT8, pb.DATA_TYPE_UNSPECIFIED]), enum_values))
    if dtype == pb.DATA_TYPE_UINT8 and all(0 <= d <= 64 for d in shape) and draw(st.booleans()):
        data = draw(st.binary(min_size=math.prod(shape), max_size=math.prod(shape)))  # the right length for uint8
    else:
        data = draw(tensor_bytes(shape))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def images(draw) -> pb.Images | None:
    choice = draw(st.sampled_from(["tensor", "png", "empty", "none"]))
    if choice == "tensor":
        return pb.Images(tensor=draw(tensors()))
    if choice == "png":
        pngs = draw(st.lists(st.one_of(st.binary(max_size=256), st.just(_PNG_28), st.just(_PNG_1x1)), max_size=4))
        return pb.Images(png=pb.PngImages(png=pngs))
    if choice == "empty":
        return pb.Images()
    return None


def _png(height: int, width: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.zeros((height, width), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


_PNG_28, _PNG_1x1 = _png(28, 28), _png(1, 1)


def _with_images(message, value: pb.Images | None):
    if value is not None:
        message.images.CopyFrom(value)
    return message


# --- genserve.v1 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stub(channel) -> genserve_pb2_grpc.GenserveStub:
    return genserve_pb2_grpc.GenserveStub(channel)


@FUZZ
@given(model=model_names, version=versions, count=int64s, seed=st.integers(0, 2**64 - 1),
       latents=st.one_of(st.none(), tensors(latent=True)), temperature=floats, output_format=enum_values,
       return_latents=st.booleans())
def test_generate(stub, model, version, count, seed, latents, temperature, output_format, return_latents):
    request = pb.GenerateRequest(model=model, version=version, count=count, seed=seed, temperature=temperature,
                                 output_format=output_format, return_latents=return_latents)
    if latents is not None:
        request.latents.CopyFrom(latents)
    check("genserve.Generate", stub.Generate, request)


@FUZZ
@given(rpc=st.sampled_from(["Encode", "Reconstruct", "Denoise"]), model=model_names, version=versions, images=images(),
       sample=st.booleans(), seed=st.integers(0, 2**64 - 1), output_format=enum_values)
def test_image_rpcs(stub, rpc, model, version, images, sample, seed, output_format):
    if rpc == "Encode":
        request = pb.EncodeRequest(model=model, version=version)
    elif rpc == "Reconstruct":
        request = pb.ReconstructRequest(model=model, version=version, sample=sample, seed=seed, output_format=output_format)
    else:
        request = pb.DenoiseRequest(model=model, version=version, output_format=output_format)
    check(f"genserve.{rpc}", getattr(stub, rpc), _with_images(request, images))


@FUZZ
@given(model=model_names, version=versions, endpoints=st.sampled_from(["images", "latents", "none"]), images=images(),
       latents=tensors(latent=True), steps=int64s, method=enum_values, output_format=enum_values)
def test_interpolate(stub, model, version, endpoints, images, latents, steps, method, output_format):
    request = pb.InterpolateRequest(model=model, version=version, steps=steps, method=method, output_format=output_format)
    if endpoints == "images":
        request.images.CopyFrom(pb.ImagePair(images=images) if images is not None else pb.ImagePair())
    elif endpoints == "latents":
        request.latents.CopyFrom(pb.LatentPair(latents=latents))
    check("genserve.Interpolate", stub.Interpolate, request)


@settings(FUZZ, max_examples=15)
@given(model=model_names, version=versions)
def test_list_and_get_model(stub, model, version):
    check("genserve.ListModels", stub.ListModels, pb.ListModelsRequest())
    check("genserve.GetModel", stub.GetModel, pb.GetModelRequest(model=model, version=version))


# --- Open Inference Protocol --------------------------------------------------------------------
OIP_MODELS = ["mnist-vae.decoder", "mnist-vae.encoder", "mnist-dcgan.generator", "mnist-dae.denoiser"]
oip_names = st.one_of(st.sampled_from(OIP_MODELS), st.sampled_from(OIP_MODELS), model_names)
oip_versions = st.one_of(st.just(""), st.sampled_from(["", "1", "0", "-1", "2", "x", "99999999999999999999999"]), st.text(max_size=8))
datatypes = st.one_of(st.sampled_from(["FP32", "UINT8", "FP16", "FP64", "INT64", "BYTES", "BOOL", ""]), st.text(max_size=6))


@st.composite
def infer_inputs(draw) -> tuple[list[ip.ModelInferRequest.InferInputTensor], list[bytes]]:
    inputs, raws = [], []
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["latent", "image", "random"]))
        if kind == "latent":
            shape = [draw(st.integers(0, 4)), draw(st.sampled_from([2, 16, 32, 64, 100]))]
        elif kind == "image":
            shape = [draw(st.integers(0, 4)), 1, 28, draw(st.sampled_from([28, 27]))]
        else:
            shape = draw(st.lists(dims, max_size=5))
        tensor = ip.ModelInferRequest.InferInputTensor(
            name=draw(st.sampled_from(["z", "images", "x", "input", ""])), datatype=draw(datatypes), shape=shape
        )
        if draw(st.booleans()):
            tensor.parameters["binary_data_size"].int64_param = draw(int64s)
        data = draw(tensor_bytes(shape))
        if use_raw:
            raws.append(data)
        elif draw(st.booleans()):
            tensor.contents.fp32_contents.extend(np.frombuffer(data[: len(data) // 4 * 4], dtype=np.float32).tolist())
        else:
            tensor.contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8)))
        inputs.append(tensor)
    if use_raw and draw(st.booleans()):
        raws.append(draw(st.binary(max_size=64)))  # one raw blob too many
    return inputs, raws


@FUZZ
@given(name=oip_names, version=oip_versions, request_id=st.text(max_size=10), io=infer_inputs(),
       outputs=st.lists(st.sampled_from(["images", "mean", "logvar", "codes", "nope", ""]), max_size=3),
       binary=st.one_of(st.none(), st.booleans()))
def test_oip_model_infer(channel, name, version, request_id, io, outputs, binary):
    inputs, raws = io
    request = ip.ModelInferRequest(model_name=name, model_version=version, id=request_id, inputs=inputs,
                                   raw_input_contents=raws)
    for output in outputs:
        wanted = request.outputs.add(name=output)
        if binary is not None:
            wanted.parameters["binary_data"].bool_param = binary
    check("oip.ModelInfer", grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request)


@settings(FUZZ, max_examples=15)
@given(name=oip_names, version=oip_versions)
def test_oip_metadata_rpcs(channel, name, version):
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    check("oip.ServerLive", stub.ServerLive, ip.ServerLiveRequest())
    check("oip.ServerReady", stub.ServerReady, ip.ServerReadyRequest())
    check("oip.ServerMetadata", stub.ServerMetadata, ip.ServerMetadataRequest())
    check("oip.ModelReady", stub.ModelReady, ip.ModelReadyRequest(name=name, version=version))
    check("oip.ModelMetadata", stub.ModelMetadata, ip.ModelMetadataRequest(name=name, version=version))
    check("oip.ModelConfig", stub.ModelConfig, ip.ModelConfigRequest(name=name, version=version))
    check("oip.ModelStatistics", stub.ModelStatistics, ip.ModelStatisticsRequest(name=name, version=version))
    check("oip.RepositoryIndex", stub.RepositoryIndex, ip.RepositoryIndexRequest(ready=True))


@settings(FUZZ, max_examples=15)
@given(name=st.one_of(model_names, st.sampled_from(["", ".", "..", "x.decoder", "../../etc", "a/b", "a\\b"]))
       .filter(lambda n: not any(m in n for m in MODELS)),  # never a real model: Unload would unload it
       repository=st.text(max_size=8))
def test_oip_repository_load_unload_of_unknown_models(channel, name, repository):
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    check("oip.RepositoryModelLoad", stub.RepositoryModelLoad,
          ip.RepositoryModelLoadRequest(repository_name=repository, model_name=name))
    check("oip.RepositoryModelUnload", stub.RepositoryModelUnload,
          ip.RepositoryModelUnloadRequest(repository_name=repository, model_name=name))


@settings(FUZZ, max_examples=10)
@given(io=infer_inputs(), name=oip_names, messages=st.integers(0, 3))
def test_oip_unsupported_rpcs(channel, io, name, messages):
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    inputs, raws = io
    requests = [ip.ModelInferRequest(model_name=name, inputs=inputs, raw_input_contents=raws)] * messages
    CASES["oip.ModelStreamInfer"] += 1
    try:
        for _ in stub.ModelStreamInfer(iter(requests), timeout=DEADLINE_S):
            pass
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
    CODES[code.name] += 1
    assert code in ALLOWED, f"ModelStreamInfer: {code.name}"
    check("oip.SystemSharedMemoryStatus", stub.SystemSharedMemoryStatus, ip.SystemSharedMemoryStatusRequest(name=name))
    check("oip.CudaSharedMemoryRegister", stub.CudaSharedMemoryRegister,
          ip.CudaSharedMemoryRegisterRequest(name=name, raw_handle=raws[0] if raws else b"", byte_size=len(raws)))
    check("oip.TraceSetting", stub.TraceSetting, ip.TraceSettingRequest(model_name=name))


# --- random bytes on the wire -------------------------------------------------------------------
def _unary_paths() -> list[str]:
    paths = []
    for service in (pb.DESCRIPTOR.services_by_name["Genserve"],
                    ip.DESCRIPTOR.services_by_name["GRPCInferenceService"]):
        for method in service.methods:
            if method.client_streaming or method.server_streaming:
                continue
            if method.name in ("RepositoryModelLoad", "RepositoryModelUnload"):
                continue  # valid garbage could name a real model and unload it
            paths.append(f"/{service.full_name}/{method.name}")
    return paths


UNARY_PATHS = _unary_paths()


@settings(FUZZ, max_examples=120)
@given(path=st.one_of(st.sampled_from(UNARY_PATHS), st.sampled_from(["/genserve.v1.Genserve/Nope", "/x/y", "/"])),
       payload=st.one_of(st.binary(max_size=2048), st.sampled_from([b"", b"\x00", b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f"])))
def test_garbage_bytes(channel, path, payload):
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    code = check("wire.garbage", call, payload)
    if path not in UNARY_PATHS:
        assert code == grpc.StatusCode.UNIMPLEMENTED


# --- afterwards ---------------------------------------------------------------------------------
def test_zz_server_still_serves(server: RunningServer, channel, stub):
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    response = stub.Generate(pb.GenerateRequest(model="mnist-vae", count=3, seed=7), timeout=DEADLINE_S)
    assert list(response.images.tensor.shape) == [3, 1, 28, 28]
    assert len(response.images.tensor.data) == 3 * 28 * 28 * 4
    assert sum(CASES.values()) > 0
