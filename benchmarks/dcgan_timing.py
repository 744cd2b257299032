"""Images/s of DCGAN training steps for layer widths and batch sizes, interleaved rounds (docs/results.md).

    .venv/bin/python -m benchmarks.dcgan_timing [THREADS [ROUNDS]]
"""
import contextlib
import sys
import time

import torch

from genserve.training.config import TrainConfig
from genserve.training.models import Batch, StepContext, build_model

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
# (D's base channels, batch size, G's width over D's): the default, G twice D
# (--dcgan-generator-width 2), and G and D at 128 with batch 32
variants = [(64, 64, 1), (64, 64, 2), (128, 32, 1)]
models = {}
for base, bs, g_width in variants:
    torch.manual_seed(0)
    m = build_model("dcgan", (1, 28, 28), TrainConfig(model="dcgan", batch_size=bs, dcgan_base_channels=base,
                                                      dcgan_generator_width=g_width))
    m = m.to(memory_format=torch.channels_last)
    models[(base, bs, g_width)] = (m, m.configure_optimizers())
images = torch.rand(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
res = {v: [] for v in variants}
for _round in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
    for (base, bs, g_width) in variants:
        m, opt = models[(base, bs, g_width)]
        x = images[:bs]
        n = 3072 // bs
        for s in range(3):
            m.train_step(Batch(x, x), opt, StepContext(s, 0.0, contextlib.nullcontext))
        t = time.perf_counter()
        for s in range(n):
            m.train_step(Batch(x, x), opt, StepContext(s, 0.0, contextlib.nullcontext))
        res[(base, bs, g_width)].append(n * bs / (time.perf_counter() - t))
for v, r in res.items():
    print(f"D base {v[0]:3d}, G {v[2]}x D, batch {v[1]:3d}: {', '.join(f'{x:.0f}' for x in r)} img/s")
