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
    genserve_model_quality{model, version, metric}              a served version's quality labels (export/labels.py)
    genserve_sample_values_total{model, version, part}          pixel values image graphs produced, and of them
    genserve_sample_nonfinite_values_total{...}, genserve_sample_saturated_values_total{...}
    genserve_sample_diversity_ratio{model, version, part}       per-execution diversity / export's (serving/sample_health.py)
    process_cpu_seconds_total, process_resident_memory_bytes, ...     (prometheus-client's ProcessCollector)

With `genserve-serve --workers N` every worker writes its metrics to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, as under gunicorn) and the
supervisor serves them once, summed over workers: counters and histograms add up (those of
restarted workers included), gauges follow their `multiprocess_mode` (queue depth: the sum over
live workers; versions ready: the minimum). Process metrics (CPU, memory) are per process and not
exported then (a prometheus_client limitation); the supervisor adds
    genserve_worker_restarts_total                              workers that died and were restarted
    genserve_workers                                            worker processes running
"""

from __future__ import annotations

import contextlib
import hmac
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    make_wsgi_app,
    multiprocess,
)

from genserve.export.labels import labels_of
from genserve.export.manifest import Manifest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DIVERSITY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.1, 1.25, 1.5, 2.0, 4.0)
# prometheus_client's multiprocess mode (a worker of `genserve-serve --workers N`), fixed at import
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


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
            multiprocess_mode="livesum",
        )
        # With workers: loaded anywhere (the most any worker has), ready everywhere (the least).
        self.models_loaded = Gauge("genserve_models_loaded", "Model versions loaded.", registry=r,
                                   multiprocess_mode="livemax")
        self.models_ready = Gauge("genserve_models_ready", "Model versions taking traffic.", registry=r,
                                  multiprocess_mode="livemin")
        self.model_ready = Gauge(
            "genserve_model_ready", "1 while a model version takes traffic.", ["model", "version"], registry=r,
            multiprocess_mode="livemin",
        )
        self.load_failures = Counter(
            "genserve_model_load_failures", "Model versions that failed to load and were refused, by stage.",
            ["model", "stage"], registry=r,
        )
        self.provider = Gauge(
            "genserve_execution_provider_info", "1 for the onnxruntime execution provider a graph runs on.",
            ["model", "version", "part", "provider"], registry=r, multiprocess_mode="livemax",
        )
        self.repository_errors = Counter(
            "genserve_repository_errors", "Repository scans that failed to read the repository (gone, unmounted, no permission).",
            registry=r,
        )
        self.model_quality = Gauge(
            "genserve_model_quality", "A served version's quality label, measured at export on its ONNX graphs.",
            ["model", "version", "metric"], registry=r, multiprocess_mode="livemostrecent",
        )
        health = ["model", "version", "part"]
        self.sample_values = Counter(
            "genserve_sample_values", "Pixel values produced by image graphs (the denominator of the sample-health fractions).",
            health, registry=r,
        )
        self.sample_nonfinite = Counter(
            "genserve_sample_nonfinite_values", "Produced pixel values that were NaN or infinite.", health, registry=r,
        )
        self.sample_saturated = Counter(
            "genserve_sample_saturated_values", "Produced pixel values within half an 8-bit step of 0 or 1.", health, registry=r,
        )
        self.sample_diversity = Histogram(
            "genserve_sample_diversity_ratio",
            "Per execution: mean pairwise distance of its first samples over the same figure measured at export.",
            health, buckets=DIVERSITY_BUCKETS, registry=r,
        )
        ProcessCollector(registry=r)
        self._endpoint = MetricsEndpoint(r)

    def show_quality(self, manifest: Manifest, serving: bool = True) -> None:
        """Set (or, with serving=False, remove) genserve_model_quality for a version's labels.
        With workers (multiprocess mode) labels cannot be removed: a retired version's stay."""
        for label in labels_of(manifest.quality):
            key = (manifest.name, str(manifest.version), label.metric)
            if serving:
                self.model_quality.labels(*key).set(label.value)
            elif not MULTIPROCESS:
                with contextlib.suppress(KeyError):  # never shown
                    self.model_quality.remove(*key)

    def serve(self, host: str, port: int, *, token: str | None = None, request_timeout_s: float = 10.0,
              max_connections: int = 16) -> int:
        """Serve this registry on /metrics (see MetricsEndpoint.serve); returns the bound port."""
        return self._endpoint.serve(host, port, token=token, request_timeout_s=request_timeout_s,
                                    max_connections=max_connections)

    def stop(self) -> None:
        self._endpoint.stop()


class SupervisorMetrics:
    """The supervisor's side of multiprocess mode: its own two metrics (written to its own files in
    PROMETHEUS_MULTIPROC_DIR like the workers') and one registry that collects every file."""

    def __init__(self, directory: str):
        self.directory = directory
        # Not registered in the collecting registry: the collector reads them from the files already.
        own = CollectorRegistry()
        self.restarts = Counter("genserve_worker_restarts", "Worker processes that died and were restarted.",
                                registry=own)
        self.workers = Gauge("genserve_workers", "Worker processes running.", registry=own, multiprocess_mode="livesum")
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=directory)
        self.endpoint = MetricsEndpoint(self.registry)

    def worker_gone(self, pid: int) -> None:
        """Drop a dead worker's live gauges (its counters and histograms stay in the sums)."""
        multiprocess.mark_process_dead(pid, self.directory)


class MetricsEndpoint:
    """/metrics over HTTP for one registry, in a thread."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._http: _BoundedThreadingServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int, *, token: str | None = None, request_timeout_s: float = 10.0,
              max_connections: int = 16) -> int:
        """Start the /metrics HTTP endpoint in a thread; returns the bound port (port 0: any free one).

        With `token`, requests need `Authorization: Bearer <token>` (401 otherwise). A connection
        must send its request within request_timeout_s; at most max_connections are served at
        once (more are closed unanswered), so slow or idle clients cannot pile up threads."""
        app = make_wsgi_app(self.registry)
        if token:
            app = _bearer_protected(app, token)
        handler = type("MetricsHandler", (_QuietHandler,), {"timeout": request_timeout_s})
        server_class = type("MetricsServer", (_BoundedThreadingServer,), {
            "address_family": socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET,
        })
        self._http = make_server(host.strip("[]"), port, app, server_class, handler_class=handler)
        self._http.slots = threading.BoundedSemaphore(max_connections)
        self._thread = threading.Thread(target=self._http.serve_forever, name="genserve-metrics", daemon=True)
        self._thread.start()
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _QuietHandler(WSGIRequestHandler):
    """No access log; `timeout` (set per server) bounds every read from the client's socket."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _BoundedThreadingServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most `slots` of them; a connection beyond that is closed at once."""

    daemon_threads = True
    slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # timed out or hung up: nothing to report
            super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _bearer_protected(app: Callable[..., Iterable[bytes]], token: str) -> Callable[..., Iterable[bytes]]:
    """`app` behind `Authorization: Bearer <token>` (compared in constant time)."""
    expected = f"Bearer {token}".encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if hmac.compare_digest(given, expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", 'Bearer realm="genserve metrics"')])
        return [b"missing or wrong bearer token: send 'Authorization: Bearer <token>' (metrics_auth in the config)\n"]

    return guarded
