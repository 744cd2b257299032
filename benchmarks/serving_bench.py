"""Serving benchmark: a gRPC load generator against genserve-serve, beside onnxruntime in-process.

    .venv/bin/python -m benchmarks.serving_bench --quick      # about 1-2 minutes on 2 cores
    .venv/bin/python -m benchmarks.serving_bench              # full: more workloads, longer cells
    .venv/bin/python -m benchmarks.serving_bench --json out.json --repository REPO
    .venv/bin/python -m benchmarks.serving_bench --modes on --workers 1,2,1,2 --channels 8 \
        --only "dense-vae Generatex1,health"                 # server worker processes, interleaved

What runs, in one process (the load generator) plus one server subprocess at a time:
  in-process  the limit: onnxruntime sessions of the same graphs, same intra-op threads as the
              server, one call after another at each workload's batch size (no gRPC, no batcher).
  off         genserve-serve with dynamic batching off (dynamic_batching: false): every request
              runs alone, whole (up to --max-batch rows), never merged with another.
  on          batching on, the server's defaults: max_batch_size --max-batch, max_queue_delay_us 0
              (whatever queued while the previous batch ran goes together; a lone request never waits).
  on-delay    batching on with max_queue_delay_us --queue-delay-us (default 2000): the first request
              of a batch waits up to that long for company (the server's default until 2026-11-21).
Load: closed loop (N concurrent clients, each sends its next request when the last one answered)
and open loop (requests sent at a fixed rate; latency counted from the scheduled send time, so a
slow server is not hidden; at most --max-in-flight outstanding, the rest counted as not sent).
Closed-loop cells with more than --max-rows-in-flight rows outstanding (256 clients x 256 samples) are
skipped: they only measure queueing. Every cell is bounded in time (--duration) and count (--max-requests); every call has a deadline.
The loopback only; the server's /metrics gives each cell's batch-size histogram.
Workers: `--workers 1,2` runs each mode once per worker count (`genserve-serve --workers N`, the
mode shown as `on w=2`), in the order given, so `1,2,1,2` interleaves them. The load generator
opens `--channels` connections (clients.client.open_channels) and sends calls over them in turn:
one connection reaches one worker.

This is a measurement, not a test: it asserts nothing about timings. The target ratios of
genserve issue 7 are computed and printed (met / missed) at the end.

The floor: grpc.health.v1 Check (an RPC that does no work) through the same server and client, in
mode on. Workloads: Generate (float32 images; 16-sample Generate also as uint8 and PNG in full runs) and
Reconstruct over genserve.v1 (grpc.aio), and ModelInfer over the Open
Inference Protocol sent with Triton's own client library (tritonclient.grpc.aio), an independent
load generator that shares no code with genserve. Triton's perf_analyzer is not part of it: on
PyPI `perf-analyzer` 0.1.0 is an empty placeholder (no binary), and the tritonclient wheel here
(2.73.0) ships no perf_analyzer binary either; it comes with Triton's SDK container, which this
machine cannot fetch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


# --- workloads ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    model: str  # repository name, e.g. mnist-vae
    rpc: str  # Generate | Reconstruct (genserve.v1, grpc.aio) | ModelInfer (OIP, sent with Triton's tritonclient) | Check
    rows: int  # samples or images per request
    image_format: str = "float32"  # of the images returned: float32 | uint8 | png

    @property
    def label(self) -> str:
        return f"{self.model} {self.rpc}x{self.rows}" + ("" if self.image_format == "float32" else f" {self.image_format}")


EMPTY_RPC = Workload("health", "Check", 1)  # grpc.health.v1 Check: the cost of an RPC that does nothing (mode on only)


def workloads(full: bool) -> list[Workload]:
    items = [Workload("mnist-vae", "Generate", n) for n in (1, 16, 256)]
    items += [Workload("mnist-vae", "Reconstruct", n) for n in (1, 64)]
    items += [Workload("mnist-vae", "ModelInfer", n) for n in (1, 16, 256)]
    if full:
        items += [Workload("mnist-dcgan", "Generate", n) for n in (1, 16, 256)]
        items += [Workload("mnist-dense-vae", "Generate", 1)]
        items += [Workload("mnist-vae", "Generate", 16, fmt) for fmt in ("uint8", "png")]
    return items


def request_for(workload: Workload, seed: int):
    from genserve.serving.protos import genserve_pb2 as pb

    output_format = pb.ImageFormat.Value(f"IMAGE_FORMAT_{workload.image_format.upper()}")
    if workload.rpc == "Generate":
        return pb.GenerateRequest(model=workload.model, count=workload.rows, seed=seed, output_format=output_format)
    images = np.random.default_rng(seed).random((workload.rows, 1, 28, 28), dtype=np.float32)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(images.shape), data=images.tobytes())
    return pb.ReconstructRequest(model=workload.model, images=pb.Images(tensor=tensor), output_format=output_format)


# --- results -----------------------------------------------------------------------------------
@dataclass
class Cell:
    mode: str  # in-process | off | on | on-delay
    workload: str
    rows: int
    load: str  # "c=8" (closed loop, 8 clients), "r=200/s" (open loop), "seq" (in-process)
    seconds: float
    ok: int
    errors: dict[str, int] = field(default_factory=dict)
    not_sent: int = 0
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    batch_mean: float = float("nan")
    batch_hist: str = ""
    load_avg: float = float("nan")
    client_cores: float = float("nan")  # CPU seconds per second of the load generator during the cell
    server_cores: float = float("nan")  # ... and of the server's processes (supervisor and workers)

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.requests_per_s * self.rows


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    if not latencies:
        return (float("nan"),) * 3
    p = np.percentile(np.asarray(latencies) * 1e3, [50, 90, 99])
    return float(p[0]), float(p[1]), float(p[2])


def load_average() -> float:
    return os.getloadavg()[0]


# --- in-process limit --------------------------------------------------------------------------
def in_process(repository: Path, items: list[Workload], intra_op_threads: int, duration: float, max_calls: int) -> list[Cell]:
    from genserve.export import Repository
    from genserve.serving import codec, latents
    from genserve.serving.protos import genserve_pb2 as pb
    from genserve.serving.runtime import load_session

    repo = Repository(repository)
    sessions: dict[str, dict] = {}
    cells = []
    for w in items:
        if w.model not in sessions:
            version = max(repo.versions(w.model))
            manifest = repo.load_manifest(w.model, version)
            folder = repo.version_dir(w.model, version)
            parts = {
                part: load_session(folder / spec.variants["fp32"].file, execution_provider="cpu", intra_op_threads=intra_op_threads)
                for part, spec in manifest.parts.items()
            }
            sessions[w.model] = {"manifest": manifest, "parts": parts}
        manifest, parts = sessions[w.model]["manifest"], sessions[w.model]["parts"]
        images = np.random.default_rng(0).random((w.rows, *manifest.image_shape), dtype=np.float32)
        fixed_latents = latents.sample_prior(manifest.prior, w.rows, 0, 1.0)

        def call(seed: int, w=w, manifest=manifest, parts=parts, images=images, fixed_latents=fixed_latents) -> None:
            if w.rpc == "Generate":
                graph = parts.get("decoder") or parts["generator"]
                out = graph.run(latents.sample_prior(manifest.prior, w.rows, seed, 1.0))[0]
                if w.image_format != "float32":  # the encoding the server does for this format
                    codec.encode_images(out, pb.ImageFormat.Value(f"IMAGE_FORMAT_{w.image_format.upper()}"))
            elif w.rpc == "ModelInfer":  # the latents come with the request: no sampling
                (parts.get("decoder") or parts["generator"]).run(fixed_latents)
            else:
                mean = parts["encoder"].run(images)[0]
                parts["decoder"].run(mean)

        for seed in range(3):  # warm up this batch size
            call(seed)
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < max_calls and time.perf_counter() - started < duration:
            t0 = time.perf_counter()
            call(len(times))
            times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        cells.append(Cell("in-process", w.label, w.rows, "seq", elapsed, len(times), {}, 0, *percentiles(times),
                          load_avg=load_average()))
    return cells


# --- the server --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODES = {
    "off": {"dynamic_batching": False, "max_queue_delay_us": 0},
    "on": {"max_queue_delay_us": 0},
    "on-delay": {},  # max_queue_delay_us from the command line
}


class ServerProcess:
    """genserve-serve in a subprocess on loopback ports, with one settings mode."""

    def __init__(self, repository: Path, mode: str, args: argparse.Namespace, workdir: Path, workers: int = 1):
        self.port, self.metrics_port = free_port(), free_port()
        defaults = {
            "max_batch_size": args.max_batch,
            "max_queue_delay_us": args.queue_delay_us,
            "max_queue_size": args.max_queue_size,
            "intra_op_threads": args.intra_op_threads,
            "cpu_memory_arena": getattr(args, "cpu_memory_arena", True),
            "execution_provider": "cpu",
            **MODES[mode],
        }
        config = {
            "repository": str(repository),
            "host": "127.0.0.1",
            "port": self.port,
            "metrics_port": self.metrics_port,
            "poll_interval_s": 0,
            "inference_threads": args.inference_threads,
            "grace_period_s": 1.0,
            "workers": workers,
            "event_loop": args.event_loop,
            "log_level": "warning",
            "limits": {"max_samples_per_request": 1024, "max_images_per_request": 1024},
            "defaults": defaults,
        }
        self.settings = defaults
        self.label = mode if workers == 1 and not getattr(args, "workers_given", False) else f"{mode} w={workers}"
        path = workdir / f"server-{mode}-w{workers}.yaml"
        path.write_text(yaml.safe_dump(config))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.log = open(workdir / f"server-{mode}-w{workers}.log", "a")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "genserve.serving.cli", "--config", str(path)], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_serving(self, timeout: float = 180) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.log.name}")
                with contextlib.suppress(grpc.RpcError):
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.2)
        raise TimeoutError("the server did not become SERVING")

    def stop(self) -> None:
        stop_process(self.process, self.log)


def stop_process(process: subprocess.Popen, log) -> None:
    """SIGTERM (the server drains), then SIGKILL after 30 s; close its log."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log.close()


