"""The training loop shared by every model kind: data on the device, a step per batch, a test pass and
an atomic checkpoint per epoch, metrics.json, TensorBoard, and the pictures at the end.

The model owns what a step does (see training/models/base.py); this file owns everything around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training.checkpoint import (
    epoch_checkpoints,
    restore_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from training.config import TrainConfig
from training.data.loader import DeviceLoader, fixed_test_loader
from training.data.types import ImageDataset
from training.distributed import Distributed, follow
from training.models import GenerativeModel, StepContext, build_model

log = logging.getLogger("genserve.train")

BINARIZED_BY_DEFAULT = ("mnist", "mnist-5k")  # MNIST digits are near-binary; published NLLs binarise them
EVAL_BATCH = 500


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is left as it was."""


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def resolve_binarize(config: TrainConfig) -> bool:
    if config.binarize is not None:
        return config.binarize
    return (
        config.dataset in BINARIZED_BY_DEFAULT
        and config.model in ("vae", "dense-vae")
        and config.likelihood == "bernoulli"
    )


@dataclass
class RunState:
    """What a checkpoint carries besides tensors."""

    epoch: int = 0
    step: int = 0
    best_test_loss: float = math.inf
    epochs: list[dict[str, Any]] = field(default_factory=list)  # one metrics entry per finished epoch
    steps: list[dict[str, Any]] = field(default_factory=list)  # losses averaged over log_every steps


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, dataset: ImageDataset | None = None):
        config.validate()
        self.config = config
        self.run_dir = Path(config.out)
        self.dist = Distributed.from_environment()  # torchrun: one rank of several (training/distributed.py)
        self.dist.check(config)
        self.device = self.dist.start(select_device(config.device))
        existing = epoch_checkpoints(self.run_dir)
        if existing and not resume:
            raise FileExistsError(
                f"{self.run_dir} already holds a run (last checkpoint {existing[-1].name}); "
                "pass --resume to continue it, or choose another --out"
            )

        torch.manual_seed(config.seed)
        if dataset is None:
            from training.data.registry import load_dataset

            dataset = load_dataset(config.dataset, config.data_dir, config.image_size)
        data = dataset
        self.dataset = data.limited(config.limit)
        config.binarize = resolve_binarize(config)

        self.model: GenerativeModel = build_model(
            config.model, self.dataset.image_shape, config, self.dataset.num_classes
        ).to(self.device, memory_format=torch.channels_last)  # oneDNN and cuDNN convolutions run faster NHWC
        self.optimizers = self.model.configure_optimizers()
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        self.augment_generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.generators = {"shuffle": self.shuffle_generator, "augment": self.augment_generator}

        noise = config.noise_factor if config.model == "dae" else None
        train_images = self.dataset.train_images.to(self.device)
        train_labels = None if self.dataset.train_labels is None else self.dataset.train_labels.to(self.device)
        self.train_loader = DeviceLoader(
            train_images,
            train_labels,
            self.dist.local_batch_size(config.batch_size),
            shuffle=True,
            binarize=config.binarize,
            noise_factor=noise,
            shuffle_generator=self.shuffle_generator,
            augment_generator=self.augment_generator,
            drop_last=True,  # equal batches: batch norm and GAN statistics stay well defined
            shard=(self.dist.rank, self.dist.world_size),
        )
        test_images = self.dataset.test_images.to(self.device)
        test_labels = None if self.dataset.test_labels is None else self.dataset.test_labels.to(self.device)
        self.test_loader = fixed_test_loader(
            test_images, test_labels, EVAL_BATCH, binarize=config.binarize, noise_factor=noise
        )
        self.total_steps = config.epochs * len(self.train_loader)

        self.state = RunState()
        if existing:
            loaded = restore_checkpoint(existing[-1], self.model, self.optimizers, self.generators)
            self.state = RunState(**{k: loaded[k] for k in RunState.__dataclass_fields__})
            log.info("resuming %s from %s (step %d)", self.run_dir, existing[-1].name, self.state.step)
        if config.compile:
            for module in self.model.children():
                module.compile()
        self.networks = self.dist.wrap(self.model)  # one DDP wrapper per network under torchrun

    # --- bookkeeping ---------------------------------------------------------------------------
    def write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(self.run_dir / "config.json")
        write_json_atomic(
            self.run_dir / "run.json",
            {
                "model": self.config.model,
                "dataset": self.dataset.name,
                "image_shape": list(self.dataset.image_shape),
                "num_classes": self.dataset.num_classes,
                "class_names": self.dataset.class_names,
                "train_images": len(self.dataset.train_images),
                "test_images": len(self.dataset.test_images),
                "value_range": [0.0, 1.0],
                "device": str(self.device),
                "world_size": self.dist.world_size,
                "torch_version": torch.__version__,
                "git_commit": git_commit(),
                "command": sys.argv,
            },
        )

    def write_metrics(self, final: dict[str, Any] | None = None) -> None:
        path = self.run_dir / "metrics.json"
        previous_final: dict[str, Any] = {}
        if final is None and path.is_file():
            previous_final = json.loads(path.read_text()).get("final", {})
        write_json_atomic(
            path,
            {
                "model": self.config.model,
                "dataset": self.dataset.name,
                "epochs": self.state.epochs,
                "steps": self.state.steps,
                "final": final if final is not None else previous_final,
            },
        )

    def autocast(self):
        if self.device.type == "cuda" and self.config.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- the loop ------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, writer) -> dict[str, float]:
        self.dist.seed_epoch(self.config.seed, epoch, self.generators)
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        window: dict[str, torch.Tensor] = {}
        window_steps = 0
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch}/{self.config.epochs}",
            leave=False,
            disable=None,  # no bar when stderr is not a terminal (CI logs)
            file=sys.stderr,
        )
        for batch in bar:
            ctx = StepContext(self.state.step, self.state.step / max(1, self.total_steps), self.autocast)
            losses = self.networks.train_step(self.model.train_step, batch, self.optimizers, ctx)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"{self.config.model}: loss became {loss.item()} at step {self.state.step} (epoch {epoch}); "
                    "stopped before saving, so the last good checkpoint is intact. "
                    "Try a lower --lr, or check the data."
                )
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
                window[key] = window.get(key, 0.0) + value.detach().float()
            window_steps += 1
            self.state.step += 1
            if window_steps == self.config.log_every:
                means = {k: (v / window_steps).item() for k, v in self.dist.mean_over_ranks(window).items()}
                self.state.steps.append({"step": self.state.step, **means})
                for key, value in means.items():
                    writer.add_scalar(f"train_step/{key}", value, self.state.step)
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k in ("loss", "recon", "kl", "d_loss", "g_loss")})
                window, window_steps = {}, 0
        steps = len(self.train_loader)
        return {key: (value / steps).item() for key, value in self.dist.mean_over_ranks(sums).items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0
        for batch in self.test_loader:
            n = len(batch.images)
            for key, value in self.model.eval_losses(batch).items():
                sums[key] = sums.get(key, 0.0) + value.item() * n
            count += n
        return {key: value / count for key, value in sums.items()}

    def run(self) -> Path:
        from torch.utils.tensorboard import SummaryWriter

        from training.evaluation import final_metrics
        from training.pictures import write_epoch_pictures, write_final_pictures

        if not self.dist.is_main:
            return follow(self)  # train in step with rank 0, write nothing
        self.write_run_files()
        writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.state.step or None)
        start_epoch = self.state.epoch + 1
        try:
            if start_epoch == 1:
                write_epoch_pictures(self.model, self.dataset, self.config, self.run_dir, 0, writer)
            for epoch in range(start_epoch, self.config.epochs + 1):
                started = time.perf_counter()
                train = self.train_epoch(epoch, writer)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                test = self.evaluate()
                entry = {
                    "epoch": epoch,
                    "step": self.state.step,
                    "train_loss": train["loss"],
                    "test_loss": test["loss"],
                    "seconds": seconds,
                    "images_per_second": len(self.train_loader) * self.config.batch_size / seconds,
                    **{f"train_{k}": v for k, v in train.items() if k != "loss"},
                    **{f"test_{k}": v for k, v in test.items() if k != "loss"},
                }
                self.state.epochs.append(entry)
                self.state.epoch = epoch
                for key in ("train_loss", "test_loss", "images_per_second"):
                    writer.add_scalar(f"epoch/{key}", entry[key], epoch)
                write_epoch_pictures(self.model, self.dataset, self.config, self.run_dir, epoch, writer)
                is_best = test["loss"] < self.state.best_test_loss
                if is_best:
                    self.state.best_test_loss = test["loss"]
                save_checkpoint(
                    self.run_dir,
                    self.model,
                    self.optimizers,
                    self.generators,
                    {**self.state.__dict__, "config": self.config.to_dict()},
                    is_best=is_best,
                )
                self.write_metrics()
                log.info(
                    "epoch %d/%d  train_loss %.4f  test_loss %.4f  %.1fs  %.0f img/s",
                    epoch, self.config.epochs, entry["train_loss"], entry["test_loss"], seconds,
                    entry["images_per_second"],
                )
            final = final_metrics(self.model, self.dataset, self.config, self.test_loader)
            self.write_metrics(final)
            write_final_pictures(self.model, self.dataset, self.config, self.run_dir, self.state, self.test_loader)
            for key, value in final.items():
                if isinstance(value, int | float):
                    writer.add_scalar(f"final/{key}", value, self.state.step)
        finally:
            writer.close()
        return self.run_dir


def train(config: TrainConfig, resume: bool = False, dataset: ImageDataset | None = None) -> Path:
    """Train config.model on config.dataset into config.out; returns the run directory."""
    trainer = Trainer(config, resume=resume, dataset=dataset)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()

