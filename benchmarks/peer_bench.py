"""Peer benchmark: genserve against Seldon MLServer and the in-process limit, in one table.

    .venv/bin/python -m benchmarks.peer_bench                  # 2 rounds, about 6-8 minutes on 2 cores
    .venv/bin/python -m benchmarks.peer_bench --rounds 1 --duration 2 --json runs/peer.json
    .venv/bin/python -m benchmarks.peer_bench --baseline-root /path/to/older/genserve/checkout

What runs (each server in its own subprocess, one at a time, in interleaved rounds):
  in-process   the limit: the same ONNX graph called in a loop (onnxruntime, CPU, 1 intra-op thread),
               at the batch size of the cell (1 or 64 rows), in this process with no server running.
  genserve     genserve-serve from this checkout with its defaults (batching, logging), on the CPU
               with 1 intra-op thread; clients call ModelInfer on `<model>.decoder`.
  genserve@... the same from --baseline-root (e.g. a checkout of an older commit), for before/after.
  genserve-unpoliced  the same with `limits.receive_timeout_s: 0`: unary methods stay unary in
               gRPC (no policing of stalled or missing request messages; serving/decoding.py).
  grpc-floor   benchmarks/grpc_floor_server.py: a bare grpc.aio server that answers ModelInfer with
               zeros of the decoder's output shape and runs no model: what grpcio alone costs per
               RPC of that size, the floor under any Python server's request path on this machine.
  mlserver     Seldon MLServer (mlserver==1.7.1 from the package registry, installed by this script
               into its own venv, --peer-venv, default runs/peer-venv) with an `mlserver.MLModel`
               runtime of our own (below) over onnxruntime with the same session options; in-process
               inference (parallel_workers 0), adaptive batching off.
  mlserver-batch  the same with MLServer's adaptive batching on (max_batch_size 64 requests,
               max_batch_time --mlserver-batch-time, default 1 ms).
Load: Triton's own client library (tritonclient.grpc.aio), an independent load generator that shares
no code with genserve or MLServer, closed loop (N concurrent callers on one channel), speaking the
Open Inference Protocol to both servers. Cells: the conv VAE decoder (mnist-vae) and the dense VAE
decoder (mnist-dense-vae), 1 sample per request at c=64 and 64 samples at c=4; the empty RPC
(ServerLive) at c=64; and 1 sample at c=1 for the median latency. The graphs come from the test
suite's repository of tiny models (trained for one epoch on 64 images and exported on first use, a
few minutes, then cached); the weights do not matter for speed, the graphs' shapes do.

This is a measurement, not a test: it asserts nothing. The targets of genserve issue 19 are computed
from the run and printed (met / MISSED). Run it on an idle machine, and report the load average
printed beside the table: on a shared machine other work moves the figures, which is why the servers
take turns within each round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from benchmarks.serving_bench import (
    batch_summary,
    default_repository,
    free_port,
    percentiles,
    scrape_batch_sizes,
    stop_process,
)

ROOT = Path(__file__).resolve().parents[1]
MLSERVER_VERSION = "1.7.1"
MODELS = {"conv": "mnist-vae", "dense": "mnist-dense-vae"}  # decoder kind -> repository model


@dataclass(frozen=True)
class CellSpec:
    decoder: str  # conv | dense | "" for the empty RPC
    rows: int
    clients: int

    @property
    def label(self) -> str:
        if not self.decoder:
            return f"empty RPC (ServerLive), c={self.clients}"
        return f"{self.decoder} VAE decoder, {self.rows} sample{'s' if self.rows > 1 else ''}, c={self.clients}"

    @property
    def latency_cell(self) -> bool:
        return self.clients == 1


CELLS = [
    CellSpec("conv", 1, 64), CellSpec("conv", 64, 4), CellSpec("dense", 1, 64), CellSpec("dense", 64, 4),
    CellSpec("", 1, 64), CellSpec("conv", 1, 1), CellSpec("dense", 1, 1),
]


def parse_cells(text: str) -> list[CellSpec]:
    """'dense:1:64,empty:1:64' -> cells; says which part is wrong otherwise."""
    cells = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[0] not in (*MODELS, "empty") or not (parts[1].isdigit() and parts[2].isdigit()):
            raise SystemExit(f"--cells: {item!r} is not DECODER:ROWS:CLIENTS with DECODER one of "
                             f"{', '.join((*MODELS, 'empty'))} and positive whole numbers (e.g. dense:1:64)")
        decoder, rows, clients = parts[0], int(parts[1]), int(parts[2])
        if rows < 1 or clients < 1:
            raise SystemExit(f"--cells: {item!r} needs at least 1 row and 1 client")
        cells.append(CellSpec("" if decoder == "empty" else decoder, rows, clients))
    return cells


@dataclass
class Result:
    server: str
    cell: str
    round: int
    seconds: float
    ok: int
    rows: int
    errors: dict[str, int] = field(default_factory=dict)
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    rows_per_execution: float = float("nan")
    load_avg: float = float("nan")
    server_cpu_us: float = float("nan")  # the server process's CPU time (all threads) per OK request
    client_cpu_us: float = float("nan")  # the load generator's (this process's) CPU time per OK request

    @property
    def per_s(self) -> float:
        """Samples per second (requests per second for the empty RPC)."""
        return self.ok * self.rows / self.seconds if self.seconds > 0 else 0.0


# --- the peer: MLServer in its own venv ----------------------------------------------------------
MLSERVER_RUNTIME = '''"""An MLServer runtime over onnxruntime with genserve's session options (written by benchmarks/peer_bench.py)."""
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxDecoder(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(self.settings.parameters.uri, sess_options=options,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        outputs = self._session.run(self._outputs, {self._input: rows})
        return InferenceResponse(model_name=self.name, outputs=[
            NumpyCodec.encode_output(name, output) for name, output in zip(self._outputs, outputs)])
'''


def ensure_peer_venv(path: Path) -> Path:
    """The venv with MLServer (created and installed from the package registry when missing)."""
    mlserver = path / "bin" / "mlserver"
    if mlserver.exists():
        return mlserver
    import onnxruntime

    print(f"# installing mlserver=={MLSERVER_VERSION} into {path} (once; a minute or two)", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", f"mlserver=={MLSERVER_VERSION}",
                    f"onnxruntime=={onnxruntime.__version__}", "numpy"], check=True)
    return mlserver


class Server:
    """One server in a subprocess on loopback ports; `oip_name(model)` is what clients call."""

    name: str
    address: str
    metrics_url: str | None = None
    process: subprocess.Popen

    def oip_name(self, model: str) -> str:
        raise NotImplementedError

    def wait_ready(self, models: list[str], timeout: float = 240) -> None:
        import tritonclient.grpc as triton

        deadline = time.monotonic() + timeout
        client = triton.InferenceServerClient(self.address)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log.name}")
                with contextlib.suppress(Exception):
                    if all(client.is_model_ready(self.oip_name(m)) for m in models):
                        return
                time.sleep(0.3)
        finally:
            client.close()
        raise TimeoutError(f"{self.name} did not become ready in {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        stop_process(self.process, self.log)


def import_root(code_root: Path, shim: Path) -> Path:
    """A folder from which `genserve.serving` and the rest import `code_root`'s copies: genserve
    installs its folders under the `genserve` namespace, so an older checkout needs a `genserve/`
    folder of links to its folders, first on PYTHONPATH (this checkout's own install comes later)."""
    if code_root.resolve() == ROOT.resolve():
        return ROOT
    package = shim / "genserve"
    package.mkdir(parents=True, exist_ok=True)
    for folder in ("training", "export", "serving", "clients"):
        link = package / folder
        if not link.exists():
            link.symlink_to(code_root.resolve() / folder)
    return shim


class GenserveServer(Server):
    def __init__(self, name: str, code_root: Path, repository: Path, workdir: Path, limits: dict[str, float] | None = None):
        self.name = name
        port, metrics_port = free_port(), free_port()
        config = {  # the server's defaults, but for the CPU, one intra-op thread and room for big requests
            "repository": str(repository), "host": "127.0.0.1", "port": port, "metrics_port": metrics_port,
            "poll_interval_s": 0, "grace_period_s": 1.0,
            "limits": {"max_samples_per_request": 1024, "max_images_per_request": 1024, **(limits or {})},
            "defaults": {"intra_op_threads": 1, "execution_provider": "cpu", "max_queue_size": 1024},
        }
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(import_root(code_root, workdir / name)),
                                                                        os.environ.get("PYTHONPATH")])))
        self.log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "genserve.serving.cli", "--config", str(path)],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=code_root)
        self.address = f"127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def oip_name(self, model: str) -> str:
        return f"{model}.decoder"


class MLServer(Server):
    def __init__(self, name: str, mlserver: Path, repository: Path, workdir: Path, batch_time_s: float | None):
        from genserve.export import Repository

        self.name = name
        port = free_port()
        folder = workdir / name
        folder.mkdir()
        (folder / "settings.json").write_text(json.dumps({
            "debug": False, "parallel_workers": 0, "http_port": free_port(), "grpc_port": port,
            "metrics_port": free_port(), "host": "127.0.0.1",
        }))
        repo = Repository(repository)
        for model in MODELS.values():
            version = max(repo.versions(model))
            model_dir = folder / model
            model_dir.mkdir()
            (model_dir / "runtime.py").write_text(MLSERVER_RUNTIME)
            settings = {"name": self.oip_name(model), "implementation": "runtime.OnnxDecoder",
                        "parameters": {"uri": str(repo.part_path(model, version, "decoder"))}}
            if batch_time_s is not None:
                settings.update(max_batch_size=64, max_batch_time=batch_time_s)
            (model_dir / "model-settings.json").write_text(json.dumps(settings))
        self.log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.process = subprocess.Popen([str(mlserver), "start", str(folder)], stdout=self.log, stderr=subprocess.STDOUT,
                                        env=env, cwd=folder)
        self.address = f"127.0.0.1:{port}"

    def oip_name(self, model: str) -> str:
        return f"{model}.decoder"


class FloorServer(Server):
    """benchmarks/grpc_floor_server.py: grpcio alone, answering zeros of the decoder's output shape."""

    def __init__(self, name: str, repository: Path, workdir: Path):
        self.name = name
        port = free_port()
        self.log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.grpc_floor_server", str(repository), str(port)],
                                        stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.address = f"127.0.0.1:{port}"

    def oip_name(self, model: str) -> str:
        return f"{model}.decoder"


# --- load ----------------------------------------------------------------------------------------
def error_code(error: Exception) -> str:
    status = getattr(error, "status", lambda: None)()  # tritonclient: "StatusCode.RESOURCE_EXHAUSTED"
    return str(status).rsplit(".", 1)[-1] if status else type(error).__name__


def decoder_inputs(repository: Path) -> dict[str, tuple[str, int]]:
    """model -> (input name, latent dim) of its decoder, from the manifests (MLServer's metadata has none)."""
    from genserve.export import Repository

    repo = Repository(repository)
    inputs = {}
    for model in MODELS.values():
        tensor = repo.load_manifest(model, max(repo.versions(model))).parts["decoder"].inputs[0]
        inputs[model] = (tensor.name, int(tensor.shape[1]))
    return inputs


async def closed_loop(server: Server, spec: CellSpec, duration: float, inputs: dict[str, tuple[str, int]],
                      ) -> tuple[float, list[float], dict[str, int]]:
    import tritonclient.grpc.aio as triton

    client = triton.InferenceServerClient(server.address, channel_args=[("grpc.max_receive_message_length", 64 << 20)])
    try:
        if spec.decoder:
            name = server.oip_name(MODELS[spec.decoder])
            input_name, dim = inputs[MODELS[spec.decoder]]
            z = np.random.default_rng(0).standard_normal((spec.rows, dim)).astype(np.float32)
            request = triton.InferInput(input_name, list(z.shape), "FP32")
            request.set_data_from_numpy(z)

            async def send() -> None:
                await client.infer(name, [request], client_timeout=30)
        else:
            async def send() -> None:
                await client.is_server_live()

        for _ in range(3):  # connection and graph warm
            with contextlib.suppress(Exception):
                await send()
        latencies: list[float] = []
        errors: dict[str, int] = {}
        loop = asyncio.get_running_loop()
        end = loop.time() + duration

        async def caller() -> None:
            while loop.time() < end:
                started = time.perf_counter()
                try:
                    await send()
                except Exception as error:  # noqa: BLE001 - counted by status code
                    errors[error_code(error)] = errors.get(error_code(error), 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(spec.clients)))
        return time.perf_counter() - started, latencies, errors
    finally:
        await client.close()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: Server, spec: CellSpec, duration: float, round_index: int, inputs: dict[str, tuple[str, int]]) -> Result:
    model = MODELS.get(spec.decoder, "")
    before = scrape_batch_sizes(server.metrics_url, model) if server.metrics_url and model else {}
    server_cpu, client_cpu = process_cpu_seconds(server.process.pid), time.process_time()
    seconds, latencies, errors = asyncio.run(closed_loop(server, spec, duration, inputs))
    server_cpu, client_cpu = process_cpu_seconds(server.process.pid) - server_cpu, time.process_time() - client_cpu
    per_execution = float("nan")
    if server.metrics_url and model:
        per_execution, _ = batch_summary(before, scrape_batch_sizes(server.metrics_url, model))
    p50, _, p99 = percentiles(latencies)
    ok = max(1, len(latencies))
    return Result(server.name, spec.label, round_index, seconds, len(latencies), spec.rows, errors, p50, p99,
                  per_execution, os.getloadavg()[0], 1e6 * server_cpu / ok, 1e6 * client_cpu / ok)


def in_process(repository: Path, duration: float, round_index: int) -> list[Result]:
    """The same graphs called in a loop with genserve's session options, at batch 1 and 64."""
    from genserve.export import Repository
    from genserve.serving.runtime import load_session

    repo = Repository(repository)
    results = []
    for decoder, model in MODELS.items():
        session = load_session(repo.part_path(model, max(repo.versions(model)), "decoder"), execution_provider="cpu",
                               intra_op_threads=1)
        dim = int(session.input_shape[1])
        for spec in [s for s in CELLS if s.decoder == decoder]:
            z = np.random.default_rng(0).standard_normal((spec.rows, dim)).astype(np.float32)
            for _ in range(5):
                session.run(z)
            times = []
            started = time.perf_counter()
            while time.perf_counter() - started < duration:
                t0 = time.perf_counter()
                session.run(z)
                times.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
            p50, _, p99 = percentiles(times)
            results.append(Result("in-process", spec.label, round_index, elapsed, len(times), spec.rows, {}, p50, p99,
                                  float(spec.rows), os.getloadavg()[0]))
    return results


# --- the table -----------------------------------------------------------------------------------
def _span(values: list[float], digits: int = 0) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    fmt = f"{{:,.{digits}f}}"
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)}-{fmt.format(high)}"


def best(results: list[Result], server: str, cell: str) -> float:
    """The best round of a cell: highest rate, or lowest median latency for the c=1 cells."""
    chosen = [r for r in results if r.server == server and r.cell == cell and r.ok]
    if not chosen:
        return float("nan")
    if cell.endswith("c=1"):
        return min(r.p50_ms for r in chosen)
    return max(r.per_s for r in chosen)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with padded columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(v.ljust(widths[i]) for i, v in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def table(results: list[Result], servers: list[str]) -> str:
    header = ["cell", "in-process limit", *servers, "genserve / limit", "genserve / floor", "genserve / best MLServer"]
    rows = []
    for spec in CELLS:
        cell = spec.label
        if not any(r.cell == cell and r.server != "in-process" for r in results):
            continue  # not run (--only)
        line = [cell + (" (p50 ms)" if spec.latency_cell else " (req/s)" if not spec.decoder else " (samples/s)")]
        for server in ["in-process", *servers]:
            chosen = [r for r in results if r.server == server and r.cell == cell and r.ok]
            if spec.latency_cell:
                text = _span([r.p50_ms for r in chosen], 2)
            else:
                text = _span([r.per_s for r in chosen])
                execs = [r.rows_per_execution for r in chosen if r.rows_per_execution == r.rows_per_execution]
                if execs and server != "in-process":
                    text += f" ({_span(execs, 1)} rows/exec)"
            errors = sum(sum(r.errors.values()) for r in results if r.server == server and r.cell == cell)
            line.append(text + (f" [{errors} errors]" if errors else ""))
        genserve = best(results, "genserve", cell)
        limit = best(results, "in-process", cell)
        peers = [best(results, s, cell) for s in servers if s.startswith("mlserver")]
        peers = [p for p in peers if p == p]
        floor = best(results, "grpc-floor", cell)
        if spec.latency_cell:
            line.append("-" if limit != limit else f"+{genserve - limit:.2f} ms")
            line.append("-" if floor != floor else f"+{genserve - floor:.2f} ms")
            line.append("-" if not peers else f"{min(peers) / genserve:.2f}x faster" if genserve else "-")
        else:
            line.append("-" if limit != limit else f"{genserve / limit:.2f}")
            line.append("-" if floor != floor else f"{genserve / floor:.2f}")
            line.append("-" if not peers else f"{genserve / max(peers):.2f}x")
        rows.append(line)
    return markdown(header, rows)


def cpu_table(results: list[Result], servers: list[str]) -> str:
    """CPU microseconds per request, server process / load generator: on a machine where both share
    the cores, which one limits a cell (a server near one core's worth of its event loop, or the client)."""
    header = ["cell (CPU us per request: server / client)", *servers]
    rows = []
    for spec in CELLS:
        line = [spec.label]
        for server in servers:
            chosen = [r for r in results if r.server == server and r.cell == spec.label and r.ok]
            line.append(f"{_span([r.server_cpu_us for r in chosen])} / {_span([r.client_cpu_us for r in chosen])}"
                        if chosen else "-")
        if any(v != "-" for v in line[1:]):
            rows.append(line)
    return markdown(header, rows)


def targets(results: list[Result], servers: list[str]) -> list[str]:
    """Genserve issue 19's targets from this run's best rounds."""
    lines = []
    live = best(results, "genserve", CellSpec("", 1, 64).label)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    for decoder in MODELS:
        single = best(results, "genserve", CellSpec(decoder, 1, 64).label)
        lines.append(f"{decoder} decoder, 1 sample at c=64 / genserve's empty RPC: {single:,.0f} / {live:,.0f} = "
                     f"{single / live:.2f}x (target >= 0.7x: {verdict(single / live >= 0.7)})")
    for decoder, goal in (("dense", 0.8), ("conv", 0.9)):
        cell = CellSpec(decoder, 64, 4).label
        ratio = best(results, "genserve", cell) / best(results, "in-process", cell)
        lines.append(f"{decoder} decoder, 64 samples at c=4 / in-process: {ratio:.2f}x (target >= {goal}x: {verdict(ratio >= goal)})")
    for decoder in MODELS:
        p50 = best(results, "genserve", CellSpec(decoder, 1, 1).label)
        lines.append(f"{decoder} decoder, 1 sample at c=1, p50 {p50:.2f} ms (target <= 0.84 ms: {verdict(p50 <= 0.84)})")
    behind = []
    for spec in CELLS:
        ours = best(results, "genserve", spec.label)
        for peer in (s for s in servers if s.startswith("mlserver")):
            theirs = best(results, peer, spec.label)
            if theirs != theirs:
                continue
            if (ours > theirs) if spec.latency_cell else (ours < theirs):
                behind.append(f"{spec.label} ({peer})")
    lines.append("ahead of MLServer in every cell: " + ("met" if not behind else "MISSED in " + "; ".join(behind)))
    if "grpc-floor" in servers:  # the same figures for a server that runs nothing: how far below them grpcio alone is
        floor_live = best(results, "grpc-floor", CellSpec("", 1, 64).label)
        for decoder in MODELS:
            single = best(results, "grpc-floor", CellSpec(decoder, 1, 64).label)
            lines.append(f"grpc-floor: {decoder}, 1 sample at c=64 / its empty RPC: {single / floor_live:.2f}x")
        for decoder in MODELS:
            cell = CellSpec(decoder, 64, 4).label
            lines.append(f"grpc-floor: {decoder}, 64 samples at c=4 / in-process: "
                         f"{best(results, 'grpc-floor', cell) / best(results, 'in-process', cell):.2f}x (without running the model)")
        for decoder in MODELS:
            lines.append(f"grpc-floor: {decoder}, 1 sample at c=1, p50 {best(results, 'grpc-floor', CellSpec(decoder, 1, 1).label):.2f} ms")
    return [line for line in lines if "nan" not in line]  # cells not run (--only)


def environment() -> dict[str, str]:
    import grpc
    import onnxruntime

    return {"python": platform.python_version(), "grpcio": grpc.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "mlserver": MLSERVER_VERSION, "cpus": str(os.cpu_count()),
            "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per cell (default 3)")
    p.add_argument("--repository", type=Path, help="repository with mnist-vae and mnist-dense-vae (default: the test "
                   "suite's cached repository of tiny models, built on first use)")
    p.add_argument("--peer-venv", type=Path, default=ROOT / "runs" / "peer-venv", help="MLServer's venv (created when missing)")
    p.add_argument("--servers", default="genserve,grpc-floor,mlserver,mlserver-batch",
                   help="which of genserve, genserve-unpoliced, grpc-floor, mlserver, mlserver-batch "
                   "(default: all but genserve-unpoliced)")
    p.add_argument("--baseline-root", type=Path, help="also run genserve from this checkout (before/after)")
    p.add_argument("--mlserver-batch-time", type=float, default=0.001, help="max_batch_time of mlserver-batch (s)")
    p.add_argument("--only", help="run only the cells whose label contains one of these, comma-separated "
                   "(e.g. 'ServerLive,c=1'); the in-process limit is measured for every decoder cell")
    p.add_argument("--cells", help="run these cells instead, comma-separated DECODER:ROWS:CLIENTS with DECODER "
                   "conv, dense or empty (ServerLive), e.g. 'dense:1:64,empty:1:64,dense:1:4'")
    p.add_argument("--json", type=Path, help="also write every round's results here")
    args = p.parse_args(argv)
    cells = parse_cells(args.cells) if args.cells else CELLS
    cells = [c for c in cells if not args.only or any(o in c.label for o in args.only.split(","))]

    servers = args.servers.split(",")
    if args.baseline_root:
        servers.insert(1, "genserve@" + args.baseline_root.name)
    mlserver = ensure_peer_venv(args.peer_venv) if any(s.startswith("mlserver") for s in servers) else None
    repository = args.repository or default_repository()
    inputs = decoder_inputs(repository)
    print(f"# peer benchmark, repository {repository}")
    print(f"# {json.dumps(environment())}")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="genserve-peer-") as tmp:
        for round_index in range(args.rounds):
            order = servers if round_index % 2 == 0 else servers[::-1]  # A B C, C B A: no server always goes first
            results += in_process(repository, args.duration, round_index)
            for name in order:
                workdir = Path(tmp) / f"round{round_index}"
                workdir.mkdir(exist_ok=True)
                if name == "genserve":
                    server: Server = GenserveServer(name, ROOT, repository, workdir)
                elif name.startswith("genserve@"):
                    server = GenserveServer(name, args.baseline_root, repository, workdir)
                elif name == "genserve-unpoliced":
                    server = GenserveServer(name, ROOT, repository, workdir, limits={"receive_timeout_s": 0})
                elif name == "grpc-floor":
                    server = FloorServer(name, repository, workdir)
                else:
                    server = MLServer(name, mlserver, repository, workdir,
                                      args.mlserver_batch_time if name == "mlserver-batch" else None)
                try:
                    server.wait_ready(list(MODELS.values()))
                    for spec in cells:
                        result = measure(server, spec, args.duration, round_index, inputs)
                        results.append(result)
                        print(f"  round {round_index} {name:16} {spec.label:38} {result.per_s:10,.0f}/s  "
                              f"p50 {result.p50_ms:.2f} ms  rows/exec {result.rows_per_execution:.1f}  "
                              f"cpu/req server {result.server_cpu_us:,.0f} us client {result.client_cpu_us:,.0f} us  "
                              f"errors {result.errors or '-'}  load {result.load_avg:.2f}", flush=True)
                finally:
                    server.stop()
    print()
    print(table(results, servers))
    print()
    print(cpu_table(results, servers))
    print()
    print(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("# targets (genserve issue 19):")
    lines = targets(results, servers)
    for line in lines:
        print(f"#   {line}")
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(), "results": [asdict(r) for r in results],
                                         "targets": lines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
