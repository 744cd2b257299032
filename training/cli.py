"""`genserve-train MODEL --dataset NAME --out RUN_DIR`: fit one model; precedence is
defaults < --config FILE < command-line flags (< the saved run config on --resume, for what you do not set).

Every TrainConfig field is an option: its type and default come from the dataclass, so only the help
text and the choices are written here; a boolean field accepts --x, --no-x and --x true|false."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from genserve.training.config import TrainConfig, read_config_file

DATASET_HELP = "mnist | fashion-mnist | cifar10 | faces | textures | mnist-5k (embedded, no download)"
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)

# field -> (group, help, choices); the default is appended from TrainConfig unless it is None.
OPTIONS: dict[str, tuple[str, str, tuple[str, ...] | None]] = {
    "dataset": ("run", f"dataset: {DATASET_HELP}", None),
    "data_dir": ("run", "dataset folder (default: $GENSERVE_DATA, else ./data)", None),
    "out": ("run", "run directory", None),
    "epochs": ("run", "epochs to train (with --resume: the new total)", None),
    "batch_size": ("run", "batch size (default per model: 128; 64 for dcgan)", None),
    "lr": ("run", "Adam learning rate (default per model: 1e-3; 2e-4 for GANs, 6e-4 for dcgan)", None),
    "lr_schedule": ("run", "default per model: cosine; constant for GANs and most presets", ("cosine", "constant")),
    "adam_beta1": ("run", "Adam beta1 (default per model: 0.9; 0.5 for GANs)", None),
    "latent_dim": ("run", "latent size (default per model)", None),
    "limit": ("run", "use only the first N training images", None),
    "device": ("run", "auto: CUDA when present", ("auto", "cpu", "cuda")),
    "seed": ("run", "random seed; CPU runs are reproducible", None),
    "compile": ("run", "torch.compile the model", None),
    "amp": ("run", "bf16 autocast (on CUDA only)", None),
    "image_size": ("run", "faces: resize to this; textures: crop size (default: the dataset's)", None),
    "binarize": ("data", "dynamic binarisation (default: on for MNIST with a Bernoulli VAE)", None),
    "noise_factor": ("data", "denoiser input noise std, inputs clipped to [0,1]", None),
    "likelihood": ("VAE", "decoder likelihood", ("bernoulli", "gaussian", "gaussian-learned")),
    "gaussian_sigma": ("VAE", "fixed decoder std for --likelihood gaussian", None),
    "beta": ("VAE", "KL weight", None),
    "kl_warmup": ("VAE", "fraction of training over which the KL weight rises from 0", None),
    "noise_dim": ("adversarial", "GAN noise size", None),
    "balance": ("adversarial", "GANs: skip the update of a player far ahead (default per model: on for gan-balanced)", None),
    "upsample": ("adversarial", "DCGAN generator upsampling", ("transposed", "resize")),
    "dcgan_base_channels": ("adversarial", "DCGAN width: G's last and D's first hidden channels, doubling per layer "
                      "(default 64; at the old 2e-4 learning rate, 128 with --batch-size 32 reached fid_domain 21.9 "
                      "in 5 MNIST epochs against 28.2, at about 2.7x the time per epoch: docs/results.md)", None),
    "dcgan_generator_width": ("adversarial", "DCGAN: G's channels over D's (default 1; at the old 2e-4 learning rate, "
                      "2 reached fid_domain 25.5 against 28.2 in 5 MNIST epochs, at about 1.6x the time per epoch: "
                      "docs/results.md)", None),
    "prior": ("adversarial", "AAE prior", ("gaussian", "uniform", "mixture")),
    "prior_std": ("adversarial", "AAE Gaussian prior std", None),
    "supervised_prior": ("adversarial", "AAE: tie mixture components to labels", None),
    "nll_k": ("evaluation", "importance samples per image for the test NLL", None),
    "nll_images": ("evaluation", "test images for the NLL estimate", None),
    "fid_samples": ("evaluation", "generated samples for FID", None),
    "log_every": ("evaluation", "steps between logged loss points", None),
}
NOT_OPTIONS = ("model", "extra")  # the positional argument; free-form data for config files only


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class BooleanFlag(argparse.Action):
    """--x (true), --no-x (false), and --x true|false as older scripts write it."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        name = option_strings[0][2:]
        super().__init__([f"--{name}", f"--no-{name}"], dest, nargs="?", metavar="true|false", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if option_string is not None and option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"{option_string} takes no value (write --{option_string[5:]} {value} instead)")
            setattr(namespace, self.dest, False)
            return
        try:
            setattr(namespace, self.dest, True if value is None else parse_bool(value))
        except argparse.ArgumentTypeError as error:
            parser.error(f"argument {option_string}: {error}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BooleanFlag):
            return " | ".join(action.option_strings)
        return super()._format_action_invocation(action)


def _value_type(hint: Any) -> Any:
    """int for `int | None`, and so on."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def model_kinds_help() -> str:
    """One line per registered model kind, from the model registry (class docstrings)."""
    from genserve.training.models import model_classes

    classes = model_classes()
    width = max(len(name) for name in classes)
    return "\n".join(f"  {name:<{width}}  {cls.summary()}" for name, cls in classes.items())


def build_parser() -> argparse.ArgumentParser:
    from genserve.training.models import model_classes

    p = argparse.ArgumentParser(
        prog="genserve-train",
        usage="genserve-train MODEL --dataset NAME --out RUN_DIR [options]",
        description="Train a generative image model. Writes checkpoints, metrics.json, TensorBoard events\n"
        "and pictures (RUN_DIR/plots/) into RUN_DIR.\n\nModel kinds (MODEL):\n" + model_kinds_help(),
        epilog="Examples:\n"
        "  genserve-train vae --dataset mnist-5k --epochs 5 --out runs/vae\n"
        "  genserve-train dae --dataset mnist --data-dir ../shared/data --noise-factor 0.5 --out runs/dae\n"
        "  genserve-train vae --out runs/vae --resume --epochs 20   # continue (and extend) a run\n"
        "Every option can also come from --config FILE (YAML or TOML, same names); flags override it.\n"
        "Boolean options take --x or --no-x (or --x true|false).",
        formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS,  # only what the user typed overrides the config file
    )
    p.add_argument("model", choices=tuple(model_classes()), metavar="MODEL", help="model kind (listed above)")
    groups = {name: p.add_argument_group(name) for name in dict.fromkeys(group for group, _, _ in OPTIONS.values())}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in NOT_OPTIONS:
            continue
        group, text, choices = OPTIONS.get(field.name, ("other", "see training/config.py", None))
        group_parser = groups.setdefault(group, p.add_argument_group(group))
        if field.default is not None and field.default is not dataclasses.MISSING:
            default = str(field.default).lower() if isinstance(field.default, bool) else field.default
            text = f"{text} (default {default})"
        flag = "--" + field.name.replace("_", "-")
        value_type = _value_type(hints[field.name])
        if value_type is bool:
            group_parser.add_argument(flag, action=BooleanFlag, dest=field.name, help=text)
        else:
            group_parser.add_argument(flag, type=value_type, choices=choices, dest=field.name, help=text)
    run = groups["run"]
    run.add_argument("--config", type=Path, help="YAML or TOML file of options")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def resolve_config(args: dict[str, Any]) -> tuple[TrainConfig, bool]:
    """Merge defaults, the config file, the saved run (on --resume) and the flags."""
    resume = bool(args.pop("resume", False))
    args.pop("verbose", None)
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file is not None:
        values.update(read_config_file(config_file))
    values.update(args)
    out = Path(values.get("out", TrainConfig.out))
    if resume and not out.is_dir():
        raise FileNotFoundError(
            f"--resume: the run directory {out} does not exist; check --out, or drop --resume to start a new run"
        )
    saved = out / "config.json"
    if resume and saved.is_file():
        stored = json.loads(saved.read_text())
        if values.get("model", stored["model"]) != stored["model"]:
            raise ValueError(f"{out} holds a {stored['model']} run; cannot resume it as {values['model']}")
        values = {**stored, **values}
    return TrainConfig.from_dict(values), resume


def interrupted_message(config: TrainConfig) -> str:
    """What a Ctrl-C leaves behind and how to go on from there."""
    from genserve.training.checkpoint import epoch_checkpoints

    out = Path(config.out)
    kept = epoch_checkpoints(out)
    if not kept:
        return ("genserve-train: interrupted before the first epoch ended; no checkpoint was written, "
                "so run the same command again to start over")
    return (f"genserve-train: interrupted; the last whole epoch is kept in {kept[-1]}; "
            f"continue with: genserve-train {config.model} --out {out} --resume")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before training began: nothing was written that matters
        print("genserve-train: interrupted before training started", file=sys.stderr)
        return INTERRUPTED


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.get("verbose") else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from genserve.training.checkpoint import CheckpointError
    from genserve.training.data.errors import DatasetError
    from genserve.training.trainer import NonFiniteLossError, train

    errors = (ValueError, FileNotFoundError, FileExistsError, DatasetError, CheckpointError, NonFiniteLossError)
    try:
        config, resume = resolve_config(args)
    except errors as error:
        print(f"genserve-train: error: {error}", file=sys.stderr)
        return 2
    try:
        run_dir = train(config, resume=resume)
    except errors as error:
        print(f"genserve-train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Checkpoints are renamed into place whole (training/checkpoint.py), so whatever the moment of
        # the interrupt, the newest one on disk is complete.
        fresh_line = "\n" if sys.stderr.isatty() else ""  # after the progress bar and the terminal's ^C
        print(f"{fresh_line}{interrupted_message(config)}", file=sys.stderr)
        return INTERRUPTED

    from genserve.training.distributed import Distributed

    if not Distributed.from_environment().is_main:
        return 0  # under torchrun, rank 0 writes and reports the run
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    print(json.dumps({"run_dir": str(run_dir), "final": final}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
