"""End to end over real gRPC on 127.0.0.1: every RPC of genserve.v1 and of the Open Inference
Protocol, every model kind, both image encodings, the status code of each bad input, deadlines,
cancellation, overload, metrics. One server (in a thread) serves every test of this module.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import (
    RunningServer,
    copy_repository,
    model_name,
    publish_copy,
    registered_kinds,
    server_config,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.clients import codec  # the tests call the server as a client does
from genserve.export import Repository
from genserve.serving.config import Limits
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc, grpc_service_pb2_grpc
from genserve.serving.protos import grpc_service_pb2 as ip
from genserve.serving.wire import to_uint8

KINDS = registered_kinds()
SAMPLERS = [k for k in KINDS if k in ("vae", "dense-vae", "gan", "dcgan", "aae")]  # kinds with a prior
ENCODERS = [k for k in KINDS if k in ("vae", "dense-vae", "ae", "aae")]
IMAGE_SHAPE = (1, 28, 28)
SLOW = "mnist-vae-slow"  # a copy of mnist-vae whose batcher waits 1 s for company (the fixed policy)
TIGHT = "mnist-gan-tight"  # a copy of mnist-gan with a queue of 3 batches of 2
MAX_MESSAGE = 1024 * 1024
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def server(golden_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = copy_repository(golden_repository, tmp_path_factory.mktemp("grpc") / "repo")
    publish_copy(repo, "mnist-vae", 1, SLOW)
    publish_copy(repo, "mnist-gan", 1, TIGHT)
    config = server_config(
        repo.root,
        limits=Limits(max_message_bytes=MAX_MESSAGE, max_samples_per_request=256, max_images_per_request=64),
        models={
            SLOW: {"max_queue_delay_us": 1_000_000, "max_batch_size": 64, "batching_policy": "fixed"},
            TIGHT: {"max_batch_size": 2, "max_queue_size": 3},
        },
    )
    running = RunningServer(config).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def genserve(channel) -> genserve_pb2_grpc.GenserveStub:
    return genserve_pb2_grpc.GenserveStub(channel)


@pytest.fixture(scope="module")
def inference(channel) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def direct(server: RunningServer):
    """direct(name, part, x) -> the graph's outputs computed with onnxruntime, without the server."""
    repo = Repository(server.config.repository)
    sessions: dict[tuple[str, str], ort.InferenceSession] = {}

    def run(name: str, part: str, x: np.ndarray) -> list[np.ndarray]:
        if (name, part) not in sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            sessions[name, part] = ort.InferenceSession(
                str(repo.part_path(name, 1, part)), options, providers=["CPUExecutionProvider"]
            )
        session = sessions[name, part]
        return session.run(None, {session.get_inputs()[0].name: x})

    return run


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """Six real MNIST test digits, uint8 (6, 1, 28, 28)."""
    from genserve.training.data.registry import load_dataset

    return load_dataset("mnist-5k").test_images[:6].numpy()


def manifest(server: RunningServer, name: str):
    return Repository(server.config.repository).load_manifest(name, 1)


