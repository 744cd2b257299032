"""Shared helpers for the serving and client tests (no tests here; the golden_repository fixture
that uses them is in conftest.py).

`model_repository()` trains a tiny run of every registered model kind on mnist-5k (64 images, one
epoch) and exports each as `mnist-<kind>` version 1 into a repository. That takes a minute or two
on a small CPU, so the result is cached across test sessions in .pytest_cache, keyed by a hash of
the model, checkpoint, config and export sources and the library versions; tests copy it before
changing it.
`RunningServer` runs a GenserveServer on its own event loop in a thread, on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from importlib.metadata import version as package_version
from pathlib import Path

import grpc
import numpy as np
import onnx
from onnx import numpy_helper
from onnx_speed import fast_onnx_exports

from genserve.export import Manifest, Repository
from genserve.serving.config import ModelSettings, ServerConfig
from genserve.serving.server import GenserveServer

ROOT = Path(__file__).resolve().parents[1]
CACHE_FORMAT = "1"  # bump to rebuild cached repositories after changing how they are made
TRAIN_IMAGES = 64


def registered_kinds() -> list[str]:
    """The default recipe of every model kind (the presets share their servable parts)."""
    from genserve.training.models import model_kinds

    return list(model_kinds(presets=False))


def model_name(kind: str) -> str:
    return f"mnist-{kind}"


def _sources_key() -> str:
    """What the exported graphs depend on: the model code, checkpoints, config, the exporter, versions."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    sources = [*(ROOT / "training" / "models").rglob("*.py"), ROOT / "training" / "checkpoint.py",
               ROOT / "training" / "config.py", *(ROOT / "export").rglob("*.py")]
    for path in sorted(sources):
        digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    for package in ("torch", "onnx", "onnxscript", "onnxruntime", "numpy"):
        digest.update(f"{package}={package_version(package)}".encode())
    return digest.hexdigest()[:20]


def _build_repository(target: Path) -> None:
    """Train and export every kind into target/repo (runs in target/runs)."""
    from genserve.export.pipeline import export_run
    from genserve.training.config import TrainConfig
    from genserve.training.data.registry import load_dataset
    from genserve.training.data.types import ImageDataset
    from genserve.training.models import model_class
    from genserve.training.trainer import train

    full = load_dataset("mnist-5k")
    n = TRAIN_IMAGES
    small = ImageDataset(
        full.name, full.train_images[:n], full.train_labels[:n], full.test_images[:n], full.test_labels[:n],
        full.class_names,
    )
    repo = Repository(target / "repo", create=True)
    with fast_onnx_exports():
        for kind in registered_kinds():
            run = target / "runs" / kind
            config = TrainConfig(
                model=kind, dataset="mnist-5k", epochs=1, limit=n, batch_size=32, nll_k=2, nll_images=8,
                fid_samples=n, out=str(run),
                latent_dim=16 if "likelihood" in model_class(kind).metric_families else None,  # the tests' shapes
            )
            train(config, dataset=small)
            export_run(run, repo, name=model_name(kind), max_batch=8)
            shutil.rmtree(run)  # checkpoints, pictures and logs: only the repository is kept
    shutil.rmtree(target / "runs", ignore_errors=True)


