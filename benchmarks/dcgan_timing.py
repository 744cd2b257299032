"""Images/s of DCGAN training steps for layer widths and batch sizes, interleaved rounds (docs/results.md).

    .venv/bin/python -m benchmarks.dcgan_timing [THREADS]
"""
import contextlib
import sys
import time

import torch

import genserve.training.models.dcgan as dc
from genserve.training.config import TrainConfig
from genserve.training.models import Batch, StepContext, build_model

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
variants = [(64, 64), (96, 32), (128, 32), (128, 64)]
models = {}
for base, bs in variants:
    dc.BASE_CHANNELS = base
    torch.manual_seed(0)
    m = build_model("dcgan", (1, 28, 28), TrainConfig(model="dcgan", batch_size=bs)).to(memory_format=torch.channels_last)
    models[(base, bs)] = (m, m.configure_optimizers())
dc.BASE_CHANNELS = 64
images = torch.rand(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
res = {v: [] for v in variants}
for _round in range(2):
    for (base, bs) in variants:
        m, opt = models[(base, bs)]
        x = images[:bs]
        n = 3072 // bs
        for s in range(3):
            m.train_step(Batch(x, x), opt, StepContext(s, 0.0, contextlib.nullcontext))
        t = time.perf_counter()
        for s in range(n):
            m.train_step(Batch(x, x), opt, StepContext(s, 0.0, contextlib.nullcontext))
        res[(base, bs)].append(n * bs / (time.perf_counter() - t))
for v, r in res.items():
    print(f"base {v[0]:3d} batch {v[1]:3d}: {', '.join(f'{x:.0f}' for x in r)} img/s")
