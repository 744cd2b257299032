"""The model manager under change: hot reload under load, refused versions, explicit load/unload,
serving marks. Each test runs its own server on a private copy of (part of) the repository."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    RunningServer,
    copy_repository,
    publish_copy,
    server_config,
    wait_until,
)
from prometheus_client import generate_latest

from genserve.clients import codec  # the tests call the server as a client does
from genserve.export import Manifest, Repository
from genserve.serving.models import ModelManager
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc, grpc_service_pb2_grpc
from genserve.serving.protos import grpc_service_pb2 as ip

Code = grpc.StatusCode


@pytest.fixture
def repo(golden_repository: Path, tmp_path: Path) -> Repository:
    return copy_repository(golden_repository, tmp_path / "repo", ["mnist-vae", "mnist-ae", "mnist-gan"])


def start(repo: Repository, **overrides) -> RunningServer:
    return RunningServer(server_config(repo.root, **overrides)).start()


def marks(repo: Repository, name: str) -> set[int]:
    return repo.serving_versions(name)


def index(stub) -> set[tuple[str, str, str]]:
    return {(m.name, m.version, m.state) for m in stub.RepositoryIndex(ip.RepositoryIndexRequest()).models}


def test_not_serving_until_the_models_are_loaded(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    load_all = ModelManager.load_all

    async def gated_load_all(self: ModelManager) -> None:
        await asyncio.get_running_loop().run_in_executor(None, gate.wait, 30)
        await load_all(self)

    monkeypatch.setattr(ModelManager, "load_all", gated_load_all)
    server = RunningServer(server_config(repo.root)).start(wait=False)
    try:
        wait_until(lambda: server.server.manager is not None, what="the server to listen")
        with server.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="genserve.v1.Genserve")
            wait_until(lambda: _status(health, check) == health_pb2.HealthCheckResponse.NOT_SERVING, what="NOT_SERVING")
            inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert inference.ServerLive(ip.ServerLiveRequest()).live
            assert not inference.ServerReady(ip.ServerReadyRequest()).ready
            gate.set()
            server.wait_started()
            assert _status(health, check) == health_pb2.HealthCheckResponse.SERVING
            assert inference.ServerReady(ip.ServerReadyRequest()).ready
    finally:
        gate.set()
        server.stop()


def _status(health, request) -> int | None:
    try:
        return health.Check(request, timeout=5).status
    except grpc.RpcError:
        return None  # not listening yet


def test_hot_reload_under_load_fails_no_request(repo: Repository) -> None:
    server = start(repo, poll_interval_s=0.1, models={"mnist-vae": {"max_queue_delay_us": 20_000, "batching_policy": "fixed"}})
    try:
        genserve = genserve_pb2_grpc.GenserveStub(server.channel())
        images = np.zeros((2, 1, 28, 28), np.uint8)
        seen: list[list[int]] = [[] for _ in range(4)]
        failures: list[str] = []
        done = threading.Event()

        def client(i: int) -> None:
            for n in range(400):  # bounded; stops soon after version 2 answers
                if done.is_set() and seen[i] and seen[i][-1] == 2:
                    return
                try:
                    if n % 2:
                        response = genserve.Reconstruct(pb.ReconstructRequest(model="mnist-vae", images=codec.images_to_proto(images)), timeout=30)
                    else:
                        response = genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=2, seed=n), timeout=30)
                    seen[i].append(response.model.version)
                except grpc.RpcError as error:
                    failures.append(f"{error.code()}: {error.details()}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: all(seen), what="every client to get an answer")
        assert marks(repo, "mnist-vae") == {1}
        assert publish_copy(repo, "mnist-vae", 1) == 2
        wait_until(lambda: sum(v.count(2) for v in seen) >= 8, what="version 2 to take traffic")
        done.set()
        for t in threads:
            t.join(60)
        assert failures == []
        for versions in seen:  # each client switched once, from 1 to 2, and never went back
            assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions)
        inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel())
        wait_until(lambda: marks(repo, "mnist-vae") == {2}, what="the serving mark to move to version 2")
        assert ("mnist-vae.decoder", "2", "READY") in index(inference)
        assert not any(v == "1" and n.startswith("mnist-vae.") for n, v, _ in index(inference))
        assert genserve.GetModel(pb.GetModelRequest(model="mnist-vae")).versions == [2]
        with pytest.raises(grpc.RpcError) as info:
            genserve.Generate(pb.GenerateRequest(model="mnist-vae", version=1, count=1))
        assert info.value.code() == Code.NOT_FOUND and "version 1 is not loaded" in info.value.details()
    finally:
        server.stop()


def _publish_with_garbage_decoder(repo: Repository, name: str) -> int:
    source = repo.version_dir(name, 1)
    manifest = repo.load_manifest(name, 1)

    def build(staging: Path, version: int) -> Manifest:
        for file in manifest.files:
            data = (source / file).read_bytes()
            (staging / file).write_bytes(b"not an onnx graph" if file == "decoder.onnx" else data)
        # its quality labels described the real decoder, so they go (the manifest would be refused)
        return dataclasses.replace(manifest, version=version, files={}, quality={})

    return repo.publish(name, build)


def test_refused_versions_leave_the_old_one_serving(repo: Repository) -> None:
    server = start(repo)  # no polling: polls are triggered below
    try:
        genserve = genserve_pb2_grpc.GenserveStub(server.channel())
        inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel())
        manager = server.server.manager
        assert _publish_with_garbage_decoder(repo, "mnist-vae") == 2  # hashes match, onnxruntime refuses it
        server.run(manager.poll_once())
        assert genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=1)).model.version == 1
        assert publish_copy(repo, "mnist-vae", 1) == 3
        graph = repo.version_dir("mnist-vae", 3) / "decoder.onnx"
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0xFF  # corrupted after publishing: the sha256 no longer matches
        graph.write_bytes(bytes(data))
        server.run(manager.poll_once())
        server.run(manager.poll_once())  # a refused version is not retried
        assert genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=1)).model.version == 1
        assert marks(repo, "mnist-vae") == {1}
        states = {(m.name, m.version): (m.state, m.reason) for m in inference.RepositoryIndex(ip.RepositoryIndexRequest()).models}
        assert states["mnist-vae.decoder", "1"] == ("READY", "")
        assert states["mnist-vae.decoder", "2"][0] == "UNAVAILABLE" and "onnxruntime cannot load" in states["mnist-vae.decoder", "2"][1]
        assert states["mnist-vae.decoder", "3"][0] == "UNAVAILABLE" and "sha256" in states["mnist-vae.decoder", "3"][1]
        text = generate_latest(server.server.metrics.registry).decode()
        assert 'genserve_model_load_failures_total{model="mnist-vae",stage="load"} 1.0' in text
        assert 'genserve_model_load_failures_total{model="mnist-vae",stage="verify"} 1.0' in text
        with pytest.raises(grpc.RpcError) as info:  # an explicit load tries again, and says why it fails
            inference.RepositoryModelLoad(ip.RepositoryModelLoadRequest(model_name="mnist-vae"))
        assert info.value.code() == Code.FAILED_PRECONDITION and "version 3 was refused (verify)" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            genserve.Generate(pb.GenerateRequest(model="mnist-vae", version=3, count=1))
        assert info.value.code() == Code.NOT_FOUND and "it was refused" in info.value.details()
        assert genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=1)).model.version == 1
    finally:
        server.stop()
    # a restart with both newer versions still damaged serves the newest one that loads (1), not nothing
    server = start(repo)
    try:
        genserve = genserve_pb2_grpc.GenserveStub(server.channel())
        assert genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=1)).model.version == 1
        assert server.server.manager.loaded()["mnist-vae"] == [1]
        assert marks(repo, "mnist-vae") == {1}
        text = generate_latest(server.server.metrics.registry).decode()
        assert 'genserve_model_load_failures_total{model="mnist-vae",stage="load"} 1.0' in text
        assert 'genserve_model_load_failures_total{model="mnist-vae",stage="verify"} 1.0' in text
        server.run(server.server.manager.poll_once())  # the poller does not retry the refused ones
        assert server.server.manager.loaded()["mnist-vae"] == [1]
    finally:
        server.stop()


def test_explicit_unload_and_load(repo: Repository) -> None:
    server = start(repo)
    try:
        genserve = genserve_pb2_grpc.GenserveStub(server.channel())
        inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel())
        z = codec.array_to_tensor(np.zeros((1, 196), np.float32))
        assert genserve.Generate(pb.GenerateRequest(model="mnist-ae", latents=z)).model.version == 1
        inference.RepositoryModelUnload(ip.RepositoryModelUnloadRequest(model_name="mnist-ae.decoder"))
        with pytest.raises(grpc.RpcError) as info:
            genserve.Generate(pb.GenerateRequest(model="mnist-ae", latents=z))
        assert info.value.code() == Code.NOT_FOUND and "unloaded" in info.value.details()
        assert not inference.ModelReady(ip.ModelReadyRequest(name="mnist-ae.encoder")).ready
        assert ("mnist-ae.encoder", "1", "UNAVAILABLE") in index(inference)
        assert marks(repo, "mnist-ae") == set()
        server.run(server.server.manager.poll_once())  # the poller leaves an unloaded model alone
        assert not inference.ModelReady(ip.ModelReadyRequest(name="mnist-ae.encoder")).ready
        inference.RepositoryModelLoad(ip.RepositoryModelLoadRequest(model_name="mnist-ae"))
        assert genserve.Generate(pb.GenerateRequest(model="mnist-ae", latents=z)).model.version == 1
        assert marks(repo, "mnist-ae") == {1}
        with pytest.raises(grpc.RpcError) as info:
            inference.RepositoryModelUnload(ip.RepositoryModelUnloadRequest(model_name="no-such-model"))
        assert info.value.code() == Code.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            inference.RepositoryModelLoad(ip.RepositoryModelLoadRequest(model_name="../etc"))
        assert info.value.code() == Code.INVALID_ARGUMENT
    finally:
        server.stop()


def test_new_models_appear_and_marks_protect_served_versions(repo: Repository) -> None:
    server = start(repo)
    try:
        genserve = genserve_pb2_grpc.GenserveStub(server.channel())
        assert publish_copy(repo, "mnist-gan", 1, "mnist-gan-new") == 1
        assert publish_copy(repo, "mnist-gan", 1) == 2
        assert repo.keep_versions("mnist-gan", 1) == []  # version 1 is marked as served: kept
        assert repo.versions("mnist-gan") == [1, 2]
        server.run(server.server.manager.poll_once())
        names = {m.name: list(m.versions) for m in genserve.ListModels(pb.ListModelsRequest()).models}
        assert names["mnist-gan-new"] == [1] and names["mnist-gan"] == [2]
        wait_until(lambda: marks(repo, "mnist-gan") == {2}, what="version 1 to be released")
        assert repo.keep_versions("mnist-gan", 1) == [1]
    finally:
        server.stop()
    assert marks(repo, "mnist-gan") == set()  # shutdown removes the marks
    mark_dir = repo.model_dir("mnist-gan") / ".serving"
    assert not [p for p in mark_dir.glob("*.json") if json.loads(p.read_text())["versions"]]


def test_several_loaded_versions_and_a_missing_fp16_variant(repo: Repository) -> None:
    server = start(repo, models={"mnist-gan": {"max_loaded_versions": 2, "variant": "fp16"}})
    try:
        genserve = genserve_pb2_grpc.GenserveStub(server.channel())
        publish_copy(repo, "mnist-gan", 1)
        server.run(server.server.manager.poll_once())
        info = genserve.GetModel(pb.GetModelRequest(model="mnist-gan"))
        assert (info.model.version, list(info.versions)) == (2, [1, 2])
        assert info.parts[0].variant == "fp32"  # no fp16 file was exported: the fp32 one serves
        request = pb.GenerateRequest(model="mnist-gan", count=2, seed=3)
        newest = genserve.Generate(request)
        request.version = 1
        oldest = genserve.Generate(request)
        assert (newest.model.version, oldest.model.version) == (2, 1) and newest.images == oldest.images
        assert marks(repo, "mnist-gan") == {1, 2}
        publish_copy(repo, "mnist-gan", 1)
        server.run(server.server.manager.poll_once())
        assert list(genserve.GetModel(pb.GetModelRequest(model="mnist-gan")).versions) == [2, 3]
        wait_until(lambda: marks(repo, "mnist-gan") == {2, 3}, what="version 1 to be released")
    finally:
        server.stop()


def test_batching_off_and_no_memory_arena_give_the_same_images(repo: Repository) -> None:
    request = pb.GenerateRequest(model="mnist-gan", count=3, seed=11)
    outputs = {}
    for label, settings in (("default", {}), ("lean", {"dynamic_batching": False, "cpu_memory_arena": False})):
        server = start(repo, models={"mnist-gan": settings})
        try:
            graph = server.server.manager.resolve("mnist-gan").graph("generator")
            assert graph.session.session.get_session_options().enable_cpu_mem_arena is (label == "default")
            assert graph.batcher.merge is (label == "default")
            outputs[label] = genserve_pb2_grpc.GenserveStub(server.channel()).Generate(request).images
        finally:
            server.stop()
    assert outputs["lean"] == outputs["default"]


def test_models_waiting_for_the_initial_load_are_retryable_not_missing(
        repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server listens (health NOT_SERVING) while it loads the repository, one model at a time.
    A call for a model still waiting its turn gets UNAVAILABLE, which clients retry, not NOT_FOUND;
    a name the repository does not have is NOT_FOUND at once."""
    gate = threading.Event()
    verify = Repository.verify

    def gated_verify(self: Repository, name: str, version: int) -> Manifest:
        if name == "mnist-ae":  # the first of the three names: the other two wait behind it
            gate.wait(30)
        return verify(self, name, version)

    monkeypatch.setattr(Repository, "verify", gated_verify)
    server = RunningServer(server_config(repo.root)).start(wait=False)
    try:
        wait_until(lambda: server.server._listening and server.server.manager._initial_queue is not None,
                   what="the server to listen and list its models")
        genserve = genserve_pb2_grpc.GenserveStub(server.channel())

        def status(model: str) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as info:
                genserve.Generate(pb.GenerateRequest(model=model, count=1), timeout=10)
            return info.value.code(), info.value.details()

        assert status("mnist-ae") == (Code.UNAVAILABLE, "model 'mnist-ae' is loading; retry shortly")
        for waiting in ("mnist-gan", "mnist-vae"):
            assert status(waiting) == (Code.UNAVAILABLE, "the server is still loading its models (0 loaded so far); "
                                                         "retry shortly")
        assert status("nope") == (Code.NOT_FOUND, "no model 'nope' is loaded (loaded models: none)")
        gate.set()
        server.wait_started(60)
        assert genserve.Generate(pb.GenerateRequest(model="mnist-gan", count=1), timeout=10).model.version == 1
    finally:
        gate.set()
        server.stop()


