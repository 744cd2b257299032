"""The container deployment: docker-compose.yml (validated by Debian's docker-compose), the GPU override,
the Dockerfile, and the entrypoint scripts the containers run, run here as plain processes.

No Docker engine is needed here (tests/test_docker_e2e.py uses one): `docker-compose config` only parses, merges and validates the files, and
the end-to-end test runs the very commands of the containers (scripts/entrypoint-server.sh on an
empty repository bootstraps the demo models and serves them; scripts/entrypoint-trainer.sh publishes
a new version, which the running server hot-loads) with tiny training settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import LoggedProcess

from genserve.clients.client import GenserveClient

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
SERVER_ENTRYPOINT = "/app/scripts/entrypoint-server.sh"
TRAINER_ENTRYPOINT = "/app/scripts/entrypoint-trainer.sh"
# Tiny training for the bootstrap and the trainer: 64 images, one epoch, small evaluation and parity.
TINY_TRAINING = {
    "DEMO_EPOCHS": "1",
    "GENSERVE_TRAIN_LIMIT": "64",
    "GENSERVE_NLL_K": "2",
    "GENSERVE_NLL_IMAGES": "8",
    "GENSERVE_EXPORT_MAX_BATCH": "8",
    "GENSERVE_DEVICE": "cpu",
}


# --- docker-compose config ------------------------------------------------------------------------

def compose_config(*files: Path) -> dict:
    """`docker-compose -f ... config`, parsed: the merged, validated and normalised configuration."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail(
            "docker-compose is not installed: `apt-get install -y --no-install-recommends docker-compose` "
            "(.ci/run installs it); the compose files cannot be validated without it"
        )
    args = [binary]
    for file in files:
        args += ["-f", str(file)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_") and not k.startswith("DOCKER_")}
    result = subprocess.run([*args, "config"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def published_ports(service: dict) -> dict[int, tuple[str, int]]:
    """container port -> (host ip, host port), from either the short string or the long form."""
    ports = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports[int(entry["target"])] = (entry.get("host_ip", ""), int(entry["published"]))
        else:
            spec = str(entry).split("/")[0]
            *host, published, target = spec.split(":")
            ports[int(target)] = (host[0] if host else "", int(published))
    return ports


def mounts(service: dict) -> dict[str, str]:
    """container path -> source (named volume or host path)."""
    result = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            result[entry["target"]] = entry["source"]
        else:
            source, target = str(entry).split(":")[:2]
            result[target] = source
    return result


def test_compose_file_is_valid_and_has_the_services() -> None:
    config = compose_config(COMPOSE)
    services = config["services"]
    assert {"server", "trainer", "prometheus", "grafana"} <= set(services)
    assert {"models", "runs", "prometheus-data"} <= set(config["volumes"])

    server = services["server"]
    assert Path(server["build"]["dockerfile"]).as_posix() == "docker/Dockerfile"
    assert Path(server["build"]["context"]).resolve() == ROOT
    assert server["build"]["args"]["ORT"] == "cpu"
    assert server["entrypoint"] == [SERVER_ENTRYPOINT]
    assert mounts(server) == {"/models": "models", "/runs": "runs"}
    assert server["environment"]["GENSERVE_REPOSITORY"] == "/models"
    assert server["environment"]["GENSERVE_HOST"] == "0.0.0.0"  # inside the container; published on loopback
    ports = published_ports(server)
    assert ports == {8001: ("127.0.0.1", 8001), 8002: ("127.0.0.1", 8002)}
    assert str(server["environment"]["GENSERVE_PORT"]) == "8001"
    assert str(server["environment"]["GENSERVE_METRICS_PORT"]) == "8002"
    assert float(server["environment"]["GENSERVE_POLL_INTERVAL"]) > 0  # hot reload of the trainer's versions
    health = server["healthcheck"]
    assert health["test"][:3] == ["CMD", SERVER_ENTRYPOINT, "healthcheck"]  # grpc.health.v1, no extra binary
    assert health["test"][3] == "127.0.0.1:8001"
    assert "start_period" in health  # the first start trains the demo models

    trainer = services["trainer"]
    assert trainer["entrypoint"] == [TRAINER_ENTRYPOINT]
    assert trainer["profiles"] == ["train"]  # one-shot, not started by a plain `up`
    assert trainer["image"] == server["image"] and trainer["build"] == server["build"]
    assert mounts(trainer) == mounts(server)  # publishes into the volume the server polls
    assert trainer["depends_on"]["server"]["condition"] == "service_healthy"
    assert trainer["restart"] == "no"
    assert trainer["environment"]["GENSERVE_GATE"] == "1"  # bootstrap-models.sh: genserve-export --gate

    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    prom_mounts = mounts(prometheus)
    assert Path(prom_mounts["/etc/prometheus/prometheus.yml"]).resolve() == ROOT / "docker" / "prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert published_ports(prometheus)[9090][0] == "127.0.0.1"

    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] if job["job_name"] == "genserve"
               for group in job["static_configs"] for t in group["targets"]]
    assert targets == ["server:8002"]  # the compose service name and its metrics port

    grafana = services["grafana"]
    assert grafana["profiles"] == ["grafana"]
    assert Path(mounts(grafana)["/etc/grafana/provisioning"]).resolve() == ROOT / "docker" / "grafana" / "provisioning"


def test_gpu_override_reserves_an_nvidia_gpu_and_installs_onnxruntime_gpu() -> None:
    config = compose_config(COMPOSE, GPU_OVERRIDE)
    for name in ("server", "trainer"):
        service = config["services"][name]
        assert service["build"]["args"]["ORT"] == "gpu", name  # pip install .[gpu]: onnxruntime-gpu
        assert Path(service["build"]["dockerfile"]).as_posix() == "docker/Dockerfile"
        assert service["image"] == "genserve:gpu"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        assert mounts(service) == {"/models": "models", "/runs": "runs"}
    assert "--require-gpu" in config["services"]["server"]["command"]
    assert config["services"]["prometheus"] == compose_config(COMPOSE)["services"]["prometheus"]


def test_dockerfile_builds_from_the_repository_sources() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    # python:3.11-slim unless docker/build-image.sh passes a stand-in (no registry); no `# syntax=`
    # line, which would pull a frontend image (tests/test_docker_e2e.py builds it for real).
    assert lines[:4] == ["ARG BASE_IMAGE=python:3.11-slim", "ARG WHEELHOUSE=scratch",
                         "FROM ${WHEELHOUSE} AS wheelhouse", "FROM ${BASE_IMAGE}"]
    assert not any(line.replace(" ", "").startswith("#syntax=") for line in text.splitlines())
    assert 'pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"' in text  # without a wheelhouse
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "['optional-dependencies'][sys.argv[1]]" in text and '"${ORT}"' in text and "ARG ORT=cpu" in text
    assert "pip install --no-cache-dir --no-deps --no-build-isolation ." in text
    assert "USER genserve" in text
    assert f'ENTRYPOINT ["{SERVER_ENTRYPOINT}"]' in text
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"{line}: {source} is not in the repository"
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:] and "!serving/" in ignore and "serving/generated/" in ignore
    for script in ("demo.sh", "entrypoint-server.sh", "entrypoint-trainer.sh", "bootstrap-models.sh",
                   "install-system-packages.sh", "../docker/build-image.sh"):
        assert os.access(ROOT / "scripts" / script, os.X_OK), f"scripts/{script} is not executable"
    dashboard = json.loads((ROOT / "docker" / "grafana" / "dashboards" / "genserve.json").read_text())
    assert dashboard["uid"] == "genserve" and all(p["targets"] for p in dashboard["panels"])
    datasources = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


