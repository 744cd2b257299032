"""A trained run -> checked ONNX graphs -> a new published version in the model repository."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import torch

from genserve.export.files import json_safe
from genserve.export.gate import GateConfig, check_gate
from genserve.export.manifest import Manifest, PartSpec, RepositoryError, VariantSpec, graph_metadata
from genserve.export.naming import default_model_name, validate_model_name
from genserve.export.onnx_export import (
    OPSET,
    ExportError,
    PartSignature,
    describe_part,
    export_part,
    with_metadata,
)
from genserve.export.parity import (
    CPU,
    CUDA,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    PARITY_SEED,
    ParityResult,
    SkippedCheck,
    Tolerance,
    check_parity,
    parity_batches,
    providers_to_check,
    reference_outputs,
)
from genserve.export.provenance import exporter_info
from genserve.export.quality import (
    QualityConfig,
    QualityError,
    QualityMeter,
    check_requested,
    unmeasured_reason,
)
from genserve.export.repository import Repository, check_keep
from genserve.training.files import write_bytes_durable

DEFAULT_MAX_BATCH = 64
CHECKPOINT_CHOICES = ("auto", "last", "best")  # as training.checkpoint.find_checkpoint (not imported: torch)


@dataclass
class ExportResult:
    """What export_run published."""

    name: str
    version: int
    path: Path
    manifest: Manifest
    removed: list[int] = field(default_factory=list)  # old versions removed by keep
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _PartExport:
    signature: PartSignature
    graphs: dict[str, onnx.ModelProto]  # variant -> graph
    results: list[ParityResult]
    skipped: list[SkippedCheck]
    seconds: float


def graph_file(part: str, variant: str) -> str:
    return f"{part}.onnx" if variant == "fp32" else f"{part}.{variant}.onnx"


def _prior(model: Any) -> dict[str, Any] | None:
    try:
        return json_safe(model.prior_spec())
    except NotImplementedError:
        return None  # ae and dae have no prior


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the run directory is damaged") from error


def export_part_checked(
    part: str,
    module: torch.nn.Module,
    image_shape: tuple[int, int, int],
    latent_dim: int,
    *,
    batches: list[int],
    providers: list[str],
    fp16: bool,
    tolerance: Tolerance,
    fp16_tolerance: Tolerance,
    opset: int,
) -> _PartExport:
    """Export one part (and its fp16 variant) and check parity for each; raises on any failure."""
    started = time.perf_counter()
    module.eval()  # servable_parts may wrap modules freshly, which start in training mode
    signature = describe_part(part, module, image_shape, latent_dim)
    references = reference_outputs(module, signature, batches)
    graphs: dict[str, onnx.ModelProto] = {}
    results: list[ParityResult] = []
    skipped: list[SkippedCheck] = []
    variants = [("fp32", tolerance)] + ([("fp16", fp16_tolerance)] if fp16 else [])
    for variant, tol in variants:
        graph = export_part(module, signature, fp16=variant == "fp16", opset=opset)
        res, skip = check_parity(
            graph.SerializeToString(), signature, references, variant=variant, tolerance=tol, providers=providers
        )
        graphs[variant] = graph
        results += res
        skipped += skip
    return _PartExport(signature, graphs, results, skipped, time.perf_counter() - started)


def quality_meter(model: Any, config: Any, quality: QualityConfig, parts: list[str]) -> tuple[QualityMeter | None, str | None]:
    """What measures the labels (the run's test set loaded, from the run's data folder or else
    $GENSERVE_DATA), or None and why not."""
    from genserve.training.data.errors import DatasetError
    from genserve.training.data.registry import load_dataset

    dataset, error = None, None
    for data_dir in dict.fromkeys([config.data_dir, None]):
        try:
            dataset = load_dataset(config.dataset, data_dir, config.image_size).limited(config.limit)
            break
        except (DatasetError, ValueError, OSError) as failure:
            error = failure
    reason = unmeasured_reason(model, dataset, quality, parts)
    if reason is not None:
        reason += f" ({error})" if dataset is None and error else ""
        if quality.extra_metrics:  # asked for by name: an error, not a warning
            raise QualityError(f"{', '.join(quality.extra_metrics)} was requested but cannot be measured: {reason}")
        return None, reason
    return QualityMeter(model, config, dataset, quality), None


def _latest_manifest(repo: Repository, name: str) -> Manifest | None:
    try:
        latest = repo.latest(name)
    except RepositoryError:
        return None
    return None if latest is None else repo.load_manifest(name, latest)


def _check_arguments(run_dir: Path, name: str | None, max_batch: int, keep: int | None, checkpoint: str) -> None:
    """Fail on bad arguments before the slow work starts."""
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINT_CHOICES)}, not {checkpoint!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max batch must be a positive integer, got {max_batch!r}")
    if keep is not None:
        check_keep(keep)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; pass the --out directory of genserve-train")
    if name is not None:
        validate_model_name(name)


def _latent_dim(model: Any) -> int:
    """The width of the latents the graphs take or give (decoder and generator inputs, encoder
    outputs): the prior's dimension, else model.latent_dim."""
    prior = _prior(model)
    if prior and isinstance(prior.get("dim"), int):
        return int(prior["dim"])
    return int(model.latent_dim)


