"""genserve-serve as a process: graceful shutdown on SIGTERM/SIGINT with in-flight calls, JSON
logs with request ids, exit codes of the command line."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    LoggedProcess,
    copy_repository,
    environment_for_subprocess,
    serving_process,
)

from genserve.export import Repository
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc

Code = grpc.StatusCode


def start_server(args: list[str]) -> LoggedProcess:
    return serving_process(*args, "--port", "0", "--metrics-port", "0")


@pytest.fixture
def repo(golden_repository: Path, tmp_path: Path) -> Repository:
    return copy_repository(golden_repository, tmp_path / "repo", ["mnist-vae"])


def test_sigterm_lets_in_flight_calls_finish_then_exits_0(repo: Repository, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"  # requests wait 1.5 s in the batcher: in flight when SIGTERM comes
    config.write_text("defaults: {intra_op_threads: 1}\nmodels:\n  mnist-vae: {max_queue_delay_us: 1500000, batching_policy: fixed}\n")
    server = start_server(["--repository", str(repo.root), "--config", str(config), "--grace-period", "10",
                           "--log-level", "debug"])  # debug: the access log of OK calls too
    try:
        listening = server.wait_for("listening")
        assert listening["event_loop"] == "uvloop"  # a dependency on Linux: event_loop auto picks it
        port = listening["port"]
        server.wait_for("serving")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        genserve = genserve_pb2_grpc.GenserveStub(channel)
        statuses: list[int] = []
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

        def follow() -> None:
            try:
                for response in watch:
                    statuses.append(response.status)
            except grpc.RpcError:
                pass

        threading.Thread(target=follow, daemon=True).start()
        in_flight = [
            genserve.Generate.future(pb.GenerateRequest(model="mnist-vae", count=2, seed=i),
                                     metadata=(("x-request-id", f"inflight-{i}"),))
            for i in range(3)
        ]
        time.sleep(0.4)
        assert not any(f.done() for f in in_flight)
        server.process.send_signal(signal.SIGTERM)
        server.wait_for("shutting_down")
        with pytest.raises(grpc.RpcError) as refused:
            genserve.Generate(pb.GenerateRequest(model="mnist-vae", count=1), timeout=5)
        assert refused.value.code() == Code.UNAVAILABLE and "shutting down" in refused.value.details()
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        results = [f.result(timeout=20) for f in in_flight]
        assert [r.model.version for r in results] == [1, 1, 1]
        assert server.process.wait(20) == 0
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
        rpcs = [e for e in server.events if e.get("event") == "rpc" and e.get("method") == "Generate"]
        assert {e["request_id"] for e in rpcs if e["code"] == "OK"} == {"inflight-0", "inflight-1", "inflight-2"}
        assert all(e["level"] in ("debug", "info", "warning") and "ts" in e for e in server.events)
        assert [e["event"] for e in server.events][-1] == "stopped"
        assert repo.serving_versions("mnist-vae") == set()
        channel.close()
    finally:
        server.kill()


def test_sigint_exits_0(repo: Repository) -> None:
    server = start_server(["--repository", str(repo.root), "--no-metrics"])
    try:
        server.wait_for("serving")
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(20) == 0
    finally:
        server.kill()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genserve.serving.cli", *args], capture_output=True, text=True, timeout=60,
                          env=environment_for_subprocess())


def test_cli_refuses_bad_configuration(tmp_path: Path) -> None:
    result = _run_cli("--port", "1")
    assert result.returncode == 2 and "no model repository" in result.stderr
    config = tmp_path / "bad.toml"
    config.write_text('repository = "/x"\n[defaults]\nmax_batch_size = "big"\n')
    result = _run_cli("--config", str(config))
    assert result.returncode == 2 and "defaults.max_batch_size must be a positive integer" in result.stderr


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_require_gpu_refuses_the_cpu(repo: Repository) -> None:
    result = _run_cli("--repository", str(repo.root), "--require-gpu", "--port", "0", "--no-metrics")
    assert result.returncode == 3 and "--require-gpu" in result.stderr and "onnxruntime-gpu" in result.stderr
