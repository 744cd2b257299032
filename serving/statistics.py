"""Per-graph statistics: feeds the Prometheus metrics and keeps Triton-style cumulative counters
(ModelStatistics: success, fail, queue and compute durations, per-batch-size stats)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from genserve.serving.metrics import ServerMetrics


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

    def __post_init__(self) -> None:
        # Resolve the label children once: .labels() on every request showed up in the server's profile.
        m, model, version, part = self.metrics, self.model, str(self.version), self.part
        self._queue_depth = m.queue_depth.labels(model, part)
        self._queue_duration = m.queue_duration.labels(model, part)
        self._compute_duration = m.compute_duration.labels(model, part)
        self._batch_size = m.batch_size.labels(model, part)
        self._samples = m.samples.labels(model, version, part)
        self._executions = m.executions.labels(model, version, part)

    def queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def waited(self, seconds: float) -> None:
        self.queue.add(seconds)
        self._queue_duration.observe(seconds)

    def executed(self, rows: int, seconds: float, ok: bool) -> None:
        self._compute_duration.observe(seconds)
        if not ok:
            return
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        self.compute.add(seconds, rows)
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = Duration()
        batch.add(seconds)
        self._batch_size.observe(rows)
        self._samples.inc(rows)
        self._executions.inc()

    def rejected(self, reason: str) -> None:
        self.metrics.rejected.labels(self.model, self.part, reason).inc()

    def request_done(self, ok: bool, seconds: float) -> None:
        (self.success if ok else self.fail).add(seconds)