def test_each_state_says_why_a_model_does_not_serve(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """The "why not" of every state a version can be in, as RepositoryIndex and a request see it:
    unloaded, LOADING (retry shortly), refused (and nothing else to serve), never tried, unknown names."""
    server = start(repo)
    try:
        genserve = genserve_pb2_grpc.GenserveStub(server.channel())
        inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel())
        z = codec.array_to_tensor(np.zeros((1, 196), np.float32))
        inference.RepositoryModelUnload(ip.RepositoryModelUnloadRequest(model_name="mnist-ae"))
        states = {(m.name, m.version): (m.state, m.reason) for m in inference.RepositoryIndex(ip.RepositoryIndexRequest()).models}
        assert states["mnist-ae.decoder", "1"] == ("UNAVAILABLE", "unloaded")

        gate = threading.Event()
        verify = Repository.verify

        def gated_verify(self: Repository, name: str, version: int) -> Manifest:
            gate.wait(30)
            return verify(self, name, version)

        monkeypatch.setattr(Repository, "verify", gated_verify)
        loading = asyncio.run_coroutine_threadsafe(server.server.manager.load("mnist-ae", explicit=True), server.loop)
        try:
            def refusal() -> grpc.RpcError:
                try:
                    genserve.Generate(pb.GenerateRequest(model="mnist-ae", latents=z))
                except grpc.RpcError as error:
                    return error
                raise AssertionError("mnist-ae answered while its load is held")

            error = wait_until(lambda: (e := refusal()).code() == Code.UNAVAILABLE and e, what="mnist-ae to be loading")
            assert "model 'mnist-ae' is loading; retry shortly" in error.details()
            # RepositoryIndex answers while the load is held (its reads do not queue behind the load)
            during = {(m.name, m.version): m.state for m in inference.RepositoryIndex(
                ip.RepositoryIndexRequest(), timeout=10).models}
            assert during["mnist-ae.decoder", "1"] == "LOADING" and during["mnist-vae.decoder", "1"] == "READY"
        finally:
            gate.set()
        assert loading.result(60).version == 1
        monkeypatch.undo()
        assert genserve.Generate(pb.GenerateRequest(model="mnist-ae", latents=z)).model.version == 1

        assert publish_copy(repo, "mnist-gan", 1, "mnist-broken") == 1
        graph = repo.version_dir("mnist-broken", 1) / "generator.onnx"
        graph.write_bytes(graph.read_bytes()[::-1])  # the sha256 no longer matches
        assert publish_copy(repo, "mnist-gan", 1, "mnist-new") == 1
        all_states = inference.RepositoryIndex(ip.RepositoryIndexRequest()).models
        states = {(m.name, m.version): (m.state, m.reason) for m in all_states}
        assert states["mnist-new.generator", "1"] == ("UNAVAILABLE", "not loaded")  # in the repository, not tried yet
        server.run(server.server.manager.poll_once())
        with pytest.raises(grpc.RpcError) as info:
            genserve.Generate(pb.GenerateRequest(model="mnist-broken", count=1))
        assert info.value.code() == Code.NOT_FOUND
        assert "model 'mnist-broken' has no servable version: version 1 was refused: " in info.value.details()
        assert "sha256" in info.value.details()
        broken = [(m.version, m.state) for m in inference.RepositoryIndex(ip.RepositoryIndexRequest()).models
                  if m.name.startswith("mnist-broken.")]
        assert broken == [("1", "UNAVAILABLE")]  # the refusal only, no second "not loaded" row
        ready = inference.RepositoryIndex(ip.RepositoryIndexRequest(ready=True)).models
        assert {m.state for m in ready} == {"READY"} and not any(m.name.startswith("mnist-broken.") for m in ready)
        assert {m.name for m in ready} >= {"mnist-new.generator", "mnist-ae.decoder", "mnist-vae.decoder"}
        with pytest.raises(grpc.RpcError) as info:
            genserve.Generate(pb.GenerateRequest(model="nope", count=1))
        assert info.value.code() == Code.NOT_FOUND
        assert info.value.details() == "no model 'nope' is loaded (loaded models: mnist-ae, mnist-gan, mnist-new, mnist-vae)"
    finally:
        server.stop()
