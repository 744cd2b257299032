"""Export: every registered model kind at every image shape -> checked ONNX graphs in the repository.

Untrained models are enough for parity (an untrained network is as hard to get right as a trained
one). Exports are slow-ish (~2 s a part), so each (kind, shape) is exported once per module.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx_speed import fast_onnx_exports
from torch import nn

from genserve.export import InvalidNameError, Repository, default_model_name
from genserve.export.cli import main as cli_main
from genserve.export.files import json_safe
from genserve.export.onnx_export import ExportError, describe_part, export_part
from genserve.export.parity import (
    CPU,
    CUDA,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    ParityError,
    check_parity,
    reference_outputs,
)
from genserve.export.pipeline import ExportResult, export_part_checked, export_run
from genserve.export.quality import QualityConfig
from genserve.training.checkpoint import CheckpointError, load_trained_model, save_checkpoint
from genserve.training.config import TrainConfig
from genserve.training.models import GenerativeModel, build_model, model_kinds

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 64, 64)]
DATASETS = {(1, 28, 28): "mnist-5k", (3, 32, 32): "cifar10", (1, 64, 64): "textures-64"}
MAX_BATCH = 8  # parity at 1, 7 and 8 here; the CLI test runs the default 64
FP16_SHAPE = (1, 28, 28)
FP16_KINDS = ("vae", "ae", "dcgan")  # fp16 variants at FP16_SHAPE; between them they use every op the kinds use
EXPECTED_IO = {
    "decoder": (["latents"], ["images"]),
    "generator": (["noise"], ["images"]),
    "denoiser": (["noisy_images"], ["images"]),
}
REPO_ROOT = Path(__file__).resolve().parents[1]


def registered_kinds() -> list[str]:
    return list(model_kinds(presets=False))


KINDS = registered_kinds()


def shape_id(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


def make_run(run_dir: Path, kind: str, shape: tuple[int, int, int], *, best: bool = False) -> Path:
    """A run directory as genserve-train writes it, with an untrained model's checkpoint."""
    dataset = DATASETS[shape]
    config = TrainConfig(model=kind, dataset=dataset, out=str(run_dir), epochs=1)
    torch.manual_seed(0)
    model = build_model(kind, shape, config, num_classes=10)
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.json")
    info = {
        "model": kind,
        "dataset": dataset,
        "image_shape": list(shape),
        "num_classes": 10,
        "class_names": [f"class-{i}" for i in range(10)],
        "value_range": [0.0, 1.0],
        "git_commit": "0123456789abcdef0123456789abcdef01234567",
    }
    (run_dir / "run.json").write_text(json.dumps(info))
    metrics = {"epochs": [{"epoch": 1, "test_loss": 123.5}], "final": {"test_loss": 123.5, "fid": float("nan")}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    save_checkpoint(run_dir, model, model.configure_optimizers(), {}, {"epoch": 1, "step": 3}, is_best=best)
    return run_dir


class Exported:
    def __init__(self, run_dir: Path, result: ExportResult, repo: Repository):
        self.run_dir = run_dir
        self.result = result
        self.repo = repo
        self.model: GenerativeModel = load_trained_model(run_dir)[0]


@pytest.fixture(scope="module", autouse=True)
def _build_onnx_registry_once():
    with fast_onnx_exports():
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def exported(workspace: Path):
    """exported(kind, shape) -> Exported, each exported once per module."""
    cache: dict[tuple[str, tuple[int, int, int]], Exported] = {}
    repo = Repository(workspace / "repo", create=True)

    def get(kind: str, shape: tuple[int, int, int]) -> Exported:
        if (kind, shape) not in cache:
            run = make_run(workspace / "runs" / f"{kind}-{shape_id(shape)}", kind, shape)
            fp16 = shape == FP16_SHAPE and kind in FP16_KINDS
            # Parity and format here; labels (tests/test_quality.py) would train cifar10's domain classifier.
            result = export_run(run, repo, max_batch=MAX_BATCH, fp16=fp16, quality=QualityConfig(samples=0))
            cache[kind, shape] = Exported(run, result, repo)
        return cache[kind, shape]

    return get


def expected_io(kind: str, part: str) -> tuple[list[str], list[str]]:
    if part == "encoder":
        return ["images"], (["mean", "logvar"] if kind in ("vae", "dense-vae") else ["codes"])
    return EXPECTED_IO[part]


def model_prior(model: GenerativeModel) -> dict | None:
    try:
        return model.prior_spec()
    except NotImplementedError:
        return None


def make_input(spec, batch: int, seed: int = 5) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *spec.shape[1:])
    tensor = torch.rand(shape, generator=g) if spec.value_range == (0.0, 1.0) else torch.randn(shape, generator=g)
    return tensor.numpy()


