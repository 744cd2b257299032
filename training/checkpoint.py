"""Checkpoints: weights as safetensors, optimizer and RNG tensors as safetensors, the rest as JSON.

Layout of a run directory:
    RUN_DIR/config.json                  the resolved TrainConfig
    RUN_DIR/run.json                     what the run trained on: kind, dataset, image shape, classes
    RUN_DIR/metrics.json                 per-epoch entries and the `final` metrics
    RUN_DIR/checkpoints/epoch-000003/    model.safetensors, state.safetensors, state.json
    RUN_DIR/checkpoints/best/            the same files for the epoch with the lowest test loss

Each checkpoint directory is written beside its final name, fsynced, then renamed into place, so a
reader (or a resumed run) sees either the previous checkpoint or the new one, never a partial one.
Nothing is ever read with pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from genserve.training.config import TrainConfig
from genserve.training.files import fsync_dir, fsync_file, write_atomic

CHECKPOINTS = "checkpoints"
BEST = "best"
KEEP_EPOCHS = 2
_EPOCH_DIR = re.compile(r"^epoch-(\d{6})$")
_FILES = ("model.safetensors", "state.safetensors", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to path via a temp file, fsync and rename."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


# --- optimizer and RNG state <-> (tensors, JSON) ------------------------------------------------
def _split_optimizer(name: str, state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{name}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = json.loads(json.dumps(state_dict["param_groups"]))  # tuples -> lists, JSON-safe
    return tensors, {"param_groups": groups, "scalars": scalars, "indices": [str(i) for i in state_dict["state"]]}


def _join_optimizer(name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for index in meta["indices"]:
        entry: dict[str, Any] = dict(meta["scalars"].get(index, {}))
        prefix = f"optimizer.{name}.{index}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                entry[key[len(prefix):]] = value
        state[int(index)] = entry
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """The global torch RNG (CPU and CUDA) and the named generators, as uint8 tensors."""
    states = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng.cuda.{i}"] = s
    for name, gen in generators.items():
        states[f"rng.gen.{name}"] = gen.get_state()
    return states


def restore_rng(tensors: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    for name, gen in generators.items():
        gen.set_state(tensors[f"rng.gen.{name}"])


# --- writing ------------------------------------------------------------------------------------
def _write_checkpoint_dir(
    final: Path,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    state: dict[str, Any],
) -> None:
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    tensors = capture_rng(generators)
    optimizer_meta = {}
    for name, optimizer in optimizers.items():
        opt_tensors, optimizer_meta[name] = _split_optimizer(name, optimizer.state_dict())
        tensors.update(opt_tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "optimizers": optimizer_meta}, indent=2, sort_keys=True))
    for name in _FILES:
        fsync_file(tmp / name)
    fsync_dir(tmp)
    if final.exists():  # replace: move the old one aside first so the name is never empty of a whole checkpoint
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    state: dict[str, Any],
    is_best: bool = False,
) -> Path:
    """Write checkpoints/epoch-NNNNNN (and checkpoints/best when is_best); keep the last few epochs.

    `state` is JSON-safe and must hold "epoch" and "step".
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{state['epoch']:06d}"
    payload = {**state, "saved_at": time.time()}
    _write_checkpoint_dir(final, model, optimizers, generators, payload)
    if is_best:
        _write_checkpoint_dir(root / BEST, model, optimizers, generators, payload)
    for old in epoch_checkpoints(run_dir)[:-KEEP_EPOCHS]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):  # from a run killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    return final


# --- reading ------------------------------------------------------------------------------------
def epoch_checkpoints(run_dir: Path) -> list[Path]:
    """Complete epoch checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _EPOCH_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name)


CHECKPOINT_CHOICES = ("auto", "last", "best")


def find_checkpoint(run_dir: Path, which: str = "auto") -> Path:
    """The last epoch checkpoint ("last"), the best one ("best"), or "auto": the best where the run chose
    it by sample quality (a GAN's or AAE's fid_domain, which its losses do not measure), else the last.
    A clear error when there is none."""
    run_dir = Path(run_dir)
    if which not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINT_CHOICES)}, not {which!r}")
    best = run_dir / CHECKPOINTS / BEST
    if which == "auto":
        try:
            metric = json.loads((best / "state.json").read_text()).get("selection_metric", "test_loss")
        except (OSError, ValueError):
            metric = "test_loss"
        which = "best" if metric != "test_loss" else "last"
    if which == "best" and best.is_dir():
        return best
    # "last", or a run too short (or unmeasurable) to have a best yet
    found = epoch_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"no checkpoint in {run_dir / CHECKPOINTS}: train first with `genserve-train MODEL --out {run_dir}`"
        )
    return found[-1]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model weights, state tensors, state JSON) of one checkpoint directory, with clear errors."""
    path = Path(path)
    for name in _FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        weights = load_file(str(path / "model.safetensors"))
        tensors = load_file(str(path / "state.safetensors"))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({error}); delete it to fall back to the previous one"
        ) from error
    try:
        state = json.loads((path / "state.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path / 'state.json'} is not valid JSON: {error}") from error
    return weights, tensors, state


def restore_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
) -> dict[str, Any]:
    """Load weights, optimizer state and RNG states in place; return the checkpoint's JSON state."""
    weights, tensors, state = read_checkpoint(path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {error}") from error
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(_join_optimizer(name, state["optimizers"][name], tensors))
    restore_rng(tensors, generators)
    return state


def load_run_info(run_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's TrainConfig and run.json."""
    run_dir = Path(run_dir)
    for name in ("config.json", "run.json"):
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir} is not a genserve run directory: {name} is missing")
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    info = json.loads((run_dir / "run.json").read_text())
    return config, info


def load_trained_model(run_dir: Path, which: str = "auto", device: str | torch.device = "cpu"):
    """Rebuild a trained model from a run directory, in eval mode. Returns (model, config, info, checkpoint)."""
    from genserve.training.models import build_model

    config, info = load_run_info(run_dir)
    model = build_model(config.model, tuple(info["image_shape"]), config, info.get("num_classes", 0))
    path = find_checkpoint(run_dir, which)
    weights, _, _ = read_checkpoint(path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {error}") from error
    return model.to(device).eval(), config, info, path
