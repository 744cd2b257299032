"""The Docker deployment for real: build the image on a Docker Engine, `docker-compose up` the stack,
and use it from the host the way docs/deployment.md says.

The harness uses the engine that answers `docker info`; when none does, it starts Debian's `dockerd`
(installing docker.io first when missing, scripts/install-system-packages.sh) with its output in a
log file, and stops that daemon when the tests end (a daemon left running would keep CI's output
open). docker/build-image.sh builds genserve:cpu with stand-in base images where no registry is
reachable, the host's CA bundle and a torch wheelhouse. The stack then runs with tiny training
settings on free host ports: the server bootstraps the demo models into its empty volume and turns
healthy, answers Generate (genserve's client) and the Open Inference Protocol (Triton's tritonclient)
through the published port, Prometheus scrapes it, the trainer service publishes a new version that
the server hot-loads, and `docker-compose stop` drains the server, which exits 0.

Timings (build, time to healthy, the whole test) are printed (`pytest -s`) and appended to
GENSERVE_DOCKER_CACHE/e2e-timings.jsonl; docs/deployment.md records measured ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_compose import TINY_TRAINING
from test_prometheus_scrape import value

from genserve.clients.client import GenserveClient

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GENSERVE_DOCKER_CACHE", ROOT / ".cache" / "docker"))


def debian_docker_client() -> str | None:
    """Debian's docker.io client: a newer `docker` first on PATH may lack buildx and so BuildKit."""
    listing = subprocess.run(["dpkg", "-L", "docker.io"], capture_output=True, text=True)
    clients = [line for line in listing.stdout.splitlines() if line.endswith("bin/docker")]
    return clients[0] if clients else None


def engine_answers(client: str) -> bool:
    return subprocess.run([client, "info"], capture_output=True, timeout=60).returncode == 0


@dataclass
class Engine:
    client: str
    env: dict[str, str]  # for docker, docker-compose and the scripts: Debian's client first on PATH
    log: Path | None     # the log of the daemon the harness started, None for one already running

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self.client, *args], capture_output=True, text=True, timeout=timeout, env=self.env)
        if check:
            assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr[-2000:]}"
        return result


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    client = debian_docker_client()
    if client is None or shutil.which("docker-compose") is None:
        install = subprocess.run(["bash", str(ROOT / "scripts" / "install-system-packages.sh"), "test"],
                                 capture_output=True, text=True, timeout=900)
        assert install.returncode == 0, install.stderr
        client = debian_docker_client()
        assert client is not None, "docker.io is installed but dpkg -L docker.io lists no bin/docker"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    env["PATH"] = os.pathsep.join([str(Path(client).parent), env.get("PATH", "")])
    env["DOCKER"] = client
    if engine_answers(client):
        yield Engine(client, env, None)
        return

    if os.geteuid() != 0:
        pytest.fail("no Docker Engine answers `docker info`, and starting dockerd needs root: "
                    "run `sudo dockerd >/var/log/dockerd.log 2>&1 &` first")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with log.open("wb") as output:
        # Its own session, stdin closed and output in the file: nothing of CI's terminal stays open.
        daemon = subprocess.Popen(["dockerd"], stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not engine_answers(client):
            assert daemon.poll() is None, f"dockerd exited with {daemon.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"dockerd did not answer within 90 s: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield Engine(client, env, log)
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)


