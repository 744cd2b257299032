"""`genserve-train MODEL --dataset NAME --out RUN_DIR`: fit one model; precedence is
defaults < --config FILE < command-line flags (< the saved run config on --resume, for what you do not set)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from training.config import MODEL_KINDS, TrainConfig, read_config_file

DATASET_HELP = "mnist | fashion-mnist | cifar10 | faces | textures | mnist-5k (embedded, no download)"


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genserve-train",
        description="Train a generative image model. Writes checkpoints, metrics.json, TensorBoard events "
        "and pictures (RUN_DIR/plots/) into RUN_DIR.",
        epilog="Examples:\n"
        "  genserve-train vae --dataset mnist-5k --epochs 5 --out runs/vae\n"
        "  genserve-train dae --dataset mnist --data-dir ../shared/data --noise-factor 0.5 --out runs/dae\n"
        "  genserve-train vae --out runs/vae --resume --epochs 20   # continue (and extend) a run\n"
        "Every option can also come from --config FILE (YAML or TOML, same names); flags override it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only what the user typed overrides the config file
    )
    p.add_argument("model", choices=MODEL_KINDS, help="model kind")
    g = p.add_argument_group("run")
    g.add_argument("--dataset", help=f"dataset: {DATASET_HELP} (default mnist-5k)")
    g.add_argument("--data-dir", help="dataset folder (default: $GENSERVE_DATA, else ./data)")
    g.add_argument("--out", help="run directory (default runs/default)")
    g.add_argument("--config", type=Path, help="YAML or TOML file of options")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--epochs", type=int, help="epochs to train (default 10)")
    g.add_argument("--batch-size", type=int, help="batch size (default 128)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default per model: 1e-3; 2e-4 for GANs)")
    g.add_argument("--latent-dim", type=int, help="latent size (default per model)")
    g.add_argument("--limit", type=int, help="use only the first N training images")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: CUDA when present")
    g.add_argument("--seed", type=int, help="random seed (default 0); CPU runs are reproducible")
    g.add_argument("--compile", type=_bool, nargs="?", const=True, help="torch.compile the model")
    g.add_argument("--amp", type=_bool, help="bf16 autocast on CUDA (default true)")
    g.add_argument("--image-size", type=int, help="faces: resize to this; textures: crop size")
    g = p.add_argument_group("data")
    g.add_argument("--binarize", type=_bool, help="dynamic binarisation (default: on for MNIST with a Bernoulli VAE)")
    g.add_argument("--noise-factor", type=float, help="denoiser input noise std, clipped to [0,1] (default 0.5)")
    g = p.add_argument_group("VAE")
    g.add_argument("--likelihood", choices=("bernoulli", "gaussian", "gaussian-learned"), help="decoder likelihood")
    g.add_argument("--gaussian-sigma", type=float, help="fixed decoder std for --likelihood gaussian (default 0.1)")
    g.add_argument("--beta", type=float, help="KL weight (default 1)")
    g.add_argument("--kl-warmup", type=float, help="fraction of training over which the KL weight rises from 0")
    g = p.add_argument_group("adversarial")
    g.add_argument("--noise-dim", type=int, help="GAN noise size (default 100)")
    g.add_argument("--balance", type=_bool, nargs="?", const=True, help="DCGAN: skip a player far ahead")
    g.add_argument("--upsample", choices=("transposed", "resize"), help="DCGAN generator upsampling")
    g.add_argument("--prior", choices=("gaussian", "uniform", "mixture"), help="AAE prior")
    g.add_argument("--prior-std", type=float, help="AAE Gaussian prior std (default 5)")
    g.add_argument("--supervised-prior", type=_bool, nargs="?", const=True, help="AAE: tie mixture components to labels")
    g = p.add_argument_group("evaluation")
    g.add_argument("--nll-k", type=int, help="importance samples per image for test NLL (default 100)")
    g.add_argument("--nll-images", type=int, help="test images for the NLL estimate (default 1000)")
    g.add_argument("--fid-samples", type=int, help="generated samples for FID (default 2000)")
    g.add_argument("--log-every", type=int, help="steps between logged loss points (default 50)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    saved = out / "config.json"
    if resume and saved.is_file():
        stored = json.loads(saved.read_text())
        if values.get("model", stored["model"]) != stored["model"]:
            raise ValueError(f"{out} holds a {stored['model']} run; cannot resume it as {values['model']}")
        values = {**stored, **values}
    return TrainConfig.from_dict(values), resume


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.get("verbose") else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from training.checkpoint import CheckpointError
    from training.data.errors import DatasetError
    from training.trainer import NonFiniteLossError, train

    try:
        config, resume = resolve_config(args)
        run_dir = train(config, resume=resume)
    except (ValueError, FileNotFoundError, FileExistsError, DatasetError, CheckpointError, NonFiniteLossError) as error:
        print(f"genserve-train: error: {error}", file=sys.stderr)
        return 2
    from training.distributed import Distributed

    if not Distributed.from_environment().is_main:
        return 0  # under torchrun, rank 0 writes and reports the run
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    print(json.dumps({"run_dir": str(run_dir), "final": final}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
