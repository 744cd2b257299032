"""CIFAR-10 from the official pickle batches (folder or tarball) or a class-per-folder image tree
(folder or .tar.gz), with decoded archives cached as .npz under the user cache dir."""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from genserve.training.cache import cache_dir
from genserve.training.data.errors import DatasetError, DatasetMissingError, fix_command
from genserve.training.data.types import ImageDataset
from genserve.training.files import atomic_write

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
ORDER_SEED = 0  # image trees are stored class by class; this fixed shuffle mixes them
CACHE_VERSION = 1  # bump when the cached layout or decoding changes
_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
_SIDE = 32


def load_cifar10(data_dir: Path) -> ImageDataset:
    """Load CIFAR-10 from the first source found under `data_dir` (see `cifar10_sources`)."""
    sources = cifar10_sources(data_dir)
    if not sources:
        looked = "\n  ".join(dict.fromkeys(str(path) for _, path in cifar10_sources(data_dir, existing=False)))
        raise DatasetMissingError(
            f"cifar10: no CIFAR-10 data found; looked for:\n  {looked}\nFix: {fix_command('cifar10', data_dir)}"
        )
    kind, path = sources[0]
    if kind == "batches-dir":  # plain pickles load in well under a second: no cache
        return _to_dataset(_read_batches_dir(path, data_dir))
    reader = _read_batches_tar if kind == "batches-tar" else _read_tree
    return _to_dataset(cached(path, lambda: reader(path, data_dir)))


def cifar10_sources(data_dir: Path, existing: bool = True) -> list[tuple[str, Path]]:
    """The places CIFAR-10 is looked for, best first, as (kind, path)."""
    candidates = [
        ("batches-dir", data_dir / "cifar10" / "cifar-10-batches-py"),
        ("batches-dir", data_dir / "cifar-10-batches-py"),
        ("batches-dir", data_dir / "cifar10"),
        ("batches-tar", data_dir / "cifar10" / "cifar-10-python.tar.gz"),
        ("batches-tar", data_dir / "cifar-10-python.tar.gz"),
        ("tree", data_dir / "cifar10"),
        ("tree", data_dir / "cifar10-jpg"),
        ("tree", data_dir / "cifar10-jpg" / "cifar10-jpg.tar.gz"),
        ("tree", data_dir / "cifar10" / "cifar10-jpg.tar.gz"),
    ]
    if not existing:
        return candidates
    found = []
    for kind, path in candidates:
        if kind == "batches-dir" and not (path / "data_batch_1").is_file():
            continue
        if kind == "tree" and path.is_dir() and not (path / "train").is_dir():
            continue
        if path.exists():
            found.append((kind, path))
    return found