def expect_error(code: grpc.StatusCode, match: str, call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    error = info.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    assert match.lower() in (error.details() or "").lower(), error.details()
    return error


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels` (0 when absent)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def raw(images: np.ndarray) -> pb.Images:
    return codec.images_to_proto(images)


# --- health, reflection, listing -----------------------------------------------------------------
def test_health_is_serving_for_the_server_and_each_service(channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "genserve.v1.Genserve", "inference.GRPCInferenceService"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_every_service(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(responses).list_services_response.service}
    assert {"genserve.v1.Genserve", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    for symbol, file in (("inference.GRPCInferenceService", "grpc_service.proto"),
                         ("genserve.v1.Genserve", "genserve/v1/genserve.proto"),
                         ("inference.ModelConfig", "model_config.proto")):
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        response = next(stub.ServerReflectionInfo(iter([request])))
        protos = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in response.file_descriptor_response.file_descriptor_proto]
        assert file in {p.name for p in protos}, response


def test_list_models_has_every_kind(genserve) -> None:
    models = {m.name: m for m in genserve.ListModels(pb.ListModelsRequest()).models}
    assert {model_name(k) for k in KINDS} | {SLOW, TIGHT} == set(models)
    for kind in KINDS:
        m = models[model_name(kind)]
        assert (m.kind, list(m.versions), m.latest_version, m.ready) == (kind, [1], 1, True)
    assert list(models["mnist-vae"].operations) == ["Generate", "Encode", "Reconstruct", "Interpolate"]
    assert list(models["mnist-dae"].operations) == ["Reconstruct", "Denoise"]
    assert list(models["mnist-gan"].operations) == ["Generate", "Interpolate"]


@pytest.mark.parametrize("kind", KINDS)
def test_get_model_describes_the_version(server, genserve, kind: str) -> None:
    name = model_name(kind)
    m = manifest(server, name)
    response = genserve.GetModel(pb.GetModelRequest(model=name))
    assert (response.model.name, response.model.version, response.kind) == (name, 1, kind)
    assert (response.image_shape.channels, response.image_shape.height, response.image_shape.width) == IMAGE_SHAPE
    assert response.latent_dim == m.latent_dim and list(response.versions) == [1]
    assert sorted(p.name for p in response.parts) == sorted(m.parts)
    for part in response.parts:
        assert part.variant == "fp32" and list(part.execution_providers) == ["CPUExecutionProvider"]
        assert part.oip_model_name == f"{name}.{part.name}" and part.inputs[0].shape[0] == -1
    assert list(response.class_names) == [str(i) for i in range(10)]
    assert json.loads(response.manifest_json)["name"] == name and response.dataset == "mnist-5k"
    assert response.metrics and all(np.isfinite(v) for v in response.metrics.values())
    if m.prior:
        assert response.prior.distribution == "normal" and response.prior.dim == m.latent_dim
        assert response.prior.std == m.prior["std"] and json.loads(response.prior.spec_json) == m.prior
    else:
        assert not response.HasField("prior")
    assert genserve.GetModel(pb.GetModelRequest(model=name, version=1)).model.version == 1


# --- generate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SAMPLERS)
def test_generate_is_exactly_the_graph_on_pcg64_latents(server, genserve, direct, kind: str) -> None:
    name = model_name(kind)
    m = manifest(server, name)
    response = genserve.Generate(pb.GenerateRequest(model=name, count=5, seed=42, return_latents=True))
    assert (response.model.name, response.model.version) == (name, 1)
    prior = m.prior
    expected_z = (prior["mean"] + prior["std"] * np.random.Generator(np.random.PCG64(42)).standard_normal((5, prior["dim"])))
    expected_z = expected_z.astype(np.float32)
    np.testing.assert_array_equal(codec.tensor_to_array(response.latents, "latents"), expected_z)
    part = "decoder" if "decoder" in m.parts else "generator"
    expected = direct(name, part, expected_z)[0]
    images = codec.images_from_proto(response.images)
    assert images.shape == (5, *IMAGE_SHAPE) and response.images.tensor.dtype == pb.DATA_TYPE_FLOAT32
    np.testing.assert_array_equal(images, expected)
    again = genserve.Generate(pb.GenerateRequest(model=name, version=1, count=5, seed=42))
    np.testing.assert_array_equal(codec.images_from_proto(again.images), expected)
    other = genserve.Generate(pb.GenerateRequest(model=name, count=5, seed=43))
    assert not np.array_equal(codec.images_from_proto(other.images), expected)


def test_generate_image_formats(genserve) -> None:
    request = pb.GenerateRequest(model="mnist-vae", count=3, seed=1)
    floats = codec.images_from_proto(genserve.Generate(request).images)
    request.output_format = pb.IMAGE_FORMAT_UINT8
    as_uint8 = genserve.Generate(request).images
    assert as_uint8.tensor.dtype == pb.DATA_TYPE_UINT8 and list(as_uint8.tensor.shape) == [3, *IMAGE_SHAPE]
    np.testing.assert_array_equal(codec.tensor_to_array(as_uint8.tensor, "x"), to_uint8(floats))
    request.output_format = pb.IMAGE_FORMAT_PNG
    as_png = genserve.Generate(request).images
    assert len(as_png.png.png) == 3 and all(p.startswith(b"\x89PNG") for p in as_png.png.png)
    np.testing.assert_array_equal(to_uint8(codec.images_from_proto(as_png)), to_uint8(floats))


def test_generate_with_latents_and_temperature(server, genserve, direct) -> None:
    z = np.random.default_rng(0).standard_normal((4, 196)).astype(np.float32)
    response = genserve.Generate(pb.GenerateRequest(model="mnist-ae", latents=codec.array_to_tensor(z)))
    np.testing.assert_array_equal(codec.images_from_proto(response.images), direct("mnist-ae", "decoder", z)[0])
    hot = genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=2, seed=3, temperature=2.0, return_latents=True))
    cold = genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=2, seed=3, return_latents=True))
    np.testing.assert_allclose(codec.tensor_to_array(hot.latents, "z"), 2 * codec.tensor_to_array(cold.latents, "z"), rtol=1e-6)


# --- encode, reconstruct, denoise, interpolate --------------------------------------------------
@pytest.mark.parametrize("kind", ENCODERS)
def test_encode_raw_and_png_agree_with_the_graph(genserve, direct, digits, kind: str) -> None:
    name = model_name(kind)
    expected = direct(name, "encoder", digits.astype(np.float32) / 255)
    by_raw = genserve.Encode(pb.EncodeRequest(model=name, images=raw(digits)))
    by_png = genserve.Encode(pb.EncodeRequest(model=name, images=codec.images_to_proto(digits, "png")))
    by_float = genserve.Encode(pb.EncodeRequest(model=name, images=raw(digits.astype(np.float32) / 255)))
    for response in (by_raw, by_png, by_float):
        assert response.model.version == 1
        if len(expected) == 2:
            np.testing.assert_array_equal(codec.tensor_to_array(response.mean, "mean"), expected[0])
            np.testing.assert_array_equal(codec.tensor_to_array(response.logvar, "logvar"), expected[1])
            assert not response.HasField("codes")
        else:
            np.testing.assert_array_equal(codec.tensor_to_array(response.codes, "codes"), expected[0])
            assert not response.HasField("mean")


def test_reconstruct_deterministic_and_sampled(genserve, direct, digits) -> None:
    x = digits.astype(np.float32) / 255
    mean, logvar = direct("mnist-vae", "encoder", x)
    response = genserve.Reconstruct(pb.ReconstructRequest(model="mnist-vae", images=raw(digits)))
    np.testing.assert_array_equal(codec.images_from_proto(response.images), direct("mnist-vae", "decoder", mean)[0])
    sampled = genserve.Reconstruct(pb.ReconstructRequest(model="mnist-vae", images=raw(digits), sample=True, seed=9))
    z = (mean.astype(np.float64) + np.exp(0.5 * logvar.astype(np.float64))
         * np.random.Generator(np.random.PCG64(9)).standard_normal(mean.shape)).astype(np.float32)
    np.testing.assert_array_equal(codec.images_from_proto(sampled.images), direct("mnist-vae", "decoder", z)[0])
    again = genserve.Reconstruct(pb.ReconstructRequest(model="mnist-vae", images=raw(digits), sample=True, seed=9))
    assert again.images == sampled.images
    png = genserve.Reconstruct(pb.ReconstructRequest(model="mnist-ae", images=codec.images_to_proto(digits, "png"),
                                                     output_format=pb.IMAGE_FORMAT_PNG))
    assert len(png.images.png.png) == len(digits)


def test_denoise_and_reconstruct_on_a_denoiser(genserve, direct, digits) -> None:
    noisy = np.clip(digits / 255 + 0.3 * np.random.default_rng(0).standard_normal(digits.shape), 0, 1).astype(np.float32)
    expected = direct("mnist-dae", "denoiser", noisy)[0]
    response = genserve.Denoise(pb.DenoiseRequest(model="mnist-dae", images=raw(noisy)))
    np.testing.assert_array_equal(codec.images_from_proto(response.images), expected)
    response = genserve.Reconstruct(pb.ReconstructRequest(model="mnist-dae", images=raw(noisy)))
    np.testing.assert_array_equal(codec.images_from_proto(response.images), expected)
    expect_error(Code.FAILED_PRECONDITION, "has no denoiser", genserve.Denoise,
                 pb.DenoiseRequest(model="mnist-vae", images=raw(digits)))


def test_interpolate_between_latents_and_images(genserve, direct, digits) -> None:
    ends = np.random.default_rng(1).standard_normal((2, 100)).astype(np.float32)
    response = genserve.Interpolate(pb.InterpolateRequest(
        model="mnist-gan", latents=pb.LatentPair(latents=codec.array_to_tensor(ends)), steps=5))
    path = codec.tensor_to_array(response.latents, "path")
    assert path.shape == (5, 100)
    np.testing.assert_allclose(path[[0, -1]], ends, atol=1e-6)
    np.testing.assert_allclose(path[2], ends.mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(codec.images_from_proto(response.images), direct("mnist-gan", "generator", path)[0])
    spherical = genserve.Interpolate(pb.InterpolateRequest(
        model="mnist-vae", images=pb.ImagePair(images=codec.images_to_proto(digits[:2], "png")), steps=4,
        method=pb.INTERPOLATION_METHOD_SPHERICAL, output_format=pb.IMAGE_FORMAT_UINT8))
    means = direct("mnist-vae", "encoder", digits[:2].astype(np.float32) / 255)[0]
    path = codec.tensor_to_array(spherical.latents, "path")
    np.testing.assert_allclose(path[[0, -1]], means, atol=1e-5)
    assert list(spherical.images.tensor.shape) == [4, *IMAGE_SHAPE]
    expect_error(Code.FAILED_PRECONDITION, "has no encoder", genserve.Interpolate, pb.InterpolateRequest(
        model="mnist-gan", images=pb.ImagePair(images=raw(digits[:2])), steps=3))


# --- bad input -> status codes -------------------------------------------------------------------
def _bad_requests(digits_shape=(2, *IMAGE_SHAPE)):
    z16 = codec.array_to_tensor(np.zeros((2, 16), np.float32))
    nan = codec.array_to_tensor(np.array([[np.nan] * 16], np.float32))
    zeros = np.zeros(digits_shape, np.uint8)
    return [
        ("Generate", pb.GenerateRequest(model="no-such-model", count=1), Code.NOT_FOUND, "no model 'no-such-model'"),
        ("Generate", pb.GenerateRequest(model="mnist-vae", version=7, count=1), Code.NOT_FOUND, "version 7 is not loaded"),
        ("Generate", pb.GenerateRequest(model="../mnist-vae", count=1), Code.INVALID_ARGUMENT, "path separator"),
        ("Generate", pb.GenerateRequest(model="mnist..vae", count=1), Code.INVALID_ARGUMENT, "contains '..'"),
        ("Generate", pb.GenerateRequest(model="", count=1), Code.INVALID_ARGUMENT, "it is empty"),
        ("Generate", pb.GenerateRequest(model="mnist-vae", version=-1, count=1), Code.INVALID_ARGUMENT, "version must be"),
        ("Generate", pb.GenerateRequest(model="mnist-vae", count=0), Code.INVALID_ARGUMENT, "count must be at least 1"),
        ("Generate", pb.GenerateRequest(model="mnist-vae", count=257), Code.INVALID_ARGUMENT, "over the limit of 256"),
        ("Generate", pb.GenerateRequest(model="mnist-vae", count=1, temperature=-1), Code.INVALID_ARGUMENT, "temperature"),
        ("Generate", pb.GenerateRequest(model="mnist-vae", count=1, output_format=9), Code.INVALID_ARGUMENT, "output_format"),
        ("Generate", pb.GenerateRequest(model="mnist-vae", latents=nan), Code.INVALID_ARGUMENT, "NaN or infinite"),
        ("Generate", pb.GenerateRequest(model="mnist-vae", count=3, latents=z16), Code.INVALID_ARGUMENT, "count is 3 but 2"),
        ("Generate", pb.GenerateRequest(model="mnist-gan", latents=z16), Code.INVALID_ARGUMENT, "shape (N, 100)"),
        ("Generate", pb.GenerateRequest(model="mnist-vae", latents=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 16], data=b"x")),
         Code.INVALID_ARGUMENT, "1 bytes of data"),
        ("Generate", pb.GenerateRequest(model="mnist-ae", count=1), Code.FAILED_PRECONDITION, "no prior"),
        ("Generate", pb.GenerateRequest(model="mnist-dae", count=1), Code.FAILED_PRECONDITION, "no decoder or generator"),
        ("Encode", pb.EncodeRequest(model="mnist-vae"), Code.INVALID_ARGUMENT, "no images given"),
        ("Encode", pb.EncodeRequest(model="mnist-vae", images=raw(np.zeros((2, 3, 28, 28), np.uint8))), Code.INVALID_ARGUMENT,
         "does not match the model's images (N, 1, 28, 28)"),
        ("Encode", pb.EncodeRequest(model="mnist-vae", images=raw(np.zeros((65, 1, 28, 28), np.uint8))), Code.INVALID_ARGUMENT,
         "more than the limit of 64"),
        ("Encode", pb.EncodeRequest(model="mnist-vae", images=pb.Images(png=pb.PngImages(png=[b"\x89PNG broken"]))),
         Code.INVALID_ARGUMENT, "not a valid PNG"),
        ("Encode", pb.EncodeRequest(model="mnist-gan", images=raw(zeros)), Code.FAILED_PRECONDITION, "has no encoder"),
        ("Reconstruct", pb.ReconstructRequest(model="mnist-gan", images=raw(zeros)), Code.FAILED_PRECONDITION,
         "no encoder and decoder"),
        ("Reconstruct", pb.ReconstructRequest(model="mnist-vae", images=raw(zeros.astype(np.float32) + 2)),
         Code.INVALID_ARGUMENT, "must be in [0, 1]"),
        ("Interpolate", pb.InterpolateRequest(model="mnist-vae", steps=3), Code.INVALID_ARGUMENT, "give the endpoints"),
        ("Interpolate", pb.InterpolateRequest(model="mnist-vae", steps=1, latents=pb.LatentPair(latents=z16)),
         Code.INVALID_ARGUMENT, "steps must be at least 2"),
        ("Interpolate", pb.InterpolateRequest(model="mnist-vae", steps=3, method=7, latents=pb.LatentPair(latents=z16)),
         Code.INVALID_ARGUMENT, "not an InterpolationMethod"),
        ("Interpolate", pb.InterpolateRequest(model="mnist-vae", steps=3,
                                              latents=pb.LatentPair(latents=codec.array_to_tensor(np.zeros((3, 16), np.float32)))),
         Code.INVALID_ARGUMENT, "exactly 2 endpoints"),
        ("Generate", pb.GenerateRequest(model=TIGHT, count=8), Code.INVALID_ARGUMENT, "need 4 batches of at most 2"),
        ("GetModel", pb.GetModelRequest(model="mnist-vae", version=2), Code.NOT_FOUND, "loaded versions: [1]"),
    ]


@pytest.mark.parametrize(("method", "request_message", "code", "match"), _bad_requests(),
                         ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_bad_requests_get_the_right_status(genserve, method, request_message, code, match) -> None:
    error = expect_error(code, match, getattr(genserve, method), request_message)
    assert dict(error.trailing_metadata())["x-request-id"]


def test_oversized_message_is_resource_exhausted(genserve, server) -> None:
    big = np.zeros((2, MAX_MESSAGE // 4), np.float32)
    expect_error(Code.RESOURCE_EXHAUSTED, "larger than max", genserve.Generate,
                 pb.GenerateRequest(model="mnist-vae", latents=codec.array_to_tensor(big)))
    assert genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=1)).model.version == 1


def test_garbage_bytes_never_crash_the_server(channel, genserve) -> None:
    call = channel.unary_unary("/genserve.v1.Genserve/Generate")  # raw bytes in, raw bytes out
    rng = np.random.default_rng(0)
    for _ in range(20):
        with pytest.raises(grpc.RpcError) as info:
            call(rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes())
        assert info.value.code() in (Code.INVALID_ARGUMENT, Code.NOT_FOUND), info.value.details()
    assert genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=1)).model.version == 1


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    count=st.integers(-3, 300),
    seed=st.integers(0, 2**64 - 1),
    temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
    rows=st.integers(0, 3),
    dim=st.sampled_from([0, 15, 16]),
    extra_bytes=st.integers(-2, 2),
    dtype=st.sampled_from([0, 1, 2, 3]),
)
def test_random_generate_requests_get_ok_or_a_client_error(genserve, count, seed, temperature, rows, dim, extra_bytes, dtype) -> None:
    request = pb.GenerateRequest(model="mnist-vae", count=count, seed=seed, temperature=temperature)
    if rows:
        size = max(rows * dim * 4 + extra_bytes, 0)
        request.latents.CopyFrom(pb.Tensor(dtype=dtype, shape=[rows, dim], data=b"\x01" * size))
    try:
        genserve.Generate(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() in (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION), error.details()


# --- deadlines, cancellation, overload ------------------------------------------------------------
def test_deadline_exceeded_in_the_queue_is_dropped_before_it_runs(server, genserve) -> None:
    samples = metric(server, "genserve_inference_samples_total", model=SLOW)
    expect_error(Code.DEADLINE_EXCEEDED, "deadline", genserve.Generate, pb.GenerateRequest(model=SLOW, count=2), timeout=0.3)
    wait_until(lambda: metric(server, "genserve_inference_rejected_total", model=SLOW) >= 1, what="a rejected request")
    wait_until(lambda: metric(server, "genserve_inference_queue_depth", model=SLOW) == 0, what="an empty queue")
    time.sleep(1.2)  # the batcher's delay has passed: had the request stayed queued, it would have run
    assert metric(server, "genserve_inference_samples_total", model=SLOW) == samples


def test_cancelled_call_frees_its_place(server, genserve) -> None:
    samples = metric(server, "genserve_inference_samples_total", model=SLOW)
    rejected = metric(server, "genserve_inference_rejected_total", model=SLOW, reason="cancelled")
    future = genserve.Generate.future(pb.GenerateRequest(model=SLOW, count=3))
    wait_until(lambda: metric(server, "genserve_inference_queue_depth", model=SLOW) == 1, what="a queued request")
    future.cancel()
    wait_until(lambda: metric(server, "genserve_inference_queue_depth", model=SLOW) == 0, timeout=0.8, what="the place freed")
    assert metric(server, "genserve_inference_rejected_total", model=SLOW, reason="cancelled") == rejected + 1
    time.sleep(1.2)
    assert metric(server, "genserve_inference_samples_total", model=SLOW) == samples
    assert metric(server, "genserve_requests_total", method="Generate", code="CANCELLED") >= 1


def test_concurrent_requests_are_batched_without_changing_results(server, genserve, direct) -> None:
    executions = metric(server, "genserve_inference_executions_total", model=SLOW)
    futures = [genserve.Generate.future(pb.GenerateRequest(model=SLOW, count=2, seed=i, return_latents=True)) for i in range(4)]
    results = [f.result(timeout=30) for f in futures]
    assert metric(server, "genserve_inference_executions_total", model=SLOW) == executions + 1  # 4 x 2 rows, one batch
    for r in results:  # each request's rows are what the graph gives for them alone
        z = codec.tensor_to_array(r.latents, "latents")
        np.testing.assert_array_equal(codec.images_from_proto(r.images), direct(SLOW, "decoder", z)[0])


def test_overload_is_rejected_not_queued(server, genserve) -> None:
    rejected = metric(server, "genserve_inference_rejected_total", model=TIGHT, reason="queue_full")
    futures = [genserve.Generate.future(pb.GenerateRequest(model=TIGHT, count=6, seed=i)) for i in range(8)]
    codes = []
    for f in futures:
        try:
            f.result(timeout=60)
            codes.append(Code.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
    assert set(codes) <= {Code.OK, Code.RESOURCE_EXHAUSTED} and Code.OK in codes
    assert codes.count(Code.RESOURCE_EXHAUSTED) == metric(server, "genserve_inference_rejected_total", model=TIGHT, reason="queue_full") - rejected


def test_request_id_is_echoed(genserve) -> None:
    _, call = genserve.Generate.with_call(pb.GenerateRequest(model="mnist-vae", count=1), metadata=(("x-request-id", "abc-123"),))
    assert dict(call.trailing_metadata())["x-request-id"] == "abc-123"


# --- the Open Inference Protocol -------------------------------------------------------------------
def test_oip_server_rpcs(inference) -> None:
    assert inference.ServerLive(ip.ServerLiveRequest()).live
    assert inference.ServerReady(ip.ServerReadyRequest()).ready
    meta = inference.ServerMetadata(ip.ServerMetadataRequest())
    assert meta.name == "genserve" and "model_repository" in meta.extensions
    assert inference.ModelReady(ip.ModelReadyRequest(name="mnist-vae.decoder")).ready
    assert inference.ModelReady(ip.ModelReadyRequest(name="mnist-vae.decoder", version="1")).ready
    assert not inference.ModelReady(ip.ModelReadyRequest(name="mnist-vae.decoder", version="2")).ready
    assert not inference.ModelReady(ip.ModelReadyRequest(name="mnist-vae.generator")).ready
    assert not inference.ModelReady(ip.ModelReadyRequest(name="nothing")).ready


@pytest.mark.parametrize("kind", KINDS)
def test_oip_metadata_and_config_for_every_graph(server, inference, kind: str) -> None:
    name = model_name(kind)
    for part, spec in manifest(server, name).parts.items():
        meta = inference.ModelMetadata(ip.ModelMetadataRequest(name=f"{name}.{part}"))
        assert (meta.name, list(meta.versions), meta.platform) == (f"{name}.{part}", ["1"], "onnxruntime_onnx")
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            (t.name, "FP32", [-1, *t.shape[1:]]) for t in spec.inputs
        ]
        assert [t.name for t in meta.outputs] == [t.name for t in spec.outputs]
        config = inference.ModelConfig(ip.ModelConfigRequest(name=f"{name}.{part}")).config
        assert config.max_batch_size == 64 and config.backend == "onnxruntime"
        assert list(config.input[0].dims) == list(spec.inputs[0].shape[1:])
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"


def test_oip_infer_raw_and_contents(inference, direct) -> None:
    z = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    expected = direct("mnist-vae", "decoder", z)[0]
    tensor = ip.ModelInferRequest.InferInputTensor(name="latents", datatype="FP32", shape=[3, 16])
    response = inference.ModelInfer(ip.ModelInferRequest(
        model_name="mnist-vae.decoder", id="r1", inputs=[tensor], raw_input_contents=[z.tobytes()]))
    assert (response.model_name, response.model_version, response.id) == ("mnist-vae.decoder", "1", "r1")
    out = response.outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == ("images", "FP32", [3, *IMAGE_SHAPE])
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(out.shape), expected)
    tensor.contents.fp32_contents.extend(z.ravel().tolist())
    response = inference.ModelInfer(ip.ModelInferRequest(model_name="mnist-vae.decoder", model_version="1", inputs=[tensor]))
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3, *IMAGE_SHAPE), expected)
    images = np.zeros((2, *IMAGE_SHAPE), np.float32)
    encoder = ip.ModelInferRequest(
        model_name="mnist-vae.encoder", raw_input_contents=[images.tobytes()],
        inputs=[ip.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=[2, *IMAGE_SHAPE])],
        outputs=[ip.ModelInferRequest.InferRequestedOutputTensor(name="logvar")],
    )
    response = inference.ModelInfer(encoder)
    assert [o.name for o in response.outputs] == ["logvar"]
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 16), direct("mnist-vae", "encoder", images)[1]
    )


def _infer(name="mnist-vae.decoder", input_name="latents", datatype="FP32", shape=(1, 16), data=None, version="",
           contents=None, outputs=()):
    tensor = ip.ModelInferRequest.InferInputTensor(name=input_name, datatype=datatype, shape=list(shape))
    if contents is not None:
        tensor.contents.fp32_contents.extend(contents)
    request = ip.ModelInferRequest(model_name=name, model_version=version, inputs=[tensor],
                                   outputs=[ip.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs])
    if data is not None:
        request.raw_input_contents.append(data)
    return request


@pytest.mark.parametrize(
    ("request_message", "code", "match"),
    [
        (_infer(data=b"\0" * 64), Code.OK, ""),
        (_infer(name="mnist-vae", data=b"\0" * 64), Code.NOT_FOUND, "<model>.<part>"),
        (_infer(name="nope.decoder", data=b"\0" * 64), Code.NOT_FOUND, "no model 'nope'"),
        (_infer(name="../x.decoder", data=b"\0" * 64), Code.INVALID_ARGUMENT, "path separator"),
        (_infer(version="3", data=b"\0" * 64), Code.NOT_FOUND, "version 3 is not loaded"),
        (_infer(version="x", data=b"\0" * 64), Code.INVALID_ARGUMENT, "version must be a positive integer"),
        (_infer(input_name="noise", data=b"\0" * 64), Code.INVALID_ARGUMENT, "its input is 'latents'"),
        (_infer(datatype="FP16", data=b"\0" * 32), Code.INVALID_ARGUMENT, "must be FP32"),
        (_infer(shape=(1, 15), data=b"\0" * 60), Code.INVALID_ARGUMENT, "shape [N, 16]"),
        (_infer(shape=(0, 16), data=b""), Code.INVALID_ARGUMENT, "N >= 1"),
        (_infer(shape=(257, 16), data=b"\0" * 257 * 64), Code.INVALID_ARGUMENT, "over the limit of 256"),
        (_infer(data=b"\0" * 63), Code.INVALID_ARGUMENT, "63 bytes of raw data"),
        (_infer(contents=[0.0] * 15), Code.INVALID_ARGUMENT, "15 values"),
        (_infer(contents=[0.0] * 16, data=b"\0" * 64), Code.INVALID_ARGUMENT, "not both"),
        (_infer(data=np.full(16, np.inf, "<f4").tobytes()), Code.INVALID_ARGUMENT, "NaN or infinite"),
        (_infer(data=b"\0" * 64, outputs=("pixels",)), Code.INVALID_ARGUMENT, "has no output 'pixels'"),
    ],
)
def test_oip_infer_errors(inference, request_message, code, match) -> None:
    if code == Code.OK:
        assert inference.ModelInfer(request_message).outputs[0].name == "images"
    else:
        expect_error(code, match, inference.ModelInfer, request_message)


def test_oip_statistics_index_and_unsupported(inference) -> None:
    before = inference.ModelStatistics(ip.ModelStatisticsRequest(name="mnist-dcgan.generator")).model_stats[0]
    tensor = ip.ModelInferRequest.InferInputTensor(name="noise", datatype="FP32", shape=[4, 100])
    inference.ModelInfer(ip.ModelInferRequest(model_name="mnist-dcgan.generator", inputs=[tensor],
                                              raw_input_contents=[np.zeros((4, 100), np.float32).tobytes()]))
    after = inference.ModelStatistics(ip.ModelStatisticsRequest(name="mnist-dcgan.generator", version="1")).model_stats[0]
    assert (after.name, after.version) == ("mnist-dcgan.generator", "1")
    assert after.inference_count == before.inference_count + 4 and after.execution_count == before.execution_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.compute_infer.ns > 0 and any(b.batch_size == 4 for b in after.batch_stats)
    every = inference.ModelStatistics(ip.ModelStatisticsRequest()).model_stats
    assert {s.name for s in every} >= {"mnist-vae.encoder", "mnist-vae.decoder", "mnist-dae.denoiser"}
    index = inference.RepositoryIndex(ip.RepositoryIndexRequest(ready=True)).models
    assert {(m.name, m.version, m.state) for m in index} >= {("mnist-gan.generator", "1", "READY"), ("mnist-ae.encoder", "1", "READY")}
    expect_error(Code.NOT_FOUND, "has no part 'denoiser'", inference.ModelStatistics,
                 ip.ModelStatisticsRequest(name="mnist-vae.denoiser"))
    expect_error(Code.UNIMPLEMENTED, "shared memory", inference.SystemSharedMemoryStatus, ip.SystemSharedMemoryStatusRequest())
    expect_error(Code.INVALID_ARGUMENT, "parameters are not supported", inference.RepositoryModelLoad,
                 ip.RepositoryModelLoadRequest(model_name="mnist-vae", parameters={"config": ip.ModelRepositoryParameter(string_param="{}")}))


def test_tritonclient_live_metadata_and_infer(server, direct) -> None:
    import tritonclient.grpc as tritonclient
    client = tritonclient.InferenceServerClient(url=server.address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist-vae.decoder")
    meta = client.get_model_metadata("mnist-vae.decoder")
    assert meta.name == "mnist-vae.decoder" and list(meta.inputs[0].shape) == [-1, 16]
    z = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    infer_input = tritonclient.InferInput("latents", [2, 16], "FP32")
    infer_input.set_data_from_numpy(z)
    result = client.infer("mnist-vae.decoder", [infer_input], outputs=[tritonclient.InferRequestedOutput("images")])
    np.testing.assert_array_equal(result.as_numpy("images"), direct("mnist-vae", "decoder", z)[0])
    assert client.get_model_config("mnist-vae.decoder").config.max_batch_size == 64
    client.close()


# --- metrics ---------------------------------------------------------------------------------------
def test_metrics_endpoint_exposes_the_documented_series(server, genserve) -> None:
    genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=2, seed=0))
    assert metric(server, "genserve_requests_total", method="Generate", model="mnist-vae", version="1", code="OK") >= 1
    assert metric(server, "genserve_requests_total", method="Generate", code="INVALID_ARGUMENT") >= 1
    assert metric(server, "genserve_request_duration_seconds_count", method="Generate", model="mnist-vae") >= 1
    assert metric(server, "genserve_inference_queue_duration_seconds_count", model="mnist-vae", part="decoder") >= 1
    assert metric(server, "genserve_inference_compute_duration_seconds_count", model="mnist-vae", part="decoder") >= 1
    assert metric(server, "genserve_inference_batch_size_count", model="mnist-vae", part="decoder") >= 1
    assert metric(server, "genserve_inference_samples_total", model="mnist-vae", version="1", part="decoder") >= 2
    assert metric(server, "genserve_inference_executions_total", model="mnist-vae", version="1", part="decoder") >= 1
    assert metric(server, "genserve_models_loaded") == len(KINDS) + 2 == metric(server, "genserve_models_ready")
    assert metric(server, "genserve_model_ready", model="mnist-vae", version="1") == 1
    assert metric(server, "genserve_execution_provider_info", model="mnist-vae", part="decoder", provider="CPUExecutionProvider") == 1
    assert metric(server, "process_cpu_seconds_total") > 0 and metric(server, "process_resident_memory_bytes") > 0
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert "# TYPE genserve_model_load_failures_total counter" in text


def test_access_log_is_off_at_info_but_the_request_counters_stay_exact(server, genserve, caplog) -> None:
    caplog.set_level(logging.INFO, logger="genserve")
    counted = lambda code: metric(server, "genserve_requests_total", method="Generate", model="mnist-vae", code=code)  # noqa: E731
    ok, invalid = counted("OK"), counted("INVALID_ARGUMENT")
    for seed in range(40):
        genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=1, seed=seed), timeout=30)
    for _ in range(3):
        expect_error(Code.INVALID_ARGUMENT, "count must be at least 1", genserve.Generate,
                     pb.GenerateRequest(model="mnist-vae", count=0), timeout=30)
    assert (counted("OK"), counted("INVALID_ARGUMENT")) == (ok + 40, invalid + 3)  # every call counted, once
    lines = [r for r in caplog.records if r.getMessage() == "rpc" and r.genserve_fields.get("method") == "Generate"]
    # no line for the 40 OK calls at the default level; the failed ones still get theirs, at warning
    assert [(r.levelname, r.genserve_fields["code"]) for r in lines] == [("WARNING", "INVALID_ARGUMENT")] * 3
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="genserve.rpc")  # log_level: debug brings the OK lines back
    genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=1), timeout=30)
    assert [r.levelname for r in caplog.records if r.getMessage() == "rpc"] == ["DEBUG"]
