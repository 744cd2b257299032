"""genserve export: trained runs -> ONNX graphs -> a versioned model repository.

The repository API (what a server needs) imports neither torch nor onnx:

    from genserve.export import Repository, VerificationError
    repo = Repository("/models")
    version = repo.latest("mnist-vae")
    manifest = repo.verify("mnist-vae", version)
    graph = repo.read_part(manifest, "decoder")  # bytes, sha256-checked: onnxruntime.InferenceSession(graph)

`export_run` (the exporter itself, loaded on first use) needs torch, onnx and onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from genserve.export.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    PartSpec,
    RepositoryError,
    TensorSpec,
    VariantSpec,
    VerificationError,
    graph_metadata,
)
from genserve.export.naming import InvalidNameError, default_model_name, sanitize_name, validate_model_name
from genserve.export.repository import Repository, VersionNotFoundError, VersionStatus, keep_versions

if TYPE_CHECKING:
    from genserve.export.pipeline import ExportResult, export_run

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ExportResult",
    "FileEntry",
    "InvalidNameError",
    "Manifest",
    "ManifestError",
    "PartSpec",
    "Repository",
    "RepositoryError",
    "TensorSpec",
    "VariantSpec",
    "VerificationError",
    "VersionNotFoundError",
    "VersionStatus",
    "default_model_name",
    "export_run",
    "graph_metadata",
    "keep_versions",
    "sanitize_name",
    "validate_model_name",
]


def __getattr__(name: str) -> Any:
    if name in ("export_run", "ExportResult"):
        from genserve.export import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
