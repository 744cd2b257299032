"""What measuring the quality labels adds to genserve-export, per model kind.

    .venv/bin/python -m benchmarks.quality_label_bench            # about a minute
    .venv/bin/python -m benchmarks.quality_label_bench --kinds vae,dcgan --samples 500

For each kind: an untrained model on mnist-5k (the cost does not depend on training) is exported (after one
untimed warm-up export) with export_run into a temporary repository, with --quality-samples 0 and with --samples; the table
gives both export times and the measurement's own time (QualityMeter.measure on the published graphs,
the domain classifier already cached). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def untrained_run(run_dir: Path, kind: str) -> Path:
    import torch

    from genserve.training.checkpoint import save_checkpoint
    from genserve.training.config import TrainConfig
    from genserve.training.data.registry import load_dataset
    from genserve.training.models import build_model

    dataset = load_dataset("mnist-5k")
    config = TrainConfig(model=kind, dataset="mnist-5k", out=str(run_dir), epochs=1)
    torch.manual_seed(0)
    model = build_model(kind, dataset.image_shape, config, num_classes=dataset.num_classes)
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.json")
    info = {"model": kind, "dataset": "mnist-5k", "image_shape": list(dataset.image_shape),
            "num_classes": dataset.num_classes, "class_names": dataset.class_names}
    (run_dir / "run.json").write_text(json.dumps(info))
    save_checkpoint(run_dir, model, model.configure_optimizers(), {}, {"epoch": 1, "step": 1})
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="vae,dae,gan,dcgan", help="comma-separated model kinds")
    parser.add_argument("--samples", type=int, default=500, help="quality samples (default: genserve-export's 500)")
    args = parser.parse_args(argv)

    from genserve.export import Repository
    from genserve.export.pipeline import export_run, quality_meter
    from genserve.export.quality import QualityConfig
    from genserve.training.checkpoint import load_trained_model
    from genserve.training.evaluation.classifier import domain_classifier
    from genserve.training.evaluation.sample_quality import classifier_dataset

    print(f"# {os.cpu_count()} CPUs, load {os.getloadavg()}, --quality-samples {args.samples}")
    header = f"{'kind':<8} {'export, no labels s':>20} {'export, labels s':>17} {'measure s':>10}  labels"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            run = untrained_run(Path(tmp) / kind, kind)
            repo = Repository(Path(tmp) / "repo")
            model, config, _, _ = load_trained_model(run)
            meter, _ = quality_meter(model, config, QualityConfig(samples=args.samples), list(model.servable_parts()))
            if "samples" in model.metric_families:  # train and cache the domain classifier before timing
                domain_classifier(classifier_dataset(meter.dataset, config))
            export_run(run, repo, max_batch=8, quality=QualityConfig(samples=0))  # warm-up (torch.onnx's first export)
            started = time.perf_counter()
            export_run(run, repo, max_batch=8, quality=QualityConfig(samples=0))
            bare = time.perf_counter() - started
            started = time.perf_counter()
            result = export_run(run, repo, max_batch=8, quality=QualityConfig(samples=args.samples))
            labelled = time.perf_counter() - started
            manifest = result.manifest
            graphs = {part: (manifest.file_for(part), repo.read_part(manifest, part)) for part in manifest.parts}
            started = time.perf_counter()
            meter.measure(graphs)
            measure = time.perf_counter() - started
            names = ", ".join(f"{entry['metric']} {entry['value']:.4g}" for entry in manifest.quality["labels"])
            print(f"{kind:<8} {bare:>20.1f} {labelled:>17.1f} {measure:>10.2f}  {names}")
    print(f"# load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
