"""Quality labels (measured on the exported ONNX graphs through onnxruntime) and the publishing gate.

Tiny sample counts (QUALITY) keep these fast; the numbers are not quality claims, only the behaviour is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rigged_graph
from onnx_speed import fast_onnx_exports
from test_export import make_run

from genserve.export import Manifest, ManifestError, Repository
from genserve.export.cli import main as cli_main
from genserve.export.gate import GateConfig, QualityGateError, parse_tolerance
from genserve.export.labels import labels_of
from genserve.export.pipeline import export_run, quality_meter
from genserve.export.quality import QualityConfig, QualityMeter
from genserve.export.sample_stats import diversity, nonfinite_count, saturated_count
from genserve.training.checkpoint import load_trained_model
from genserve.training.config import TrainConfig
from genserve.training.data.types import ImageDataset
from genserve.training.evaluation.reconstruction import per_image_mse, psnr_db

QUALITY = QualityConfig(samples=64, nll_k=2)
SHAPE = (1, 28, 28)


@pytest.fixture(scope="module", autouse=True)
def _fast_exports():
    with fast_onnx_exports():
        yield


def label(manifest: Manifest, metric: str) -> dict:
    found = [entry for entry in manifest.quality["labels"] if entry["metric"] == metric]
    assert found, f"no {metric} label in {[e['metric'] for e in manifest.quality['labels']]}"
    return found[0]


def test_sample_statistics() -> None:
    images = np.zeros((8, 1, 2, 2), np.float32)
    assert diversity(images) == 0.0  # collapsed: every sample alike
    images[::2] = 1.0
    assert diversity(images) == pytest.approx(1.0)  # every consecutive pair differs by 1 everywhere
    images[:4] = 1.0
    assert diversity(images) == pytest.approx(3 / 7)  # pairs (4, 5), (5, 6), (6, 7) differ
    images[0, 0, 0, 0] = np.nan
    assert nonfinite_count(images) == 1 and diversity(images) is None
    assert saturated_count(np.array([0.0, 0.001, 0.5, 0.999, 1.0, np.nan])) == 4
    assert diversity(images[:1]) is None


def test_labels_are_measured_on_the_onnx_graph_not_the_torch_model(tmp_path: Path) -> None:
    run = make_run(tmp_path / "ae", "ae", SHAPE)
    result = export_run(run, tmp_path / "repo", max_batch=2, quality=QUALITY)
    repo = Repository(tmp_path / "repo")
    manifest = repo.verify(result.name, result.version)
    psnr = label(manifest, "test_psnr_db")
    assert psnr["samples"] == 64 and psnr["reference"] == {"dataset": "mnist-5k", "split": "test", "images": 64}
    assert [g["file"] for g in psnr["graphs"]] == ["encoder.onnx", "decoder.onnx"]
    for g in psnr["graphs"]:  # the label names the published bytes
        assert g["sha256"] == manifest.files[g["file"]].sha256
    assert manifest.quality["measured_with"]["runtime"] == "onnxruntime"
    assert manifest.quality["config"]["samples"] == 64

    # The torch model agrees with the honest graph (parity) ...
    model, config, _, _ = load_trained_model(run)
    meter, reason = quality_meter(model, config, QUALITY, ["encoder", "decoder"])
    assert reason is None
    images = meter.dataset.test_images[:64].float() / 255
    with torch.no_grad():
        torch_psnr = psnr_db(per_image_mse(model.reconstruct(images), images)).mean().item()
    assert psnr["value"] == pytest.approx(torch_psnr, abs=1e-3)
    # ... and a rigged graph with the same model beside it gets its own, different label.
    encoder = repo.read_part(manifest, "encoder")
    damaged = rigged_graph(repo.read_part(manifest, "decoder"))
    measured = meter.measure({"encoder": ("encoder.onnx", encoder), "decoder": ("decoder.onnx", damaged)})
    rigged_label = labels_of(measured)[0]
    assert abs(rigged_label.value - torch_psnr) > 0.5
    assert rigged_label.graphs[1].sha256 == hashlib.sha256(damaged).hexdigest()
    assert measured["sample_health"]["parts"]["decoder"]["diversity"] != manifest.quality["sample_health"]["parts"]["decoder"]["diversity"]


def test_generator_labels_name_the_feature_extractor_and_round_trip(tmp_path: Path, mnist_5k) -> None:
    run = make_run(tmp_path / "gan", "gan", SHAPE)
    result = export_run(run, tmp_path / "repo", max_batch=2, quality=QUALITY)
    manifest = result.manifest
    fid, coverage = label(manifest, "fid_domain"), label(manifest, "class_coverage")
    assert fid["better"] == "lower" and coverage["better"] == "higher" and coverage["unit"] == "nats"
    extractor = fid["feature_extractor"]
    assert extractor["name"] == "domain_classifier" and len(extractor["sha256"]) == 64 and extractor["version"] >= 1
    assert fid["graphs"] == [{"part": "generator", "file": "generator.onnx",
                              "sha256": manifest.files["generator.onnx"].sha256}]
    assert sum(coverage["details"]["shares"].values()) == pytest.approx(1.0)
    assert set(manifest.quality["sample_health"]["parts"]) == {"generator"}
    # round trip, and a label that does not describe a published file is refused
    assert Manifest.from_json(manifest.to_json()) == manifest
    tampered = json.loads(manifest.to_json())
    tampered["quality"]["labels"][0]["graphs"][0]["sha256"] = "0" * 64
    with pytest.raises(ManifestError, match="not a file of this version"):
        Manifest.from_dict(tampered)
    tampered = json.loads(manifest.to_json())
    tampered["quality"]["labels"][0]["settings"]["samples"] = 1
    with pytest.raises(ManifestError, match="protocol"):
        Manifest.from_dict(tampered)
    # without class labels there is no domain classifier: no sample labels, and the record says why
    model, config, _, _ = load_trained_model(run)
    full = QualityMeter(model, config, mnist_5k, QUALITY).dataset
    unlabelled = ImageDataset(full.name, full.train_images, None, full.test_images, None, None)
    graph = Repository(tmp_path / "repo").read_part(manifest, "generator")
    record = QualityMeter(model, config, unlabelled, QUALITY).measure({"generator": ("generator.onnx", graph)})
    assert record["labels"] == [] and "no class labels" in record["notes"][0]
    assert record["sample_health"]["parts"]["generator"] == manifest.quality["sample_health"]["parts"]["generator"]


def test_gate_refuses_a_worse_version_accepts_a_better_one_and_records_force(
    tmp_path: Path, mnist_5k, capsys: pytest.CaptureFixture[str]
) -> None:
    from genserve.training.trainer import train

    config = TrainConfig(model="dense-vae", dataset="mnist-5k", out=str(tmp_path / "trained"), epochs=1, limit=512,
                         batch_size=64, nll_k=2, nll_images=8, device="cpu")
    trained = train(config, dataset=mnist_5k)
    untrained = make_run(tmp_path / "untrained", "dense-vae", SHAPE)  # the same recipe, never trained
    repo = tmp_path / "repo"
    gate = ["--repository", str(repo), "--name", "digits", "--max-batch", "2", "--quality-samples", "64",
            "--quality-nll-k", "2", "--gate", "-q"]
    assert cli_main([str(trained), *gate]) == 0
    assert "no published version to compare with" in capsys.readouterr().err

    assert cli_main([str(untrained), *gate]) == 3  # refused: nothing published
    err = capsys.readouterr().err
    assert "quality gate refused digits version 2" in err and "test_elbo_nats" in err and "worse" in err
    assert "--force" in err and "--gate-tolerance test_elbo_nats=" in err
    assert Repository(repo).versions("digits") == [1]

    assert cli_main([str(untrained), *gate, "--force"]) == 0
    assert "forced past a regression" in capsys.readouterr().err
    forced = Repository(repo).verify("digits", 2).quality["gate"]
    assert forced["forced"] is True and forced["against_version"] == 1
    assert any(not c["passed"] and c["metric"] == "test_elbo_nats" for c in forced["comparisons"])

    assert cli_main([str(trained), *gate]) == 0  # better than version 2: accepted
    accepted = Repository(repo).verify("digits", 3).quality["gate"]
    assert accepted["forced"] is False and accepted["against_version"] == 2
    assert accepted["comparisons"] and all(c["passed"] for c in accepted["comparisons"])

    # A different protocol (sample count) is not comparable: published with a warning.
    assert cli_main([str(untrained), *gate, "--quality-samples", "32"]) == 0  # the last --quality-samples counts
    assert "no label comparable" in capsys.readouterr().err


def test_gate_in_process_and_tolerances(tmp_path: Path) -> None:
    run = make_run(tmp_path / "ae", "ae", SHAPE)
    repo = Repository(tmp_path / "repo")
    export_run(run, repo, name="digits", max_batch=1, quality=QUALITY)
    # the same checkpoint measures the same: a tolerance of zero passes
    again = export_run(run, repo, name="digits", max_batch=1, quality=QUALITY,
                       gate=GateConfig(enabled=True, tolerances={"test_psnr_db": 0.0}))
    assert again.manifest.quality["gate"]["comparisons"][0]["worse_by"] == 0.0
    assert parse_tolerance("fid_domain=0.25") == ("fid_domain", 0.25)
    for bad in ("fid_domain", "=0.1", "fid_domain=-1", "fid_domain=x"):
        with pytest.raises(ValueError, match="METRIC=FRACTION"):
            parse_tolerance(bad)
    assert issubclass(QualityGateError, Exception)
    none = export_run(run, repo, name="digits", max_batch=1, quality=QualityConfig(samples=0))
    assert none.manifest.quality["labels"] == [] and any("--quality-samples 0" in w for w in none.warnings)
