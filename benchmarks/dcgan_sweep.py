"""DCGAN recipe sweep (docs/results.md): one MNIST run per call, one variable changed.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.dcgan_sweep NAME EPOCHS key=value ...
    e.g. ... dcgan_sweep b64 5 batch_size=64 ; ... dcgan_sweep w128-b32 5 batch_size=32 base=128

Keys: TrainConfig fields batch_size, lr, upsample, lr_schedule, seed (JSON values); otherwise DCGAN class
attributes (ema_decay, real_label, d_lr_scale, minibatch_std), base (both players' width), dbase
(the discriminator's width alone) and gbase (the generator's alone). Runs go to runs/dcgan-sweep/NAME (an existing one is resumed);
the data from $GENSERVE_DATA. Prints fid_domain and seconds per epoch, and the final coverage.
"""
import json
import os
import sys
import time
from pathlib import Path

import genserve.training.models.dcgan as dc
from genserve.training.config import TrainConfig
from genserve.training.trainer import train

name, epochs, *pairs = sys.argv[1:]
cfg_over, cls_over = {}, {}
for p in pairs:
    k, v = p.split("=")
    v = json.loads(v) if v not in ("None",) else None
    (cfg_over if k in ("batch_size", "lr", "upsample", "lr_schedule", "seed") else cls_over)[k] = v
if "base" in cls_over:
    dc.BASE_CHANNELS = cls_over.pop("base")
if "dbase" in cls_over:
    dbase = cls_over.pop("dbase")
    original_build_d = dc.DCGAN.build_discriminator
    def build_d(self):
        saved = self.channels
        self.channels = [c * dbase // dc.BASE_CHANNELS for c in saved]
        try:
            return original_build_d(self)
        finally:
            self.channels = saved
    dc.DCGAN.build_discriminator = build_d
if "gbase" in cls_over:
    gbase = cls_over.pop("gbase")
    original_build_g = dc.DCGAN.build_generator
    def build_g(self):
        saved = self.channels
        self.channels = [c * gbase // dc.BASE_CHANNELS for c in saved]
        try:
            return original_build_g(self)
        finally:
            self.channels = saved
    dc.DCGAN.build_generator = build_g
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
