"""What the sample-health metrics (serving/sample_health.py) cost per execution.

    .venv/bin/python -m benchmarks.sample_health_bench            # about a minute
    .venv/bin/python -m benchmarks.sample_health_bench --rounds 3 --seconds 0.5   # quicker

For untrained generators of three sizes (export's own ONNX export; untrained weights cost the same
as trained ones), at batch 1, 8 and 64 rows, in one process: onnxruntime alone (`without`) and the
same session run as the server runs it, with the finiteness check and SampleHealth.observe
(serving/versions.py's `checked_run`, `with`), interleaved without, with, without, with, ...
for --rounds rounds of --seconds each; plus SampleHealth.observe alone on that batch's real output
(`observe`, microseconds per sample, the median of --repeats timings). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

GRAPHS = (("gan", (1, 28, 28)), ("dcgan", (1, 28, 28)), ("dcgan", (3, 32, 32)))
BATCHES = (1, 8, 64)


def generator_session(kind: str, shape: tuple[int, int, int]):
    import onnxruntime as ort
    import torch

    from genserve.export.onnx_export import describe_part, export_part
    from genserve.training.config import TrainConfig
    from genserve.training.models import build_model

    torch.manual_seed(0)
    model = build_model(kind, shape, TrainConfig(model=kind, dataset="mnist-5k"), num_classes=10).eval()
    module = model.servable_parts()["generator"].eval()
    latent_dim = int(model.prior_spec()["dim"])
    signature = describe_part("generator", module, shape, latent_dim)
    graph = export_part(module, signature, fp16=False).SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the server's default per instance on a small machine
    session = ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda rows: session.run(None, {name: rows})), latent_dim


def throughput(run: Callable[[np.ndarray], list[np.ndarray]], rows: np.ndarray, seconds: float) -> float:
    """Rows per second over `seconds` of back-to-back calls."""
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        run(rows)
        done += len(rows)
    return done / elapsed


def observe_us_per_sample(health, images: np.ndarray, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(20):
            health.observe(images)
        timings.append((time.perf_counter() - started) / 20)
    return statistics.median(timings) * 1e6 / len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved without/with pairs per cell (default 5)")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each timing (default 1)")
    parser.add_argument("--repeats", type=int, default=15, help="timings of observe() alone (default 15)")
    args = parser.parse_args(argv)

    from genserve.serving.metrics import ServerMetrics
    from genserve.serving.sample_health import SampleHealth
    from genserve.serving.versions import checked_run

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    print(f"# {args.rounds} interleaved rounds of {args.seconds:g} s per cell; onnxruntime 1 intra-op thread")
    header = (f"{'graph':<18} {'batch':>5} {'without rows/s':>15} {'with rows/s':>12} {'with/without':>12} "
              f"{'observe us/sample':>18} {'run us/sample':>14}")
    print(header)
    print("-" * len(header))
    metrics = ServerMetrics()
    for kind, shape in GRAPHS:
        run, latent_dim = generator_session(kind, shape)
        label = f"{kind} {'x'.join(map(str, shape))}"
        health = SampleHealth(metrics, label.replace(" ", "-"), 1, "generator", (0.0, 1.0), 0.2)
        wrapped = checked_run(run, health)
        for batch in BATCHES:
            rows = np.random.default_rng(0).standard_normal((batch, latent_dim)).astype(np.float32)
            throughput(run, rows, args.seconds / 4)  # warm-up
            without, with_health = [], []
            for _ in range(args.rounds):
                without.append(throughput(run, rows, args.seconds))
                with_health.append(throughput(wrapped, rows, args.seconds))
            a, b = statistics.median(without), statistics.median(with_health)
            cost = observe_us_per_sample(health, run(rows)[0], args.repeats)
            print(f"{label:<18} {batch:>5} {a:>15.0f} {b:>12.0f} {b / a:>12.3f} {cost:>18.2f} {1e6 / a:>14.1f}")
    print(f"# load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
