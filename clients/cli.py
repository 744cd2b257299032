"""genserve-client: call a genserve server from the shell; writes PNG grids and .npy files.

    genserve-client models
    genserve-client info mnist-vae
    genserve-client generate mnist-vae -n 64 --seed 1 -o samples.png [--latents-out z.npy]
    genserve-client encode mnist-vae --dataset mnist-5k --limit 500 -o latents.npy --plot latents.png
    genserve-client reconstruct mnist-vae --images a.png b.png -o reconstructions.png
    genserve-client denoise mnist-dae --dataset mnist-5k --limit 16 --noise 0.5 -o denoised.png
    genserve-client interpolate mnist-vae --dataset mnist-5k --offset 3 --steps 10 --spherical -o path.png

Images come from PNG files (--images) or a dataset split (--dataset, --split, --offset, --limit).
An output ending in .npy gets the float32 array; anything else a PNG picture.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
import numpy as np

from genserve.clients.client import DEFAULT_ADDRESS, GenserveClient, GenserveError


def _add_inputs(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--images", nargs="+", type=Path, metavar="PNG", help="PNG files (converted to the model's channels)")
    group.add_argument("--dataset", help="a dataset name (training.data.registry), e.g. mnist-5k")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--offset", type=int, default=0, help="first dataset image")
    parser.add_argument("--limit", type=int, default=16, help="dataset images to use")
    parser.add_argument("--data-dir", help="dataset folder (default: $GENSERVE_DATA or ./data)")


def _add_connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command shares. They are accepted before and after the command: the main
    parser holds the defaults, and each command's copy sets a value only when it is given there."""

    def default(value):
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("connection (before or after the command)")
    group.add_argument("--address", default=default(DEFAULT_ADDRESS), help=f"server host:port (default {DEFAULT_ADDRESS})")
    group.add_argument("--token-file", type=Path, default=default(None), help="file with the server's bearer token")
    group.add_argument("--tls", action="store_true", default=default(False), help="connect with TLS (system roots unless --tls-ca)")
    group.add_argument("--tls-ca", type=Path, default=default(None), help="PEM root certificates to trust")
    group.add_argument("--tls-cert", type=Path, default=default(None), help="PEM client certificate (with --tls-key)")
    group.add_argument("--tls-key", type=Path, default=default(None), help="PEM client key")
    group.add_argument("--timeout", type=float, default=default(60.0), help="seconds per call, retries included")
    group.add_argument("--retries", type=int, default=default(4), help="retries while the server is UNAVAILABLE")
    group.add_argument("--png", action="store_true", default=default(False),
                       help="send and receive images as PNG instead of raw tensors")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genserve-client", description=__doc__.splitlines()[0])
    _add_connection_options(p, defaults=True)
    shared = argparse.ArgumentParser(add_help=False)
    _add_connection_options(shared, defaults=False)
    commands = p.add_subparsers(dest="command", required=True)

    commands.add_parser("models", parents=[shared], help="list the served models")
    info = commands.add_parser("info", parents=[shared], help="one model version's manifest")
    info.add_argument("model")
    info.add_argument("--version", type=int)

    generate = commands.add_parser("generate", parents=[shared], help="sample images from the prior")
    generate.add_argument("model")
    generate.add_argument("-n", "--count", type=int, default=64)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--version", type=int)
    generate.add_argument("-o", "--out", type=Path, default=Path("samples.png"))
    generate.add_argument("--latents-out", type=Path, help="also write the latents (.npy)")

    encode = commands.add_parser("encode", parents=[shared], help="images -> latents (.npy) and a scatter plot")
    encode.add_argument("model")
    _add_inputs(encode)
    encode.add_argument("--version", type=int)
    encode.add_argument("-o", "--out", type=Path, default=Path("latents.npy"))
    encode.add_argument("--plot", type=Path, help="scatter plot of the latents (first two principal components)")

    reconstruct = commands.add_parser("reconstruct", parents=[shared], help="images -> encoder -> decoder -> images")
    reconstruct.add_argument("model")
    _add_inputs(reconstruct)
    reconstruct.add_argument("--sample", action="store_true", help="decode a posterior sample, not the mean")
    reconstruct.add_argument("--seed", type=int, default=0)
    reconstruct.add_argument("--version", type=int)
    reconstruct.add_argument("-o", "--out", type=Path, default=Path("reconstructions.png"))

    denoise = commands.add_parser("denoise", parents=[shared], help="noisy images -> clean images")
    denoise.add_argument("model")
    _add_inputs(denoise)
    denoise.add_argument("--noise", type=float, default=0.0, help="add Gaussian noise of this std first (clipped to [0, 1])")
    denoise.add_argument("--seed", type=int, default=0, help="seed of the added noise")
    denoise.add_argument("--version", type=int)
    denoise.add_argument("-o", "--out", type=Path, default=Path("denoised.png"))

    interpolate = commands.add_parser("interpolate", parents=[shared], help="decoded images along a path between two endpoints")
    interpolate.add_argument("model")
    _add_inputs(interpolate, required=False)
    interpolate.add_argument("--seed", type=int, help="interpolate between two prior samples drawn with this seed")
    interpolate.add_argument("--steps", type=int, default=10)
    interpolate.add_argument("--spherical", action="store_true")
    interpolate.add_argument("--version", type=int)
    interpolate.add_argument("-o", "--out", type=Path, default=Path("interpolation.png"))
    return p


