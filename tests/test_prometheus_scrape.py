"""A real Prometheus server scrapes a real genserve-serve, both started here on loopback.

Prometheus (Debian's `prometheus` package; .ci/run installs it) gets a generated configuration that
scrapes the server's /metrics every second; the test then asks Prometheus's HTTP API
(/api/v1/query, /api/v1/targets) for the series the deployment relies on (docs/serving.md, Metrics;
the Grafana dashboard in docker/grafana/). It also checks docker/prometheus.yml with promtool.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    LoggedProcess,
    copy_repository,
    environment_for_subprocess,
)

from genserve.clients.client import GenserveClient, GenserveError

ROOT = Path(__file__).resolve().parents[1]
SCRAPE_INTERVAL_S = 1


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(
            f"{binary} is not installed: `apt-get install -y --no-install-recommends prometheus` "
            "(.ci/run installs it); the scrape test needs a real Prometheus server"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def genserve(golden_repository: Path, tmp_path: Path) -> Iterator[tuple[LoggedProcess, str, int]]:
    """genserve-serve on 127.0.0.1 (any free ports) serving mnist-vae and mnist-dae."""
    repo = copy_repository(golden_repository, tmp_path / "repo", ["mnist-vae", "mnist-dae"])
    script = Path(sys.executable).parent / "genserve-serve"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "genserve.serving.cli"]
    server = LoggedProcess(
        [*command, "--repository", str(repo.root), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--poll-interval", "0", "--inference-threads", "1", "--grace-period", "2", "--log-json"],
        env=environment_for_subprocess(),
    )
    try:
        listening = server.wait_for("listening", timeout=60)
        server.wait_for("serving", timeout=120)
        yield server, f"127.0.0.1:{listening['port']}", listening["metrics_port"]
        assert server.stop() == 0, "genserve-serve did not exit 0 on SIGTERM"
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


@pytest.fixture
def prometheus(genserve: tuple[LoggedProcess, str, int], tmp_path: Path) -> Iterator[str]:
    """A Prometheus server on 127.0.0.1 scraping the genserve fixture every second; yields its base URL."""
    binary = require("prometheus")
    _, _, metrics_port = genserve
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
        "scrape_configs:\n"
        "  - job_name: genserve\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    port = free_port()
    server = LoggedProcess([
        binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn",
    ])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), 60, "Prometheus to be ready", server)
        yield url
    finally:
        server.stop()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until(predicate, timeout: float, what: str, process: LoggedProcess | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.process.poll() is not None:
            raise AssertionError(f"{what}: the process exited:\n" + "\n".join(process.lines[-30:]))
        if time.monotonic() > deadline:
            tail = "\n" + "\n".join(process.lines[-30:]) if process else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(0.25)


def api(url: str, path: str, **params: str) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def query(url: str, promql: str) -> list[tuple[dict[str, str], float]]:
    """An instant query: (labels, value) per series."""
    data = api(url, "query", query=promql)
    assert data["resultType"] == "vector", data
    return [(item["metric"], float(item["value"][1])) for item in data["result"]]


def value(url: str, promql: str) -> float | None:
    """The value of a query answering one series, or None while it answers none."""
    result = query(url, promql)
    assert len(result) <= 1, f"{promql} answered {result}"
    return result[0][1] if result else None


def test_prometheus_scrapes_the_metrics_endpoint(genserve: tuple[LoggedProcess, str, int], prometheus: str) -> None:
    _, address, metrics_port = genserve
    with GenserveClient(address, timeout=30) as client:
        for seed in range(3):
            client.generate("mnist-vae", 4, seed=seed)
        client.denoise("mnist-dae", np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32))
        with pytest.raises(GenserveError):
            client.generate("no-such-model", 1)

        # One scrape: the target is up, on loopback, with genserve's series.
        wait_until(lambda: value(prometheus, 'up{job="genserve"}') == 1, 60, "a successful scrape of genserve")
        targets = api(prometheus, "targets")["activeTargets"]
        assert [(t["scrapeUrl"], t["health"]) for t in targets] == [(f"http://127.0.0.1:{metrics_port}/metrics", "up")]

        generate_ok = 'genserve_requests_total{job="genserve",method="Generate",model="mnist-vae",code="OK"}'
        wait_until(lambda: (value(prometheus, generate_ok) or 0) >= 3, 30, "the Generate requests in Prometheus")
        assert value(prometheus, 'sum(genserve_requests_total{method="Denoise",model="mnist-dae",code="OK"})') >= 1
        assert value(prometheus, 'sum(genserve_requests_total{method="Generate",code="NOT_FOUND"})') >= 1
        assert {labels["version"] for labels, _ in query(prometheus, generate_ok)} == {"1"}

        # Histograms: batch sizes and latencies, usable by PromQL's histogram functions.
        batches = value(prometheus, 'genserve_inference_batch_size_count{model="mnist-vae",part="decoder"}')
        assert batches is not None and batches >= 1
        rows = value(prometheus, 'genserve_inference_batch_size_sum{model="mnist-vae",part="decoder"}')
        assert rows is not None and rows >= 12  # 3 x 4 samples went through the decoder
        buckets = query(prometheus, 'genserve_inference_batch_size_bucket{model="mnist-vae",part="decoder"}')
        assert len(buckets) > 2 and any(labels["le"] == "+Inf" for labels, _ in buckets)
        median = value(prometheus, 'histogram_quantile(0.5, sum by (le) '
                                   '(genserve_request_duration_seconds_bucket{method="Generate",model="mnist-vae"}))')
        assert median is not None and math.isfinite(median) and median > 0

        # Models, versions and execution providers.
        assert value(prometheus, "genserve_models_ready") == 2
        assert value(prometheus, "genserve_models_loaded") == 2
        assert value(prometheus, 'genserve_model_ready{model="mnist-dae",version="1"}') == 1
        providers = query(prometheus, "genserve_execution_provider_info == 1")
        assert sorted((labels["model"], labels["part"]) for labels, _ in providers) == [
            ("mnist-dae", "denoiser"), ("mnist-vae", "decoder"), ("mnist-vae", "encoder")]
        assert {labels["provider"] for labels, _ in providers} <= {"CPUExecutionProvider", "CUDAExecutionProvider",
                                                                  "TensorrtExecutionProvider"}
        assert value(prometheus, 'sum(genserve_model_load_failures_total)') in (None, 0)

        # The process collector: memory and CPU of genserve-serve.
        assert value(prometheus, 'process_resident_memory_bytes{job="genserve"}') > 10 * 2**20
        assert value(prometheus, 'process_cpu_seconds_total{job="genserve"}') > 0

        # Scraping goes on: new requests show up in a later scrape, and rate() sees them.
        client.generate("mnist-vae", 2, seed=9)
        client.generate("mnist-vae", 2, seed=10)
        wait_until(lambda: (value(prometheus, generate_ok) or 0) >= 5, 30, "a later scrape with the new requests")
        assert value(prometheus, f"sum(rate({generate_ok}[1m]))") > 0


def test_compose_prometheus_config_is_valid() -> None:
    """docker/prometheus.yml (the compose Prometheus) passes promtool, from the same Debian package."""
    promtool = require("promtool")
    result = subprocess.run([promtool, "check", "config", str(ROOT / "docker" / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
