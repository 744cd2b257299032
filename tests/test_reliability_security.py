"""Security checks that tests/test_serving_security.py does not make: a client trusting the wrong CA
and a client certificate from the wrong CA fail the TLS handshake; every RPC of both services (not
just a sample) needs the bearer token; model names with path separators or `..` are refused with
INVALID_ARGUMENT by every RPC that takes a model name."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    RunningServer,
    copy_repository,
    server_config,
)
from test_serving_security import self_signed

from genserve.serving.config import TlsConfig
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc, grpc_service_pb2_grpc
from genserve.serving.protos import grpc_service_pb2 as ip

Code = grpc.StatusCode
TOKEN = "another-s3cret"
GENSERVE = pb.DESCRIPTOR.services_by_name["Genserve"]
INFERENCE = ip.DESCRIPTOR.services_by_name["GRPCInferenceService"]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    directory = tmp_path_factory.mktemp("certs")
    return {name: self_signed(directory, name) for name in ("server", "client", "stranger")}


@pytest.fixture(scope="module")
def repo_root(golden_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_repository(golden_repository, tmp_path_factory.mktemp("security") / "repo", ["mnist-vae"]).root


def start(repo_root: Path, **overrides) -> RunningServer:
    return RunningServer(server_config(repo_root, metrics_port=None, **overrides)).start()


def _generate(channel: grpc.Channel) -> pb.GenerateResponse:
    return genserve_pb2_grpc.GenserveStub(channel).Generate(pb.GenerateRequest(model="mnist-vae", count=1), timeout=5)


def test_wrong_certificate_authorities_fail_the_handshake(repo_root: Path, certificates) -> None:
    cert, key = certificates["server"]
    client_cert, client_key = certificates["client"]
    stranger_cert, stranger_key = certificates["stranger"]
    server = start(repo_root, tls=TlsConfig(str(cert), str(key), str(client_cert)))
    try:
        attempts = {
            "client trusts another CA": grpc.ssl_channel_credentials(
                stranger_cert.read_bytes(), client_key.read_bytes(), client_cert.read_bytes()),
            "client certificate from another CA": grpc.ssl_channel_credentials(
                cert.read_bytes(), stranger_key.read_bytes(), stranger_cert.read_bytes()),
        }
        for what, credentials in attempts.items():
            with grpc.secure_channel(server.address, credentials) as channel:
                for call in (_generate,
                             lambda ch: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)):
                    with pytest.raises(grpc.RpcError) as info:
                        call(channel)
                    assert info.value.code() == Code.UNAVAILABLE, what
        good = grpc.ssl_channel_credentials(cert.read_bytes(), client_key.read_bytes(), client_cert.read_bytes())
        with grpc.secure_channel(server.address, good) as channel:  # and the server is unharmed
            assert _generate(channel).model.version == 1
    finally:
        server.stop()


def _unary(channel: grpc.Channel, service, method) -> grpc.UnaryUnaryMultiCallable:
    request_class = pb if service is GENSERVE else ip
    return channel.unary_unary(
        f"/{service.full_name}/{method.name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=getattr(request_class, method.output_type.name).FromString,
    ), getattr(request_class, method.input_type.name)


def test_every_rpc_needs_the_token(repo_root: Path) -> None:
    server = start(repo_root, auth_token=TOKEN)
    checked = 0
    try:
        with server.channel() as channel:
            for service in (GENSERVE, INFERENCE):
                for method in service.methods:
                    if method.client_streaming or method.server_streaming:
                        call = channel.stream_stream(f"/{service.full_name}/{method.name}")
                        for metadata in ((), (("authorization", f"Bearer {TOKEN}x"),)):
                            with pytest.raises(grpc.RpcError) as info:
                                list(call(iter([b""]), metadata=metadata, timeout=5))
                            assert info.value.code() == Code.UNAUTHENTICATED, method.full_name
                            checked += 1
                        continue
                    call, request = _unary(channel, service, method)
                    for metadata in ((), (("authorization", f"Bearer {TOKEN}x"),), (("authorization", f"Bearer {TOKEN[:-1]}"),),
                                     (("authorization", f"bearer {TOKEN}"),), (("authorization", ""),)):
                        with pytest.raises(grpc.RpcError) as info:
                            call(request(), metadata=metadata, timeout=5)
                        assert info.value.code() == Code.UNAUTHENTICATED, (method.full_name, metadata)
                        checked += 1
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
            good = (("authorization", f"Bearer {TOKEN}"),)
            response = genserve_pb2_grpc.GenserveStub(channel).Generate(
                pb.GenerateRequest(model="mnist-vae", count=1), metadata=good, timeout=5)
            assert response.model.version == 1
        assert checked > 50
        print(f"token: {checked} calls without the right token refused, on every method of both services")
    finally:
        server.stop()


BAD_NAMES = ["../mnist-vae", "mnist-vae/../mnist-vae", "a/b", "a\\b", "..", "mnist..vae", "/etc/passwd"]


def _genserve_calls(stub, name: str):
    pair = pb.ImagePair()
    return {
        "GetModel": (stub.GetModel, pb.GetModelRequest(model=name)),
        "Generate": (stub.Generate, pb.GenerateRequest(model=name, count=1)),
        "Encode": (stub.Encode, pb.EncodeRequest(model=name)),
        "Reconstruct": (stub.Reconstruct, pb.ReconstructRequest(model=name)),
        "Denoise": (stub.Denoise, pb.DenoiseRequest(model=name)),
        "Interpolate": (stub.Interpolate, pb.InterpolateRequest(model=name, images=pair, steps=2)),
    }


def _inference_calls(stub, name: str):
    graph = f"{name}.decoder"
    return {
        "ModelReady": (stub.ModelReady, ip.ModelReadyRequest(name=graph)),
        "ModelMetadata": (stub.ModelMetadata, ip.ModelMetadataRequest(name=graph)),
        "ModelConfig": (stub.ModelConfig, ip.ModelConfigRequest(name=graph)),
        "ModelStatistics": (stub.ModelStatistics, ip.ModelStatisticsRequest(name=graph)),
        "ModelInfer": (stub.ModelInfer, ip.ModelInferRequest(model_name=graph)),
        "RepositoryModelLoad": (stub.RepositoryModelLoad, ip.RepositoryModelLoadRequest(model_name=name)),
        "RepositoryModelUnload": (stub.RepositoryModelUnload, ip.RepositoryModelUnloadRequest(model_name=name)),
    }


def test_model_names_with_path_separators_are_refused_everywhere(repo_root: Path) -> None:
    server = start(repo_root)
    wrong: list[str] = []
    try:
        with server.channel() as channel:
            genserve = genserve_pb2_grpc.GenserveStub(channel)
            inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for name in BAD_NAMES:
                for rpc, (call, request) in {**_genserve_calls(genserve, name), **_inference_calls(inference, name)}.items():
                    try:
                        response = call(request, timeout=5)
                        if rpc != "ModelReady" or response.ready:  # ModelReady answers "not ready" to any bad name
                            wrong.append(f"{rpc}({name!r}): OK")
                    except grpc.RpcError as error:
                        if error.code() != Code.INVALID_ARGUMENT:
                            wrong.append(f"{rpc}({name!r}): {error.code().name} {error.details()}")
            assert wrong == [], "\n".join(wrong)
            print(f"bad model names: {len(BAD_NAMES)} names x 13 RPCs refused")
            assert _generate(channel).model.version == 1  # and the real model is untouched
        assert sorted(p.name for p in repo_root.iterdir() if not p.name.startswith(".")) == ["mnist-vae"]
    finally:
        server.stop()
