"""The GPU suite (benchmarks/gpu_suite.py) before any device runs it: its dry run on the CPU writes every part
with finite figures, and its carried parts reassemble into the exact files the loaders read."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_suite, gpu_suite_carry
from genserve.training.data.registry import load_dataset

REPO = Path(__file__).resolve().parents[1]


def numbers(value, path: str = ""):
    """Every int and float inside a JSON value, with where it is."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers(item, f"{path}[{i}]")


@pytest.mark.slow
def test_dry_run_writes_every_part_with_finite_figures(tmp_path: Path):
    out, stage = tmp_path / "out", tmp_path / "stage"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "run", "--dry-run", "--out", str(out), "--stage-dir", str(stage)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / gpu_suite.RESULTS).read_text())
    assert (out / gpu_suite.LOG).read_text().count("part ") >= 2 * len(gpu_suite.PARTS)
    assert results["dry_run"] is True
    parts = results["parts"]
    assert set(parts) == set(gpu_suite.PARTS)
    for name, entry in parts.items():
        assert entry["status"] in ("ok", "skipped"), (name, entry.get("error"))
        assert entry["seconds"] >= 0 and entry["budget_s"] > 0
    bad = [(where, v) for where, v in numbers(results) if not math.isfinite(v)]
    assert not bad, bad

    kinds = gpu_suite.registry_kinds()
    speed = parts["speed"]["results"]
    assert {(r["kind"], r["mode"]) for r in speed["rows"]} == {(k, m) for k in kinds for m, _, _ in gpu_suite.MODES}
    assert all(r["epoch_s"] > 0 and r["steps"] >= 1 for r in speed["rows"])

    vae = parts["vae"]["results"]
    assert vae["final"]["nll_k"] == gpu_suite.DRY_RUN.nll_k and vae["final"]["binarized"] is True
    assert vae["final"]["test_nll_nats"] > 0 and vae["epochs"] >= 1

    runs = parts["dcgan"]["results"]["runs"]
    assert runs and all(run["final"]["fid_inception"] > 0 and run["final"]["fid_samples"] == gpu_suite.DRY_RUN.fid_samples
                        for run in runs.values())

    generation = parts["generation"]["results"]
    cells = {(r["kind"], r["mode"], r["samples"]) for r in generation["rows"]}
    assert ("vae", "compile", max(gpu_suite.DRY_RUN.generation_batches)) in cells
    assert all(r["samples_per_second"] > 0 for r in generation["rows"])
    assert "unverified" in parts["serving"]["results"]["reason"]
    assert (out / "vae-mnist-5k-samples.png").is_file()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_parts_reassemble_into_loadable_data(shared_data: Path, tmp_path: Path):
    files = gpu_suite_carry.dataset_files(shared_data, ("mnist",))
    folders = gpu_suite_carry.pack([files], tmp_path / "carry", part_mib=4)  # 11 MiB of MNIST: several parts
    assert len(folders) >= 3
    assert all(sum(p.stat().st_size for p in f.iterdir()) <= 4 * gpu_suite_carry.MIB + 65536 for f in folders)
    stage = tmp_path / "stage"
    first = gpu_suite_carry.stage(folders[0], stage)
    assert first["waiting"], "the big training-image file cannot be whole after the first part"
    for folder in folders[1:]:
        status = gpu_suite_carry.stage(folder, stage)
    assert not status["waiting"] and len(status["complete"]) == len(files)
    for relative, source in files.items():
        assert sha256(stage / "root" / relative) == sha256(source)
    assert len(load_dataset("mnist", stage / "root" / "data").train_images) == 60_000


def test_damaged_part_is_refused(shared_data: Path, tmp_path: Path):
    files = gpu_suite_carry.dataset_files(shared_data, ("mnist",))
    [folder] = gpu_suite_carry.pack([files], tmp_path / "carry", part_mib=20)
    chunk = sorted(folder.glob("chunk-*.bin"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(gpu_suite_carry.CarryError, match="arrived damaged"):
        gpu_suite_carry.stage(folder, tmp_path / "stage")


def test_parts_too_large_for_a_call_are_refused(shared_data: Path, tmp_path: Path):
    files = gpu_suite_carry.dataset_files(shared_data, ("mnist",))
    with pytest.raises(gpu_suite_carry.CarryError, match="--part-mib"):
        gpu_suite_carry.pack([files], tmp_path / "carry", part_mib=64)


def test_unknown_part_is_a_clear_error(capsys: pytest.CaptureFixture[str]):
    assert gpu_suite.main(["run", "--parts", "vae,warp", "--dry-run", "--out", "/nonexistent/x"]) == 2
    assert "unknown parts ['warp']" in capsys.readouterr().err
