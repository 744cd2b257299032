"""Overload: ten times the sustainable request rate for a few seconds against a genserve-serve process.

The server must shed with RESOURCE_EXHAUSTED (its batcher queue is small), keep answering health
checks with SERVING, keep its memory (RSS from /proc) bounded, finish the requests it accepted
within their deadlines, and serve normally again afterwards. About 20-30 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    copy_repository,
    environment_for_subprocess,
)

from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc

ROWS = 64  # samples per request: the graph, not the RPC layer, is what saturates
QUEUE = 8  # max_queue_size: requests (of ROWS rows each) waiting at most
DEADLINE_S = 3.0
OVERLOAD_S = 5.0
MAX_IN_FLIGHT = 1000  # client-side bound on outstanding calls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def server(golden_repository: Path, tmp_path: Path):
    repo = copy_repository(golden_repository, tmp_path / "repo", ["mnist-vae"])
    port = _free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"repository: {repo.root}\nport: {port}\nmetrics_port: null\npoll_interval_s: 0\ninference_threads: 1\n"
        f"log_level: error\ngrace_period_s: 1\n"
        f"defaults: {{intra_op_threads: 1, max_batch_size: {ROWS}, max_queue_delay_us: 1000, max_queue_size: {QUEUE},"
        f" execution_provider: cpu}}\n"
    )
    process = subprocess.Popen([sys.executable, "-m", "genserve.serving.cli", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment_for_subprocess())
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, f"the server exited with {process.returncode}"
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the server did not become SERVING"
                time.sleep(0.2)
        yield process, address
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _request(seed: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="mnist-vae", count=ROWS, seed=seed)


async def _closed_loop(address: str, clients: int, seconds: float) -> float:
    """Requests per second that `clients` back-to-back callers get (the sustainable rate)."""
    done = 0
    async with grpc.aio.insecure_channel(address) as channel:
        generate = genserve_pb2_grpc.GenserveStub(channel).Generate
        await generate(_request(0), timeout=DEADLINE_S)
        end = time.monotonic() + seconds

        async def client() -> None:
            nonlocal done
            while time.monotonic() < end:
                await generate(_request(done), timeout=DEADLINE_S)
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done / (time.monotonic() - started)


async def _open_loop(address: str, rate: float, seconds: float):
    """Send at `rate` per second for `seconds`; returns status counts and the OK latencies."""
    codes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    not_sent = 0
    async with grpc.aio.insecure_channel(address) as channel:
        generate = genserve_pb2_grpc.GenserveStub(channel).Generate
        in_flight: set[asyncio.Task] = set()

        async def one(seed: int) -> None:
            t0 = time.monotonic()
            try:
                await generate(_request(seed), timeout=DEADLINE_S)
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1
                return
            codes["OK"] += 1
            latencies.append(time.monotonic() - t0)

        started = time.monotonic()
        for i in range(int(rate * seconds)):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= MAX_IN_FLIGHT:
                not_sent += 1
                continue
            task = asyncio.create_task(one(i))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=DEADLINE_S + 5)
        assert not in_flight, f"{len(in_flight)} calls did not end within their deadline + 5 s"
    return codes, latencies, not_sent


def test_ten_times_the_sustainable_rate_is_shed_and_the_server_recovers(server) -> None:
    process, address = server
    sustainable = asyncio.run(_closed_loop(address, clients=4, seconds=1.0))
    rss_before = _rss_bytes(process.pid)

    # watch health and memory from a thread while the load runs
    stop = threading.Event()
    health_codes: collections.Counter[str] = collections.Counter()
    rss_samples: list[int] = []

    def watch() -> None:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2.0).status
                    health_codes[health_pb2.HealthCheckResponse.ServingStatus.Name(status)] += 1
                except grpc.RpcError as error:
                    health_codes[error.code().name] += 1
                rss_samples.append(_rss_bytes(process.pid))
                stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rate = 10 * sustainable
    try:
        codes, latencies, not_sent = asyncio.run(_open_loop(address, rate, OVERLOAD_S))
    finally:
        stop.set()
        watcher.join(10)
    summary = (f"sustainable {sustainable:.0f} req/s x {ROWS} rows; sent at {rate:.0f} req/s for {OVERLOAD_S} s: "
               f"{dict(codes)}, not sent {not_sent}; health {dict(health_codes)}; RSS before {rss_before >> 20} MiB, "
               f"max {max(rss_samples, default=0) >> 20} MiB")
    print(summary)

    assert process.poll() is None, "the server died under load"
    assert codes["RESOURCE_EXHAUSTED"] > 0, f"no load shedding: {summary}"
    assert codes["OK"] > 0, f"nothing served under load: {summary}"
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, summary
    # accepted requests finish within their deadlines: the queue is short, so (almost) none time out
    assert codes["DEADLINE_EXCEEDED"] <= 0.02 * sum(codes.values()), summary
    assert max(latencies) < DEADLINE_S, summary
    assert health_codes and set(health_codes) == {"SERVING"}, summary
    assert max(rss_samples) < rss_before + 256 * 2**20, summary

    # recovery: normal calls succeed again
    time.sleep(0.5)
    with grpc.insecure_channel(address) as channel:
        stub = genserve_pb2_grpc.GenserveStub(channel)
        for seed in range(20):
            response = stub.Generate(pb.GenerateRequest(model="mnist-vae", count=4, seed=seed), timeout=DEADLINE_S)
            assert list(response.images.tensor.shape) == [4, 1, 28, 28]
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
