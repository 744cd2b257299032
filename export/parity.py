"""Parity: onnxruntime must compute what PyTorch computes, per part, batch size and execution provider."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from genserve.export.onnx_export import IMAGE_RANGE, ExportError, PartSignature, as_tuple, example_input

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
ODD_BATCH = 7
RANGE_SLACK = 1e-6  # float rounding at the ends of [0, 1]
PARITY_SEED = 0


@dataclass(frozen=True)
class Tolerance:
    """Elementwise |onnx - torch| <= atol + rtol * |torch| (numpy.allclose semantics)."""

    atol: float
    rtol: float


FP32_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)
# fp16 graphs are compared with the float32 PyTorch model: ~3 significant digits survive.
FP16_TOLERANCE = Tolerance(atol=1e-2, rtol=1e-2)


class ParityError(RuntimeError):
    """onnxruntime disagrees with PyTorch beyond tolerance, or an image left [0, 1]."""


@dataclass(frozen=True)
class ParityResult:
    part: str
    variant: str
    provider: str
    batch: int
    output: str
    max_abs_diff: float
    max_rel_diff: float  # over elements with |torch| > atol, where a relative difference means something
    atol: float
    rtol: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SkippedCheck:
    part: str
    variant: str
    provider: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parity_batches(max_batch: int) -> list[int]:
    """1, an odd batch and the maximum batch."""
    if max_batch < 1:
        raise ValueError(f"max batch must be at least 1, got {max_batch}")
    return sorted({1, min(ODD_BATCH, max_batch), max_batch})


def providers_to_check() -> list[str]:
    """CPU always; CUDA where this onnxruntime build has it."""
    return [CPU] + ([CUDA] if CUDA in ort.get_available_providers() else [])


def open_session(model: bytes, provider: str) -> ort.InferenceSession:
    """A session on exactly `provider`; raises RuntimeError when onnxruntime fell back to another one."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: keep the CLI output clean
    providers = [provider] if provider == CPU else [provider, CPU]
    with warnings.catch_warnings():  # a missing provider is reported below, not as a warning
        warnings.simplefilter("ignore")
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
    if session.get_providers()[0] != provider:
        raise RuntimeError(
            f"asked onnxruntime for {provider} but the session fell back to {session.get_providers()[0]} "
            "(for CUDA: are the CUDA and cuDNN libraries that onnxruntime-gpu needs installed?)"
        )
    return session


def _compare(reference: np.ndarray, actual: np.ndarray, tol: Tolerance) -> tuple[float, float, bool]:
    diff = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
    magnitude = np.abs(reference.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    meaningful = magnitude > tol.atol
    max_rel = float((diff[meaningful] / magnitude[meaningful]).max()) if meaningful.any() else 0.0
    passed = bool(np.all(diff <= tol.atol + tol.rtol * magnitude)) and bool(np.isfinite(actual).all())
    return max_abs, max_rel, passed


def _check_range(values: np.ndarray, where: str) -> None:
    low, high = IMAGE_RANGE
    lo, hi = float(values.min()), float(values.max())
    if not (lo >= low - RANGE_SLACK and hi <= high + RANGE_SLACK):
        raise ParityError(
            f"{where}: images must lie in [{low}, {high}], got values in [{lo:.6g}, {hi:.6g}]; "
            "servable parts must end in a sigmoid (or clamp) so served images are in [0, 1]"
        )


def reference_outputs(module: nn.Module, signature: PartSignature, batches: list[int]) -> dict[int, tuple[np.ndarray, list[np.ndarray]]]:
    """Seeded inputs and the float32 PyTorch outputs for each batch size (computed once, shared by variants)."""
    refs = {}
    for batch in batches:
        x = example_input(signature.input, batch, torch.Generator().manual_seed(PARITY_SEED + batch))
        if signature.input.value_range == IMAGE_RANGE:
            _check_range(x.numpy(), f"parity input of part {signature.part!r}")
        try:
            with torch.no_grad():
                outputs = [o.detach().float().numpy() for o in as_tuple(module(x))]
        except Exception as error:
            raise ExportError(
                f"part {signature.part!r} fails in PyTorch at batch {batch}: {error}; servable parts must "
                "accept any batch size (use x.view(x.shape[0], ...), nn.Flatten or nn.Unflatten)"
            ) from error
        for spec, out in zip(signature.outputs, outputs, strict=True):
            if spec.value_range == IMAGE_RANGE:
                _check_range(out, f"PyTorch part {signature.part!r}, output {spec.name!r}, batch {batch}")
        refs[batch] = (x.numpy(), outputs)
    return refs


def check_parity(
    model: bytes,
    signature: PartSignature,
    references: dict[int, tuple[np.ndarray, list[np.ndarray]]],
    *,
    variant: str,
    tolerance: Tolerance,
    providers: list[str],
) -> tuple[list[ParityResult], list[SkippedCheck]]:
    """Run the serialised graph on every provider and batch; raise ParityError on the first failure.

    A provider whose session cannot be created (e.g. no float16 kernels on CPU, or CUDA falling back
    to CPU) is recorded as skipped; at least one provider must have checked the graph.
    """
    part = signature.part
    results: list[ParityResult] = []
    skipped: list[SkippedCheck] = []
    for provider in providers:
        try:
            session = open_session(model, provider)
            runs = {b: session.run(None, {signature.input.name: x}) for b, (x, _) in references.items()}
        except Exception as error:  # onnxruntime raises its own exception types, not exported
            if variant == "fp32" and provider == CPU:
                raise ParityError(f"onnxruntime cannot run part {part!r} ({variant}) on {provider}: {error}") from error
            skipped.append(SkippedCheck(part, variant, provider, f"{type(error).__name__}: {error}"))
            continue
        for batch, (_, expected) in references.items():
            for spec, ref, out in zip(signature.outputs, expected, runs[batch], strict=True):
                where = f"part {part!r} ({variant}) on {provider}, batch {batch}, output {spec.name!r}"
                if out.shape != ref.shape or out.dtype != np.float32:
                    raise ParityError(f"{where}: onnxruntime returned {out.dtype} {out.shape}, PyTorch float32 {ref.shape}")
                max_abs, max_rel, passed = _compare(ref, out, tolerance)
                results.append(
                    ParityResult(part, variant, provider, batch, spec.name, max_abs, max_rel, tolerance.atol, tolerance.rtol, passed)
                )
                if not passed:
                    raise ParityError(
                        f"parity failed for {where}: max abs difference {max_abs:.3g}, max rel difference "
                        f"{max_rel:.3g}; allowed |onnx - torch| <= {tolerance.atol:g} + {tolerance.rtol:g} * |torch|. "
                        "The graph does not compute what the PyTorch part does (an op lowered differently?); "
                        "nothing was published."
                    )
                if spec.value_range == IMAGE_RANGE:
                    _check_range(out, f"onnxruntime {where}")
    if not results:
        reasons = "; ".join(f"{s.provider}: {s.reason}" for s in skipped)
        raise ParityError(
            f"part {part!r} ({variant}) could not be run on any execution provider ({reasons}); "
            + ("drop --fp16 on this machine, or export on a machine with CUDA" if variant == "fp16" else "")
        )
    return results, skipped