def record(**timings: float) -> None:
    line = json.dumps({"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **timings})
    print(f"docker e2e timings: {line}")
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "e2e-timings.jsonl").open("a") as file:
        file.write(line + "\n")


@pytest.fixture(scope="session")
def image(engine: Engine) -> dict[str, str]:
    """Build genserve:cpu with docker/build-image.sh; returns the images it chose (images.env)."""
    images_env = CACHE / "images.env"
    log = CACHE / "build-image.log"
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as output:
        build = subprocess.run(["nice", "-n", "10", "bash", str(ROOT / "docker" / "build-image.sh"), "cpu"],
                               stdout=output, stderr=subprocess.STDOUT, env={**engine.env, "IMAGES_ENV": str(images_env)},
                               timeout=1500)
    seconds = time.monotonic() - started
    assert build.returncode == 0, f"docker/build-image.sh failed (log {log}):\n{log.read_text()[-4000:]}"
    size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", "genserve:cpu").stdout)
    record(build_s=round(seconds, 1), image_bytes=size)
    user = engine.docker("image", "inspect", "-f", "{{.Config.User}}", "genserve:cpu").stdout.strip()
    assert user == "genserve", f"the image runs as {user!r}, not the non-root user genserve"
    return dict(line.split("=", 1) for line in images_env.read_text().split())


def compose_commands(engine_client: str | None) -> list[list[str]]:
    """docker-compose (Debian's 1.29), and `docker compose` where a client has the plugin."""
    commands = [["docker-compose"]]
    for client in filter(None, [engine_client, shutil.which("docker")]):
        if subprocess.run([client, "compose", "version"], capture_output=True).returncode == 0:
            commands.append([client, "compose"])
            break
    return commands


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """One compose project of docker-compose.yml plus a test override, on free loopback ports."""

    def __init__(self, compose: list[str], engine: Engine, images: dict[str, str], tmp_path: Path):
        self.engine = engine
        self.project = f"genserve-e2e-{os.getpid()}-{len(compose)}"
        self.ports = {"grpc": free_port(), "metrics": free_port(), "prometheus": free_port()}
        override = tmp_path / "docker-compose.e2e.yml"
        tiny = {**TINY_TRAINING, "GENSERVE_POLL_INTERVAL": "1"}
        override.write_text(yaml.safe_dump({
            "services": {
                # The server's health is checked every 2 s here instead of 10 s: a quicker test.
                "server": {"environment": tiny, "healthcheck": {"interval": "2s"}, "restart": "no"},
                "trainer": {"environment": {**tiny, "GENSERVE_MODELS": "dae"}},
                "prometheus": {"restart": "no"},
            },
        }))
        self.command = [*compose, "-p", self.project, "-f", str(ROOT / "docker-compose.yml"), "-f", str(override)]
        self.env = {**engine.env, **images, "GENSERVE_HOST_PORT": str(self.ports["grpc"]),
                    "GENSERVE_HOST_METRICS_PORT": str(self.ports["metrics"]),
                    "PROMETHEUS_HOST_PORT": str(self.ports["prometheus"])}

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=timeout,
                                env=self.env, cwd=ROOT)
        assert result.returncode == 0, f"{' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
        return result

    def container(self, service: str) -> str:
        ids = self("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def state(self, container: str) -> dict:
        return json.loads(self.engine.docker("inspect", "-f", "{{json .State}}", container).stdout)

    def server_events(self, container: str) -> list[dict]:
        """The server's JSON log lines (stderr; the bootstrap's training output is plain text)."""
        logs = self.engine.docker("logs", container)
        events = []
        for line in (logs.stdout + logs.stderr).splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and "event" in entry:
                    events.append(entry)
        return events

    def wait(self, predicate, timeout: float, what: str, container: str):
        deadline = time.monotonic() + timeout
        while not (result := predicate()):
            if time.monotonic() > deadline:
                tail = "\n".join(self.engine.docker("logs", "--tail", "40", container).stderr.splitlines()[-40:])
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; server log:\n{tail}")
            time.sleep(0.5)
        return result


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("compose", compose_commands(debian_docker_client()), ids=" ".join)
def test_compose_stack_serves_scrapes_hot_loads_and_drains(compose: list[str], engine: Engine,
                                                           image: dict[str, str], tmp_path: Path) -> None:
    import tritonclient.grpc as tritonclient

    started = time.monotonic()
    stack = Stack(compose, engine, image, tmp_path)
    try:
        stack("up", "-d", "--no-build", "server", "prometheus")
        server = stack.container("server")

        # The HEALTHCHECK (grpc.health.v1 from inside the container), after the bootstrap training.
        stack.wait(lambda: stack.state(server)["Health"]["Status"] == "healthy", 600, "a healthy server", server)
        healthy_s = time.monotonic() - started
        events = stack.server_events(server)
        assert any(e["event"] == "serving" and sorted(e["models"].split(",")) == ["mnist-dae:1", "mnist-vae:1"]
                   for e in events), events[-5:]

        address = f"127.0.0.1:{stack.ports['grpc']}"
        with GenserveClient(address, timeout=30) as client:
            samples = client.generate("mnist-vae", 4, seed=1)
            assert samples.version == 1 and samples.images.shape == (4, 1, 28, 28)
            assert samples.images.min() >= 0.0 and samples.images.max() <= 1.0

            triton = tritonclient.InferenceServerClient(url=address)
            assert triton.is_server_ready() and triton.is_model_ready("mnist-vae.decoder")
            latent_dim = int(triton.get_model_metadata("mnist-vae.decoder").inputs[0].shape[1])
            latents = tritonclient.InferInput("latents", [3, latent_dim], "FP32")
            latents.set_data_from_numpy(np.zeros((3, latent_dim), np.float32))
            images = triton.infer("mnist-vae.decoder", [latents]).as_numpy("images")
            assert images.shape == (3, 1, 28, 28) and np.isfinite(images).all()
            triton.close()

            # Prometheus (its container, on the compose network) scrapes server:8002.
            prometheus = f"http://127.0.0.1:{stack.ports['prometheus']}"
            stack.wait(lambda: value(prometheus, 'up{job="genserve"}') == 1, 120, "Prometheus to scrape genserve", server)
            generated = 'sum(genserve_requests_total{job="genserve",method="Generate",code="OK"})'
            stack.wait(lambda: (value(prometheus, generated) or 0) >= 1, 60, "the Generate call in Prometheus", server)
            with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports['metrics']}/metrics", timeout=10) as response:
                assert b"genserve_model_ready" in response.read()  # /metrics published on the host too

            # The trainer service publishes mnist-dae version 2 into the shared volume; the server switches.
            stack("run", "--rm", "-T", "trainer", timeout=900)
            noisy = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
            stack.wait(lambda: client.denoise("mnist-dae", noisy).version == 2, 120, "mnist-dae version 2", server)
            assert client.generate("mnist-vae", 1, seed=1).version == 1

        stack("stop", "-t", "30")
        state = stack.state(server)
        assert state["Status"] == "exited" and state["ExitCode"] == 0, state
        events = [e["event"] for e in stack.server_events(server)]
        assert "version_ready" in events and "shutting_down" in events
        assert "calls_drained" in events and events[-1] == "stopped", events[-6:]
        record(compose=" ".join(compose[-1:]), healthy_s=round(healthy_s, 1), stack_s=round(time.monotonic() - started, 1))
    finally:
        subprocess.run([*stack.command, "down", "-v", "--remove-orphans", "-t", "5"], capture_output=True,
                       env=stack.env, cwd=ROOT, timeout=300)
