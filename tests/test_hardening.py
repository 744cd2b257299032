"""Hardening (issue 18): what an adversarial client or one bad repository file must not be able to do.

The models here are tiny ONNX graphs built with onnx.helper (no training, no torch): a decoder
latents (N, 4) -> images (N, 1, 2, 2) and a denoiser with symbolic image axes, published through
Repository.publish like any other tool would. Repository cases use real files: FIFOs, symlinks,
swapped files, manifests with oversized numbers and deep nesting.
"""

from __future__ import annotations

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
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import RunningServer, hpack_literal, http2_frame, server_config, wait_until
from onnx import TensorProto, helper
from PIL import Image

from genserve.export import Manifest, ManifestError, PartSpec, Repository, TensorSpec, VariantSpec
from genserve.serving import codec
from genserve.serving.config import Limits
from genserve.serving.errors import InvalidArgument
from genserve.serving.oip_names import parse_version
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc, grpc_service_pb2_grpc
from genserve.serving.protos import grpc_service_pb2 as ip

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


def start(repo: Repository, limits: dict | None = None, **overrides) -> RunningServer:
    config = server_config(repo.root, limits=Limits(**(limits or {})), **overrides)
    return RunningServer(config).start(timeout=60)


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


# --- High 2, Medium 8: receiving requests, connection limits --------------------------------------


def _frames_until(sock: socket.socket, done, seconds: float = 20.0) -> list[tuple[int, int, int]]:
    """(type, flags, stream) of the frames the server sends, until done(frames) or the connection closes."""
    sock.settimeout(0.2)
    buffer, frames = b"", []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not done(frames):
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        if not chunk:
            frames.append((-1, 0, 0))  # closed
            break
        buffer += chunk
        while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
            length = int.from_bytes(buffer[:3], "big")
            frames.append((buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF))
            buffer = buffer[9 + length:]
    return frames


def _stream_ended(stream: int):
    # RST_STREAM, or HEADERS with END_STREAM (the trailers carrying the status), or the connection closed
    return lambda frames: any((k == 0x3 and s == stream) or (k == 0x1 and s == stream and f & 0x1) or k == -1
                              for k, f, s in frames)


