"""Fault injection against the server: SIGTERM under load, SIGKILL and restart, model files
truncated, deleted or replaced (before and after loading), an unreadable repository, slow and
stalled clients, and clients that cancel mid-batch.

Each test counts what it sent and asserts concrete outcomes: accepted requests are never lost,
refused ones get a status code saying why (never a hang, never INTERNAL), the server keeps
serving what it loaded and recovers. Loopback only, bounded request counts; about 30 s on 2 cores.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    LoggedProcess,
    RunningServer,
    copy_repository,
    hpack_literal,
    http2_frame,
    publish_copy,
    server_config,
    serving_process,
    wait_until,
)

from genserve.export import Repository
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc

Code = grpc.StatusCode
MODEL = "mnist-vae"
DEADLINE_S = 20.0
SERVING = health_pb2.HealthCheckResponse.SERVING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repository: Path, port: int, *extra: str) -> LoggedProcess:
    """A server on a given port with no metrics port, no polling and one inference thread."""
    return serving_process("--repository", str(repository), "--port", str(port), "--no-metrics",
                           "--poll-interval", "0", "--inference-threads", "1", *extra)


@pytest.fixture
def repo(golden_repository: Path, tmp_path: Path) -> Repository:
    return copy_repository(golden_repository, tmp_path / "repo", [MODEL])


class Load:
    """`clients` threads sending Generate back to back until stopped; counts versions and failures."""

    def __init__(self, address: str, clients: int = 3, count: int = 2):
        self.channel = grpc.insecure_channel(address)
        self.stub = genserve_pb2_grpc.GenserveStub(self.channel)
        self.count = count
        self.sent = 0
        self.versions: collections.Counter[int] = collections.Counter()
        self.last: list[int] = [0] * clients
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set() and n < 20_000:  # bounded
            n += 1
            self.sent += 1
            try:
                response = self.stub.Generate(pb.GenerateRequest(model=MODEL, count=self.count, seed=n), timeout=DEADLINE_S)
            except grpc.RpcError as error:
                self.failures.append(f"{error.code()}: {error.details()}")
                continue
            self.versions[response.model.version] += 1
            self.last[i] = response.model.version

    @property
    def ok(self) -> int:
        return sum(self.versions.values())

    def wait_for_more(self, n: int = 10) -> None:
        """Wait until `n` more requests have succeeded (the load is really flowing)."""
        target = self.ok + n
        wait_until(lambda: self.ok >= target or self.failures, timeout=60, what=f"{n} more successful requests")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(DEADLINE_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a client hung"
        self.channel.close()


def _metric(url: str, line_start: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict]:
    return [dict(getattr(r, "genserve_fields", {})) for r in caplog.records if r.getMessage() == name]


# --- 1. SIGTERM under load ------------------------------------------------------------------------
def test_sigterm_under_load_loses_no_accepted_request(repo: Repository, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"  # requests wait 50 ms in the batcher: some are in flight at SIGTERM
    # asyncio's own loop here (the other subprocess tests run on uvloop, the default): both shut down cleanly
    # log_level debug: the access log line of every call, OK ones included (the server's own account below)
    config.write_text("event_loop: asyncio\nlog_level: debug\n"
                      "defaults: {intra_op_threads: 1, max_queue_delay_us: 50000, batching_policy: fixed}\n")
    port = _free_port()
    server = start_server(repo.root, port, "--grace-period", "10", "--config", str(config))
    try:
        assert server.wait_for("listening")["event_loop"] == "asyncio"
        server.wait_for("serving")
        clients = 6
        results: list[tuple[str, str, float, float]] = []  # request id, code, sent, ended
        sigterm_at: list[float] = []

        def client(i: int) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                generate = genserve_pb2_grpc.GenserveStub(channel).Generate
                for n in range(2000):  # bounded; ends at the first refusal
                    rid = f"c{i}-{n}"
                    sent = time.monotonic()
                    try:
                        generate(pb.GenerateRequest(model=MODEL, count=2, seed=n), timeout=DEADLINE_S,
                                 metadata=(("x-request-id", rid),))
                        code = "OK"
                    except grpc.RpcError as error:
                        code = f"{error.code().name}: {error.details()}"
                    results.append((rid, code, sent, time.monotonic()))
                    if code != "OK":
                        return

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        wait_until(lambda: sum(r[1] == "OK" for r in results) >= 60, timeout=60, what="the load to flow")
        sigterm_at.append(time.monotonic())
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(DEADLINE_S + 10)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert server.process.wait(30) == 0
        events = server.finish()

        ok = {rid for rid, code, _, _ in results if code == "OK"}
        refused = [(rid, code, sent) for rid, code, sent, _ in results if code != "OK"]
        in_flight_ok = [rid for rid, code, sent, ended in results if code == "OK" and sent < sigterm_at[0] < ended]
        print(f"SIGTERM under load: {len(results)} requests sent, {len(ok)} OK ({len(in_flight_ok)} of them in "
              f"flight at SIGTERM), {len(refused)} refused: {collections.Counter(c.split(':')[0] for _, c, _ in refused)}")
        # the server's own account: it finished every call it accepted (none lost on the way) and
        # refused the rest while shutting down
        rpcs = {e["request_id"]: e for e in events if e.get("event") == "rpc"}
        assert {rid for rid, e in rpcs.items() if e["code"] == "OK"} == ok
        assert {e["code"] for e in rpcs.values()} <= {"OK", "UNAVAILABLE"}
        assert in_flight_ok, "no request was in flight at SIGTERM: the test did not test anything"
        # every client ended on one refusal saying why: never a hang, never INTERNAL or a deadline
        assert len(refused) == clients
        for rid, code, _ in refused:
            if rid in rpcs:  # a handler ran: it refused the call because the server is shutting down
                assert "shutting down" in rpcs[rid]["error"], (rid, code)
            # the port closes only once calls stopped arriving: a call cut off by the closing port
            # would end CANCELLED, which a client cannot tell from its own cancellation
            assert code.startswith("UNAVAILABLE"), (rid, code)
        names = [e["event"] for e in events]
        assert "calls_drained" in names and names[-1] == "stopped"
        assert not [e for e in events if e.get("level") == "error" and e.get("logger", "").startswith("genserve")]
        assert repo.serving_versions(MODEL) == set()
    finally:
        server.kill()


# --- 2. SIGKILL, then restart on the same port ----------------------------------------------------
def test_sigkill_then_restart_serves_the_same_outputs(repo: Repository) -> None:
    port = _free_port()
    request = pb.GenerateRequest(model=MODEL, count=4, seed=1234)
    server = start_server(repo.root, port)
    try:
        server.wait_for("serving")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            before = genserve_pb2_grpc.GenserveStub(channel).Generate(request, timeout=DEADLINE_S)
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(10) == -signal.SIGKILL
    finally:
        server.kill()
    assert repo.serving_versions(MODEL) == {1}  # the killed server's mark is left behind (harmless: kept)
    again = start_server(repo.root, port)
    try:
        assert again.wait_for("listening")["port"] == port
        again.wait_for("serving")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
            assert health.status == SERVING
            after = genserve_pb2_grpc.GenserveStub(channel).Generate(request, timeout=DEADLINE_S)
        assert after.model.version == before.model.version == 1
        assert after.images.SerializeToString() == before.images.SerializeToString()  # bitwise
        print("SIGKILL and restart: same port, same 4 images bitwise")
        again.process.send_signal(signal.SIGTERM)
        assert again.process.wait(30) == 0
    finally:
        again.kill()
    assert repo.serving_versions(MODEL) == set()  # the restarted server (same holder name) cleaned up


# --- 3. model files truncated, deleted, replaced --------------------------------------------------
def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _delete(path: Path) -> None:
    path.unlink()


def _replace(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(bytes((i * 131 + 7) % 251 for i in range(size)))  # same size, different bytes


def test_model_file_faults_under_load(repo: Repository, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="genserve")
    server = RunningServer(server_config(repo.root)).start()  # no polling: polls are run below
    load = Load(server.address)
    verify_failures = 'genserve_model_load_failures_total{model="mnist-vae",stage="verify"}'
    try:
        load.wait_for_more()
        faults = {"truncated": (_truncate, "sha256"), "deleted": (_delete, "missing"), "replaced": (_replace, "sha256")}
        for n, (what, (fault, reason)) in enumerate(faults.items(), start=1):
            version = publish_copy(repo, MODEL, 1)
            fault(repo.version_dir(MODEL, version) / "decoder.onnx")
            server.run(server.server.manager.poll_once())
            assert _metric(server.metrics_url, verify_failures) == n, what
            refused = _events(caplog, "version_refused")[-1]
            assert (refused["version"], refused["stage"]) == (version, "verify") and reason in refused["reason"], what
            assert "decoder.onnx" in refused["reason"], what
            load.wait_for_more()
            assert set(load.versions) == {1} and load.failures == [], what
        # (d) the loaded version's file is truncated on disk: its session is in memory and keeps serving
        _truncate(repo.version_dir(MODEL, 1) / "decoder.onnx")
        server.run(server.server.manager.poll_once())
        load.wait_for_more(30)
        load.stop()
        assert set(load.versions) == {1} and load.failures == []
        print(f"model file faults: {load.sent} requests sent, {load.ok} OK, 4 faults injected, 0 lost")
    finally:
        load.stop()
        server.stop()
    # ...until a restart: then version 1 is refused with a clear error (published versions are immutable)
    for version in (2, 3, 4):
        shutil.rmtree(repo.version_dir(MODEL, version))
    caplog.clear()
    server = RunningServer(server_config(repo.root)).start()
    try:
        with server.channel() as channel, pytest.raises(grpc.RpcError) as info:
            genserve_pb2_grpc.GenserveStub(channel).Generate(pb.GenerateRequest(model=MODEL, count=1), timeout=DEADLINE_S)
        assert info.value.code() == Code.NOT_FOUND
        assert "version 1 was refused" in info.value.details() and "sha256" in info.value.details()
        assert "altered or corrupted after publishing" in _events(caplog, "version_refused")[-1]["reason"]
        with server.channel() as channel:  # a model that cannot be served does not make the server unhealthy
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == SERVING
    finally:
        server.stop()


# --- 5. an unreadable repository ------------------------------------------------------------------
def test_unreadable_repository_keeps_serving_and_recovers(repo: Repository, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="genserve")
    server = RunningServer(server_config(repo.root, poll_interval_s=0.1)).start()
    load = Load(server.address)
    root, moved = repo.root, repo.root.with_name("repo.moved")
    as_root = False
    try:
        load.wait_for_more()
        root.chmod(0)
        if os.access(root, os.R_OK):  # root (or CAP_DAC_OVERRIDE) reads it anyway: take it away instead
            as_root = True
            root.chmod(0o755)
            root.rename(moved)
            root.write_text("not a repository\n")
        time.sleep(1.0)  # about ten polls of the unreadable repository
        load.wait_for_more(20)
        with server.channel() as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        # said once, however many polls fail, and counted
        assert len(_events(caplog, "repository_unreadable")) == 1
        assert _metric(server.metrics_url, "genserve_repository_errors_total") >= 3
        assert set(load.versions) == {1} and load.failures == []
        # readable again: the poller picks up a new version
        if as_root:
            root.unlink()
            moved.rename(root)
        else:
            root.chmod(0o755)
        assert publish_copy(repo, MODEL, 1) == 2
        wait_until(lambda: all(v == 2 for v in load.last), timeout=30, what="version 2 to take all traffic")
        assert len(_events(caplog, "repository_readable")) == 1
        load.stop()
        assert load.failures == [] and set(load.versions) == {1, 2}
        print(f"unreadable repository: {load.sent} requests sent, {load.ok} OK, {dict(load.versions)} by version")
    finally:
        if not as_root and root.exists():
            root.chmod(0o755)
        if moved.exists():
            with contextlib.suppress(FileNotFoundError):
                root.unlink()
            moved.rename(root)
        load.stop()
        server.stop()


# --- 6. slow and stalled clients ------------------------------------------------------------------


class _FrameReader:
    """Reads HTTP/2 frames (type, flags, stream, payload) from a socket, keeping partial ones."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""
        self.frames: list[tuple[int, int, int, bytes]] = []

    def read(self, seconds: float) -> None:
        self.sock.settimeout(0.05)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                break
            self.buffer += chunk
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                break
            head = self.buffer[:9]
            self.frames.append((head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, self.buffer[9 : 9 + length]))
            self.buffer = self.buffer[9 + length :]

    def data(self, stream: int) -> bytes:
        return b"".join(payload for kind, _, sid, payload in self.frames if kind == 0x0 and sid == stream)