# --- every kind at every shape --------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("kind", KINDS)
def test_manifest_describes_the_export(exported, kind: str, shape: tuple[int, int, int]) -> None:
    e = exported(kind, shape)
    model, result = e.model, e.result
    assert result.name == default_model_name(kind, DATASETS[shape])
    assert result.path == e.repo.root / result.name / str(result.version)
    m = e.repo.verify(result.name, result.version)
    assert m == result.manifest and m.format_version == 1
    assert (m.kind, m.image_shape, m.dataset) == (kind, shape, DATASETS[shape])
    assert m.class_names == [f"class-{i}" for i in range(10)]
    assert m.latent_dim == model.latent_dim and m.prior == model_prior(model)
    assert set(m.parts) == set(model.servable_parts())
    variants = ["fp32", "fp16"] if shape == FP16_SHAPE and kind in FP16_KINDS else ["fp32"]
    for part, spec in m.parts.items():
        inputs, outputs = expected_io(kind, part)
        assert [t.name for t in spec.inputs] == inputs and [t.name for t in spec.outputs] == outputs
        for t in (*spec.inputs, *spec.outputs):
            assert t.dtype == "float32" and t.shape[0] == "batch"
            if t.name.endswith("images"):
                assert t.shape[1:] == shape and t.value_range == (0.0, 1.0)
            else:
                assert t.shape[1:] == (model.latent_dim,) and t.value_range is None
        assert sorted(spec.variants) == sorted(variants)
        assert spec.variants["fp32"].file == f"{part}.onnx"
    assert set(m.files) == {v.file for s in m.parts.values() for v in s.variants.values()}

    training = m.training
    assert training["config"] == TrainConfig.from_dict(json.loads((e.run_dir / "config.json").read_text())).to_dict()
    assert training["final_metrics"] == {"test_loss": 123.5, "fid": None}  # NaN becomes null: strict JSON
    assert training["run_dir"] == str(e.run_dir.resolve()) and training["checkpoint"] == "checkpoints/epoch-000001"
    assert training["run_git_commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert training["epoch"] == 1
    versions = m.exporter["versions"]
    assert all(versions[k] for k in ("torch", "onnx", "onnxruntime", "onnxscript", "genserve"))
    assert "git_commit" in m.exporter and m.exporter["opset"] >= 18
    datetime.fromisoformat(m.created_at)

    parity = m.parity
    assert parity["batches"] == [1, 7, MAX_BATCH]
    assert parity["tolerances"]["fp32"] == {"atol": FP32_TOLERANCE.atol, "rtol": FP32_TOLERANCE.rtol}
    seen = {(r["part"], r["variant"], r["provider"], r["batch"], r["output"]) for r in parity["results"]}
    for part, spec in m.parts.items():
        for variant in variants:
            for batch in (1, 7, MAX_BATCH):
                for t in spec.outputs:
                    assert (part, variant, CPU, batch, t.name) in seen  # fp16 runs on this CPU build
    for r in parity["results"]:
        tol = FP32_TOLERANCE if r["variant"] == "fp32" else FP16_TOLERANCE
        assert r["passed"] and (r["atol"], r["rtol"]) == (tol.atol, tol.rtol)
    assert parity["skipped"] == [] or CUDA in ort.get_available_providers()


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("kind", KINDS)
def test_graphs_load_and_run_in_onnxruntime(exported, kind: str, shape: tuple[int, int, int]) -> None:
    e = exported(kind, shape)
    m = e.result.manifest
    parts = e.model.servable_parts()
    for part, spec in m.parts.items():
        module = parts[part].eval()
        for variant in spec.variants:
            path = e.repo.part_path(m.name, m.version, part, variant)
            graph = onnx.load(path)
            onnx.checker.check_model(graph, full_check=True)
            assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 18
            meta = {p.key: p.value for p in graph.metadata_props}
            assert meta["genserve.model"] == m.name and meta["genserve.kind"] == kind
            assert meta["genserve.part"] == part and meta["genserve.variant"] == variant
            assert json.loads(meta["genserve.version"]) == m.version
            assert json.loads(meta["genserve.image_shape"]) == list(shape)
            assert json.loads(meta["genserve.latent_dim"]) == m.latent_dim
            assert json.loads(meta["genserve.prior"]) == m.prior
            for value in (*graph.graph.input, *graph.graph.output):
                assert value.type.tensor_type.shape.dim[0].dim_param == "batch"

            session = ort.InferenceSession(str(path), providers=[CPU])
            assert [i.name for i in session.get_inputs()] == [t.name for t in spec.inputs]
            assert [o.name for o in session.get_outputs()] == [t.name for t in spec.outputs]
            tol = FP32_TOLERANCE if variant == "fp32" else FP16_TOLERANCE
            for batch in (1, 5):
                x = make_input(spec.inputs[0], batch)
                outputs = session.run(None, {spec.inputs[0].name: x})
                with torch.no_grad():
                    expected = module(torch.from_numpy(x))
                expected = expected if isinstance(expected, tuple) else (expected,)
                for t, out, ref in zip(spec.outputs, outputs, expected, strict=True):
                    assert out.dtype == np.float32 and out.shape == (batch, *t.shape[1:])
                    np.testing.assert_allclose(out, ref.numpy(), atol=tol.atol, rtol=tol.rtol)
                    if t.value_range:
                        assert out.min() >= 0.0 and out.max() <= 1.0


def test_reexport_creates_next_version_and_keep(exported) -> None:
    kind = next((k for k in ("gan", "dae") if k in KINDS), KINDS[0])  # one part: the cheapest to export
    first = exported(kind, SHAPES[0])
    repo, name = first.repo, first.result.name
    again = export_run(first.run_dir, repo, max_batch=1)
    assert again.version == first.result.version + 1 and repo.latest(name) == again.version
    assert again.manifest.parity["batches"] == [1]
    repo.mark_serving(name, [first.result.version], holder="test-server")
    third = export_run(first.run_dir, repo, max_batch=1, keep=1)
    assert third.removed == [again.version]  # the served first version stays
    assert repo.versions(name) == [first.result.version, third.version]
    repo.clear_serving(name, "test-server")


def test_export_of_a_trained_run(tmp_path: Path, mnist_5k) -> None:
    """The real trainer's run directory (one short epoch) exports as its best checkpoint."""
    from genserve.training.trainer import train

    config = TrainConfig(model="dae", dataset="mnist-5k", out=str(tmp_path / "run"), epochs=1, limit=128, device="cpu")
    run = train(config, dataset=mnist_5k)
    result = export_run(run, tmp_path / "repo", checkpoint="best", max_batch=4)
    manifest = Repository(tmp_path / "repo").verify("mnist-5k-dae", 1)
    assert result.manifest == manifest and manifest.training["checkpoint"] == "checkpoints/best"
    metrics = json.loads((run / "metrics.json").read_text())
    assert manifest.training["final_metrics"] == json_safe(metrics["final"])
    assert manifest.class_names == mnist_5k.class_names and manifest.image_shape == (1, 28, 28)
    assert manifest.training["run_git_commit"] == json.loads((run / "run.json").read_text())["git_commit"]


# --- failures are caught and explained ------------------------------------------------------------
class Unbounded(nn.Module):
    """A decoder without the final sigmoid: images would leave [0, 1]."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 28 * 28)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.linear(z) * 10).view(z.shape[0], 1, 28, 28)


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 28 * 28)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(z)).view(2, 1, 28, 28)  # hard-codes the example batch


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 28 * 28)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(z)).view(-1, 1, 28, 28)


def _check(module: nn.Module):
    return export_part_checked(
        "decoder", module, (1, 28, 28), 4, batches=[1, 7], providers=[CPU], fp16=False,
        tolerance=FP32_TOLERANCE, fp16_tolerance=FP16_TOLERANCE, opset=18,
    )


def test_images_outside_unit_range_are_refused() -> None:
    with pytest.raises(ParityError, match=r"images must lie in \[0.0, 1.0\].*sigmoid"):
        _check(Unbounded())


def test_hard_coded_batch_is_refused() -> None:
    with pytest.raises(ExportError, match="fails in PyTorch at batch 1.*must accept any batch size"):
        _check(FixedBatch())
    # Were it to run at every batch in PyTorch, the graph's fixed batch axis would still be caught.
    signature = describe_part("decoder", FixedBatch(), (1, 28, 28), 4)
    with pytest.raises(ExportError, match="batch axis .* fixed to 2.*must not hard-code the batch size"):
        export_part(FixedBatch(), signature)


@pytest.fixture(scope="module")
def small_graph() -> tuple[nn.Module, object, bytes]:
    torch.manual_seed(0)
    module = Decoder().eval()
    signature = describe_part("decoder", module, (1, 28, 28), 4)
    return module, signature, export_part(module, signature).SerializeToString()


def test_parity_failure_names_part_batch_difference_and_tolerance(small_graph) -> None:
    module, signature, graph = small_graph
    references = reference_outputs(module, signature, [1, 7])
    x, outputs = references[7]
    references[7] = (x, [outputs[0] + 0.01])  # as if the graph computed something else
    with pytest.raises(ParityError) as info:
        check_parity(graph, signature, references, variant="fp32", tolerance=FP32_TOLERANCE, providers=[CPU])
    message = str(info.value)
    for needle in ("part 'decoder'", "batch 7", "output 'images'", "max abs difference 0.01", "0.0001", "0.001"):
        assert needle in message, (needle, message)


def test_cuda_falling_back_to_cpu_is_recorded_not_trusted(small_graph) -> None:
    module, signature, graph = small_graph
    references = reference_outputs(module, signature, [1])
    results, skipped = check_parity(
        graph, signature, references, variant="fp32", tolerance=FP32_TOLERANCE, providers=[CPU, CUDA]
    )
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the fallback path is not exercised")
    assert {r.provider for r in results} == {CPU}
    assert [s.provider for s in skipped] == [CUDA] and "fell back" in skipped[0].reason


def test_bad_arguments_fail_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_run(tmp_path / "nope", repo)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a genserve run directory"):
        export_run(empty, repo)
    with pytest.raises(InvalidNameError, match="invalid model name"):
        export_run(empty, repo, name="../escape")
    with pytest.raises(ValueError, match="max batch"):
        export_run(empty, repo, max_batch=0)
    assert cli_main([str(empty), "--repository", str(repo)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("genserve-export: error:") and "config.json is missing" in err
    with pytest.raises(SystemExit) as info:
        cli_main([str(empty), "--repository", str(repo), "--keep", "0"])
    assert info.value.code == 2
    assert not repo.exists() or Repository(repo).models() == []


# --- the command, killed at random moments ------------------------------------------------------------
def _command() -> list[str]:
    script = Path(sys.executable).parent / "genserve-export"
    return [str(script)] if script.exists() else [sys.executable, "-m", "genserve.export.cli"]


def _all_visible_versions_verify(repo: Repository) -> None:
    for name in repo.models():
        for status in repo.status(name):
            assert status.valid, status.error
            repo.verify(name, status.version)


def test_cli_killed_at_random_moments_never_leaves_a_partial_version(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "ae", (1, 28, 28), best=True)
    repo = Repository(tmp_path / "repo")
    for _ in range(2):  # versions 1 and 2, in-process; 1 is being served
        export_run(run, repo, name="digits", max_batch=1)
    repo.mark_serving("digits", [1], holder="test-server")
    args = [*_command(), str(run), "--repository", str(repo.root), "--name", "digits"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # warnings must still not reach the output

    started = time.perf_counter()
    done = subprocess.run(
        [*args, "--checkpoint", "best", "--keep", "1"], capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    duration = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "published digits version 3" in out and "encoder.onnx" in out and "decoder.onnx" in out
    assert "parity: batches [1, 7, 64]" in out and "removed old versions: 2" in out
    noise = [line for line in done.stderr.splitlines() if not line.endswith("...")]
    assert noise == [], done.stderr  # only the progress lines
    assert repo.versions("digits") == [1, 3]  # kept: the newest and the served one
    assert repo.load_manifest("digits", 3).training["checkpoint"] == "checkpoints/best"

    # Random moments: anywhere in the run, and just after "publishing..." where the files are written.
    rng = random.Random(1234)
    moments = [(None, rng.uniform(0.2, 0.7) * duration)] + [("publishing", rng.uniform(0.0, 0.03)) for _ in range(2)]
    for after, delay in moments:
        process = subprocess.Popen(
            [*args, "--max-batch", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT
        )
        if after is not None:
            for line in process.stderr:
                if line.startswith(after):
                    break
        time.sleep(delay)
        process.kill()
        process.wait()
        process.stderr.close()
        _all_visible_versions_verify(repo)
    assert repo.versions("digits")[:2] == [1, 3]

    repo.clean_stale(max_age_s=0)
    assert [p.name for p in repo.root.iterdir()] == ["digits"]  # killed runs' staging dirs cleaned
