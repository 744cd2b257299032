"""A real server (real gRPC, real /metrics over HTTP) shows each version's quality labels on every API
and watches what its image graphs put out: a graph rigged to output NaN raises the non-finite series,
an all-white one the saturated series, a constant one collapses the diversity figure."""

from __future__ import annotations

import dataclasses
import json
import shutil
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import RunningServer, copy_repository, publish_copy, rigged_graph, server_config

from genserve.clients.client import GenserveClient
from genserve.export import Manifest, Repository
from genserve.export.labels import labels_of
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc, grpc_service_pb2_grpc
from genserve.serving.protos import grpc_service_pb2 as ip

LABELLED = ["mnist-gan", "mnist-vae", "mnist-dae"]  # one model per metric family
NAN, WHITE, FLAT = "mnist-gan-nan", "mnist-gan-white", "mnist-gan-flat"
PIXELS = 28 * 28


def publish_rigged(repo: Repository, source: str, name: str, scale: float, offset: float) -> None:
    """mnist-gan's version 1 again as `name`, its generator's output replaced by output * scale + offset.
    Its labels described the honest graph, so they go (a reader would refuse them: the sha256 differs)."""
    manifest = repo.load_manifest(source, 1)
    version_dir = repo.version_dir(source, 1)

    def build(staging: Path, version: int) -> Manifest:
        for file in manifest.files:
            shutil.copyfile(version_dir / file, staging / file)
        generator = staging / manifest.file_for("generator")
        generator.write_bytes(rigged_graph(generator.read_bytes(), scale, offset))
        return dataclasses.replace(manifest, name=name, version=version, files={},
                                   quality={**manifest.quality, "labels": []})

    repo.publish(name, build)


@pytest.fixture(scope="module")
def server(golden_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = copy_repository(golden_repository, tmp_path_factory.mktemp("quality") / "repo", LABELLED)
    publish_rigged(repo, "mnist-gan", NAN, float("nan"), 0.0)
    publish_rigged(repo, "mnist-gan", WHITE, 0.0, 1.0)
    publish_rigged(repo, "mnist-gan", FLAT, 0.0, 0.5)
    running = RunningServer(server_config(repo.root)).start()
    yield running
    running.stop()


def scrape(server: RunningServer, name: str, **labels: str) -> float | None:
    """The sum of a series' samples whose labels include `labels`, read from /metrics (None: absent)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    total = None
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total = (total or 0.0) + float(value)
    return total


@pytest.mark.parametrize("name", LABELLED)
def test_labels_reach_every_api(server: RunningServer, channel, name: str) -> None:
    manifest = Repository(server.config.repository).load_manifest(name, 1)
    labels = labels_of(manifest.quality)
    assert labels, f"{name} version 1 has no quality labels"
    genserve = genserve_pb2_grpc.GenserveStub(channel)
    response = genserve.GetModel(pb.GetModelRequest(model=name))
    assert [(q.metric, q.value, q.better, q.protocol, q.samples) for q in response.quality] == [
        (label.metric, label.value, label.better, label.protocol, label.samples) for label in labels
    ]
    for message, label in zip(response.quality, labels, strict=True):
        assert [(g.part, g.file, g.sha256) for g in message.graphs] == [(g.part, g.file, g.sha256) for g in label.graphs]
        assert message.reference_split == "test" and json.loads(message.label_json) == label.to_dict()
        assert message.feature_extractor_sha256 == ((label.feature_extractor or {}).get("sha256") or "")
    assert not response.quality_gate_forced
    with GenserveClient(server.address, timeout=30) as client:
        assert client.model(name).quality == {label.metric: label.value for label in labels}
    summary = next(m for m in genserve.ListModels(pb.ListModelsRequest()).models if m.name == name)
    assert [(q.metric, q.value) for q in summary.quality] == [(label.metric, label.value) for label in labels]

    inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    for part in manifest.parts:
        meta = inference.ModelMetadata(ip.ModelMetadataRequest(name=f"{name}.{part}"))
        config = inference.ModelConfig(ip.ModelConfigRequest(name=f"{name}.{part}")).config
        for label in labels:
            assert meta.parameters[f"quality.{label.metric}"].double_param == label.value
            assert float(config.parameters[f"quality.{label.metric}"].string_value) == label.value
        assert json.loads(meta.parameters["quality_json"].string_param) == [label.to_dict() for label in labels]

    for label in labels:
        assert scrape(server, "genserve_model_quality", model=name, version="1", metric=label.metric) == pytest.approx(label.value)


def test_a_graph_that_outputs_nan_raises_the_nonfinite_series(server: RunningServer, channel) -> None:
    genserve = genserve_pb2_grpc.GenserveStub(channel)
    before = scrape(server, "genserve_sample_nonfinite_values_total", model=NAN, part="generator")
    assert before == 0.0  # the series exists from the start, at zero
    with pytest.raises(grpc.RpcError) as error:
        genserve.Generate(pb.GenerateRequest(model=NAN, count=4, seed=1))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in error.value.details()
    nonfinite = scrape(server, "genserve_sample_nonfinite_values_total", model=NAN, version="1", part="generator")
    assert nonfinite == scrape(server, "genserve_sample_values_total", model=NAN, part="generator") == 4 * PIXELS

    genserve.Generate(pb.GenerateRequest(model="mnist-gan", count=4, seed=1))  # the honest graph: none
    assert scrape(server, "genserve_sample_nonfinite_values_total", model="mnist-gan", part="generator") == 0.0
    assert scrape(server, "genserve_sample_values_total", model="mnist-gan", part="generator") >= 4 * PIXELS


def test_saturation_and_diversity_series(server: RunningServer, channel) -> None:
    genserve = genserve_pb2_grpc.GenserveStub(channel)
    for name in (WHITE, FLAT, "mnist-gan"):
        genserve.Generate(pb.GenerateRequest(model=name, count=8, seed=2))
    assert scrape(server, "genserve_sample_saturated_values_total", model=WHITE, part="generator") == 8 * PIXELS
    assert scrape(server, "genserve_sample_saturated_values_total", model=FLAT, part="generator") == 0.0
    # every sample alike: diversity 0 whatever the reference; the honest generator's is positive
    assert scrape(server, "genserve_sample_diversity_ratio_count", model=FLAT, part="generator") >= 1
    assert scrape(server, "genserve_sample_diversity_ratio_sum", model=FLAT, part="generator") == 0.0
    honest = scrape(server, "genserve_sample_diversity_ratio_sum", model="mnist-gan", part="generator")
    assert honest is not None and np.isfinite(honest) and honest > 0
    # encoders output latents, not images: no health series for them
    genserve.Encode(pb.EncodeRequest(model="mnist-vae", images=pb.Images(tensor=pb.Tensor(
        dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 1, 28, 28], data=np.zeros((1, 1, 28, 28), np.float32).tobytes()))))
    assert scrape(server, "genserve_sample_values_total", model="mnist-vae", part="encoder") is None


def test_a_retired_version_leaves_the_quality_gauge(server: RunningServer) -> None:
    repo = Repository(server.config.repository)
    metric = labels_of(repo.load_manifest("mnist-dae", 1).quality)[0].metric
    assert publish_copy(repo, "mnist-dae", 1) == 2  # the same graphs: the labels still describe them
    server.run(server.server.manager.poll_once())  # version 2 loads, version 1 retires (one loaded)
    assert scrape(server, "genserve_model_quality", model="mnist-dae", version="2", metric=metric) is not None
    assert scrape(server, "genserve_model_quality", model="mnist-dae", version="1", metric=metric) is None
