"""Training benchmark: images/s and seconds per epoch of every model kind, and where the time goes.

    GENSERVE_DATA=../shared/data .venv/bin/python -m benchmarks.training_bench            # MNIST, 4096 images, 2 epochs
    .venv/bin/python -m benchmarks.training_bench --limit 1024 --kinds vae,gan --epochs 2
    .venv/bin/python -m benchmarks.training_bench --dataset mnist-5k   # the embedded digits, no data dir

For each kind, a real Trainer (training/trainer.py) on the first --limit training images runs
--epochs epochs through Trainer.train_epoch, the code path genserve-train uses; its DeviceLoader is
wrapped so that the time spent producing each batch (indexing, binarisation, denoiser noise) is
counted apart from the rest (the model's train_step: forward, backward, optimiser). The last
epoch is reported (with --epochs 2 the first one is a warm-up). Evaluation, pictures and
checkpoints are not run. "full epoch s" is the training set's size (all of it, not only --limit)
divided by the measured images/s: what one epoch of genserve-train on the whole set takes. This is
a measurement, not a test: it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


class _TimedLoader:
    """Wraps a DeviceLoader; adds the seconds spent in its iterator (producing batches) to `seconds`."""

    def __init__(self, loader):
        self.loader = loader
        self.seconds = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.seconds += time.perf_counter() - started
                return
            self.seconds += time.perf_counter() - started
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _NoWriter:
    def add_scalar(self, *args, **kwargs) -> None:
        pass


def bench_kind(kind: str, dataset, args: argparse.Namespace, workdir: Path) -> dict:
    import torch

    from genserve.training.config import TrainConfig
    from genserve.training.trainer import Trainer

    config = TrainConfig(model=kind, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs, limit=args.limit,
                         batch_size=args.batch_size, out=str(workdir / kind), device="cpu")
    trainer = Trainer(config, dataset=dataset)
    timed = _TimedLoader(trainer.train_loader)
    trainer.train_loader = timed
    result = {}
    for epoch in range(1, args.epochs + 1):
        timed.seconds = 0.0
        started = time.perf_counter()
        trainer.train_epoch(epoch, _NoWriter())
        seconds = time.perf_counter() - started
        images = len(timed) * config.batch_size
        result = {
            "train_set": len(dataset.train_images),
            "kind": kind,
            "epoch": epoch,
            "steps": len(timed),
            "images": images,
            "seconds": seconds,
            "images_per_second": images / seconds,
            "batch_seconds": timed.seconds,
            "step_seconds": seconds - timed.seconds,
            "batch_share": timed.seconds / seconds,
            "load1": os.getloadavg()[0],
            "torch_threads": torch.get_num_threads(),
        }
    return result


def table(rows: list[dict]) -> str:
    header = ("model", "steps x batch", "s (measured epoch)", "images/s", "batches s (share)", "train_step s",
              "full epoch s", "load1")
    lines = [(r["kind"], f"{r['steps']} x {r['images'] // max(1, r['steps'])}", f"{r['seconds']:.2f}",
              f"{r['images_per_second']:.0f}", f"{r['batch_seconds']:.3f} ({r['batch_share']:.1%})",
              f"{r['step_seconds']:.2f}", f"{r['train_set'] / r['images_per_second']:.0f} ({r['train_set']:,} images)",
              f"{r['load1']:.2f}") for r in rows]
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(str(v).ljust(widths[i]) for i, v in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def main(argv: list[str] | None = None) -> int:
    from genserve.training.models import model_kinds

    kinds = model_kinds(presets=False)
    p = argparse.ArgumentParser(prog="python -m benchmarks.training_bench", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", help="dataset name (default mnist, read from --data-dir)")
    p.add_argument("--data-dir", default=os.environ.get("GENSERVE_DATA"), help="default $GENSERVE_DATA")
    p.add_argument("--limit", type=int, default=4096, help="training images used (default 4096)")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs per kind; the last one is reported, the first warms up (default 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--kinds", default=",".join(kinds), help=f"comma-separated, presets too (default {','.join(kinds)})")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    import torch

    from genserve.training.data.registry import load_dataset

    print(f"# genserve training benchmark: {args.dataset}, first {args.limit} images, {args.epochs} epoch(s), "
          f"batch {args.batch_size}, CPU, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {platform.python_version()}")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    dataset = load_dataset(args.dataset, args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="genserve-train-bench-") as tmp:
        for kind in args.kinds.split(","):
            row = bench_kind(kind, dataset, args, Path(tmp))
            rows.append(row)
            print(f"  {kind:10} {row['seconds']:7.2f} s/epoch {row['images_per_second']:7.0f} images/s  "
                  f"batches {row['batch_share']:.1%}", flush=True)
    print()
    print(table(rows))
    print(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