def test_stalled_clients_do_not_block_others(repo: Repository, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="genserve")
    caplog.set_level(logging.DEBUG, logger="genserve.rpc")  # the access log of OK calls is at debug
    server = RunningServer(server_config(repo.root)).start()
    stalled: list[socket.socket] = []
    try:
        port = server.server.port
        # a client that sends half the HTTP/2 preface and nothing more
        half = socket.create_connection(("127.0.0.1", port), timeout=5)
        half.sendall(b"PRI * HTTP/2.0\r\n")
        stalled.append(half)
        # a client that opens the connection and then never sends a frame
        mute = socket.create_connection(("127.0.0.1", port), timeout=5)
        mute.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        stalled.append(mute)
        # a client that calls Generate with a receive window of 0: the response can never be sent
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        stalled.append(slow)
        message = pb.GenerateRequest(model=MODEL, count=64, seed=5).SerializeToString()
        headers = b"".join(hpack_literal(k, v) for k, v in (
            (":method", "POST"), (":scheme", "http"), (":path", "/genserve.v1.Genserve/Generate"),
            (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"), ("te", "trailers"),
            ("x-request-id", "stalled-reader")))
        slow.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + http2_frame(0x4, 0, 0, struct.pack(">HI", 0x4, 0))  # SETTINGS_INITIAL_WINDOW_SIZE = 0
            + http2_frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
            + http2_frame(0x0, 0x1, 1, b"\x00" + struct.pack(">I", len(message)) + message)  # DATA, END_STREAM
        )
        wait_until(lambda: any(e.get("request_id") == "stalled-reader" for e in _events(caplog, "rpc")),
                   what="the server to answer the stalled reader's call")
        # other clients keep being served, each within its deadline
        with server.channel() as channel:
            genserve = genserve_pb2_grpc.GenserveStub(channel)
            futures = [genserve.Generate.future(pb.GenerateRequest(model=MODEL, count=4, seed=i), timeout=10)
                       for i in range(40)]
            assert all(list(f.result().images.tensor.shape) == [4, 1, 28, 28] for f in futures)
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        # the stalled reader has had no response data; once it opens its window, it gets all of it
        reader = _FrameReader(slow)
        reader.read(0.5)
        assert reader.frames and reader.data(1) == b"", "response data sent despite a zero window"
        slow.sendall(http2_frame(0x4, 0x1, 0, b"")  # SETTINGS ACK
                     + http2_frame(0x8, 0, 0, struct.pack(">I", 1 << 20))  # WINDOW_UPDATE: the connection
                     + http2_frame(0x8, 0, 1, struct.pack(">I", 1 << 20)))  # and stream 1
        end = time.monotonic() + 10
        while not (len(body := reader.data(1)) >= 5 and len(body) >= 5 + int.from_bytes(body[1:5], "big")):
            assert time.monotonic() < end, f"only {len(body)} bytes of the response arrived"
            reader.read(0.1)
        assert len(body) == 5 + int.from_bytes(body[1:5], "big")
        response = pb.GenerateResponse.FromString(body[5:])
        assert list(response.images.tensor.shape) == [64, 1, 28, 28] and response.model.version == 1
        print("stalled clients: 3 stalled connections (half preface, mute, zero window), 40 other calls all OK; "
              f"the stalled reader got its {len(body)} bytes once it opened its window")
        for sock in stalled:
            sock.close()
        wait_until(lambda: server.server.state.in_flight == 0, what="no call left in flight")
    finally:
        for sock in stalled:
            sock.close()
        server.stop()


