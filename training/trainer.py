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

from genserve.training.checkpoint import (
    epoch_checkpoints,
    find_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from genserve.training.config import TrainConfig
from genserve.training.data.loader import DeviceLoader, fixed_test_loader
from genserve.training.data.types import ImageDataset
from genserve.training.distributed import Distributed, follow
from genserve.training.models import GenerativeModel, StepContext, build_model, model_class

log = logging.getLogger("genserve.train")

EVAL_BATCH = 500
WARMUP_FRACTION = 0.02  # of all steps: the cosine schedule's linear warm-up


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


def resolve_batch_size(config: TrainConfig) -> int:
    return config.batch_size or model_class(config.model).default_batch_size


def resolve_binarize(config: TrainConfig) -> bool:
    if config.binarize is not None:
        return config.binarize
    return model_class(config.model).binarize_by_default(config)


def lr_factor(schedule: str, progress: float) -> float:
    """The learning rate's multiplier at `progress` (fraction of all steps done): "constant" is 1;
    "cosine" rises linearly over WARMUP_FRACTION, then follows half a cosine down to 0 at the end.
    A function of the step alone, so a resumed run follows the same schedule with no saved state."""
    if schedule == "constant":
        return 1.0
    if progress < WARMUP_FRACTION:
        return (progress + 1e-3) / WARMUP_FRACTION
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - WARMUP_FRACTION) / (1 - WARMUP_FRACTION))))