def _part_spec(part: str, e: _PartExport) -> PartSpec:
    variants = {
        variant: VariantSpec(
            graph_file(part, variant),
            "float32" if variant == "fp32" else "float16",
            (CPU, CUDA) if variant == "fp32" else (CUDA,),
        )
        for variant in e.graphs
    }
    return PartSpec(e.signature.inputs, e.signature.outputs, variants)


def _training_record(run_dir: Path, checkpoint_path: Path, which: str, config: Any, info: dict[str, Any]) -> dict[str, Any]:
    state = _read_json(checkpoint_path / "state.json") or {}
    metrics = _read_json(run_dir / "metrics.json") or {}
    return json_safe(
        {
            "run_dir": str(run_dir.resolve()),
            "checkpoint": str(checkpoint_path.resolve().relative_to(run_dir.resolve())),
            "checkpoint_which": which,
            "epoch": state.get("epoch"),
            "step": state.get("step"),
            "run_git_commit": info.get("git_commit"),
            "config": config.to_dict(),
            "final_metrics": metrics.get("final"),
        }
    )


def _parity_record(
    exports: dict[str, _PartExport], batches: list[int], providers: list[str], tolerances: dict[str, Tolerance]
) -> dict[str, Any]:
    return {
        "batches": batches,
        "providers": providers,
        "inputs": f"uniform [0, 1] images or standard normal latents, torch seed {PARITY_SEED} + batch size",
        "reference": "the float32 PyTorch part on CPU",
        "tolerances": {variant: {"atol": t.atol, "rtol": t.rtol} for variant, t in tolerances.items()},
        "results": [r.to_dict() for e in exports.values() for r in e.results],
        "skipped": [s.to_dict() for e in exports.values() for s in e.skipped],
    }