# --- official pickle batches -------------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold (dicts, lists, bytes, ints and numpy arrays): any
    other global, e.g. os.system in a tampered file, is refused instead of being called."""

    def find_class(self, module: str, name: str) -> object:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, whatever its module
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes in protocol 2 pickles
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to unpickle the global {module}.{name}")


def _unpickle_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        # encoding="bytes": the official batches are Python 2 pickles, their str keys become bytes
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # any failure of untrusted bytes is a corrupt file
        raise DatasetError(f"cifar10: {where} is not a readable CIFAR batch: {err}") from err
    if not isinstance(batch, dict):
        raise DatasetError(f"cifar10: {where} holds a {type(batch).__name__}, not a CIFAR batch dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    images, labels = batch.get("data"), batch.get("labels")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * _SIDE * _SIDE:
        raise DatasetError(f"cifar10: {where}: 'data' is not a uint8 (N, 3072) array")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(images),) or (labels.size and not 0 <= labels.min() <= labels.max() < 10):
        raise DatasetError(f"cifar10: {where}: 'labels' must be {len(images)} integers in 0..9")
    return images.reshape(-1, 3, _SIDE, _SIDE), labels


def _join(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _read_batches_dir(folder: Path, data_dir: Path) -> dict[str, np.ndarray]:
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for split, names in (("train", _BATCHES), ("test", ["test_batch"])):
        for name in names:
            path = folder / name
            if not path.is_file():
                raise DatasetMissingError(f"cifar10: {path} is missing. Fix: {fix_command('cifar10', data_dir)}")
            try:
                parts[split].append(_unpickle_batch(path.read_bytes(), str(path)))
            except DatasetError as err:
                raise DatasetError(f"{err}. Fix: {fix_command('cifar10', data_dir)}") from err
    return _arrays(_join(parts["train"]), _join(parts["test"]), CIFAR10_CLASSES)


def _read_batches_tar(path: Path, data_dir: Path) -> dict[str, np.ndarray]:
    wanted = {*_BATCHES, "test_batch"}
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, data in _tar_files(path, data_dir):
        base = PurePosixPath(name).name
        if base in wanted:
            found[base] = _unpickle_batch(data, f"{path}:{name}")
    missing = sorted(wanted - set(found))
    if missing:
        raise DatasetError(
            f"cifar10: {path} lacks {', '.join(missing)}; it is not the complete cifar-10-python.tar.gz. "
            f"Fix: {fix_command('cifar10', data_dir)}"
        )
    train = _join([found[name] for name in _BATCHES])
    return _arrays(train, found["test_batch"], CIFAR10_CLASSES)


# --- class-per-folder image trees ----------------------------------------------------------------


def _read_tree(path: Path, data_dir: Path) -> dict[str, np.ndarray]:
    """train/<class>/* and test/<class>/* images, from a folder or a .tar(.gz) without extracting."""
    files = _tar_files(path, data_dir) if path.is_file() else _folder_files(path)
    entries: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    for name, data in files:
        parts = name.split("/")  # str.split: PurePosixPath costs seconds over 60k names
        if len(parts) < 3 or parts[-1].startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
            continue
        split, label, filename = parts[-3:]
        if split in entries:
            entries[split].append((label, filename, data))
    if not entries["train"] or not entries["test"]:
        raise DatasetError(
            f"cifar10: {path} has no images under train/<class>/ and test/<class>/. "
            f"Fix: {fix_command('cifar10', data_dir)}"
        )
    found = sorted({label for label, _, _ in entries["train"]})
    classes = CIFAR10_CLASSES if set(found) == set(CIFAR10_CLASSES) else found
    extra = sorted({label for label, _, _ in entries["test"]} - set(classes))
    if extra:
        raise DatasetError(f"cifar10: {path}: test classes {extra} have no training images")
    index = {name: i for i, name in enumerate(classes)}
    splits = {}
    for split, items in entries.items():
        items.sort(key=lambda item: (index[item[0]], item[1]))
        images = _decode_all(((f"{split}/{label}/{fn}", data) for label, fn, data in items), len(items), path)
        labels = np.array([index[label] for label, _, _ in items], dtype=np.int64)
        order = np.random.default_rng(ORDER_SEED).permutation(len(items))
        splits[split] = (images[order], labels[order])
    return _arrays(splits["train"], splits["test"], classes)


def _folder_files(root: Path) -> Iterator[tuple[str, bytes]]:
    for split in ("train", "test"):
        for path in sorted((root / split).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                yield path.relative_to(root).as_posix(), path.read_bytes()


def _tar_files(path: Path, data_dir: Path) -> Iterator[tuple[str, bytes]]:
    """Regular files of a tar archive, streamed (no extraction; links and devices are skipped)."""
    try:
        # "r|*": one sequential pass, much faster than random access into a gzip stream
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if member.isfile():
                    handle = archive.extractfile(member)
                    if handle is not None:
                        yield member.name, handle.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DatasetError(
            f"cifar10: {path} is truncated or corrupt ({type(err).__name__}: {err}). "
            f"Fix: {fix_command('cifar10', data_dir)}"
        ) from err


def _decode_all(files: Iterable[tuple[str, bytes]], count: int, source: Path) -> np.ndarray:
    out = np.empty((count, _SIDE, _SIDE, 3), np.uint8)
    for i, (name, data) in enumerate(files):
        try:
            with Image.open(io.BytesIO(data)) as image:
                size = image.size
                pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:  # what Pillow raises for undecodable data
            raise DatasetError(f"cifar10: {source}:{name} is not a readable image: {err}") from err
        if size != (_SIDE, _SIDE):
            raise DatasetError(f"cifar10: {source}:{name} is {size[0]}x{size[1]}, not {_SIDE}x{_SIDE}")
        out[i] = pixels
    return out.transpose(0, 3, 1, 2).copy()


# --- shared helpers and the decode cache ---------------------------------------------------------


def _arrays(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], classes: list[str]
) -> dict[str, np.ndarray]:
    return {
        "train_images": train[0],
        "train_labels": train[1],
        "test_images": test[0],
        "test_labels": test[1],
        "class_names": np.array(classes),
    }


def _to_dataset(arrays: dict[str, np.ndarray]) -> ImageDataset:
    return ImageDataset(
        "cifar10",
        torch.from_numpy(np.ascontiguousarray(arrays["train_images"])),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(np.ascontiguousarray(arrays["test_images"])),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        [str(name) for name in arrays["class_names"]],
    )


def cache_path(source: Path) -> Path:
    """Cache file for `source`, keyed by its resolved path, size and mtime (every file's, for a folder)."""
    source = source.resolve()
    key = hashlib.sha256(f"v{CACHE_VERSION}\0{source}".encode())
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    for path in files:
        stat = path.stat()
        key.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return cache_dir() / "cifar10" / f"{key.hexdigest()[:32]}.npz"


def cached(source: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`build()`'s arrays, from the cache when `source` is unchanged; written atomically after a build."""
    path = cache_path(source)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {key: stored[key] for key in stored.files}
        except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as err:
            # a damaged cache is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable cache {path}: {err}", stacklevel=2)
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:  # readers see the old file or the whole new one
            np.savez(f, **arrays)  # a file object: given a name, savez would add ".npz" to it
    except OSError as err:  # a read-only or full cache dir only costs speed next time
        warnings.warn(f"could not write the decode cache {path}: {err}; set GENSERVE_CACHE", stacklevel=2)
    return arrays