# --- 7. clients that cancel mid-batch -------------------------------------------------------------
def test_cancelled_calls_leave_the_server_healthy(repo: Repository) -> None:
    # requests of 24 rows wait up to 5 ms to share batches of 64: cancelled calls sit in the queue or
    # in a running batch beside calls that are not cancelled
    server = RunningServer(server_config(repo.root, defaults={"max_queue_size": 512, "max_queue_delay_us": 5000,
                                                              "batching_policy": "fixed"})).start()
    try:
        with server.channel() as channel:
            genserve = genserve_pb2_grpc.GenserveStub(channel)
            n_calls = 24
            calls = [genserve.Generate.future(pb.GenerateRequest(model=MODEL, count=24, seed=i), timeout=DEADLINE_S)
                     for i in range(n_calls)]
            cancelled = set()
            for i in range(1, n_calls, 2):  # every other call, soon after it was sent
                time.sleep(0.002)
                if calls[i].cancel():
                    cancelled.add(i)
            outcomes: dict[int, pb.GenerateResponse | None] = {}
            for i, call in enumerate(calls):
                try:
                    outcomes[i] = call.result()
                except grpc.FutureCancelledError:
                    outcomes[i] = None
            rejected = 'genserve_inference_rejected_total{model="mnist-vae",part="decoder",reason="cancelled"}'
            print(f"cancel mid-batch: {n_calls} calls of 24 samples, {len(cancelled)} cancelled "
                  f"({_metric(server.metrics_url, rejected):.0f} taken out of the batcher queue), "
                  f"{sum(r is not None for r in outcomes.values())} OK")
            assert cancelled and {i for i, r in outcomes.items() if r is None} == cancelled
            wait_until(lambda: server.server.state.in_flight == 0, what="no call left in flight")
            depth = 'genserve_inference_queue_depth{model="mnist-vae",part="decoder"}'
            wait_until(lambda: _metric(server.metrics_url, depth) == 0, what="an empty queue")
            assert _metric(server.metrics_url, 'genserve_requests_total{code="INTERNAL"') == 0
            # the calls that were not cancelled got exactly what they get alone, and so do new ones
            for i in sorted(set(range(n_calls)) - cancelled)[:6] + sorted(cancelled)[:2]:
                alone = genserve.Generate(pb.GenerateRequest(model=MODEL, count=24, seed=i), timeout=DEADLINE_S)
                if i not in cancelled:
                    assert alone.images.SerializeToString() == outcomes[i].images.SerializeToString()
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
    finally:
        server.stop()