@dataclass
class RunState:
    """What a checkpoint carries besides tensors."""

    epoch: int = 0
    step: int = 0
    best_score: float = math.inf  # the best checkpoint's model.selection_metric (lower is better)
    epochs: list[dict[str, Any]] = field(default_factory=list)  # one metrics entry per finished epoch
    steps: list[dict[str, Any]] = field(default_factory=list)  # losses averaged over log_every steps


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, dataset: ImageDataset | None = None):
        config.validate()
        self.config = config
        self.run_dir = Path(config.out)
        self.dist = Distributed.from_environment()  # torchrun: one rank of several (training/distributed.py)
        config.batch_size = resolve_batch_size(config)  # saved in config.json as resolved
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
            from genserve.training.data.registry import load_dataset

            dataset = load_dataset(config.dataset, config.data_dir, config.image_size)
        data = dataset
        self.dataset = data.limited(config.limit)
        config.binarize = resolve_binarize(config)

        self.model: GenerativeModel = build_model(
            config.model, self.dataset.image_shape, config, self.dataset.num_classes
        ).to(self.device, memory_format=torch.channels_last)  # oneDNN and cuDNN convolutions run faster NHWC
        self.optimizers = self.model.configure_optimizers()
        self.lr_schedule = config.lr_schedule or self.model.default_lr_schedule
        self.base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in self.optimizers.items()}
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        self.augment_generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.generators = {"shuffle": self.shuffle_generator, "augment": self.augment_generator}

        noise = config.noise_factor if self.model.noisy_inputs else None
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
            loaded.setdefault("best_score", loaded.get("best_test_loss", math.inf))  # runs before best_score
            self.state = RunState(**{k: loaded[k] for k in RunState.__dataclass_fields__})
            log.info("resuming %s from %s (step %d)", self.run_dir, existing[-1].name, self.state.step)
        else:
            self.model.initialize_from_data(self.dataset.train_images.float().mean(0).div(255).to(self.device))
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

    def set_learning_rates(self, progress: float) -> None:
        factor = lr_factor(self.lr_schedule, progress)
        for name, optimizer in self.optimizers.items():
            for group, base in zip(optimizer.param_groups, self.base_lrs[name], strict=True):
                group["lr"] = base * factor

    def selection_score(self, test: dict[str, float]) -> float | None:
        """The epoch's model.selection_metric, lower is better; None where it cannot be measured
        (fid_domain on unlabelled data), and then no checkpoint is marked best."""
        if self.model.selection_metric == "test_loss":
            return test["loss"]
        from genserve.training.evaluation.sample_quality import default_sample_metrics, sample_quality_metrics

        if "fid_domain" not in default_sample_metrics(self.model, self.dataset):
            return None
        return sample_quality_metrics(self.model, self.dataset, self.config, ["fid_domain"])["fid_domain"]

    def load_exported_checkpoint(self) -> dict[str, Any]:
        """Load the weights that `--checkpoint auto` exports when they are not the last epoch's (a GAN's
        best by fid_domain); returns which checkpoint the final metrics describe."""
        path = find_checkpoint(self.run_dir, "auto")
        weights, _, state = read_checkpoint(path)
        if state["epoch"] != self.state.epoch:
            self.model.load_state_dict(weights)
            log.info("final metrics of the best checkpoint (epoch %d by %s)", state["epoch"], self.model.selection_metric)
        return {"checkpoint": path.name, "checkpoint_epoch": state["epoch"]}

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
            # learning rate for this step, then forward, backward and optimizer steps (the model's own)
            progress = self.state.step / max(1, self.total_steps)
            self.set_learning_rates(progress)
            ctx = StepContext(self.state.step, progress, self.autocast)
            losses = self.networks.train_step(self.model.train_step, batch, self.optimizers, ctx)
            # stop before a non-finite loss reaches a checkpoint
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"{self.config.model}: loss became {loss.item()} at step {self.state.step} (epoch {epoch}); "
                    "stopped before saving, so the last good checkpoint is intact. "
                    "Try a lower --lr, or check the data."
                )
            # accumulate the epoch's and the log window's losses (on the device: no sync per step)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
                window[key] = window.get(key, 0.0) + value.detach().float()
            window_steps += 1
            self.state.step += 1
            # every log_every steps: the window's means over ranks, to metrics.json and tensorboard
            if window_steps == self.config.log_every:
                means = {k: (v / window_steps).item() for k, v in self.dist.mean_over_ranks(window).items()}
                self.state.steps.append({"step": self.state.step, **means})
                for key, value in means.items():
                    writer.add_scalar(f"train_step/{key}", value, self.state.step)
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k in ("loss", "recon", "kl", "d_loss", "g_loss")})
                window, window_steps = {}, 0
        self.model.end_of_epoch()  # on every rank, so that all of them keep the same model
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

        from genserve.training.pictures import write_epoch_pictures

        if not self.dist.is_main:
            return follow(self)  # train in step with rank 0, write nothing
        self.write_run_files()
        writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.state.step or None)
        start_epoch = self.state.epoch + 1
        try:
            if start_epoch == 1:
                write_epoch_pictures(self.model, self.dataset, self.config, self.run_dir, 0, writer)
            for epoch in range(start_epoch, self.config.epochs + 1):
                # train one epoch (timed to the last kernel)
                started = time.perf_counter()
                train = self.train_epoch(epoch, writer)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                # measure it on the test set, and by the model's selection metric
                test = self.evaluate()
                score = self.selection_score(test)
                # record the epoch: metrics entry, tensorboard
                entry = self.epoch_entry(epoch, train, test, score, seconds)
                self.state.epochs.append(entry)
                self.state.epoch = epoch
                self.log_epoch(entry, writer)
                # pictures, the checkpoint (best by the model's selection metric), metrics.json
                write_epoch_pictures(self.model, self.dataset, self.config, self.run_dir, epoch, writer)
                self.save(score)
                self.write_metrics()
                self.log_epoch_line(entry, score)
            self.finish(writer)
        finally:
            writer.close()
        return self.run_dir

    # --- the steps of run() ----------------------------------------------------------------------
    def epoch_entry(self, epoch: int, train: dict[str, float], test: dict[str, float], score: float | None,
                    seconds: float) -> dict[str, Any]:
        """The epoch's row of metrics.json."""
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
        if score is not None and self.model.selection_metric != "test_loss":
            entry[self.model.selection_metric] = score
        return entry

    def log_epoch(self, entry: dict[str, Any], writer) -> None:
        for key in ("train_loss", "test_loss", "images_per_second", self.model.selection_metric):
            if key in entry:
                writer.add_scalar(f"epoch/{key}", entry[key], entry["epoch"])

    def save(self, score: float | None) -> None:
        """The epoch's checkpoint, marked best when its selection score is the lowest so far."""
        is_best = score is not None and score < self.state.best_score
        if is_best:
            self.state.best_score = score
        save_checkpoint(
            self.run_dir,
            self.model,
            self.optimizers,
            self.generators,
            {**self.state.__dict__, "config": self.config.to_dict(),
             "selection_metric": self.model.selection_metric},
            is_best=is_best,
        )

    def log_epoch_line(self, entry: dict[str, Any], score: float | None) -> None:
        log.info(
            "epoch %d/%d  train_loss %.4f  test_loss %.4f%s  %.1fs  %.0f img/s",
            entry["epoch"], self.config.epochs, entry["train_loss"], entry["test_loss"],
            f"  {self.model.selection_metric} {score:.2f}" if score is not None and "fid" in self.model.selection_metric else "",
            entry["seconds"], entry["images_per_second"],
        )

    def finish(self, writer) -> None:
        """The final metrics and pictures, of what export takes by default (--checkpoint auto)."""
        from genserve.training.evaluation import final_metrics
        from genserve.training.pictures import write_final_pictures

        chosen = self.load_exported_checkpoint()
        final = {**final_metrics(self.model, self.dataset, self.config, self.test_loader), **chosen}
        self.write_metrics(final)
        write_final_pictures(self.model, self.dataset, self.config, self.run_dir, self.state, self.test_loader)
        for key, value in final.items():
            if isinstance(value, int | float):
                writer.add_scalar(f"final/{key}", value, self.state.step)


def train(config: TrainConfig, resume: bool = False, dataset: ImageDataset | None = None) -> Path:
    """Train config.model on config.dataset into config.out; returns the run directory."""
    trainer = Trainer(config, resume=resume, dataset=dataset)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()

