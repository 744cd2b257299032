"""Training on several processes or machines under torchrun, with PyTorch DistributedDataParallel.

    torchrun --standalone --nproc-per-node 2 -m genserve.training.cli vae --dataset mnist-5k --out runs/ddp-vae

torchrun starts one process per GPU (or per CPU share) and sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; without them (a plain `genserve-train`) nothing here changes anything. Under it:

- The process group uses NCCL on CUDA (each process on cuda:LOCAL_RANK) and gloo on the CPU.
- `--batch-size` stays the global batch: each rank takes batch_size / world_size rows per step, so
  the learning rate and the number of steps mean the same as in one process.
- Each rank reads its shard of every epoch with DistributedSampler's semantics: one permutation of
  the training set per epoch, the same on every rank (from the run's checkpointed shuffle
  generator, so a resumed run replays it), padded by wrapping to a multiple of world_size, rank r
  taking positions r, r + world_size, ... So step i of N ranks sees exactly the rows of step i of
  one process with the same global batch.
- Each network of the model (every child module with parameters: encoder and decoder, generator and
  discriminator) gets its own DDP wrapper, swapped in for the training step only. So a GAN or AAE
  step that runs and backpropagates its players one after another averages each player's
  gradients when that player's backward runs; evaluation, pictures and checkpoints see the plain
  modules. A parameter that belongs to no child (the VAE's learned decoder std) has its gradient
  averaged with torch.distributed.all_reduce as it is accumulated. On CUDA, batch norm layers
  become SyncBatchNorm (statistics over the global batch); gloo has no SyncBatchNorm, so on the
  CPU batch norm uses each rank's rows.
- Randomness inside a step (reparameterisation noise, binarisation and denoiser noise, dropout) is
  reseeded at every epoch from (seed, rank, epoch): ranks draw differently from each other, and a
  resumed run draws exactly what the uninterrupted run drew.
- Only rank 0 writes: run files, checkpoints, metrics, TensorBoard and pictures. The other ranks
  train their shards in step with it and stop after the last epoch. Logged losses are the mean over
  ranks. `--resume` reads the last checkpoint on every rank, so every rank must see the run
  directory (a shared filesystem across machines).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Ranks wait for rank 0 while it evaluates, draws pictures and checkpoints between epochs.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


def shard_size(n: int, world_size: int) -> int:
    """Rows each rank gets from n (DistributedSampler without drop_last: the tail is padded)."""
    return -(-n // world_size)


def shard_indices(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s share of one epoch's permutation `order`, DistributedSampler-style: padded by
    repeating the start of `order` to a multiple of world_size, then every world_size-th position."""
    if world_size == 1:
        return order
    total = shard_size(len(order), world_size) * world_size
    if total > len(order):
        repeats = -(-total // len(order))
        order = order.repeat(repeats)[:total]
    return order[rank:total:world_size]


def epoch_seed(seed: int, rank: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for one random stream of one rank in one epoch."""
    return int(np.random.SeedSequence([seed, rank, epoch, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _environment_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


class TrainerLike(Protocol):
    """What `follow` needs of training.trainer.Trainer."""

    config: Any
    state: Any
    run_dir: Path

    def train_epoch(self, epoch: int, writer: Any) -> dict[str, float]: ...


class _NullWriter:
    """A SummaryWriter that writes nothing: ranks other than 0."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job; world_size 1 (the default) is a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Distributed:
        env = os.environ if env is None else env
        world_size = _environment_int(env, "WORLD_SIZE")
        if world_size is None or world_size == 1:
            return cls()
        rank = _environment_int(env, "RANK")
        local_rank = _environment_int(env, "LOCAL_RANK")
        if rank is None or local_rank is None:
            raise ValueError("WORLD_SIZE is set but RANK or LOCAL_RANK is not: start distributed runs with torchrun")
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            raise ValueError(f"invalid torchrun environment: RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank}")
        return cls(rank, world_size, local_rank)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    def check(self, config: Any) -> None:
        """Refuse settings that cannot work across ranks, with the fix."""
        if not self.enabled:
            return
        if config.batch_size % self.world_size:
            raise ValueError(
                f"--batch-size {config.batch_size} is the global batch and must divide evenly over "
                f"{self.world_size} processes; use a multiple of {self.world_size}"
            )
        from genserve.training.models import model_class

        balance = getattr(config, "balance", None)
        if balance is None:  # the kind's default (on for the gan-balanced preset)
            balance = getattr(model_class(config.model), "default_balance", False)
        if balance:
            raise ValueError(
                "--balance decides from each rank's own losses whether to update a player, so the ranks "
                "would disagree and their gradient averaging would deadlock; train without --balance "
                "under torchrun"
            )

    def local_batch_size(self, batch_size: int) -> int:
        return batch_size // self.world_size

    def start(self, device: torch.device) -> torch.device:
        """Join the process group (NCCL on CUDA, gloo on the CPU); returns this rank's device."""
        if not self.enabled:
            return device
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"LOCAL_RANK {self.local_rank} has no GPU (torch sees {torch.cuda.device_count()}): "
                    "run at most one process per GPU (--nproc-per-node), or --device cpu"
                )
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT, **kwargs)
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(
                f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the environment "
                f"says {self.rank} of {self.world_size}"
            )
        return device

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def seed_epoch(self, seed: int, epoch: int, generators: Mapping[str, torch.Generator]) -> None:
        """Under torchrun: reseed the global RNG and the per-rank generators for this rank and epoch
        (not "shuffle": the permutation must stay the same on every rank)."""
        if not self.enabled:
            return
        torch.manual_seed(epoch_seed(seed, self.rank, epoch, 0))
        for stream, (name, generator) in enumerate(sorted(generators.items()), start=1):
            if name != "shuffle":
                generator.manual_seed(epoch_seed(seed, self.rank, epoch, stream))

    def mean_over_ranks(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The mean of each scalar (tensor or number) over the ranks; the same keys on every rank."""
        if not self.enabled or not values:
            return dict(values)
        keys = sorted(values)
        first = next((v for v in values.values() if isinstance(v, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=device).reshape(()) for k in keys])
        dist.all_reduce(stacked)
        stacked /= self.world_size
        return dict(zip(keys, stacked.unbind(), strict=True))

    def wrap(self, model: nn.Module) -> Networks:
        return Networks(model, self)


class Networks:
    """The DDP wrappers of one model's networks, active only while a training step runs."""

    def __init__(self, model: nn.Module, distributed: Distributed):
        self.model = model
        self.distributed = distributed
        self.wrappers: dict[str, DistributedDataParallel] = {}
        self._active = False
        if not distributed.enabled:
            return
        device = next(model.parameters()).device
        for name, child in list(model.named_children()):
            if not any(p.requires_grad for p in child.parameters()):
                continue
            if device.type == "cuda":
                converted = nn.SyncBatchNorm.convert_sync_batchnorm(child)  # in place, except a bare BN
                if converted is not child:
                    model._modules[name] = child = converted
            # DDP's constructor also broadcasts rank 0's parameters and buffers: every rank starts equal.
            # (Buffers, e.g. batch norm statistics, are also synced from rank 0 at every forward.)
            self.wrappers[name] = DistributedDataParallel(child, device_ids=[device] if device.type == "cuda" else None)
        for parameter in model._parameters.values():  # direct parameters, outside every child network
            if parameter is not None and parameter.requires_grad:
                dist.broadcast(parameter.data, src=0)
                parameter.register_post_accumulate_grad_hook(self._average_gradient)

    def _average_gradient(self, parameter: torch.Tensor) -> None:
        if self._active and parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= self.distributed.world_size

    @contextmanager
    def active(self) -> Iterator[None]:
        """The model's child networks replaced by their DDP wrappers (same parameters), then restored."""
        if not self.wrappers:
            yield
            return
        originals = {name: self.model._modules[name] for name in self.wrappers}
        self.model._modules.update(self.wrappers)
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self.model._modules.update(originals)

    def train_step(self, step: Callable[..., dict[str, torch.Tensor]], *args: Any) -> dict[str, torch.Tensor]:
        """model.train_step(*args) with every network's gradients averaged over the ranks."""
        with self.active():
            return step(*args)


def follow(trainer: TrainerLike) -> Path:
    """Ranks other than 0: train this rank's shard of every remaining epoch in step with rank 0, write
    nothing, and stop (rank 0 alone then evaluates, draws and writes the final metrics)."""
    writer = _NullWriter()
    for epoch in range(trainer.state.epoch + 1, trainer.config.epochs + 1):
        trainer.train_epoch(epoch, writer)
        trainer.state.epoch = epoch
    return trainer.run_dir