def load_inputs(args: argparse.Namespace, channels: int) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """uint8 (N, C, H, W) images, their labels and class names (dataset inputs only)."""
    if args.images:
        from PIL import Image

        arrays = []
        for path in args.images:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
            arrays.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"the images differ in size: {sorted(shapes)}")
        return np.stack(arrays), None, None
    from genserve.training.data.registry import load_dataset

    dataset = load_dataset(args.dataset, args.data_dir)
    images = dataset.test_images if args.split == "test" else dataset.train_images
    labels = dataset.test_labels if args.split == "test" else dataset.train_labels
    window = slice(args.offset, args.offset + args.limit)
    if len(images[window]) == 0:
        raise ValueError(f"{args.dataset} {args.split} has {len(images)} images; --offset {args.offset} is past the end")
    return (
        images[window].numpy(),
        None if labels is None else labels[window].numpy(),
        dataset.class_names,
    )


def write_images(path: Path, images: np.ndarray, title: str, ncols: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, images.astype(np.float32))
        return
    from genserve.training.plots import image_grid  # matplotlib, no torch

    image_grid(path, images, title, ncols=ncols)


def write_rows(path: Path, rows: list[tuple[str, np.ndarray]], title: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, rows[-1][1].astype(np.float32))
        return
    from genserve.training.plots import image_rows  # matplotlib, no torch

    image_rows(path, rows, title)


def scatter(path: Path, latents: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None, title: str) -> None:
    """The first two principal components of the latents (the latents themselves when 2-D)."""
    from genserve.training.plots import latent_scatter  # matplotlib, no torch

    if latents.shape[1] == 2:
        points, axes = latents, ("z[0]", "z[1]")
    else:
        centered = latents - latents.mean(axis=0)
        _, _, vt = np.linalg.svd(centered.astype(np.float64), full_matrices=False)
        points, axes = centered @ vt[:2].T, ("principal component 1", "principal component 2")
    latent_scatter(path, points, labels, class_names, title, axes)


def _client(args: argparse.Namespace) -> GenserveClient:
    token = args.token_file.read_text().strip() if args.token_file else None
    return GenserveClient(
        args.address, token=token, tls=args.tls, root_certificates=args.tls_ca, client_certificate=args.tls_cert,
        client_key=args.tls_key, timeout=args.timeout, retries=args.retries, image_encoding="png" if args.png else "raw",
    )


