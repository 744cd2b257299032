"""DCGAN recipe sweep (docs/results.md): one MNIST run per call, one variable changed.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.dcgan_sweep NAME EPOCHS key=value ...
    e.g. ... dcgan_sweep b64 5 batch_size=64 ; ... dcgan_sweep w128-b32 5 batch_size=32 base=128

Keys: TrainConfig fields (batch_size, lr, upsample, lr_schedule, seed, ...; JSON values); otherwise DCGAN class
attributes (ema_decay, real_label, d_lr_scale, minibatch_std), base (both players' width), dbase
(the discriminator's width alone) and gbase (the generator's alone). Runs go to runs/dcgan-sweep/NAME (an existing one is resumed);
the data from $GENSERVE_DATA. Prints fid_domain and seconds per epoch, and the final coverage.
"""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import genserve.training.models.dcgan as dc
from genserve.training.config import TrainConfig
from genserve.training.trainer import train

name, epochs, *pairs = sys.argv[1:]
CONFIG_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
cfg_over, cls_over = {}, {}
for p in pairs:
    k, v = p.split("=")
    v = json.loads(v) if v not in ("None",) else None
    (cfg_over if k in CONFIG_KEYS else cls_over)[k] = v
if "base" in cls_over:
    dc.BASE_CHANNELS = cls_over.pop("base")


def scaled(build, base: int):
    """A DCGAN.build_* method that builds its player at width `base` instead of BASE_CHANNELS."""
    def build_scaled(self):
        saved = self.channels
        self.channels = [c * base // dc.BASE_CHANNELS for c in saved]
        try:
            return build(self)
        finally:
            self.channels = saved
    return build_scaled


if "dbase" in cls_over:
    dc.DCGAN.build_discriminator = scaled(dc.DCGAN.build_discriminator, cls_over.pop("dbase"))
if "gbase" in cls_over:
    dc.DCGAN.build_generator = scaled(dc.DCGAN.build_generator, cls_over.pop("gbase"))
unknown = [k for k in cls_over if not hasattr(dc.DCGAN, k)]
if unknown:
    raise SystemExit(f"unknown keys {unknown}: neither TrainConfig fields nor DCGAN class attributes (see the doc)")
for k, v in cls_over.items():
    setattr(dc.DCGAN, k, v)
out = Path("runs/dcgan-sweep") / name
cfg = TrainConfig(model="dcgan", dataset="mnist", data_dir=os.environ.get("GENSERVE_DATA"), out=str(out), epochs=int(epochs), **cfg_over)
t = time.time()
train(cfg, resume=(out / "checkpoints").is_dir())
m = json.loads((out / "metrics.json").read_text())
print("RESULT", name, [(e["epoch"], round(e.get("fid_domain", -1), 1), round(e["seconds"])) for e in m["epochs"]],
      {k: m["final"].get(k) for k in ("fid_domain", "class_coverage_entropy_nats")},
      "min class", min(m["final"]["class_coverage"].values()) if "class_coverage" in m["final"] else None,
      f"{time.time()-t:.0f}s", flush=True)