def model_repository(cache_root: Path) -> Path:
    """The cached repository of every kind (built on first use); never modify it, copy it."""
    key_dir = cache_root / _sources_key()
    done = key_dir / "DONE"
    if done.is_file():
        return key_dir / "repo"
    key_dir.mkdir(parents=True, exist_ok=True)
    with open(key_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            for leftover in ("repo", "runs"):
                shutil.rmtree(key_dir / leftover, ignore_errors=True)
            _build_repository(key_dir)
            done.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    for old in cache_root.iterdir():  # drop repositories of older sources
        if old.is_dir() and old != key_dir:
            shutil.rmtree(old, ignore_errors=True)
    return key_dir / "repo"


def copy_repository(source: Path, target: Path, names: list[str] | None = None) -> Repository:
    """A private copy of (some models of) a repository, without serving marks."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and (names is None or entry.name in names):
            shutil.copytree(entry, target / entry.name, ignore=shutil.ignore_patterns(".serving"))
    return Repository(target)


def publish_copy(repo: Repository, name: str, version: int, new_name: str | None = None) -> int:
    """Publish version `version` of `name` again (as a new version of `new_name`, default `name`)."""
    source = repo.version_dir(name, version)
    manifest = repo.load_manifest(name, version)
    target = new_name or name

    def build(staging: Path, new_version: int) -> Manifest:
        for file in manifest.files:
            shutil.copyfile(source / file, staging / file)
        return dataclasses.replace(manifest, name=target, version=new_version, files={})

    return repo.publish(target, build)


def server_config(repository: Path, **overrides) -> ServerConfig:
    """A config for tests: loopback, any free ports, one thread each, fast batching, no polling."""
    defaults = overrides.pop("defaults", {})
    config = ServerConfig(
        repository=str(repository),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        poll_interval_s=0,
        inference_threads=1,
        grace_period_s=2.0,
        defaults=ModelSettings(**{"intra_op_threads": 1, "max_queue_delay_us": 500, **defaults}),
    )
    return dataclasses.replace(config, **overrides).validate()



class RunningServer:
    """A GenserveServer on its own event loop in a daemon thread."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.server = GenserveServer(config)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="genserve-test-server", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as error:  # reported by start()
            self._error = error
            self._started.set()
            return
        self._started.set()
        self.loop.run_until_complete(self.server.wait_stopped())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def start(self, timeout: float = 120, wait: bool = True) -> RunningServer:
        """Start the thread; with `wait`, return once the server is SERVING (or raise why not)."""
        self._thread.start()
        return self.wait_started(timeout) if wait else self

    def wait_started(self, timeout: float = 120) -> RunningServer:
        if not self._started.wait(timeout):
            raise TimeoutError("the test server did not start")
        if self._error is not None:
            raise self._error
        return self

    def run(self, coroutine, timeout: float = 60):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float = 0.5) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.run(self.server.stop(grace))
            self._thread.join(30)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll predicate() until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def environment_for_subprocess() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class LoggedProcess:
    """A child process whose output (stdout and stderr) is kept line by line, JSON log events parsed
    (other lines become {"event": "unparsed"}), for waits and failure messages."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
                 own_group: bool = False):
        """`own_group`: in a process group of its own, which kill() kills whole (a script's children too)."""
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                        cwd=cwd, start_new_session=own_group)
        self.own_group = own_group
        self.lines: list[str] = []
        self.events: list[dict] = []
        self._events: queue.Queue[dict] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip("\n"))
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if not isinstance(event, dict):
                event = {"event": "unparsed", "line": line}
            self.events.append(event)
            self._events.put(event)

    def wait_for(self, name: str, timeout: float = 90, **fields: object) -> dict:
        """The next event called `name` (with these field values) or AssertionError with the output's end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                return event
        raise AssertionError(f"no {name!r} event {fields or ''} within {timeout}s; output ends with:\n"
                             + "\n".join(self.lines[-40:]))

    def finish(self) -> list[dict]:
        """All events, once the process has exited and its output is read."""
        self.process.wait(30)
        self._reader.join(10)
        return self.events

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, then the exit status (None when it had to be killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.process.returncode

    def kill(self) -> None:
        if self.own_group:  # the whole group, even once the leader has exited
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        elif self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def serving_process(*args: str) -> LoggedProcess:
    """`python -m genserve.serving.cli --log-json ARGS`, as the console script runs it, in the test environment."""
    return LoggedProcess([sys.executable, "-m", "genserve.serving.cli", "--log-json", *args], env=environment_for_subprocess())


# --- raw HTTP/2 for the stalled-client tests (a client gRPC itself would never be) ------------------
def http2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(name: str, value: str) -> bytes:
    """A literal header field without indexing, new name, no Huffman (lengths < 127)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def rigged_graph(graph: bytes, scale: float = 0.0, offset: float = 1.0) -> bytes:
    """The same graph with its output replaced by output * scale + offset (default: all white);
    same inputs, outputs and weights, so parity with the torch model is all that is broken."""
    model = onnx.load_from_string(graph)
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{output}_raw" if name == output else name for name in node.output]
    model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "rig_scale"),
                                    numpy_helper.from_array(np.array(offset, np.float32), "rig_offset")])
    model.graph.node.extend([onnx.helper.make_node("Mul", [f"{output}_raw", "rig_scale"], [f"{output}_scaled"]),
                             onnx.helper.make_node("Add", [f"{output}_scaled", "rig_offset"], [output])])
    return model.SerializeToString()