def scrape_batch_sizes(url: str, model: str) -> dict[str, float]:
    """Cumulative genserve_inference_batch_size buckets (le -> count, plus 'sum' and 'count') for model."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "genserve_inference_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            key = {"genserve_inference_batch_size_bucket": sample.labels.get("le"),
                   "genserve_inference_batch_size_sum": "sum", "genserve_inference_batch_size_count": "count"}.get(sample.name)
            if key is not None:
                out[key] = out.get(key, 0.0) + sample.value
    return out


def batch_summary(before: dict[str, float], after: dict[str, float]) -> tuple[float, str]:
    """Mean rows per execution in the cell and the non-empty histogram buckets ('<=1:120 <=64:30')."""
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    count = diff.get("count", 0.0)
    mean = diff.get("sum", 0.0) / count if count else float("nan")
    buckets = sorted(((float(k), v) for k, v in diff.items() if k not in ("sum", "count") and k != "+Inf"), key=lambda kv: kv[0])
    parts, previous = [], 0.0
    for le, cumulative in buckets:
        n = cumulative - previous
        previous = cumulative
        if n > 0:
            parts.append(f"<={int(le)}:{int(n)}")
    return mean, " ".join(parts)


# --- load generation ---------------------------------------------------------------------------
def stub_call(channel: grpc.aio.Channel, rpc: str):
    from genserve.serving.protos import genserve_pb2_grpc

    stub = genserve_pb2_grpc.GenserveStub(channel)
    return getattr(stub, rpc)


@contextlib.asynccontextmanager
async def sender(address: str, w: Workload, deadline_s: float, channels: int = 1):
    """An async `send(i)` for the workload, warmed up (connections and graph); errors raise with a
    code. Call i goes over channel i % channels (each its own connection)."""
    if w.rpc == "ModelInfer":
        async with _oip_sender(address, w, deadline_s) as send:
            yield send
        return
    from genserve.clients.client import open_channels

    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    opened = open_channels(address, channels, options=options, aio=True)
    try:
        if w.rpc == "Check":  # the floor: an RPC that does no work, through the same server and client
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            calls = [health_pb2_grpc.HealthStub(channel).Check for channel in opened]
            requests = [health_pb2.HealthCheckRequest()]
        else:
            calls = [stub_call(channel, w.rpc) for channel in opened]
            requests = [request_for(w, seed) for seed in range(8)]

        async def send(i: int) -> None:
            await calls[i % len(calls)](requests[i % len(requests)], timeout=deadline_s)

        for i in range(2 * len(calls)):
            with contextlib.suppress(grpc.RpcError):
                await send(i)
        yield send
    finally:
        for channel in opened:
            await channel.close()


@contextlib.asynccontextmanager
async def _oip_sender(address: str, w: Workload, deadline_s: float):
    """ModelInfer on `<model>.decoder` (or `.generator`) through Triton's own Python client,
    tritonclient.grpc.aio: a load generator that shares no code with genserve's."""
    import tritonclient.grpc.aio as triton

    client = triton.InferenceServerClient(address, channel_args=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    try:
        index = await client.get_model_repository_index()
        names = {m.name for m in index.models}
        oip_name = next(n for n in (f"{w.model}.decoder", f"{w.model}.generator") if n in names)
        metadata = await client.get_model_metadata(oip_name)
        spec = metadata.inputs[0]
        z = np.random.default_rng(0).standard_normal((w.rows, int(spec.shape[1]))).astype(np.float32)
        request = triton.InferInput(spec.name, list(z.shape), "FP32")
        request.set_data_from_numpy(z)

        async def send(i: int) -> None:
            await client.infer(oip_name, [request], client_timeout=deadline_s)

        for i in range(2):
            with contextlib.suppress(Exception):
                await send(i)
        yield send
    finally:
        await client.close()


def error_code(error: Exception) -> str:
    """The gRPC status name of a failed call, from grpc.aio or tritonclient."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    status = getattr(error, "status", lambda: None)()  # tritonclient: "StatusCode.RESOURCE_EXHAUSTED"
    return str(status).rsplit(".", 1)[-1] if status else type(error).__name__


async def closed_loop(address: str, w: Workload, clients: int, duration: float, max_requests: int, deadline_s: float,
                      channels: int = 1):
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with sender(address, w, deadline_s, channels) as send:
        issued = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + duration

        async def client(index: int) -> None:
            nonlocal issued
            while issued < max_requests and loop.time() < end:
                i = issued
                issued += 1
                t0 = time.perf_counter()
                try:
                    await send(i)
                except Exception as error:  # noqa: BLE001 - counted by status code
                    errors[error_code(error)] = errors.get(error_code(error), 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    return elapsed, latencies, errors, 0


async def open_loop(address: str, w: Workload, rate: float, duration: float, max_requests: int, deadline_s: float,
                    max_in_flight: int, channels: int = 1):
    latencies: list[float] = []
    errors: dict[str, int] = {}
    not_sent = 0
    async with sender(address, w, deadline_s, channels) as send:
        in_flight: set[asyncio.Task] = set()

        async def one(i: int, scheduled: float) -> None:
            try:
                await send(i)
            except Exception as error:  # noqa: BLE001 - counted by status code
                errors[error_code(error)] = errors.get(error_code(error), 0) + 1
                return
            latencies.append(time.perf_counter() - scheduled)

        total = min(max_requests, int(rate * duration))
        started = time.perf_counter()
        for i in range(total):
            scheduled = started + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= max_in_flight:
                not_sent += 1
                continue
            task = asyncio.create_task(one(i, scheduled))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=deadline_s + 1)
        elapsed = time.perf_counter() - started
    return elapsed, latencies, errors, not_sent


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and its live children, from /proc (Linux; nan elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, found = 0.0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick
            found = True
    return total if found else float("nan")


def run_cell(server: ServerProcess, mode: str, w: Workload, load: str, coroutine) -> Cell:
    before = scrape_batch_sizes(server.metrics_url, w.model)
    client_before, server_before, started = time.process_time(), cpu_seconds(server.process.pid), time.perf_counter()
    elapsed, latencies, errors, not_sent = asyncio.run(coroutine)
    wall = time.perf_counter() - started
    client_cores = (time.process_time() - client_before) / wall
    server_cores = (cpu_seconds(server.process.pid) - server_before) / wall
    after = scrape_batch_sizes(server.metrics_url, w.model)
    mean, hist = batch_summary(before, after)
    return Cell(mode, w.label, w.rows, load, elapsed, len(latencies), errors, not_sent, *percentiles(latencies),
                batch_mean=mean, batch_hist=hist, load_avg=load_average(), client_cores=client_cores,
                server_cores=server_cores)


# --- output ------------------------------------------------------------------------------------
def table(cells: list[Cell]) -> str:
    header = ("mode", "workload", "load", "req/s", "samples/s", "p50 ms", "p90 ms", "p99 ms", "errors", "rows/exec",
              "batch sizes (executions)", "cores client/server", "load1")
    rows = []
    for c in cells:
        errors = " ".join(f"{k}:{v}" for k, v in sorted(c.errors.items()))
        if c.not_sent:
            errors = (errors + f" not-sent:{c.not_sent}").strip()
        rows.append((c.mode, c.workload, c.load, f"{c.requests_per_s:.0f}", f"{c.samples_per_s:.0f}", f"{c.p50_ms:.2f}",
                     f"{c.p90_ms:.2f}", f"{c.p99_ms:.2f}", errors or "-", "-" if c.batch_mean != c.batch_mean else f"{c.batch_mean:.1f}",
                     c.batch_hist or "-",
                     "-" if c.client_cores != c.client_cores else f"{c.client_cores:.2f}/{c.server_cores:.2f}",
                     f"{c.load_avg:.2f}"))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(v).ljust(widths[i]) for i, v in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def find(cells: list[Cell], mode: str, workload: str, load: str | None = None) -> list[Cell]:
    return [c for c in cells if c.mode == mode and c.workload == workload and (load is None or c.load == load)]


def targets(cells: list[Cell]) -> list[str]:
    """The issue's three target ratios, from this run's cells."""
    lines = []
    gen256, gen1 = "mnist-vae Generatex256", "mnist-vae Generatex1"
    limit = find(cells, "in-process", gen256)
    served = [c for c in find(cells, "on", gen256) if c.load.startswith("c=")]
    if limit and served:
        best = max(served, key=lambda c: c.samples_per_s)
        ratio = best.samples_per_s / limit[0].samples_per_s
        lines.append(f"256-sample Generate, server (batching on, best {best.load}) / in-process samples/s: "
                     f"{best.samples_per_s:.0f} / {limit[0].samples_per_s:.0f} = {ratio:.2f}x (target >= 0.8x: "
                     f"{'met' if ratio >= 0.8 else 'MISSED'})")
    on, off = find(cells, "on", gen1, "c=64"), find(cells, "off", gen1, "c=64")
    if on and off and off[0].samples_per_s > 0:
        ratio = on[0].samples_per_s / off[0].samples_per_s
        lines.append(f"1-sample Generate at c=64, batching on / off samples/s: {on[0].samples_per_s:.0f} / "
                     f"{off[0].samples_per_s:.0f} = {ratio:.2f}x (target >= 4x: {'met' if ratio >= 4 else 'MISSED'})")
    limit1 = find(cells, "in-process", gen1)
    for mode in ("off", "on", "on-delay"):
        c1 = find(cells, mode, gen1, "c=1")
        if limit1 and c1:
            gap = c1[0].p99_ms - limit1[0].p99_ms
            lines.append(f"1-sample Generate at c=1, p99 {mode} - in-process: {c1[0].p99_ms:.2f} - {limit1[0].p99_ms:.2f} "
                         f"= {gap:.2f} ms (target <= 1 ms: {'met' if gap <= 1 else 'MISSED'})")
    return lines


def environment() -> dict[str, str]:
    import onnxruntime

    return {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "cpus": str(os.cpu_count()),
        "platform": platform.platform(),
    }


def default_repository() -> Path:
    """The test suite's cached repository of tiny mnist-<kind> models (built on first use, a few minutes)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import model_repository

    cache = ROOT / ".pytest_cache" / "d" / "genserve-serving-models"
    cache.mkdir(parents=True, exist_ok=True)
    return model_repository(cache)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer workloads, shorter cells (about 1-2 minutes)")
    p.add_argument("--repository", type=Path, help="model repository with mnist-vae (and mnist-dcgan); default: the "
                   "test suite's cached repository of tiny models (same graphs, untrained weights do not matter here)")
    p.add_argument("--duration", type=float, help="seconds per cell (quick 1.5, full 5)")
    p.add_argument("--max-requests", type=int, default=100_000, help="requests per cell at most")
    p.add_argument("--concurrency", help="closed-loop clients, comma-separated (quick 1,8,64; full 1,8,64,256)")
    p.add_argument("--rates", help="open-loop requests/s for 1- and 16-sample Generate (quick 200,800; full 100,400,1600)")
    p.add_argument("--modes", help="server modes, comma-separated of off,on,on-delay (default all three)")
    p.add_argument("--max-rows-in-flight", type=int, default=16384,
                   help="skip closed-loop cells whose clients x rows exceed this (default 16384)")
    p.add_argument("--max-batch", type=int, default=256, help="max_batch_size with batching on (default 256)")
    p.add_argument("--queue-delay-us", type=int, default=2000, help="max_queue_delay_us of mode on-delay (default 2000)")
    p.add_argument("--max-queue-size", type=int, default=65536, help="max_queue_size (default 65536: measure, do not shed)")
    p.add_argument("--intra-op-threads", type=int, default=1, help="onnxruntime intra-op threads, server and in-process")
    p.add_argument("--inference-threads", type=int, default=1, help="the server's inference_threads")
    p.add_argument("--event-loop", default="auto", choices=("auto", "uvloop", "asyncio"),
                   help="the server's event_loop (default auto: uvloop when installed)")
    p.add_argument("--deadline", type=float, default=30.0, help="per-call deadline in seconds")
    p.add_argument("--max-in-flight", type=int, default=512, help="open loop: outstanding requests at most")
    p.add_argument("--only", help="run only workloads whose label contains one of these, comma-separated "
                   "(e.g. 'Generatex1,health')")
    p.add_argument("--workers", help="server worker processes, comma-separated, in this order (e.g. 1,2,1,2; default 1)")
    p.add_argument("--channels", type=int, default=1,
                   help="connections the load generator opens and sends over in turn (default 1; one reaches one worker)")
    p.add_argument("--json", type=Path, help="also write every cell and the environment as JSON here")
    args = p.parse_args(argv)
    args.workers_given = args.workers is not None
    worker_counts = [int(n) for n in (args.workers or "1").split(",")]

    full = not args.quick
    duration = args.duration or (5.0 if full else 1.5)
    concurrency = [int(c) for c in (args.concurrency or ("1,8,64,256" if full else "1,8,64")).split(",")]
    rates = [float(r) for r in (args.rates or ("100,400,1600" if full else "200,800")).split(",")]
    modes = (args.modes or "off,on,on-delay").split(",")
    only = args.only.split(",") if args.only else None
    items = workloads(full or only is not None)  # --only picks from every workload; --quick then only shortens cells
    if only:
        items = [w for w in items if any(o in w.label for o in only)]
    repository = args.repository or default_repository()
    print(f"# genserve serving benchmark ({'full' if full else 'quick'}), repository {repository}")
    print(f"# {json.dumps(environment())}")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    cells = in_process(repository, items, args.intra_op_threads, duration, args.max_requests)
    for c in cells:
        print(f"  {c.mode:10} {c.workload:28} {c.samples_per_s:10.0f} samples/s  p99 {c.p99_ms:.2f} ms", flush=True)
    with tempfile.TemporaryDirectory(prefix="genserve-bench-") as tmp:
        for mode, workers in [(m, n) for m in modes for n in worker_counts]:
            server = ServerProcess(repository, mode, args, Path(tmp), workers)
            label, channels = server.label, args.channels
            try:
                server.wait_serving()
                print(f"# server {label}: {server.settings}", flush=True)
                for w in [*items, *([EMPTY_RPC] if not only or any(o in EMPTY_RPC.label for o in only) else [])]:
                    loads = [(f"c={n}", closed_loop(server.address, w, n, duration, args.max_requests, args.deadline, channels))
                             for n in concurrency if n * w.rows <= args.max_rows_in_flight]
                    if w.rpc == "Generate" and w.rows in (1, 16) and w.model == "mnist-vae" and w.image_format == "float32":
                        loads += [(f"r={r:.0f}/s", open_loop(server.address, w, r, duration, args.max_requests,
                                                             args.deadline, args.max_in_flight, channels)) for r in rates]
                    if w == EMPTY_RPC and mode != "on":
                        continue
                    for load, coroutine in loads:
                        cell = run_cell(server, label, w, load, coroutine)
                        cells.append(cell)
                        print(f"  {label:10} {w.label:28} {load:9} {cell.samples_per_s:10.0f} samples/s  "
                              f"p99 {cell.p99_ms:.2f} ms  rows/exec {cell.batch_mean:.1f}  errors {cell.errors or '-'}",
                              flush=True)
            finally:
                server.stop()
    print()
    print(table(cells))
    print()
    print(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("# targets (genserve issue 7):")
    for line in targets(cells):
        print(f"#   {line}")
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(), "cells": [asdict(c) for c in cells],
                                         "targets": targets(cells)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
