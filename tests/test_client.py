"""The Python client (clients.client.GenserveClient) and the genserve-client command line, against a
real server on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import (
    RunningServer,
    copy_repository,
    environment_for_subprocess,
    server_config,
)
from PIL import Image

from genserve.clients.cli import main as cli_main
from genserve.clients.client import GenserveClient, GenserveError

NAMES = ["mnist-vae", "mnist-ae", "mnist-dae", "mnist-gan"]


@pytest.fixture(scope="module")
def repo_root(golden_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_repository(golden_repository, tmp_path_factory.mktemp("client") / "repo", NAMES).root


@pytest.fixture(scope="module")
def server(repo_root: Path):
    running = RunningServer(server_config(repo_root, metrics_port=None)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer):
    with GenserveClient(server.address, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from genserve.training.data.registry import load_dataset

    return load_dataset("mnist-5k").test_images[:4].numpy()


def test_models_and_info(client: GenserveClient) -> None:
    assert client.serving()
    assert {m.name: m.kind for m in client.models()} == {"mnist-vae": "vae", "mnist-ae": "ae", "mnist-dae": "dae", "mnist-gan": "gan"}
    info = client.model("mnist-vae")
    assert (info.name, info.version, info.kind, info.image_shape, info.latent_dim) == ("mnist-vae", 1, "vae", (1, 28, 28), 16)
    assert info.prior == {"distribution": "normal", "mean": 0.0, "std": 1.0, "dim": 16}
    assert info.execution_providers["decoder"] == ["CPUExecutionProvider"] and len(info.class_names) == 10
    assert client.model("mnist-dae").prior is None


def test_generate_is_reproducible(client: GenserveClient) -> None:
    a = client.generate("mnist-vae", 6, seed=5)
    b = client.generate("mnist-vae", 6, seed=5, version=1)
    assert a.images.shape == (6, 1, 28, 28) and a.images.dtype == np.float32 and a.version == 1
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.latents, b.latents)
    decoded = client.generate("mnist-vae", latents=a.latents)
    np.testing.assert_array_equal(decoded.images, a.images)
    assert not np.array_equal(client.generate("mnist-vae", 6, seed=6).images, a.images)


def test_encode_reconstruct_denoise_interpolate(client: GenserveClient, digits: np.ndarray) -> None:
    vae = client.encode("mnist-vae", digits)
    assert vae.mean.shape == vae.logvar.shape == (4, 16) and vae.codes is None and vae.latents is vae.mean
    ae = client.encode("mnist-ae", digits[0])  # one (C, H, W) image is a batch of one
    assert ae.codes.shape == (1, 196) and ae.mean is None  # the 7x7x4 code
    mean = client.reconstruct("mnist-vae", digits)
    np.testing.assert_array_equal(mean.images, client.generate("mnist-vae", latents=vae.mean).images)
    sampled = client.reconstruct("mnist-vae", digits, sample=True, seed=1)
    np.testing.assert_array_equal(sampled.images, client.reconstruct("mnist-vae", digits, sample=True, seed=1).images)
    assert not np.array_equal(sampled.images, mean.images)
    assert client.denoise("mnist-dae", digits.astype(np.float32) / 255).images.shape == (4, 1, 28, 28)
    path = client.interpolate("mnist-vae", images=digits[:2], steps=5, spherical=True)
    assert path.images.shape == (5, 1, 28, 28) and path.latents.shape == (5, 16)
    ends = client.generate("mnist-gan", 2, seed=0).latents
    line = client.interpolate("mnist-gan", latents=ends, steps=3)
    np.testing.assert_allclose(line.latents[1], ends.mean(axis=0), atol=1e-6)


def test_png_encoding_matches_raw(server: RunningServer, digits: np.ndarray) -> None:
    with GenserveClient(server.address, image_encoding="png") as png_client, GenserveClient(server.address) as raw_client:
        as_png = png_client.reconstruct("mnist-ae", digits).images
        as_raw = raw_client.reconstruct("mnist-ae", digits).images
        np.testing.assert_array_equal(as_png, np.round(np.clip(as_raw, 0, 1) * 255) / np.float32(255))
        np.testing.assert_array_equal(png_client.encode("mnist-ae", digits).codes, raw_client.encode("mnist-ae", digits).codes)


def test_errors_carry_code_details_and_request_id(client: GenserveClient) -> None:
    with pytest.raises(GenserveError) as info:
        client.generate("mnist-dae", 2)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "no decoder or generator" in info.value.details
    assert info.value.request_id and info.value.request_id in str(info.value)
    with pytest.raises(GenserveError) as info:
        client.generate("mnist-vae", latents=np.full((1, 16), np.nan, np.float32))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError, match="either two images or two latents"):
        client.interpolate("mnist-vae")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retries_while_unavailable_then_succeeds(repo_root: Path) -> None:
    port = _free_port()
    with GenserveClient(f"127.0.0.1:{port}", timeout=2, retries=0) as impatient, pytest.raises(GenserveError) as info:
        impatient.models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    server = RunningServer(server_config(repo_root, port=port, metrics_port=None))
    starter = threading.Timer(0.5, server.start)
    started = time.monotonic()
    starter.start()
    try:
        with GenserveClient(f"127.0.0.1:{port}", timeout=60, retries=20, backoff_s=0.05, max_backoff_s=0.5) as patient:
            assert patient.generate("mnist-gan", 1).version == 1
        assert time.monotonic() - started >= 0.5
    finally:
        starter.join()
        server.stop()


def test_a_server_that_comes_back_is_reached_within_the_clients_backoff(repo_root: Path) -> None:
    """After seconds of failed connections gRPC's own reconnect backoff has grown past them (1 s,
    1.6 s, 2.6 s, ...), and calls fail at once until its next attempt; the client's channel tries as
    often as its calls retry, so a server that is back is reached within max_backoff_s."""
    port = _free_port()
    server = RunningServer(server_config(repo_root, port=port, metrics_port=None))
    with GenserveClient(f"127.0.0.1:{port}", timeout=0.3, retries=100, backoff_s=0.05, max_backoff_s=0.2) as client:
        failing_until = time.monotonic() + 3.0
        while time.monotonic() < failing_until:  # the channel fails to connect for 3 s
            with pytest.raises(GenserveError) as info:
                client.models()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        server.start()
        try:
            client.timeout = 1.0  # gRPC's next attempt after 3 s of failures would come 1.6-2.7 s later
            assert "mnist-gan" in [m.name for m in client.models()]
        finally:
            server.stop()


def test_deadline_and_token(repo_root: Path) -> None:
    config = server_config(repo_root, metrics_port=None, auth_token="tok",
                           models={"mnist-vae": {"max_queue_delay_us": 2_000_000, "batching_policy": "fixed"}})
    server = RunningServer(config).start()
    try:
        with GenserveClient(server.address, timeout=5) as anonymous, pytest.raises(GenserveError) as info:
            anonymous.models()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with GenserveClient(server.address, token="tok", timeout=0.5) as client:
            assert [m.name for m in client.models()] == sorted(NAMES)
            with pytest.raises(GenserveError) as info:
                client.generate("mnist-vae", 1)  # waits 2 s in the batcher: past the 0.5 s deadline
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        server.stop()


# --- command line ---------------------------------------------------------------------------------
def test_cli_commands_write_pictures_and_arrays(server: RunningServer, tmp_path: Path, digits: np.ndarray, capsys) -> None:
    def cli(*args: str) -> str:
        assert cli_main(["--address", server.address, *args]) == 0
        return capsys.readouterr().out

    assert "mnist-vae\tvae\tversion 1" in cli("models")
    assert '"kind": "vae"' in cli("info", "mnist-vae")
    out = cli("generate", "mnist-vae", "-n", "12", "--seed", "1", "-o", str(tmp_path / "samples.png"),
              "--latents-out", str(tmp_path / "z.npy"))
    assert "12 images from mnist-vae version 1" in out
    assert Image.open(tmp_path / "samples.png").size[0] > 100 and np.load(tmp_path / "z.npy").shape == (12, 16)
    cli("--png", "generate", "mnist-gan", "-n", "3", "-o", str(tmp_path / "samples.npy"))
    assert np.load(tmp_path / "samples.npy").shape == (3, 1, 28, 28)
    cli("encode", "mnist-vae", "--dataset", "mnist-5k", "--limit", "40", "-o", str(tmp_path / "latents.npy"),
        "--plot", str(tmp_path / "latents.png"))
    assert np.load(tmp_path / "latents.npy").shape == (40, 16) and (tmp_path / "latents.png").stat().st_size > 1000
    pngs = []
    for i, digit in enumerate(digits[:3]):
        pngs.append(tmp_path / f"digit{i}.png")
        Image.fromarray(digit[0]).convert("RGB").save(pngs[-1])  # converted back to grayscale for the model
    cli("reconstruct", "mnist-ae", "--images", *map(str, pngs), "-o", str(tmp_path / "reconstructions.png"))
    assert (tmp_path / "reconstructions.png").is_file()
    assert "8 denoised images" in cli("denoise", "mnist-dae", "--dataset", "mnist-5k", "--limit", "8", "--noise", "0.4",
                                      "-o", str(tmp_path / "denoised.png"))
    cli("interpolate", "mnist-vae", "--dataset", "mnist-5k", "--offset", "2", "--steps", "6", "--spherical",
        "-o", str(tmp_path / "path.npy"))
    assert np.load(tmp_path / "path.npy").shape == (6, 1, 28, 28)
    cli("interpolate", "mnist-gan", "--seed", "4", "--steps", "4", "-o", str(tmp_path / "gan-path.png"))
    assert (tmp_path / "gan-path.png").is_file()


def test_cli_errors(server: RunningServer, capsys) -> None:
    assert cli_main(["--address", server.address, "generate", "no-such-model", "-o", "/dev/null"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli_main(["--address", server.address, "encode", "mnist-vae", "--dataset", "mnist-5k", "--offset", "99999"]) == 2
    assert "past the end" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "genserve-client"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "genserve.clients.cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60, env=environment_for_subprocess())
    assert result.returncode == 0 and "generate" in result.stdout