def run(args: argparse.Namespace, client: GenserveClient) -> str:
    """Execute one command; returns the line to print."""
    if args.command == "models":
        lines = [f"{m.name}\t{m.kind}\tversion {m.latest_version}\t{', '.join(m.operations)}" for m in client.models()]
        return "\n".join(lines) or "no models loaded"
    if args.command == "info":
        import dataclasses
        import json

        return json.dumps(dataclasses.asdict(client.model(args.model, args.version)), indent=2)
    if args.command == "generate":
        result = client.generate(args.model, args.count, seed=args.seed, temperature=args.temperature, version=args.version)
        write_images(args.out, result.images, f"{args.model} v{result.version}, seed {args.seed}")
        if args.latents_out:
            args.latents_out.parent.mkdir(parents=True, exist_ok=True)
            np.save(args.latents_out, result.latents)
        return f"wrote {args.out} ({len(result.images)} images from {args.model} version {result.version})"

    info = client.model(args.model, args.version)
    if args.command == "interpolate":
        return _interpolate(args, client, info.image_shape[0])
    images, labels, class_names = load_inputs(args, info.image_shape[0])
    if args.command == "encode":
        encoding = client.encode(args.model, images, version=args.version)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, encoding.latents)
        if args.plot:
            scatter(args.plot, encoding.latents, labels, class_names, f"{args.model} v{encoding.version} latents")
        return f"wrote {args.out} ({encoding.latents.shape[0]} x {encoding.latents.shape[1]} latents, version {encoding.version})"
    originals = images.astype(np.float32) / 255
    if args.command == "reconstruct":
        result = client.reconstruct(args.model, images, sample=args.sample, seed=args.seed, version=args.version)
        write_rows(args.out, [("originals", originals), ("reconstructions", result.images)], f"{args.model} v{result.version}")
        return f"wrote {args.out} ({len(result.images)} reconstructions, version {result.version})"
    noisy = originals
    if args.noise > 0:
        noise = np.random.Generator(np.random.PCG64(args.seed)).standard_normal(originals.shape)
        noisy = np.clip(originals + args.noise * noise, 0, 1).astype(np.float32)
    result = client.denoise(args.model, noisy, version=args.version)
    rows = [("clean", originals), ("noisy", noisy)] if args.noise > 0 else [("inputs", originals)]
    write_rows(args.out, [*rows, ("denoised", result.images)], f"{args.model} v{result.version}")
    return f"wrote {args.out} ({len(result.images)} denoised images, version {result.version})"


def _interpolate(args: argparse.Namespace, client: GenserveClient, channels: int) -> str:
    if args.images or args.dataset:
        if args.dataset:
            args.limit = 2
        images, _, _ = load_inputs(args, channels)
        if len(images) != 2:
            raise ValueError(f"interpolation needs exactly 2 images, got {len(images)}")
        result = client.interpolate(args.model, images=images, steps=args.steps, spherical=args.spherical, version=args.version)
    else:
        ends = client.generate(args.model, 2, seed=args.seed or 0, version=args.version).latents
        result = client.interpolate(args.model, latents=ends, steps=args.steps, spherical=args.spherical, version=args.version)
    method = "spherical" if args.spherical else "linear"
    write_images(args.out, result.images, f"{args.model} v{result.version}, {method}", ncols=args.steps)
    return f"wrote {args.out} ({args.steps} images, {method}, version {result.version})"


def describe_failure(error: GenserveError, address: str) -> str:
    """The error, or for a server that is not there, what was tried and how to start one."""
    if error.code == grpc.StatusCode.UNAVAILABLE and "connect" in error.details.lower():
        return (f"no genserve server answers at {address} ({error.details}); start one with "
                "`genserve-serve --repository REPO` (or `make serve`), or point --address at a running one")
    return str(error)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _client(args) as client:
            print(run(args, client))
    except GenserveError as error:
        print(f"genserve-client: error: {describe_failure(error, args.address)}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        print(f"genserve-client: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
