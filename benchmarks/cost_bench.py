"""Cost benchmark: how serving cost (throughput, memory) grows with image size and model size.

    .venv/bin/python -m benchmarks.cost_bench --quick     # vae and dcgan, short cells
    .venv/bin/python -m benchmarks.cost_bench             # dense-vae, vae, gan, dcgan x 28, 32, 64 px
    .venv/bin/python -m benchmarks.cost_bench --json out.json --repository REPO

The grid: model kinds x image shapes (1,28,28), (3,32,32), (3,64,64); a model is <kind>-<C>x<H>x<W>.
Models are built through the real code path: training.trainer.train for one epoch on 64 random
uint8 images of the shape (untrained weights: the cost of a graph does not depend on them), then
export.pipeline.export_run with max_batch 64, so every graph is parity-checked at batch 1, 7 and 64
(the server runs batches of up to 64). The repository is cached under .cache/cost-bench/, keyed by
the model, export and library sources, and only missing models are built. A kind that refuses a
shape is recorded with its reason and skipped.

Per model (Generate, prior sampling included, float32 images out):
  params, ONNX MB  initializer elements and file size of the served part (decoder or generator),
                   from the repository (the exporter folds batch norm into convolutions, so a DCGAN
                   shows a few hundred fewer than its torch module); in brackets, all parts' files
                   when the server loads more (a VAE's encoder too)
  in-process       onnxruntime in this process, 1 intra-op thread, one call after another at batch
                   1 and 64 (serving_bench.in_process)
  server           genserve-serve in a subprocess, one server per model (a copy of the repository
                   holding only that model), cpu, intra_op_threads 1, inference_threads 1,
                   max_batch_size 64, dynamic batching on, max_queue_delay_us 0, max_queue_size 65536;
                   closed loop: Generate x1 at 64 clients, Generate x64 at 4 clients; then the
                   same model with dynamic batching off (serving_bench's mode off) for Generate x1
                   at 64 clients: "on/off" is what batching buys for this model
  B/sample         the serialized GenerateResponse bytes per sample, at 1 and 64 samples
  RSS              the server's VmRSS once SERVING (models loaded and warmed up at batch 1 and 64),
                   before any traffic; "model" subtracts the RSS of a server with an empty repository
  peak             the server's VmHWM over the load cells (reset through /proc/PID/clear_refs before
                   them; where that is refused, the peak since start, marked *)
Every cell is bounded in time (--duration) and count (--max-requests); every call has a deadline.
This is a measurement, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from benchmarks.serving_bench import (
    ROOT,
    Cell,
    ServerProcess,
    Workload,
    closed_loop,
    environment,
    in_process,
    request_for,
    run_cell,
    stub_call,
)

KINDS = ("dense-vae", "vae", "gan", "dcgan")
QUICK_KINDS = ("vae", "dcgan")
SHAPES = ((1, 28, 28), (3, 32, 32), (3, 64, 64))
TRAIN_IMAGES = 64
MAX_BATCH = 64  # export parity batches and the server's max_batch_size
BUILD_FORMAT = "1"  # bump to rebuild cached repositories after changing how models are built
MODE = "on"  # serving_bench's mode: batching on, max_queue_delay_us 0
OFF_MODE = "off"  # serving_bench's mode: dynamic_batching false (each request runs alone)
SERVER = argparse.Namespace(max_batch=MAX_BATCH, queue_delay_us=0, max_queue_size=65536, intra_op_threads=1,
                            inference_threads=1, cpu_memory_arena=True, event_loop="auto")
SERVER_LOADS = ((1, 64), (64, 4))  # (samples per request, concurrent clients)
IN_PROCESS_ROWS = (1, 64)
MiB = 1024 * 1024


def shape_label(shape: tuple[int, int, int]) -> str:
    return "x".join(str(v) for v in shape)


def model_name(kind: str, shape: tuple[int, int, int]) -> str:
    return f"{kind}-{shape_label(shape)}"


def _tests_on_path() -> None:
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


# --- building the models -------------------------------------------------------------------------
def default_repository() -> Path:
    """.cache/cost-bench/<build format>-<sources key>/repo; repositories of older sources are removed."""
    _tests_on_path()
    from helpers import _sources_key

    cache_root = ROOT / ".cache" / "cost-bench"
    key_dir = cache_root / f"{BUILD_FORMAT}-{_sources_key()}"
    key_dir.mkdir(parents=True, exist_ok=True)
    for old in cache_root.iterdir():
        if old.is_dir() and old != key_dir:
            shutil.rmtree(old, ignore_errors=True)
    return key_dir / "repo"


def build_model(repository: Path, kind: str, shape: tuple[int, int, int], workdir: Path) -> None:
    """Train `kind` one epoch on random images of `shape` and export it as <kind>-<shape> (max_batch 64)."""
    import torch

    from genserve.export.pipeline import export_run
    from genserve.training.config import TrainConfig
    from genserve.training.data.types import ImageDataset
    from genserve.training.trainer import train

    images = torch.randint(0, 256, (TRAIN_IMAGES, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = ImageDataset(f"synthetic-{shape_label(shape)}", images, None, images, None, None)
    run = workdir / model_name(kind, shape)
    config = TrainConfig(model=kind, dataset=dataset.name, epochs=1, batch_size=32, device="cpu", nll_k=2,
                         nll_images=8, fid_samples=TRAIN_IMAGES, out=str(run))
    train(config, dataset=dataset)
    export_run(run, repository, name=model_name(kind, shape), max_batch=MAX_BATCH)


def build_missing(repository: Path, grid: list[tuple[str, tuple[int, int, int]]]) -> dict[str, str]:
    """Build every model of the grid the repository lacks; returns {name: why} for those that could not be."""
    from genserve.export import Repository

    repo = Repository(repository, create=True)
    missing = lambda: [(k, s) for k, s in grid if repo.latest(model_name(k, s)) is None]  # noqa: E731
    if not missing():
        return {}
    _tests_on_path()
    from onnx_speed import fast_onnx_exports  # shares torch.onnx's op registry; parity checks still run

    refused: dict[str, str] = {}
    with open(repo.root / ".cost-bench.lock", "a") as lock, fast_onnx_exports():
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run building the same cache waits, then finds its models
        for kind, shape in missing():
            name = model_name(kind, shape)
            started = time.perf_counter()
            print(f"  building {name} ...", end=" ", flush=True)
            try:
                with tempfile.TemporaryDirectory(prefix="genserve-cost-runs-") as runs:
                    build_model(repository, kind, shape, Path(runs))
            except Exception as error:  # a kind that refuses a shape, or any failure: recorded, skipped
                refused[name] = f"{type(error).__name__}: {error}"
                print(f"refused: {refused[name]}", flush=True)
                continue
            print(f"{time.perf_counter() - started:.1f} s", flush=True)
    return refused


# --- measuring -----------------------------------------------------------------------------------
@dataclass
class ModelCost:
    model: str
    kind: str
    image_shape: list[int]
    error: str = ""  # why this model was not measured (or not fully)
    part: str = ""  # the part Generate runs: decoder or generator
    params: int = 0  # initializer elements of the part's fp32 graph
    part_mb: float = float("nan")
    all_parts_mb: float = float("nan")
    response_bytes_per_sample: dict[str, float] = field(default_factory=dict)  # "x1", "x64"
    rss_idle_mib: float = float("nan")
    rss_model_mib: float = float("nan")  # rss_idle_mib - the empty server's
    hwm_startup_mib: float = float("nan")  # VmHWM before the load: loading and warm-up
    rss_peak_mib: float = float("nan")  # VmHWM over the load cells
    rss_peak_after_mib: dict[str, float] = field(default_factory=dict)  # VmHWM after each cell ("x1 c=64")
    peak_reset: bool = False  # False: rss_peak_mib is the peak since start
    cells: list[Cell] = field(default_factory=list)
    seconds: float = 0.0


def graph_facts(repository: Path, cost: ModelCost) -> None:
    import onnx

    from genserve.export import Repository

    repo = Repository(repository)
    version = repo.latest(cost.model)
    manifest = repo.load_manifest(cost.model, version)
    cost.part = "decoder" if "decoder" in manifest.parts else "generator"
    graph_file = manifest.file_for(cost.part)
    graph = onnx.load(str(repo.version_dir(cost.model, version) / graph_file), load_external_data=False)
    cost.params = sum(math.prod(t.dims) for t in graph.graph.initializer)
    cost.part_mb = manifest.files[graph_file].bytes / 1e6
    cost.all_parts_mb = sum(e.bytes for e in manifest.files.values()) / 1e6


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where that is refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def start_server(repository: Path, workdir: Path, mode: str = MODE) -> ServerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(repository, mode, SERVER, workdir)
    try:
        server.wait_serving()
    except BaseException:
        server.stop()
        raise
    return server


def baseline_rss_mib(workdir: Path) -> float:
    """VmRSS of a SERVING server with an empty repository."""
    from genserve.export import Repository

    repository = Repository(workdir / "repo", create=True).root
    server = start_server(repository, workdir)
    try:
        return memory_kib(server.process.pid)["VmRSS"] / 1024
    finally:
        server.stop()


def response_bytes(address: str, w: Workload, deadline: float) -> int:
    options = [("grpc.max_receive_message_length", 64 * MiB)]
    with grpc.insecure_channel(address, options=options) as channel:
        return stub_call(channel, w.rpc)(request_for(w, 0), timeout=deadline).ByteSize()


def measure_server(repository: Path, cost: ModelCost, baseline_mib: float, workdir: Path, args: argparse.Namespace) -> None:
    _tests_on_path()
    from helpers import copy_repository

    copy_repository(repository, workdir / "repo", [cost.model])  # one model per server: its memory is its own
    server = start_server(workdir / "repo", workdir)
    try:
        pid = server.process.pid
        idle = memory_kib(pid)
        cost.rss_idle_mib, cost.hwm_startup_mib = idle["VmRSS"] / 1024, idle["VmHWM"] / 1024
        cost.rss_model_mib = cost.rss_idle_mib - baseline_mib
        cost.peak_reset = reset_peak(pid)
        for rows, clients in SERVER_LOADS:
            w = Workload(cost.model, "Generate", rows)
            cell = run_cell(server, MODE, w, f"c={clients}",
                            closed_loop(server.address, w, clients, args.duration, args.max_requests, args.deadline))
            cost.cells.append(cell)
            cost.rss_peak_after_mib[f"x{rows} c={clients}"] = memory_kib(pid)["VmHWM"] / 1024
            say(cell)
        cost.rss_peak_mib = memory_kib(pid)["VmHWM"] / 1024
        for rows, _ in SERVER_LOADS:
            w = Workload(cost.model, "Generate", rows)
            cost.response_bytes_per_sample[f"x{rows}"] = response_bytes(server.address, w, args.deadline) / rows
    finally:
        server.stop()
    # the same single-sample load with dynamic batching off: what batching buys for this model
    server = start_server(workdir / "repo", workdir, OFF_MODE)
    try:
        rows, clients = SERVER_LOADS[0]
        w = Workload(cost.model, "Generate", rows)
        cell = run_cell(server, OFF_MODE, w, f"c={clients}",
                        closed_loop(server.address, w, clients, args.duration, args.max_requests, args.deadline))
        cost.cells.append(cell)
        say(cell)
    finally:
        server.stop()


def say(cell: Cell) -> None:
    print(f"    {cell.mode:10} {cell.workload:30} {cell.load:5} {cell.samples_per_s:9.0f} samples/s  p99 {cell.p99_ms:8.2f} ms"
          f"  errors {cell.errors or '-'}", flush=True)


def measure(repository: Path, cost: ModelCost, baseline_mib: float, workdir: Path, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    print(f"  {cost.model}", flush=True)
    try:
        graph_facts(repository, cost)
        items = [Workload(cost.model, "Generate", rows) for rows in IN_PROCESS_ROWS]
        for cell in in_process(repository, items, SERVER.intra_op_threads, args.duration, args.max_requests):
            cost.cells.append(cell)
            say(cell)
        measure_server(repository, cost, baseline_mib, workdir, args)
    except Exception as error:  # recorded in the table; the other models still run
        cost.error = f"{type(error).__name__}: {error}"
        print(f"    failed: {cost.error}", flush=True)
    cost.seconds = time.perf_counter() - started


# --- output --------------------------------------------------------------------------------------
def _cell(cost: ModelCost, mode: str, rows: int) -> Cell | None:
    return next((c for c in cost.cells if c.mode == mode and c.rows == rows), None)


def _num(value: float, digits: int = 0) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"


def table(costs: list[ModelCost], baseline_mib: float) -> str:
    header = ("model", "part", "params", "ONNX MB (all)", "in-proc x1/s", "in-proc x64/s", "srv x1 c=64/s", "p99 ms",
              "off x1 c=64/s", "on/off", "srv x64 c=4/s", "p99 ms", "B/sample x1/x64", "RSS MiB", "model MiB",
              "peak MiB", "notes")
    rows = [("(empty repository)", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", _num(baseline_mib, 1), "0",
             "-", "baseline")]
    for cost in costs:
        ip1, ip64 = _cell(cost, "in-process", 1), _cell(cost, "in-process", 64)
        s1, s64, off1 = _cell(cost, MODE, 1), _cell(cost, MODE, 64), _cell(cost, OFF_MODE, 1)
        ratio = s1.samples_per_s / off1.samples_per_s if s1 and off1 and off1.samples_per_s else float("nan")
        notes = [cost.error] if cost.error else []
        notes += [f"{c.mode} {c.workload.split()[-1]} {' '.join(f'{k}:{v}' for k, v in sorted(c.errors.items()))}"
                  for c in (s1, s64, off1) if c and c.errors]
        mb = "-" if cost.part_mb != cost.part_mb else f"{cost.part_mb:.2f}" + (
            f" ({cost.all_parts_mb:.2f})" if cost.all_parts_mb > cost.part_mb else "")
        per_sample = cost.response_bytes_per_sample
        rows.append((
            cost.model, cost.part or "-", f"{cost.params:,}" if cost.params else "-", mb,
            _num(ip1.samples_per_s) if ip1 else "-", _num(ip64.samples_per_s) if ip64 else "-",
            _num(s1.samples_per_s) if s1 else "-", _num(s1.p99_ms, 1) if s1 else "-",
            _num(off1.samples_per_s) if off1 else "-", _num(ratio, 2),
            _num(s64.samples_per_s) if s64 else "-", _num(s64.p99_ms, 1) if s64 else "-",
            f"{per_sample['x1']:,.0f}/{per_sample['x64']:,.0f}" if len(per_sample) == 2 else "-",
            _num(cost.rss_idle_mib, 1), _num(cost.rss_model_mib, 1),
            _num(cost.rss_peak_mib, 1) + ("" if cost.peak_reset or cost.rss_peak_mib != cost.rss_peak_mib else "*"),
            "; ".join(notes) or "-",
        ))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(v).ljust(widths[i]) for i, v in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def as_json(cost: ModelCost) -> dict:
    out = asdict(cost)
    for cell, record in zip(cost.cells, out["cells"], strict=True):
        record["samples_per_s"] = cell.samples_per_s
    return out


def machine() -> dict[str, str]:
    from importlib.metadata import version

    return {**environment(), "torch": version("torch"), "onnx": version("onnx")}


def load_averages() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_shape(text: str) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in text.lower().split("x"))
    return c, h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"kinds {','.join(QUICK_KINDS)} only, shorter cells")
    p.add_argument("--repository", type=Path, help="model repository to measure, built (missing models only) if "
                   "needed; default: a cache under .cache/cost-bench/")
    p.add_argument("--kinds", help=f"model kinds, comma-separated (default {','.join(KINDS)}; quick {','.join(QUICK_KINDS)})")
    p.add_argument("--shapes", help="image shapes CxHxW, comma-separated (default "
                   f"{','.join(shape_label(s) for s in SHAPES)})")
    p.add_argument("--duration", type=float, help="seconds per cell (quick 1.5, full 3)")
    p.add_argument("--max-requests", type=int, default=100_000, help="requests (in-process: calls) per cell at most")
    p.add_argument("--deadline", type=float, default=30.0, help="per-call deadline in seconds")
    p.add_argument("--no-cpu-memory-arena", action="store_true",
                   help="serve with cpu_memory_arena: false (onnxruntime frees buffers after each run)")
    p.add_argument("--json", type=Path, help="also write every model, cell and the environment as JSON here")
    args = p.parse_args(argv)
    SERVER.cpu_memory_arena = not args.no_cpu_memory_arena
    args.duration = args.duration or (1.5 if args.quick else 3.0)
    kinds = args.kinds.split(",") if args.kinds else list(QUICK_KINDS if args.quick else KINDS)
    shapes = [parse_shape(s) for s in args.shapes.split(",")] if args.shapes else list(SHAPES)
    grid = [(kind, shape) for kind in kinds for shape in shapes]

    started = time.perf_counter()
    load_start = load_averages()
    repository = (args.repository or default_repository()).absolute()
    print(f"# genserve cost benchmark ({'quick' if args.quick else 'full'}), repository {repository}")
    print(f"# {json.dumps(machine())}")
    print(f"# server: {MODE}, {json.dumps(vars(SERVER))}; cells {args.duration} s")
    print(f"# load average at start: {load_start}", flush=True)

    refused = build_missing(repository, grid)
    build_s = time.perf_counter() - started
    costs = [ModelCost(model_name(kind, shape), kind, list(shape), error=refused.get(model_name(kind, shape), ""))
             for kind, shape in grid]
    with tempfile.TemporaryDirectory(prefix="genserve-cost-") as tmp:
        baseline_mib = baseline_rss_mib(Path(tmp) / "empty")
        print(f"  empty repository: RSS {baseline_mib:.1f} MiB", flush=True)
        for cost in costs:
            if not cost.error:
                measure(repository, cost, baseline_mib, Path(tmp) / cost.model, args)
    load_end = load_averages()
    print()
    print(table(costs, baseline_mib))
    print()
    print(f"# load average at end: {load_end}")
    print(f"# {time.perf_counter() - started:.0f} s in all ({build_s:.0f} s building models)")
    if args.json:
        args.json.write_text(json.dumps({
            "environment": machine(), "server": {"mode": MODE, **vars(SERVER)}, "duration_s": args.duration,
            "repository": str(repository), "load_average": {"start": load_start, "end": load_end},
            "baseline_rss_mib": baseline_mib, "models": [as_json(c) for c in costs],
            "seconds": time.perf_counter() - started, "build_seconds": build_s,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
