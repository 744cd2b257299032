"""genserve-serve --workers 2 for real: two server processes on one port under the supervisor, real
gRPC, real onnxruntime, real prometheus multiprocess files. Calls spread over both workers and
their metrics add up; a new version is SERVING only once both have loaded it; SIGTERM drains both;
a killed worker is restarted and counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from helpers import LoggedProcess, copy_repository, publish_copy, serving_process, wait_until

from genserve.clients.client import GenserveClient, open_channels
from genserve.export import Repository
from genserve.serving.config import ConfigError, load_config
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc, grpc_service_pb2_grpc
from genserve.serving.protos import grpc_service_pb2 as oip
from genserve.serving.worker_group import WorkerContext, WorkerGroup, record_path

MODEL = "mnist-dense-vae"  # the quickest to load and run
CHANNELS = 16  # connections: the kernel hands each to one of the 2 workers (all on one: 2 ** -15)


class Workers:
    """A running `genserve-serve --workers 2` and what its log said about it."""

    def __init__(self, process: LoggedProcess):
        self.process = process
        supervising = process.wait_for("supervising")
        self.port, self.metrics_port = supervising["port"], supervising["metrics_port"]
        self.state_dir, self.metrics_dir = Path(supervising["state_dir"]), Path(supervising["metrics_dir"])
        self.address = f"127.0.0.1:{self.port}"
        process.wait_for("workers_serving")

    def pids(self) -> dict[int, int]:
        """worker slot -> pid of the process now in it."""
        return {e["worker"]: e["pid"] for e in self.process.events if e.get("event") == "worker_started"}

    def served_by(self) -> dict[str, int]:
        """request id -> the worker (slot) that answered it."""
        return {e["request_id"]: e["worker"] for e in self.process.events if e.get("event") == "rpc"}

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples


def start_workers(repo: Repository, *args: str) -> Workers:
    # --log-level debug: the tests read which worker served each call from the access log of OK calls
    process = serving_process("--repository", str(repo.root), "--workers", "2", "--port", "0", "--metrics-port", "0",
                              "--inference-threads", "1", "--log-level", "debug", *args)
    try:
        return Workers(process)
    except BaseException:
        process.kill()
        raise


@pytest.fixture(scope="module")
def repo(golden_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return copy_repository(golden_repository, tmp_path_factory.mktemp("workers") / "repo", [MODEL])


@pytest.fixture(scope="module")
def workers(repo: Repository):
    running = start_workers(repo, "--poll-interval", "1")
    yield running
    running.process.stop()  # SIGTERM: the supervisor removes its folders (a SIGKILL would leave them)


def generate(channel: grpc.Channel, request_id: str, seed: int = 7, version: int = 0) -> pb.GenerateResponse:
    return genserve_pb2_grpc.GenserveStub(channel).Generate(
        pb.GenerateRequest(model=MODEL, count=2, seed=seed, version=version),
        metadata=(("x-request-id", request_id),), timeout=20,
    )


def test_calls_spread_over_both_workers_and_their_metrics_add_up(workers: Workers) -> None:
    channels = open_channels(workers.address, CHANNELS)
    try:
        before = workers.metrics().get(f'genserve_requests_total{{code="OK",method="Generate",model="{MODEL}",version="1"}}', 0)
        responses = {f"spread-{i}": generate(channel, f"spread-{i}") for i, channel in enumerate(channels)}
        served = wait_until(lambda: (s := workers.served_by()) and all(r in s for r in responses) and s, timeout=10,
                            what="the rpc log lines of every call")
        assert {served[r] for r in responses} == {0, 1}  # both workers answered some
        # the same seed gives the same images, whichever worker computed them
        assert len({r.images.tensor.data for r in responses.values()}) == 1
        metrics = workers.metrics()
        after = metrics[f'genserve_requests_total{{code="OK",method="Generate",model="{MODEL}",version="1"}}']
        assert after - before == CHANNELS  # both workers' counters, summed by the supervisor
        assert metrics["genserve_workers"] == 2
        assert metrics[f'genserve_model_ready{{model="{MODEL}",version="1"}}'] == 1
        assert metrics["genserve_models_ready"] == 1  # the minimum over workers, not the sum
    finally:
        for channel in channels:
            channel.close()
    with GenserveClient(workers.address, channels=4) as client:  # the client's own option
        assert client.generate(MODEL, 3, seed=1).images.shape == (3, 1, 28, 28)


def test_a_new_version_is_serving_only_once_both_workers_have_it(workers: Workers, repo: Repository) -> None:
    channels = open_channels(workers.address, CHANNELS)
    try:
        version = publish_copy(repo, MODEL, 1)
        seen_new_at = None
        deadline = time.monotonic() + 20
        while seen_new_at is None and time.monotonic() < deadline:
            for i, channel in enumerate(channels):  # every call answers: v1 until both have the new one
                if generate(channel, f"reload-{i}-{time.monotonic()}").model.version == version:
                    seen_new_at = time.time()
                    break
        assert seen_new_at is not None, "no worker ever answered with the new version"
        ready = wait_until(lambda: (r := [e for e in workers.process.events if e.get("event") == "version_ready"
                                          and e.get("version") == version]) and len(r) == 2 and r,
                           timeout=10, what="both workers' version_ready")
        assert {e["worker"] for e in ready} == {0, 1}
        for event in ready:  # both had loaded it before any call was answered with it
            assert datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp() <= seen_new_at
        # every worker routes requests without a version to it, once it has read the other's record
        # (a tenth of a second apart at most: FOLLOW_INTERVAL_S)
        wait_until(lambda: all(generate(c, "after-reload").model.version == version for c in channels), timeout=5,
                   what="every worker answering with the new version")
        for channel in channels:  # genserve's own index agrees
            listed = genserve_pb2_grpc.GenserveStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models
            assert [(m.name, m.latest_version) for m in listed] == [(MODEL, version)]
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channels[0])
        index = stub.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=10)
        assert (f"{MODEL}.decoder", str(version), "READY") in {(m.name, m.version, m.state) for m in index.models}
        wait_until(lambda: sum(1 for e in workers.process.events if e.get("event") == "version_unloaded"
                               and e.get("version") == 1) == 2, timeout=10, what="version 1 unloaded by both")
        assert repo.serving_versions(MODEL) == {version}  # each worker's mark says what it serves
        refused = stub.RepositoryModelUnload  # would reach one worker only: refused, saying what to do
        with pytest.raises(grpc.RpcError) as error:
            refused(oip.RepositoryModelUnloadRequest(model_name=MODEL), timeout=10)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "every worker" in error.value.details()
    finally:
        for channel in channels:
            channel.close()


def test_a_killed_worker_is_restarted_and_counted(workers: Workers) -> None:
    restarts = workers.metrics().get("genserve_worker_restarts_total", 0)
    victim = workers.pids()[1]
    os.kill(victim, signal.SIGKILL)
    died = workers.process.wait_for("worker_died", timeout=20)
    assert died["pid"] == victim and died["signal"] == "SIGKILL"
    wait_until(lambda: workers.pids()[1] != victim, timeout=20, what="a new worker 1")
    replacement = workers.pids()[1]
    wait_until(lambda: any(e.get("event") == "worker_ready" and e.get("pid") == replacement for e in workers.process.events),
               timeout=60, what="the replacement ready")
    metrics = workers.metrics()
    assert metrics["genserve_worker_restarts_total"] == restarts + 1
    assert metrics["genserve_workers"] == 2
    channels = open_channels(workers.address, CHANNELS)
    try:
        ids = [f"after-kill-{i}" for i in range(CHANNELS)]
        for request_id, channel in zip(ids, channels, strict=True):
            generate(channel, request_id)
        served = wait_until(lambda: (s := workers.served_by()) and all(r in s for r in ids) and s, timeout=10,
                            what="the rpc log lines")
        assert {served[r] for r in ids} == {0, 1}
        assert any(e.get("event") == "rpc" and e.get("pid") == replacement for e in workers.process.events)
    finally:
        for channel in channels:
            channel.close()


def test_sigterm_drains_both_workers(golden_repository: Path, tmp_path: Path) -> None:
    repo = copy_repository(golden_repository, tmp_path / "repo", [MODEL])
    config = tmp_path / "serve.yaml"  # requests wait 1.5 s in the batcher: in flight when SIGTERM comes
    config.write_text(f"defaults: {{intra_op_threads: 1}}\nmodels:\n  {MODEL}: {{max_queue_delay_us: 1500000, batching_policy: fixed}}\n")
    workers = start_workers(repo, "--config", str(config), "--grace-period", "10")
    channels = open_channels(workers.address, CHANNELS)
    try:
        in_flight = {
            f"drain-{i}": genserve_pb2_grpc.GenserveStub(channel).Generate.future(
                pb.GenerateRequest(model=MODEL, count=1, seed=i), metadata=(("x-request-id", f"drain-{i}"),), timeout=30)
            for i, channel in enumerate(channels)
        }
        time.sleep(0.4)
        assert not any(f.done() for f in in_flight.values())
        workers.process.process.send_signal(signal.SIGTERM)
        assert all(f.result(timeout=20).model.version == 1 for f in in_flight.values())
        assert workers.process.process.wait(30) == 0
        events = workers.process.finish()
        served = {e["request_id"]: e["worker"] for e in events if e.get("event") == "rpc" and e.get("code") == "OK"}
        assert set(in_flight) <= set(served) and {served[r] for r in in_flight} == {0, 1}
        assert sorted(e["worker"] for e in events if e.get("event") == "stopped" and "worker" in e) == [0, 1]
        assert events[-1]["event"] == "stopped" and events[-1]["exit_status"] == 0
        assert repo.serving_versions(MODEL) == set()  # both workers removed their marks
        assert not workers.state_dir.exists() and not workers.metrics_dir.exists()
    finally:
        for channel in channels:
            channel.close()
        workers.process.stop()


def test_a_worker_that_cannot_start_ends_the_server(tmp_path: Path) -> None:
    process = serving_process("--repository", str(tmp_path / "missing"), "--workers", "2", "--port", "0", "--no-metrics")
    try:
        assert process.process.wait(60) == 1
        events = process.finish()
        assert any(e.get("event") == "startup_failed" and "does not exist" in e.get("error", "") for e in events)
        assert any(e.get("event") == "worker_failed_to_start" for e in events)
    finally:
        process.kill()


def test_workers_must_be_a_positive_integer() -> None:
    with pytest.raises(ConfigError, match="workers must be a positive integer"):
        load_config(None, repository="repo", workers=0)


def test_the_group_agrees_over_live_ready_workers_only(tmp_path: Path) -> None:
    def record(slot: int, pid: int, ready: bool, versions: list[int]) -> None:
        data = {"slot": slot, "pid": pid, "ready": ready, "loaded": {MODEL: versions} if versions else {}}
        record_path(tmp_path, slot).write_text(json.dumps(data))

    group = WorkerGroup(WorkerContext(0, 3, str(tmp_path), os.getppid()))
    dead = subprocess.Popen(["true"])
    dead.wait()
    record(1, os.getpid(), True, [1, 2])
    record(2, dead.pid, True, [1])  # a worker that died: its record does not count
    group.refresh()
    assert group.others_have(MODEL, 2) and not group.all_ready(True)
    record(2, os.getppid(), False, [])  # its replacement, still loading: not ready, does not count
    assert group.refresh()
    assert group.others_have(MODEL, 2) and not group.all_ready(True)
    record(2, os.getppid(), True, [1])  # ready with version 1 only
    assert group.refresh()
    assert group.others_have(MODEL, 1) and not group.others_have(MODEL, 2)
    assert group.waiting_for(MODEL, 2) == 1
    assert group.all_ready(True) and not group.all_ready(False)
    assert not group.refresh()  # nothing changed