def test_stalled_and_empty_requests_are_ended_and_idle_connections_closed(repo: Repository) -> None:
    server = start(repo, limits={"receive_timeout_s": 1.0, "connection_idle_timeout_s": 2.0})
    sockets: list[socket.socket] = []
    try:
        port = server.server.port
        # a stream that declares a 4 MiB message, sends 1 MiB of it and stalls: ended, its bytes dropped
        stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
        sockets.append(stalled)
        headers = b"".join(hpack_literal(k, v) for k, v in (
            (":method", "POST"), (":scheme", "http"), (":path", "/genserve.v1.Genserve/Encode"),
            (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"), ("te", "trailers")))
        stalled.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + http2_frame(0x4, 0, 0, b"") + http2_frame(0x1, 0x4, 1, headers))
        part = b"\x00" + struct.pack(">I", 4 * MiB) + b"\x00" * (16 * 1024 - 5)
        stalled.sendall(http2_frame(0x0, 0, 1, part))  # within the initial 64 KiB window
        frames = _frames_until(stalled, _stream_ended(1))
        assert _stream_ended(1)(frames), f"the stalled stream was never ended: {frames}"
        with server.channel() as channel:
            # a unary call whose client half-closes without sending a message is answered
            empty = channel.stream_unary("/genserve.v1.Genserve/Generate", request_serializer=lambda m: m,
                                         response_deserializer=pb.GenerateResponse.FromString)
            error = rpc_error(empty, iter(()), timeout=10)
            assert error.code() == Code.INVALID_ARGUMENT and "without a request message" in error.details()

            # one whose message never comes ends with DEADLINE_EXCEEDED from the server, not the client
            def never():
                time.sleep(8)
                yield b""

            error = rpc_error(empty, never(), timeout=30)
            assert error.code() == Code.DEADLINE_EXCEEDED and "receive_timeout_s" in error.details()
            assert genserve_pb2_grpc.GenserveStub(channel).Generate(pb.GenerateRequest(model=GOOD, count=1),
                                                                    timeout=10).model.version == 1
        # an idle connection is told to go away (GOAWAY) once connection_idle_timeout_s passes
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        sockets.append(idle)
        idle.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + http2_frame(0x4, 0, 0, b""))
        frames = _frames_until(idle, lambda fs: any(k in (0x7, -1) for k, _, _ in fs), seconds=30)
        assert any(k in (0x7, -1) for k, _, _ in frames), f"an idle connection was kept open: {frames}"
        wait_until(lambda: server.server.state.in_flight == 0, what="no call left in flight")
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def _advertised_settings(port: int) -> dict[int, int]:
    """The server's first SETTINGS frame on a fresh raw HTTP/2 connection: {identifier: value}."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + http2_frame(0x4, 0, 0, b""))
        buffer = b""
        while True:
            while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                length, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
                payload, buffer = buffer[9:9 + length], buffer[9 + length:]
                if kind == 0x4 and not flags & 0x1:  # SETTINGS, not an ACK: 6-byte (id, value) pairs
                    return {int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
                            for i in range(0, len(payload), 6)}
            chunk = sock.recv(1 << 16)
            assert chunk, "the server closed the connection before its SETTINGS"
            buffer += chunk


@pytest.mark.parametrize("limits", [{}, {"max_streams_per_connection": 8}], ids=["default", "8"])
def test_the_stream_limit_is_advertised_and_by_default_leaves_one_connection_every_call_slot(
        repo: Repository, limits: dict) -> None:
    """gRPC counts a stream until the server has freed its call, after the response, so a limit near
    a client's concurrency refuses some of its calls under load (REFUSED_STREAM, docs/benchmarks.md):
    the default lets one connection hold as many streams as the server has call slots."""
    server = start(repo, limits=limits)
    try:
        max_concurrent_streams = _advertised_settings(server.server.port).get(0x3)
        configured = Limits(**limits)
        assert max_concurrent_streams == configured.max_streams_per_connection
        if not limits:
            assert max_concurrent_streams >= configured.max_concurrent_calls
    finally:
        server.stop()


def test_request_bytes_in_flight_have_a_budget() -> None:
    from genserve.serving.decoding import RequestBudget

    budget = RequestBudget(10)
    assert budget.reserve(6) and not budget.reserve(5) and budget.used_bytes == 6
    budget.release(6)
    assert budget.reserve(10) and budget.used_bytes == 10


@pytest.mark.parametrize("receive_timeout_s", [30.0, 0.0])  # 0: unary methods stay unary (decoding.py)
def test_over_budget_and_undecodable_requests_get_clear_statuses(repo: Repository, receive_timeout_s: float) -> None:
    server = start(repo, limits={"max_in_flight_request_bytes": 1 * MiB, "receive_timeout_s": receive_timeout_s})
    try:
        with server.channel() as channel:
            stub = genserve_pb2_grpc.GenserveStub(channel)
            big = pb.EncodeRequest(model=GOOD, images=pb.Images(tensor=pb.Tensor(
                dtype=pb.DATA_TYPE_UINT8, shape=[2 * MiB], data=bytes(2 * MiB))))
            error = rpc_error(stub.Encode, big, timeout=10)
            assert error.code() == Code.RESOURCE_EXHAUSTED and "max_in_flight_request_bytes" in error.details()
            raw = channel.unary_unary("/genserve.v1.Genserve/Generate", request_serializer=lambda m: m,
                                      response_deserializer=pb.GenerateResponse.FromString)
            error = rpc_error(raw, b"\xff\xff\xff", timeout=10)  # not a protobuf message
            assert error.code() == Code.INVALID_ARGUMENT and "not a valid genserve.v1.GenerateRequest" in error.details()
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # a response-streaming method
            watch.cancel()
            assert stub.Generate(pb.GenerateRequest(model=GOOD, count=1), timeout=10).model.version == 1
        assert server.server.state.in_flight == 0
        assert server.server.request_budget.used_bytes == 0  # every reservation released
    finally:
        server.stop()


@pytest.mark.parametrize(("receive_timeout_s", "streaming"), [(30.0, True), (0.0, False)])
def test_unary_methods_are_served_as_streaming_only_while_their_message_is_timed(receive_timeout_s, streaming) -> None:
    from genserve.serving.decoding import RequestBudget, RequestDecodingInterceptor

    async def body(request, context):
        return request

    handler = grpc.unary_unary_rpc_method_handler(body, request_deserializer=pb.GenerateRequest.FromString)
    wrapped = RequestDecodingInterceptor(receive_timeout_s, RequestBudget(1 << 20))._wrap(handler)
    assert wrapped.request_streaming is streaming and not wrapped.response_streaming
    received = wrapped.request_deserializer(b"\xff")
    assert received.status == Code.INVALID_ARGUMENT and received.size == 1


def test_one_sweeper_times_out_stalled_messages_and_lets_cancellations_through() -> None:
    import asyncio

    from genserve.serving.decoding import RequestBudget, RequestDecodingInterceptor

    class Stalled:  # the context of a call whose message never comes
        async def read(self):
            await asyncio.Event().wait()

    async def scenario() -> None:
        interceptor = RequestDecodingInterceptor(0.2, RequestBudget(1 << 20))
        stalled = [asyncio.create_task(interceptor._receive(Stalled())) for _ in range(3)]
        cancelled = asyncio.create_task(interceptor._receive(Stalled()))
        await asyncio.sleep(0.05)
        assert len(interceptor._waiting) == 4  # one sweeper for all of them, no timer per call
        cancelled.cancel()  # the client's cancellation is not turned into the server's timeout
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        for received in await asyncio.wait_for(asyncio.gather(*stalled), timeout=10):
            assert received.status == Code.DEADLINE_EXCEEDED and "receive_timeout_s" in received.details
        assert not interceptor._waiting and not interceptor._timed_out
        await asyncio.wait_for(interceptor._sweeper, timeout=10)  # nothing waits: the sweeper ends

    asyncio.run(scenario())


def test_metrics_endpoint_asks_for_the_token_and_times_out_slow_clients(repo: Repository) -> None:
    server = start(repo, auth_token="s3cret", metrics_request_timeout_s=1.0, metrics_max_connections=2)
    sockets: list[socket.socket] = []
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(server.metrics_url, timeout=10)
        assert info.value.code == 401
        good = urllib.request.Request(server.metrics_url, headers={"Authorization": "Bearer s3cret"})
        assert b"genserve_models_loaded 1.0" in urllib.request.urlopen(good, timeout=10).read()
        # two connections that never finish their request: each is closed after the timeout, and
        # a third beyond metrics_max_connections is closed at once; none pins a thread for good
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.server.metrics_port), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            sockets.append(sock)
        for sock in sockets:
            sock.settimeout(15)
            assert sock.recv(1024) == b"", "a stalled /metrics connection was kept open"
        wait_until(lambda: not any("process_request" in t.name for t in threading.enumerate()),
                   what="no /metrics request thread left")
        assert b"genserve_models_loaded" in urllib.request.urlopen(good, timeout=10).read()
    finally:
        for sock in sockets:
            sock.close()
        server.stop()
    open_server = start(repo, auth_token="s3cret", metrics_auth="none")
    try:
        assert b"genserve_models_loaded" in urllib.request.urlopen(open_server.metrics_url, timeout=10).read()
    finally:
        open_server.stop()


# --- High 3, 4, Medium 6, 9, 10: one bad version is refused, everything else carries on ------------
def _damage(repo: Repository, outside: Path) -> dict[str, str]:
    """Model versions damaged in every way the issue found; name -> what the refusal must say."""
    good = good_manifest_dict(repo)
    graph = repo.version_dir(GOOD, 1) / "decoder.onnx"

    def by_hand(name: str, change) -> None:
        data = json.loads(json.dumps(good))
        data["name"] = name
        change(data)
        write_manifest_text(repo, name, json.dumps(data, ensure_ascii=False) if "kind" not in name
                            else json.dumps(data).replace("KIND", "\\ud800"))
        (repo.version_dir(name, 1) / "decoder.onnx").write_bytes(graph.read_bytes())

    write_manifest_text(repo, "bad-digits", json.dumps({**good, "name": "bad-digits", "training": {"steps": 1}})
                        .replace('"steps": 1', '"steps": ' + "9" * 5000))
    write_manifest_text(repo, "bad-deep", '{"a": ' * 100_000 + "1" + "}" * 100_000)
    fifo_dir = repo.version_dir("bad-fifo", 1)
    fifo_dir.mkdir(parents=True)
    os.mkfifo(fifo_dir / "manifest.json")
    zero_dir = repo.version_dir("bad-zero", 1)
    zero_dir.mkdir(parents=True)
    (zero_dir / "manifest.json").symlink_to("/dev/zero")
    by_hand("bad-prior", lambda d: d["latent"]["prior"].update(mean="abc"))
    by_hand("bad-shape", lambda d: d["image"].update(shape=[1, 2 ** 64, 2]))
    by_hand("bad-kind", lambda d: d.update(kind="KIND"))
    # a listed graph that is a symlink to a file outside the repository, with the right hash
    publish(repo, "bad-filelink")
    linked = repo.version_dir("bad-filelink", 1) / "decoder.onnx"
    outside.mkdir(parents=True, exist_ok=True)
    os.replace(linked, outside / "decoder.onnx")
    linked.symlink_to(outside / "decoder.onnx")
    # a model directory that is a symlink to a tree outside the repository
    elsewhere = Repository(outside / "repo", create=True)
    publish(elsewhere, "bad-dirlink")
    (repo.root / "bad-dirlink").symlink_to(elsewhere.model_dir("bad-dirlink"))
    # manifests whose shapes the graph does not have, or too big to allocate for a warm-up
    publish(repo, "bad-mismatch", latent_shape=8)
    publish(repo, "bad-huge", manifest=denoiser_manifest, image_shape=(1, 1500, 1500))
    return {
        "bad-digits": "not valid JSON", "bad-deep": "not valid JSON", "bad-fifo": "a FIFO",
        "bad-zero": "symbolic link", "bad-prior": "latent.prior.mean", "bad-shape": "image.shape",
        "bad-kind": "lone surrogate", "bad-filelink": "symbolic link", "bad-dirlink": "symbolic link",
        "bad-mismatch": "the graph has shape", "bad-huge": "over limits.max_message_bytes",
    }


def test_damaged_versions_are_refused_and_the_rest_is_served(repo: Repository, tmp_path: Path) -> None:
    expected = _damage(repo, tmp_path / "outside")
    publish(repo, OTHER)
    for name in ("bad-digits", "bad-deep", "bad-fifo", "bad-zero", "bad-prior", "bad-shape", "bad-kind", "bad-dirlink"):
        [status] = repo.status(name)
        assert not status.valid and expected[name] in status.error, (name, status.error)
    # the server starts (a restart too), serves the good models and answers the repository index
    limits = {"max_message_bytes": 4 * MiB}
    server = start(repo, limits=limits, defaults={"max_batch_size": 2})
    try:
        with server.channel() as channel:
            genserve = genserve_pb2_grpc.GenserveStub(channel)
            models = genserve.ListModels(pb.ListModelsRequest(), timeout=10).models
            assert sorted(m.name for m in models) == [OTHER, GOOD]
            for name in (GOOD, OTHER):
                assert genserve.GetModel(pb.GetModelRequest(model=name), timeout=10).model.version == 1
                assert list(generate(server, name, count=2).images.tensor.shape) == [2, 1, 2, 2]
            for name, why in expected.items():
                error = rpc_error(genserve.GetModel, pb.GetModelRequest(model=name), timeout=10)
                assert error.code() == Code.NOT_FOUND, name
                if name in ("bad-filelink", "bad-mismatch", "bad-huge"):  # refused at load
                    assert why in error.details(), (name, error.details())
        states = {name: state for name, _, state in index(server)}
        assert states[f"{GOOD}.decoder"] == "READY" and states[f"{OTHER}.decoder"] == "READY"
        assert not any(state == "READY" for name, state in states.items() if name.startswith("bad-"))
        # hot reload keeps working beside the damage: a new version of a good model is picked up
        publish(repo, GOOD)
        server.run(server.server.manager.poll_once())
        assert server.server.manager.loaded()[GOOD] == [2]
    finally:
        server.stop()
    assert not server._thread.is_alive(), "the server did not stop"


# --- High 5: what is hashed is what is loaded --------------------------------------------------------
def test_the_server_loads_the_bytes_it_hashed(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from genserve.serving import runtime

    publish(repo, OTHER)
    loaded_from: list[object] = []
    original_session = onnxruntime.InferenceSession

    def recording_session(model, *args, **kwargs):
        loaded_from.append(model)
        return original_session(model, *args, **kwargs)

    monkeypatch.setattr(runtime.ort, "InferenceSession", recording_session, raising=True)
    original_verify = Repository.verify
    swapped = decoder_graph("Exp", seed=7)  # a different, valid graph

    def verify_then_swap(self: Repository, name: str, version: int) -> Manifest:
        manifest = original_verify(self, name, version)
        if name == OTHER:  # the file changes after its hash was checked, before it is loaded
            path = self.version_dir(name, version) / "decoder.onnx"
            tmp = path.with_name("swap.tmp")
            tmp.write_bytes(swapped)
            os.replace(tmp, path)
        return manifest

    monkeypatch.setattr(Repository, "verify", verify_then_swap)
    server = start(repo)
    try:
        manifest = repo.load_manifest(GOOD, 1)
        assert loaded_from and all(isinstance(m, bytes) for m in loaded_from), "a graph was loaded from its path"
        assert hashlib.sha256(loaded_from[0]).hexdigest() == manifest.files["decoder.onnx"].sha256
        assert server.server.manager.loaded() == {GOOD: [1]}
        with server.channel() as channel:
            error = rpc_error(genserve_pb2_grpc.GenserveStub(channel).GetModel, pb.GetModelRequest(model=OTHER), timeout=10)
        assert error.code() == Code.NOT_FOUND and "sha256" in error.details()
    finally:
        server.stop()


# --- Medium 7, Low 12-15: what requests can make the server say -------------------------------------
def _metrics_text(server: RunningServer) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


def test_requests_cannot_grow_metrics_or_break_statuses(repo: Repository, tmp_path: Path) -> None:
    publish(repo, "tiny-exp", graph=decoder_graph("Exp"))  # a decoder whose outputs overflow on large latents
    server = start(repo)
    try:
        with server.channel() as channel:
            genserve = genserve_pb2_grpc.GenserveStub(channel)
            inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            # 7: invented names become no metric series and no lock-table entries
            def invent(i: int) -> None:
                error = rpc_error(inference.RepositoryModelUnload, ip.RepositoryModelUnloadRequest(model_name=f"made-up-{i}"),
                                  timeout=10)
                assert error.code() == Code.NOT_FOUND
                rpc_error(inference.RepositoryModelLoad, ip.RepositoryModelLoadRequest(model_name=f"made-up-{i}"), timeout=10)

            invent(0)
            before = len(_metrics_text(server))
            for i in range(1, 300):
                invent(i)
            text = _metrics_text(server)
            assert "made-up" not in text and len(text) < before + 200, (before, len(text))
            assert server.server.manager._locks == {}
            # 12: version strings are ASCII digits, bounded
            for version in ("²", "١", "1" * 5000, "-1", "1.0"):
                error = rpc_error(inference.ModelReady, ip.ModelReadyRequest(name=f"{GOOD}.decoder", version=version), timeout=10)
                assert error.code() == Code.INVALID_ARGUMENT, version
                error = rpc_error(inference.ModelMetadata, ip.ModelMetadataRequest(name=f"{GOOD}.decoder", version=version),
                                  timeout=10)
                assert error.code() == Code.INVALID_ARGUMENT, version
            assert inference.ModelReady(ip.ModelReadyRequest(name=f"{GOOD}.decoder", version="1"), timeout=10).ready
            # 13: a 20 kB name is refused as such, its echo truncated
            long_name = "a" * 20_000
            for call, request in ((genserve.GetModel, pb.GetModelRequest(model=long_name)),
                                  (inference.ModelMetadata, ip.ModelMetadataRequest(name=long_name + ".decoder"))):
                error = rpc_error(call, request, timeout=10)
                assert error.code() in (Code.INVALID_ARGUMENT, Code.NOT_FOUND) and len(error.details()) < 1200
            # 14: no temperature or latents past the limits, and never non-finite pixels with OK
            error = rpc_error(genserve.Generate, pb.GenerateRequest(model=GOOD, count=1, temperature=3.4e38), timeout=10)
            assert error.code() == Code.INVALID_ARGUMENT and "max_temperature" in error.details()
            huge = codec.array_to_tensor(np.full((1, LATENT), 3.4e38, np.float32))
            error = rpc_error(genserve.Generate, pb.GenerateRequest(model=GOOD, latents=huge), timeout=10)
            assert error.code() == Code.INVALID_ARGUMENT and "max_latent_abs" in error.details()
            pair = pb.InterpolateRequest(model=GOOD, steps=3, latents=pb.LatentPair(latents=codec.array_to_tensor(
                np.full((2, LATENT), 3.4e38, np.float32))))
            assert rpc_error(genserve.Interpolate, pair, timeout=10).code() == Code.INVALID_ARGUMENT
            big = codec.array_to_tensor(np.full((1, LATENT), 1000.0, np.float32))  # within the limit; exp overflows
            error = rpc_error(genserve.Generate, pb.GenerateRequest(model="tiny-exp", latents=big), timeout=10)
            assert error.code() == Code.INVALID_ARGUMENT and "NaN or infinite" in error.details()
            infer = ip.ModelInferRequest(model_name="tiny-exp.decoder", inputs=[ip.ModelInferRequest.InferInputTensor(
                name="latents", datatype="FP32", shape=[1, LATENT])], raw_input_contents=[np.full((1, LATENT), 1000.0, "<f4").tobytes()])
            assert rpc_error(inference.ModelInfer, infer, timeout=10).code() == Code.INVALID_ARGUMENT
            # 15: an unknown output is refused before the graph runs; mixed contents are refused
            runs = server.server.manager.resolve(GOOD).graph("decoder").stats.inference_count
            unknown = ip.ModelInferRequest(
                model_name=f"{GOOD}.decoder", outputs=[ip.ModelInferRequest.InferRequestedOutputTensor(name="nope")],
                inputs=[ip.ModelInferRequest.InferInputTensor(name="latents", datatype="FP32", shape=[1, LATENT])],
                raw_input_contents=[np.zeros((1, LATENT), "<f4").tobytes()])
            error = rpc_error(inference.ModelInfer, unknown, timeout=10)
            assert error.code() == Code.INVALID_ARGUMENT and "'images'" in error.details()
            assert server.server.manager.resolve(GOOD).graph("decoder").stats.inference_count == runs
            mixed = ip.ModelInferRequest(model_name=f"{GOOD}.decoder", inputs=[ip.ModelInferRequest.InferInputTensor(
                name="latents", datatype="FP32", shape=[1, LATENT],
                contents=ip.InferTensorContents(fp32_contents=[0.0] * LATENT, int_contents=[1]))])
            error = rpc_error(inference.ModelInfer, mixed, timeout=10)
            assert error.code() == Code.INVALID_ARGUMENT and "int_contents" in error.details()
            ok = inference.ModelInfer(ip.ModelInferRequest(
                model_name=f"{GOOD}.decoder", inputs=[ip.ModelInferRequest.InferInputTensor(
                    name="latents", datatype="FP32", shape=[1, LATENT], contents=ip.InferTensorContents(fp32_contents=[0.0] * LATENT))]),
                timeout=10)
            assert list(ok.outputs[0].shape) == [1, 1, 2, 2]
        assert "INTERNAL" not in _metrics_text(server)
    finally:
        server.stop()


# --- Low 11, 12 and the file readers, as units -----------------------------------------------------
def test_sixteen_bit_pngs_are_refused_not_clipped() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((2, 2), 32768, np.uint16)).save(buffer, format="PNG")  # 16-bit mid-grey
    with pytest.raises(InvalidArgument, match="16-bit PNG"):
        codec.decode_images(pb.Images(png=pb.PngImages(png=[buffer.getvalue()])), (1, 2, 2), 4)
    buffer = io.BytesIO()
    Image.fromarray(np.full((2, 2), 128, np.uint8)).save(buffer, format="PNG")
    decoded = codec.decode_images(pb.Images(png=pb.PngImages(png=[buffer.getvalue()])), (1, 2, 2), 4)
    np.testing.assert_allclose(decoded, 128 / 255)


def test_version_strings_are_ascii_digits() -> None:
    assert parse_version("") is None and parse_version("7") == 7
    for text in ("²", "١", "1" * 19, "1" * 5000, "0", " 1", "1\n"):
        with pytest.raises(InvalidArgument) as info:
            parse_version(text)
        assert len(str(info.value)) < 300


def test_repository_reads_refuse_fifos_devices_symlinks_and_oversized_files(tmp_path: Path) -> None:
    from genserve.export.reading import RefusedFileError, read_regular, sha256_regular

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(RefusedFileError, match="a FIFO"):
        read_regular(fifo, 100)  # returns at once: the FIFO is never waited on
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")
    with pytest.raises(RefusedFileError, match="symbolic link"):
        read_regular(link, 100)
    with pytest.raises(RefusedFileError, match="character device"):
        read_regular(Path("/dev/zero"), 100)
    plain = tmp_path / "plain"
    plain.write_bytes(b"x" * 101)
    with pytest.raises(RefusedFileError, match="over the limit of 100 bytes"):
        read_regular(plain, 100)
    assert read_regular(plain, 101) == b"x" * 101
    assert sha256_regular(plain, 101) == (hashlib.sha256(b"x" * 101).hexdigest(), 101)


def test_manifest_values_the_server_cannot_carry_are_refused(repo: Repository) -> None:
    good = good_manifest_dict(repo)
    cases = {
        "nested": ('{"a": ' * 40 + "1" + "}" * 40, "nested more than"),
        "digits": (json.dumps(good).replace('"version": 1', '"version": ' + "1" * 5000), "not valid JSON"),
        "nan": (json.dumps({**good, "training": {"loss": float("nan")}}), "must be finite"),
        "int64": (json.dumps({**good, "training": {"steps": 2 ** 70}}), "64-bit"),
        "surrogate": (json.dumps({**good, "dataset": "\ud800"}), "lone surrogate"),
        "std": (json.dumps({**good, "latent": {"dim": LATENT, "prior": {**good["latent"]["prior"], "std": [1, 2]}}}),
                "latent.prior.std"),
        "mixture": (json.dumps({**good, "latent": {"dim": LATENT, "prior": {
            "distribution": "gaussian_mixture", "dim": LATENT, "std": 1.0, "weights": [1.0], "means": [[0.0]]}}}),
            "latent.prior.means"),
        "big": (" " * (2 << 20), "over the limit"),
    }
    for name, (text, why) in cases.items():
        with pytest.raises(ManifestError, match=why):
            Manifest.from_json(text, name)
    assert Manifest.from_json(json.dumps(good)).name == GOOD
