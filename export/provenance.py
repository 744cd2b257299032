"""Where an export came from: the exporting code's git commit and the library versions."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

_PACKAGES = ("genserve", "torch", "onnx", "onnxscript", "onnxruntime", "numpy")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """`git rev-parse HEAD` of the exporting code, or None outside a git checkout."""
    out = _git("rev-parse", "HEAD")
    return out.strip() or None if out else None


def git_dirty() -> bool | None:
    """Whether the exporting code has uncommitted changes (None when unknown)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in _PACKAGES:
        # onnxruntime-gpu installs the same module under another distribution name.
        names = (package, "onnxruntime-gpu") if package == "onnxruntime" else (package,)
        versions[package] = None
        for name in names:
            try:
                versions[package] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def exporter_info(opset: int) -> dict[str, Any]:
    return {
        "tool": "genserve-export",
        "method": "torch.onnx.export(dynamo=True)",
        "opset": opset,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "versions": library_versions(),
    }
