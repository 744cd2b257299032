"""genserve-export RUN_DIR --repository REPO: publish a trained run as a new model version."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from genserve.export.manifest import MANIFEST_NAME, VARIANTS, RepositoryError

if TYPE_CHECKING:
    from genserve.export.pipeline import ExportResult


# Both extras install the module `onnxruntime`; a bare `pip install genserve` installs neither.
ONNXRUNTIME_MISSING = (
    "onnxruntime is not installed: install genserve with an onnxruntime extra, "
    "`pip install 'genserve[cpu]'` (onnxruntime) or `pip install 'genserve[gpu]'` (onnxruntime-gpu)"
)


def missing_onnxruntime() -> str | None:
    """ONNXRUNTIME_MISSING when no onnxruntime can be imported (genserve-export and genserve-serve need it), else None."""
    try:
        import onnxruntime  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name == "onnxruntime":
            return ONNXRUNTIME_MISSING
        raise
    return None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def _metric_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected metric names separated by commas, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    # export.pipeline imports onnxruntime: only after main() has checked that it is installed.
    from genserve.export.gate import DEFAULT_TOLERANCE, parse_tolerance
    from genserve.export.pipeline import CHECKPOINT_CHOICES, DEFAULT_MAX_BATCH
    from genserve.export.quality import DEFAULT_NLL_K, DEFAULT_SAMPLES, EXTRA_METRICS

    parser = argparse.ArgumentParser(
        prog="genserve-export",
        description="Export a trained run's servable parts to ONNX, check them against PyTorch, and "
        "publish them atomically as the next version of a model in a model repository.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by genserve-train")
    parser.add_argument("--repository", "-r", required=True, metavar="REPO", help="model repository root (created if missing)")
    parser.add_argument("--name", help="model name (default: DATASET-KIND, e.g. mnist-vae)")
    parser.add_argument(
        "--max-batch", type=_positive, default=DEFAULT_MAX_BATCH, metavar="N",
        help=f"largest batch the parity check runs (default {DEFAULT_MAX_BATCH})",
    )
    parser.add_argument("--fp16", action="store_true", help="also write float16 variants (<part>.fp16.onnx) for CUDA")
    parser.add_argument("--keep", type=_positive, metavar="N", help="then remove all but the newest N versions (never a served one)")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="auto",
                        help="which checkpoint to export: auto (default) is the best by sample quality for GANs "
                        "and AAEs that measured it, else the last")
    quality = parser.add_argument_group("quality labels and the publishing gate")
    quality.add_argument("--quality-samples", type=_non_negative, default=DEFAULT_SAMPLES, metavar="N",
                         help=f"samples (or test images) each quality label is measured on, through onnxruntime on "
                         f"the exported graphs (default {DEFAULT_SAMPLES}; 0: no labels)")
    quality.add_argument("--quality-nll-k", type=_non_negative, default=DEFAULT_NLL_K, metavar="K",
                         help=f"importance samples per image for the VAEs' test_nll_nats label (default {DEFAULT_NLL_K}; 0: none)")
    quality.add_argument("--quality-metrics", type=_metric_list, action="extend", default=[], metavar="METRIC[,METRIC]",
                         help=f"opt-in labels measured besides the model's defaults, for models that can sample: "
                         f"{', '.join(EXTRA_METRICS)} (the standard Inception-v3 FID, on the same samples and test "
                         f"images as fid_domain; about half a second per image on a 2-core CPU); repeatable")
    quality.add_argument("--gate", action="store_true",
                         help="refuse to publish when a quality label is worse than the latest published version's "
                         "(same metric and protocol) by more than its tolerance")
    quality.add_argument("--force", action="store_true", help="with --gate: publish a regression anyway (the manifest records it)")
    quality.add_argument("--gate-tolerance", type=parse_tolerance, action="append", default=[], metavar="METRIC=FRACTION",
                         help=f"allowed regression of one metric as a fraction of the earlier value (default "
                         f"{DEFAULT_TOLERANCE:g} = {100 * DEFAULT_TOLERANCE:g}%%; fid_domain 0.1); repeatable")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only the version directory")
    return parser


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KB"
    for bigger in ("MB", "GB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def report(result: ExportResult) -> str:
    """A human summary of what was written."""
    m = result.manifest
    lines = [
        f"published {m.name} version {m.version} ({m.kind}, image {list(m.image_shape)}, "
        f"latent {m.latent_dim}) in {result.seconds:.1f}s",
        f"  {result.path}/",
    ]
    worst: dict[tuple[str, str], float] = {}
    for r in m.parity.get("results", []):
        key = (r["part"], r["variant"])
        worst[key] = max(worst.get(key, 0.0), r["max_abs_diff"])
    for part, spec in m.parts.items():
        for variant in sorted(spec.variants, key=VARIANTS.index):
            v = spec.variants[variant]
            entry = m.files[v.file]
            io = f"{', '.join(t.name for t in spec.inputs)} -> {', '.join(t.name for t in spec.outputs)}"
            lines.append(
                f"    {v.file:<22} {_size(entry.bytes):>9}  {io:<28} max |onnx-torch| {worst.get((part, variant), 0.0):.2g}"
                f"  sha256 {entry.sha256[:12]}"
            )
    lines.append(f"    {MANIFEST_NAME}")
    for label in m.quality.get("labels", []):
        unit = f" {label['unit']}" if label["unit"] else ""
        graphs = ", ".join(g["file"] for g in label["graphs"])
        lines.append(f"  quality: {label['metric']} {label['value']:.4g}{unit} ({label['better']} is better; "
                     f"{label['samples']} samples, {graphs}, protocol {label['protocol']})")
    gate = m.quality.get("gate", {})
    if gate.get("enabled"):
        against = gate.get("against_version")
        verdict = "FORCED past a regression" if gate.get("forced") else "passed"
        lines.append(f"  gate: {verdict}" + (f" against version {against}" if against else " (no earlier version)"))
    parity = m.parity
    lines.append(f"  parity: batches {parity.get('batches')} on {', '.join(parity.get('providers', []))}")
    if result.removed:
        lines.append(f"  removed old versions: {', '.join(map(str, result.removed))}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    if (missing := missing_onnxruntime()) is not None:
        print(f"genserve-export: error: {missing}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    from genserve.export.gate import GateConfig, QualityGateError
    from genserve.export.onnx_export import ExportError
    from genserve.export.parity import ParityError
    from genserve.export.pipeline import export_run
    from genserve.export.quality import QualityConfig, QualityError
    from genserve.training.checkpoint import CheckpointError

    if args.force and not args.gate:
        print("genserve-export: error: --force only makes sense with --gate (it publishes past the gate)", file=sys.stderr)
        return 2
    progress = None if args.quiet else (lambda message: print(f"{message}...", file=sys.stderr, flush=True))
    try:
        result = export_run(
            args.run_dir,
            args.repository,
            name=args.name,
            max_batch=args.max_batch,
            fp16=args.fp16,
            keep=args.keep,
            checkpoint=args.checkpoint,
            quality=QualityConfig(samples=args.quality_samples, nll_k=args.quality_nll_k,
                                  extra_metrics=tuple(dict.fromkeys(args.quality_metrics))),
            gate=GateConfig(enabled=args.gate, force=args.force, tolerances=dict(args.gate_tolerance)),
            progress=progress,
        )
    except QualityGateError as error:
        print(f"genserve-export: {error}", file=sys.stderr)
        return 3
    except (CheckpointError, ExportError, ParityError, QualityError, RepositoryError, ValueError, OSError) as error:
        print(f"genserve-export: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A version is built in a staging directory (removed on the way out) and renamed into place
        # whole, so an interrupt leaves either no new version or a complete one.
        print(f"genserve-export: interrupted; {args.repository} holds no partial version (versions appear "
              "only when complete); run the same command again to export", file=sys.stderr)
        from genserve.training.cli import (
            INTERRUPTED,  # here: the server imports this module, and no more of training
        )

        return INTERRUPTED
    for warning in result.warnings:
        print(f"genserve-export: warning: {warning}", file=sys.stderr)
    print(result.path if args.quiet else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
