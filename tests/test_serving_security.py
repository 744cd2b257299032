"""TLS (with and without client certificates) and the bearer token, which every call but health needs."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    RunningServer,
    copy_repository,
    server_config,
)
from prometheus_client import generate_latest

from genserve.serving.config import TlsConfig
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc, grpc_service_pb2_grpc
from genserve.serving.protos import grpc_service_pb2 as ip

Code = grpc.StatusCode
TOKEN = "s3cret-token"


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (it is its own CA)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    directory = tmp_path_factory.mktemp("certs")
    return {"server": self_signed(directory, "server"), "client": self_signed(directory, "client")}


@pytest.fixture(scope="module")
def repo_root(golden_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_repository(golden_repository, tmp_path_factory.mktemp("security") / "repo", ["mnist-vae"]).root


def start(repo_root: Path, **overrides) -> RunningServer:
    return RunningServer(server_config(repo_root, metrics_port=None, **overrides)).start()


def test_tls_with_a_bearer_token(repo_root: Path, certificates, tmp_path: Path) -> None:
    cert, key = certificates["server"]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = start(repo_root, tls=TlsConfig(str(cert), str(key)), auth_token_file=str(token_file))
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(server.address, credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            genserve = genserve_pb2_grpc.GenserveStub(channel)
            inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for metadata, problem in (((), "missing"), ((("authorization", "Bearer wrong"),), "wrong"),
                                      ((("authorization", TOKEN),), "wrong")):
                for call, request in ((genserve.Generate, pb.GenerateRequest(model="mnist-vae", count=1)),
                                      (inference.ServerLive, ip.ServerLiveRequest())):
                    with pytest.raises(grpc.RpcError) as info:
                        call(request, metadata=metadata)
                    assert info.value.code() == Code.UNAUTHENTICATED and problem in info.value.details()
            good = (("authorization", f"Bearer {TOKEN}"),)
            assert genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=1), metadata=good).model.version == 1
            assert inference.ServerLive(ip.ServerLiveRequest(), metadata=good).live
        with grpc.insecure_channel(server.address) as plain, pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() == Code.UNAVAILABLE
        text = generate_latest(server.server.metrics.registry).decode()
        assert 'genserve_requests_total{code="UNAUTHENTICATED",method="Generate",model="",version=""} 3.0' in text
    finally:
        server.stop()


def test_client_certificates(repo_root: Path, certificates) -> None:
    cert, key = certificates["server"]
    client_cert, client_key = certificates["client"]
    server = start(repo_root, tls=TlsConfig(str(cert), str(key), str(client_cert)))
    try:
        with_cert = grpc.ssl_channel_credentials(cert.read_bytes(), client_key.read_bytes(), client_cert.read_bytes())
        with grpc.secure_channel(server.address, with_cert) as channel:
            response = genserve_pb2_grpc.GenserveStub(channel).Generate(pb.GenerateRequest(model="mnist-vae", count=1))
            assert response.model.version == 1
        without = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(server.address, without) as channel, pytest.raises(grpc.RpcError) as info:
            genserve_pb2_grpc.GenserveStub(channel).Generate(pb.GenerateRequest(model="mnist-vae", count=1), timeout=5)
        assert info.value.code() == Code.UNAVAILABLE
    finally:
        server.stop()


def test_token_without_tls_on_loopback(repo_root: Path) -> None:
    server = start(repo_root, auth_token=TOKEN)
    try:
        with server.channel() as channel:
            genserve = genserve_pb2_grpc.GenserveStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                genserve.ListModels(pb.ListModelsRequest())
            assert info.value.code() == Code.UNAUTHENTICATED
            response = genserve.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert [m.name for m in response.models] == ["mnist-vae"]
    finally:
        server.stop()


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    from genserve.serving.config import ConfigError

    with pytest.raises(ConfigError, match="go together"):
        dataclasses.replace(server_config(tmp_path), tls=TlsConfig(cert_file="x")).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        dataclasses.replace(server_config(tmp_path), tls=TlsConfig("/no/cert", "/no/key")).validate()
