"""Per-graph statistics: feeds the Prometheus metrics and keeps Triton-style cumulative counters
(ModelStatistics: success, fail, queue and compute durations, per-batch-size stats)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from serving.metrics import ServerMetrics


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class GraphStats:
    """One loaded graph's counters; a BatchObserver for its batcher. Called on the event loop only."""

    model: str
    version: int
    part: str
    metrics: ServerMetrics
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)
    inference_count: int = 0  # rows run successfully
    execution_count: int = 0
    last_inference_ms: int = 0

    def queue_depth(self, depth: int) -> None:
        self.metrics.queue_depth.labels(self.model, self.part).set(depth)

    def waited(self, seconds: float) -> None:
        self.queue.add(seconds)
        self.metrics.queue_duration.labels(self.model, self.part).observe(seconds)

    def executed(self, rows: int, seconds: float, ok: bool) -> None:
        self.metrics.compute_duration.labels(self.model, self.part).observe(seconds)
        if not ok:
            return
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        self.compute.add(seconds, rows)
        self.batches.setdefault(rows, Duration()).add(seconds)
        self.metrics.batch_size.labels(self.model, self.part).observe(rows)
        self.metrics.samples.labels(self.model, str(self.version), self.part).inc(rows)
        self.metrics.executions.labels(self.model, str(self.version), self.part).inc()

    def rejected(self, reason: str) -> None:
        self.metrics.rejected.labels(self.model, self.part, reason).inc()

    def request_done(self, ok: bool, seconds: float) -> None:
        (self.success if ok else self.fail).add(seconds)
