"""protos/*.proto -> serving/generated/ (Python messages and gRPC stubs, made by grpcio-tools).

    python -m genserve.serving.protos_build          # regenerate when the .proto files changed
    python -m genserve.serving.protos_build --force  # regenerate anyway

The generated code is not committed. It is made at install time (setup.py's build_py hook), and
`ensure_generated()` (called by serving.protos on import) rebuilds it whenever it is missing or
older than the .proto files: serving/generated/PROTOS_SHA256 holds the hash of the sources it was
built from. Builds go to a temporary directory that replaces serving/generated/ in one rename,
under a file lock, so concurrent processes never see half a package.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
GENERATED = PACKAGE_DIR / "generated"
PROTOS = PACKAGE_DIR.parent / "protos"
STAMP = "PROTOS_SHA256"
GENERATED_MODULES = (
    "genserve/v1/genserve_pb2.py",
    "genserve/v1/genserve_pb2_grpc.py",
    "inference/grpc_service_pb2.py",
    "inference/grpc_service_pb2_grpc.py",
    "inference/model_config_pb2.py",
)
GENERATED_PACKAGE = "genserve.serving.generated"
# (proto root relative to PROTOS, files relative to that root, output dir relative to GENERATED,
# whether the modules get a private descriptor pool). Triton's files are compiled from their own
# directory so their descriptors are named as in Triton ("grpc_service.proto"), and registered in a
# private pool: tritonclient (any version) registers the same names and symbols in the default
# pool, and a process may import both.
UNITS = (
    ("", ("genserve/v1/genserve.proto",), "", False),
    ("inference", ("grpc_service.proto", "model_config.proto"), "inference", True),
)
PRIVATE_POOL_MODULE = "_pool"
PRIVATE_POOL_SOURCE = '''"""The descriptor pool of the inference.* messages (kept apart from the default pool)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
'''


class ProtoBuildError(RuntimeError):
    """The .proto files could not be compiled, or generated code is missing and cannot be made."""


class GrpcToolsMissing(ProtoBuildError):
    """grpcio-tools (the compiler) is not installed."""


def proto_files(protos: Path = PROTOS) -> list[Path]:
    return sorted(protos / root / name for root, names, _, _ in UNITS for name in names)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def sources_hash(protos: Path = PROTOS) -> str:
    """sha256 over the .proto files' relative paths and contents, this builder's rules, and the
    grpcio-tools and protobuf versions (generated code must not be newer than the runtime)."""
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())  # a change in how code is generated also rebuilds
    digest.update(f"grpcio-tools={_version('grpcio-tools')} protobuf={_version('protobuf')}".encode())
    for path in proto_files(protos):
        digest.update(str(path.relative_to(protos)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def is_current(generated: Path = GENERATED, protos: Path = PROTOS) -> bool:
    stamp = generated / STAMP
    return stamp.is_file() and stamp.read_text().strip() == sources_hash(protos)


def _rewrite_imports(path: Path, top_modules: dict[str, str]) -> None:
    """protoc writes imports relative to the proto root ("from genserve.v1 import x_pb2",
    "import model_config_pb2"); make them absolute inside serving.generated."""
    text = path.read_text()
    for module, package in top_modules.items():
        text = re.sub(rf"^from {re.escape(module)} import ", f"from {package}.{module} import ", text, flags=re.M)
        text = re.sub(rf"^import ({re.escape(module)}) as ", rf"from {package} import \1 as ", text, flags=re.M)
    path.write_text(text)


def _use_private_pool(path: Path, package: str) -> None:
    """Register the module's descriptors in `package`'s private pool instead of the default one."""
    text = path.read_text()
    default = "_descriptor_pool.Default().AddSerializedFile("
    if default not in text:
        raise ProtoBuildError(f"{path}: protoc's output changed; cannot find {default!r}")
    text = text.replace(default, f"{PRIVATE_POOL_MODULE}.POOL.AddSerializedFile(")
    text = text.replace(
        "# @@protoc_insertion_point(imports)",
        f"# @@protoc_insertion_point(imports)\nfrom {package} import {PRIVATE_POOL_MODULE}",
        1,
    )
    path.write_text(text)


def _compile(out: Path, protos: Path) -> None:
    try:
        from grpc_tools import protoc
    except ImportError as error:
        raise GrpcToolsMissing(
            "grpcio-tools is needed to generate serving/generated/ from protos/: pip install grpcio-tools"
        ) from error
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    for root, names, target, private_pool in UNITS:
        target_dir = out / target
        target_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"-I{protos / root}",
            f"-I{well_known}",
            f"--python_out={target_dir}",
            f"--pyi_out={target_dir}",
            f"--grpc_python_out={target_dir}",
            *names,
        ]
        if protoc.main(args) != 0:
            raise ProtoBuildError(f"protoc failed on {', '.join(names)} (see its messages above)")
        package = f"{GENERATED_PACKAGE}.{target}".rstrip(".")
        if root == "":
            rewrites = {"genserve.v1": GENERATED_PACKAGE}
        else:
            rewrites = {Path(n).stem + "_pb2": package for n in names}
        for path in target_dir.rglob("*.py*"):
            _rewrite_imports(path, rewrites)
            if private_pool and path.name.endswith("_pb2.py"):
                _use_private_pool(path, package)
        if private_pool:
            (target_dir / f"{PRIVATE_POOL_MODULE}.py").write_text(PRIVATE_POOL_SOURCE)
    for directory in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (out / "README").write_text(
        "Generated from protos/ by `python -m genserve.serving.protos_build`; not committed. Do not edit.\n"
    )


def build(generated: Path = GENERATED, protos: Path = PROTOS, *, force: bool = False) -> bool:
    """Regenerate `generated` from `protos` unless it is current; returns True if it built."""
    if not protos.is_dir():
        raise ProtoBuildError(f"{protos} does not exist; cannot generate {generated}")
    generated.parent.mkdir(parents=True, exist_ok=True)
    lock_path = generated.parent / ".protos_build.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_current(generated, protos):
            return False
        digest = sources_hash(protos)
        staging = Path(tempfile.mkdtemp(prefix=".generated-", dir=generated.parent))
        try:
            _compile(staging, protos)
            (staging / STAMP).write_text(digest + "\n")
            old = None
            if generated.exists():
                old = generated.parent / f".generated-old-{os.getpid()}"
                os.rename(generated, old)
            os.rename(staging, generated)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return True


def ensure_generated() -> None:
    """Make sure serving/generated/ exists and matches protos/ (a no-op when it does).

    Without protos/ (an installed wheel) the generated code shipped with the package is used.
    """
    if PROTOS.is_dir():
        if not is_current():
            build()
    elif not all((GENERATED / module).is_file() for module in GENERATED_MODULES):
        raise ProtoBuildError(
            f"{GENERATED} is missing and {PROTOS} is not there to generate it from; reinstall genserve"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genserve.serving.protos_build", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="regenerate even if the code is current")
    args = parser.parse_args(argv)
    try:
        built = build(force=args.force)
    except ProtoBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{'generated' if built else 'up to date:'} {GENERATED} from {PROTOS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