# --- the entrypoints, run as the containers run them ----------------------------------------------

def entrypoint(args: list[str], env: dict[str, str]) -> LoggedProcess:
    """A script run as its container runs it, in a process group of its own (a bootstrap's genserve-train too)."""
    return LoggedProcess(args, env=env, cwd=ROOT, own_group=True)


def run_script(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own, all of which is killed if it runs too long."""
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"{' '.join(args)} ran over {timeout}s:\n{output[-4000:]}") from None
    return subprocess.CompletedProcess(args, process.returncode, output, "")


def script_env(repository: Path, runs: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TINY_TRAINING)
    env.update(
        GENSERVE_BIN=str(Path(sys.executable).parent),  # the venv's genserve-* and python
        GENSERVE_REPOSITORY=str(repository),
        GENSERVE_RUNS=str(runs),
        GENSERVE_HOST="127.0.0.1",
        GENSERVE_PORT="0",
        GENSERVE_METRICS_PORT="0",
        GENSERVE_POLL_INTERVAL="1",
        OMP_NUM_THREADS="1",
        MPLBACKEND="Agg",
    )
    env.update(extra)
    return env


def healthcheck(address: str) -> subprocess.CompletedProcess:
    env = script_env(Path("/nonexistent"), Path("/nonexistent"))
    return run_script(["bash", "scripts/entrypoint-server.sh", "healthcheck", address], env, timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_server_entrypoint_bootstraps_an_empty_repository_and_hot_loads_the_trainers_version(tmp_path: Path) -> None:
    repository, runs = tmp_path / "models", tmp_path / "runs"  # both missing, like fresh volumes
    server = entrypoint(["bash", "scripts/entrypoint-server.sh", "--log-json", "--grace-period", "2"],
                        script_env(repository, runs))
    try:
        listening = server.wait_for("listening", timeout=300)  # after the bootstrap training
        assert any("holds no model: training the demo models" in line for line in server.lines)
        serving = server.wait_for("serving", timeout=120)
        assert sorted(serving["models"].split(",")) == ["mnist-dae:1", "mnist-vae:1"]
        bootstrap_runs = list(runs.glob("bootstrap-*"))
        assert len(bootstrap_runs) == 1
        assert {p.name for p in bootstrap_runs[0].iterdir()} == {"vae", "dae"}
        assert (bootstrap_runs[0] / "vae" / "metrics.json").is_file()
        assert (repository / ".bootstrap.lock").is_file()  # ignored by the repository (a dot name)

        address = f"127.0.0.1:{listening['port']}"
        check = healthcheck(address)
        assert check.returncode == 0 and "SERVING" in check.stdout, check

        with GenserveClient(address, timeout=30) as client:
            samples = client.generate("mnist-vae", 4, seed=1)
            assert samples.version == 1 and samples.images.shape == (4, 1, 28, 28)
            noisy = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
            assert client.denoise("mnist-dae", noisy).version == 1

            # The trainer container's command: train the denoiser again and publish mnist-dae version 2,
            # through the quality gate as compose runs it (the same recipe measures the same PSNR).
            trainer = run_script(["bash", "scripts/entrypoint-trainer.sh"],
                                 script_env(repository, runs, GENSERVE_MODELS="dae", GENSERVE_GATE="1"), timeout=300)
            assert trainer.returncode == 0, trainer.stdout
            gate = json.loads((repository / "mnist-dae" / "2" / "manifest.json").read_text())["quality"]["gate"]
            assert gate["enabled"] and gate["against_version"] == 1 and not gate["forced"]
            assert [c["metric"] for c in gate["comparisons"]] == ["test_psnr_db"]
            assert not (repository / "mnist-vae" / "2").exists()
            assert len(list(runs.glob("train-*/dae/checkpoints"))) == 1

            server.wait_for("version_ready", timeout=60, model="mnist-dae", version=2)
            deadline = time.monotonic() + 30
            while client.denoise("mnist-dae", noisy).version != 2:
                assert time.monotonic() < deadline, "the server kept answering with mnist-dae version 1"
                time.sleep(0.2)
            assert client.generate("mnist-vae", 1, seed=1).version == 1

        server.process.send_signal(signal.SIGTERM)  # exec'd: the signal reaches genserve-serve itself
        assert server.process.wait(30) == 0
        server.wait_for("stopped", timeout=5)
        assert healthcheck(address).returncode != 0
    finally:
        server.kill()


def test_server_entrypoint_without_bootstrap_serves_an_empty_repository(tmp_path: Path) -> None:
    server = entrypoint(["bash", "scripts/entrypoint-server.sh", "--log-json", "--no-metrics"],
                        script_env(tmp_path / "models", tmp_path / "runs", GENSERVE_BOOTSTRAP="0"))
    try:
        listening = server.wait_for("listening", timeout=60)
        server.wait_for("serving", timeout=60)
        assert not any("training the demo models" in line for line in server.lines)
        assert healthcheck(f"127.0.0.1:{listening['port']}").returncode == 0
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
    finally:
        server.kill()