def export_run(
    run_dir: str | os.PathLike[str],
    repository: str | os.PathLike[str] | Repository,
    *,
    name: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    fp16: bool = False,
    keep: int | None = None,
    checkpoint: str = "auto",
    tolerance: Tolerance = FP32_TOLERANCE,
    fp16_tolerance: Tolerance = FP16_TOLERANCE,
    opset: int = OPSET,
    quality: QualityConfig | None = None,
    gate: GateConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export run_dir's last (or best) checkpoint as the next version of `name` in `repository`.

    Every servable part becomes <part>.onnx (and <part>.fp16.onnx with fp16), parity-checked at
    batch 1, 7 and max_batch on CPU (and CUDA where onnxruntime has it) before anything is published.
    Each version is labelled with its quality measured on the fp32 graphs as published (`quality`,
    export/quality.py); with gate.enabled a regression against the latest published version's
    comparable labels refuses to publish (export/gate.py).
    Raises CheckpointError, ExportError, ParityError, RepositoryError, QualityError, QualityGateError
    or ValueError with the reason.
    """
    from genserve.training.checkpoint import load_trained_model  # heavy; keeps `import export` light

    started = time.perf_counter()
    say = progress or (lambda _message: None)
    run_dir = Path(run_dir)
    _check_arguments(run_dir, name, max_batch, keep, checkpoint)
    repo = repository if isinstance(repository, Repository) else Repository(repository)

    model, config, info, checkpoint_path = load_trained_model(run_dir, checkpoint, device="cpu")
    dataset = info.get("dataset") or config.dataset
    name = name or default_model_name(model.kind, dataset)
    c, h, w = (int(v) for v in info.get("image_shape", model.image_shape))
    image_shape = (c, h, w)
    if image_shape != tuple(model.image_shape):
        raise ValueError(f"{run_dir}/run.json says image_shape {list(image_shape)}, the model has {list(model.image_shape)}")
    try:
        parts = model.servable_parts()
    except NotImplementedError as error:
        raise ExportError(f"{model.kind} does not implement servable_parts(); nothing to export") from error
    if not parts:
        raise ExportError(f"{model.kind} returned no servable parts; nothing to export")

    quality, gate = quality or QualityConfig(), gate or GateConfig()
    check_requested(model, quality)  # before the slow work
    batches, providers = parity_batches(max_batch), providers_to_check()
    latent_dim = _latent_dim(model)
    exports: dict[str, _PartExport] = {}
    for part, module in parts.items():
        say(f"exporting {part}")
        exports[part] = export_part_checked(
            part, module, image_shape, latent_dim,
            batches=batches, providers=providers, fp16=fp16,
            tolerance=tolerance, fp16_tolerance=fp16_tolerance, opset=opset,
        )

    tolerances = {"fp32": tolerance, **({"fp16": fp16_tolerance} if fp16 else {})}
    base = Manifest(
        name=name,
        version=1,  # replaced by the number the repository assigns
        kind=model.kind,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        image_shape=image_shape,
        latent_dim=latent_dim,
        prior=_prior(model),
        dataset=dataset,
        class_names=info.get("class_names"),
        parts={part: _part_spec(part, e) for part, e in exports.items()},
        training=_training_record(run_dir, checkpoint_path, checkpoint, config, info),
        exporter={**exporter_info(opset), "seconds": {part: round(e.seconds, 3) for part, e in exports.items()}},
        parity=_parity_record(exports, batches, providers, tolerances),
    )

    say("preparing the quality measurement")
    meter, unmeasured = quality_meter(model, config, quality, list(exports))
    warnings: list[str] = []

    def build(staging: Path, version: int) -> Manifest:
        # Only metadata_props differ from the parity-checked graphs; the computation is identical.
        manifest = replace(base, version=version)
        published: dict[str, tuple[str, bytes]] = {}
        for part, e in exports.items():
            for variant, graph in e.graphs.items():
                data = with_metadata(graph, graph_metadata(manifest, part, variant))
                write_bytes_durable(staging / graph_file(part, variant), data)
                if variant == "fp32":
                    published[part] = (graph_file(part, variant), data)
        # Labels describe exactly the bytes published (their sha256 is checked against `files`).
        say(f"measuring quality of version {version} on its ONNX graphs")
        record = meter.measure(published) if meter else {"labels": [], "unmeasured": unmeasured,
                                                         "config": quality.to_dict()}
        record["gate"], gate_warnings = check_gate(name, version, record, _latest_manifest(repo, name), gate)
        warnings[:] = ([f"no quality labels: {unmeasured}"] if unmeasured else []) + record.pop("notes", []) + gate_warnings
        record["warnings"] = list(warnings)
        return replace(manifest, quality=record)

    say("publishing")
    version = repo.publish(name, build)
    removed = repo.keep_versions(name, keep) if keep is not None else []
    return ExportResult(
        name=name,
        version=version,
        path=repo.version_dir(name, version),
        manifest=repo.load_manifest(name, version),
        removed=removed,
        warnings=[
            f"{s.part} ({s.variant}) was not checked on {s.provider}: {s.reason}"
            for e in exports.values()
            for s in e.skipped
        ] + warnings,
        seconds=time.perf_counter() - started,
    )
