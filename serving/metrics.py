"""Prometheus metrics (own registry, own HTTP port), named in base units with _total and _seconds.

    genserve_requests_total{method, model, version, code}       every RPC by status code
    genserve_request_duration_seconds{method, model}            end-to-end handler latency
    genserve_inference_queue_duration_seconds{model, part}      time a request waited in a batcher
    genserve_inference_compute_duration_seconds{model, part}    time one execution (one batch) took
    genserve_inference_batch_size{model, part}                  rows per execution
    genserve_inference_samples_total{model, version, part}      rows run
    genserve_inference_executions_total{model, version, part}   batches run
    genserve_inference_rejected_total{model, part, reason}      queue_full | deadline | cancelled
    genserve_inference_queue_depth{model, part}                 requests waiting now
    genserve_models_loaded / genserve_models_ready              model versions loaded / taking traffic
    genserve_model_ready{model, version}                        1 while a version takes traffic
    genserve_model_load_failures_total{model, stage}            versions refused (verify | load | gpu | warmup)
    genserve_execution_provider_info{model, version, part, provider}   1 for the provider in use
    genserve_repository_errors_total                           repository scans that could not read it
    process_cpu_seconds_total, process_resident_memory_bytes, ...     (prometheus-client's ProcessCollector)
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """Every metric genserve exports, registered in one private registry (one per server)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "genserve_requests", "RPCs handled, by method, model, version and gRPC status code.",
            ["method", "model", "version", "code"], registry=r,
        )
        self.request_duration = Histogram(
            "genserve_request_duration_seconds", "RPC handling time, from arrival to response.",
            ["method", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_duration = Histogram(
            "genserve_inference_queue_duration_seconds", "Time a request waited in a batcher queue before its batch ran.",
            ["model", "part"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.compute_duration = Histogram(
            "genserve_inference_compute_duration_seconds", "Time one execution of a graph (one batch) took.",
            ["model", "part"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "genserve_inference_batch_size", "Rows per graph execution.",
            ["model", "part"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.samples = Counter(
            "genserve_inference_samples", "Rows (images or latents) run through a graph.",
            ["model", "version", "part"], registry=r,
        )
        self.executions = Counter(
            "genserve_inference_executions", "Graph executions (batches).", ["model", "version", "part"], registry=r,
        )
        self.rejected = Counter(
            "genserve_inference_rejected", "Requests a batcher did not run: queue_full, deadline or cancelled.",
            ["model", "part", "reason"], registry=r,
        )
        self.queue_depth = Gauge(
            "genserve_inference_queue_depth", "Requests waiting in a batcher queue.", ["model", "part"], registry=r,
        )
        self.models_loaded = Gauge("genserve_models_loaded", "Model versions loaded.", registry=r)
        self.models_ready = Gauge("genserve_models_ready", "Model versions taking traffic.", registry=r)
        self.model_ready = Gauge(
            "genserve_model_ready", "1 while a model version takes traffic.", ["model", "version"], registry=r,
        )
        self.load_failures = Counter(
            "genserve_model_load_failures", "Model versions that failed to load and were refused, by stage.",
            ["model", "stage"], registry=r,
        )
        self.provider = Gauge(
            "genserve_execution_provider_info", "1 for the onnxruntime execution provider a graph runs on.",
            ["model", "version", "part", "provider"], registry=r,
        )
        self.repository_errors = Counter(
            "genserve_repository_errors", "Repository scans that failed to read the repository (gone, unmounted, no permission).",
            registry=r,
        )
        ProcessCollector(registry=r)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a thread; returns the bound port (port 0: any free one)."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
