"""The versioned model repository: REPO/NAME/VERSION/{manifest.json, <part>.onnx, ...}.

Publishing is atomic: a version is built in REPO/.staging-XXXX (same filesystem), fsynced, and renamed
to REPO/NAME/VERSION in one step, so a reader sees a whole version or none. Names that are not
positive integers (staging, removal and serving-marker entries all start with '.') are never versions.
Removal renames a version to a hidden name first, then deletes it.

The server holds no lock. It marks what it serves with `mark_serving` (one small JSON file per server
process in REPO/NAME/.serving/), and `keep_versions` never removes a marked version.
No torch or onnx imports: the server uses this module.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from genserve.export.files import dump_json, sha256_file
from genserve.export.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    ManifestError,
    RepositoryError,
    VerificationError,
)
from genserve.export.naming import validate_model_name
from genserve.export.reading import read_regular, sha256_regular, unsafe_directory_reason
from genserve.training.files import fsync_dir, fsync_file, write_atomic, write_bytes_durable  # no torch

STAGING_PREFIX = ".staging-"
REMOVING_PREFIX = ".removing-"
SERVING_DIR = ".serving"
STALE_AFTER_S = 3600.0  # staging dirs untouched this long belong to a dead exporter
_VERSION = re.compile(r"[1-9][0-9]*")  # used with fullmatch: "$" would accept "3\n"

# build(staging_dir, version) writes the version's files into staging_dir and returns its manifest
# (without `files`: the repository hashes whatever build wrote). It may be called again with a higher
# version when another publisher took the number meanwhile, so version-dependent content is rebuilt.
Builder = Callable[[Path, int], Manifest]


class VersionNotFoundError(RepositoryError, LookupError):
    """The model or version does not exist."""


@dataclass(frozen=True)
class VersionStatus:
    """A version directory and whether its manifest is valid (`error` says why not)."""

    version: int
    valid: bool
    error: str | None = None


def _check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"a version is a positive integer, got {version!r}")
    return version


def check_keep(keep: int) -> int:
    """`keep` (how many of the newest versions retention keeps) if it is a positive integer, else ValueError."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive integer (the newest versions to keep), got {keep!r}")
    return keep


class Repository:
    """A model repository rooted at `root`. Cheap to create; every call reads the filesystem afresh."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False):
        self.root = Path(root).absolute()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Repository({str(self.root)!r})"

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise RepositoryError(
                f"model repository {self.root} does not exist; create it by exporting a model: "
                f"genserve-export RUN_DIR --repository {self.root}"
            )

    def model_dir(self, name: str) -> Path:
        return self.root / validate_model_name(name)

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(_check_version(version))

    # --- listing --------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Model names (directories with a valid name), sorted. A model may have no valid version yet."""
        self._require_root()
        names = []
        for entry in self.root.iterdir():
            try:
                validate_model_name(entry.name)
            except ValueError:
                continue
            if entry.is_dir():
                names.append(entry.name)
        return sorted(names)

    def versions(self, name: str) -> list[int]:
        """Every version directory of `name`, ascending, valid or not ([] for an unknown model)."""
        self._require_root()
        model_dir = self.model_dir(name)
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if _VERSION.fullmatch(p.name) and p.is_dir())

    def status(self, name: str) -> list[VersionStatus]:
        """Each version with whether its manifest loads and validates (no hashing; see verify)."""
        result = []
        for version in self.versions(name):
            try:
                self.load_manifest(name, version)
            except RepositoryError as error:
                result.append(VersionStatus(version, False, str(error)))
            else:
                result.append(VersionStatus(version, True))
        return result

    def latest(self, name: str) -> int | None:
        """The newest version whose manifest is valid, or None. Call verify() before serving it."""
        valid = [s.version for s in self.status(name) if s.valid]
        return valid[-1] if valid else None

    # --- reading --------------------------------------------------------------------------------
    def load_manifest(self, name: str, version: int) -> Manifest:
        """The version's manifest, schema-checked. Raises VersionNotFoundError or ManifestError.

        Read as every serving-side read is (export.reading): a regular file, never through a
        symlink, at most MAX_MANIFEST_BYTES; a model or version directory that is a symlink or
        resolves outside the repository is refused too.
        """
        vdir = self.version_dir(name, version)
        if not vdir.is_dir():
            self._require_root()
            known = self.versions(name)
            raise VersionNotFoundError(
                f"model {name!r} has no version {version} in {self.root}; "
                + (f"versions: {known}" if known else "it has no versions")
            )
        for directory in (self.model_dir(name), vdir):
            reason = unsafe_directory_reason(directory, self.root)
            if reason is not None:
                raise ManifestError(f"{reason}; it is never served")
        path = vdir / MANIFEST_NAME
        try:
            text = read_regular(path, MAX_MANIFEST_BYTES)
        except FileNotFoundError as error:
            raise ManifestError(
                f"{vdir} has no {MANIFEST_NAME}: it is incomplete or was not published through a staging "
                "directory; it is never served (delete it, or re-export the model)"
            ) from error
        except OSError as error:  # RefusedFileError (FIFO, device, symlink, too big), permissions, I/O
            raise ManifestError(f"{path} cannot be read: {error}") from None
        manifest = Manifest.from_json(text, str(path))
        if manifest.name != name or manifest.version != version:
            raise ManifestError(
                f"{path} describes {manifest.name!r} version {manifest.version}, but lies in {name}/{version}; "
                "version directories must not be copied or renamed by hand"
            )
        return manifest

    def verify(self, name: str, version: int) -> Manifest:
        """Check the manifest schema and the sha256 of every file; no unlisted files allowed.

        Returns the manifest; raises VerificationError naming the file and the expected and actual hash.
        Files are read as load_manifest reads (regular files, no symlinks), each at most its listed size.
        """
        manifest = self.load_manifest(name, version)
        vdir = self.version_dir(name, version)
        for fname, entry in sorted(manifest.files.items()):
            path = vdir / fname
            try:
                actual, size = sha256_regular(path, entry.bytes)
            except FileNotFoundError:
                raise VerificationError(f"{name} version {version}: {fname} is listed in the manifest but missing") from None
            except OSError as error:
                if error.errno != errno.EFBIG:
                    raise VerificationError(f"{name} version {version}: {error}") from None
                actual, size = "not computed", path.stat().st_size  # bigger than listed: not read at all
            if actual != entry.sha256:
                raise VerificationError(
                    f"{name} version {version}: {path} has sha256 {actual} ({size} bytes), "
                    f"but the manifest expects {entry.sha256} ({entry.bytes} bytes); the file was altered or "
                    "corrupted after publishing. Published versions are immutable: re-export the model."
                )
        extra = sorted(p.name for p in vdir.iterdir() if p.name != MANIFEST_NAME and p.name not in manifest.files)
        if extra:
            raise VerificationError(
                f"{name} version {version}: {vdir} holds files the manifest does not list: {extra}; "
                "published versions are immutable: remove them or re-export the model"
            )
        return manifest

    def part_path(self, name: str, version: int, part: str, variant: str = "fp32") -> Path:
        """The ONNX file of one part ("encoder", ...) in one variant ("fp32" or "fp16")."""
        manifest = self.load_manifest(name, version)
        return self.version_dir(name, version) / manifest.file_for(part, variant)

    def read_part(self, manifest: Manifest, part: str, variant: str = "fp32") -> bytes:
        """The bytes of one graph, checked against the manifest's sha256 after reading.

        Pass them to onnxruntime.InferenceSession(data): what is checked is exactly what is loaded,
        with no window for the file to change between verify() and loading.
        """
        fname = manifest.file_for(part, variant)
        path = self.version_dir(manifest.name, manifest.version) / fname
        try:
            data = read_regular(path, manifest.files[fname].bytes)
        except FileNotFoundError as error:
            raise VerificationError(f"{manifest.name} version {manifest.version}: {fname} is missing") from error
        except OSError as error:
            raise VerificationError(f"{manifest.name} version {manifest.version}: {error}") from None
        expected = manifest.files[fname].sha256
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise VerificationError(
                f"{manifest.name} version {manifest.version}: {path} has sha256 {actual}, but the manifest "
                f"expects {expected}; the file was altered or corrupted after publishing. Re-export the model."
            )
        return data

    # --- publishing -----------------------------------------------------------------------------
    def publish(self, name: str, build: Builder, *, max_attempts: int = 100) -> int:
        """Build a new version of `name` in a staging dir and rename it into place; returns its number.

        The number is one more than the highest existing one; if another publisher takes it first,
        the next number is tried (build is called again for it).
        """
        validate_model_name(name)
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        model_dir = self.model_dir(name)
        model_dir.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        try:
            os.chmod(staging, 0o755)  # mkdtemp makes it 0700; servers may run as another user
            for _ in range(max_attempts):
                version = self._next_version(model_dir)
                self._build_into(staging, name, version, build)
                try:
                    # Atomic: fails with ENOTEMPTY/EEXIST when the number was taken meanwhile.
                    os.rename(staging, model_dir / str(version))
                except OSError as error:
                    if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                        continue
                    raise
                fsync_dir(model_dir)
                fsync_dir(self.root)
                return version
            raise RepositoryError(f"no free version number for {name} after {max_attempts} attempts")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @staticmethod
    def _next_version(model_dir: Path) -> int:
        taken = [int(p.name) for p in model_dir.iterdir() if _VERSION.fullmatch(p.name)]
        return max(taken, default=0) + 1

    @staticmethod
    def _build_into(staging: Path, name: str, version: int, build: Builder) -> None:
        for leftover in staging.iterdir():  # from an attempt whose number was taken
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        manifest = build(staging, version)
        if manifest.name != name or manifest.version != version:
            raise RepositoryError(
                f"builder returned a manifest for {manifest.name!r} version {manifest.version}, "
                f"expected {name!r} version {version}"
            )
        files: dict[str, FileEntry] = {}
        for path in sorted(staging.iterdir()):
            if path.name == MANIFEST_NAME:
                raise RepositoryError(f"builder wrote {MANIFEST_NAME} itself; the repository writes it")
            if not path.is_file() or path.is_symlink():
                raise RepositoryError(f"builder wrote {path.name}, which is not a plain file; versions are flat")
            fsync_file(path)  # durable regardless of how the builder wrote it
            files[path.name] = FileEntry(sha256_file(path), path.stat().st_size)
        manifest = manifest.with_files(files)
        Manifest.from_dict(json.loads(manifest.to_json()), f"manifest of {name} version {version}")  # schema
        write_bytes_durable(staging / MANIFEST_NAME, manifest.to_json())
        fsync_dir(staging)

    # --- retention ------------------------------------------------------------------------------
    def keep_versions(self, name: str, keep: int, protect: Iterable[int] = ()) -> list[int]:
        """Remove all but the newest `keep` valid versions; returns the removed numbers.

        Never removed: the kept ones, versions in `protect`, versions any server marked with
        mark_serving, and anything newer than the oldest kept version (e.g. an invalid newer one).
        """
        check_keep(keep)
        protected = {_check_version(v) for v in protect} | self.serving_versions(name)
        statuses = self.status(name)
        kept = [s.version for s in statuses if s.valid][-keep:]
        if not kept:
            return []  # no valid version at all: deleting anything could only make things worse
        removed = []
        for s in statuses:
            if s.version >= kept[0] or s.version in protected:
                continue
            if self._remove_version(name, s.version):
                removed.append(s.version)
        return removed

    def _remove_version(self, name: str, version: int) -> bool:
        model_dir = self.model_dir(name)
        hidden = model_dir / f"{REMOVING_PREFIX}{version}-{secrets.token_hex(4)}"
        try:
            os.rename(model_dir / str(version), hidden)  # unpublished in one step; deletion may take long
        except FileNotFoundError:
            return False  # removed concurrently
        fsync_dir(model_dir)
        shutil.rmtree(hidden, ignore_errors=True)
        return True

    def clean_stale(self, max_age_s: float = STALE_AFTER_S) -> list[Path]:
        """Delete staging dirs untouched for max_age_s (left by killed exporters) and unfinished removals."""
        if not self.root.is_dir():
            return []
        now = time.time()
        cleaned = []
        for entry in self.root.iterdir():
            if entry.name.startswith(STAGING_PREFIX) and now - _newest_mtime(entry) > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
                cleaned.append(entry)
            elif not entry.name.startswith(".") and entry.is_dir():
                for inner in entry.iterdir():
                    if inner.name.startswith(REMOVING_PREFIX):  # already unpublished: any age
                        shutil.rmtree(inner, ignore_errors=True)
                        cleaned.append(inner)
        return cleaned

    # --- serving marks --------------------------------------------------------------------------
    def mark_serving(self, name: str, versions: Iterable[int], holder: str = "default") -> Path:
        """Record (atomically) that server `holder` serves `versions` of `name`; keep_versions spares them.

        Each server process uses its own holder name (e.g. host-port) and rewrites its mark whenever
        it changes what it serves: mark the new version BEFORE loading it, unmark the old one after.
        """
        validate_model_name(holder, "serving holder name")
        marks = self.model_dir(name) / SERVING_DIR
        marks.mkdir(parents=True, exist_ok=True)
        data = {
            "holder": holder,
            "versions": sorted({_check_version(v) for v in versions}),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        final = marks / f"{holder}.json"
        write_atomic(final, dump_json(data))
        return final

    def clear_serving(self, name: str, holder: str = "default") -> None:
        """Remove server `holder`'s mark (on shutdown)."""
        validate_model_name(holder, "serving holder name")
        (self.model_dir(name) / SERVING_DIR / f"{holder}.json").unlink(missing_ok=True)

    def serving_versions(self, name: str) -> set[int]:
        """The union of the versions every server marked. A corrupt mark raises (nothing is assumed free)."""
        marks = self.model_dir(name) / SERVING_DIR
        if not marks.is_dir():
            return set()
        versions: set[int] = set()
        for path in marks.glob("*.json"):
            if path.name.startswith("."):
                continue
            try:
                data = json.loads(path.read_text())
                versions.update(_check_version(v) for v in data["versions"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise RepositoryError(
                    f"serving mark {path} is unreadable ({error}); fix or delete it "
                    "(it must hold {\"versions\": [positive ints]})"
                ) from error
        return versions


def keep_versions(repo: Repository | str | os.PathLike[str], name: str, keep: int, protect: Iterable[int] = ()) -> list[int]:
    """Function form of Repository.keep_versions."""
    repository = repo if isinstance(repo, Repository) else Repository(repo)
    return repository.keep_versions(name, keep, protect)


def _newest_mtime(path: Path) -> float:
    """The newest mtime of a directory and its files (a big file being written does not touch the dir)."""
    try:
        newest = path.stat().st_mtime
        for inner in path.iterdir():
            newest = max(newest, inner.stat().st_mtime)
    except FileNotFoundError:
        return time.time()  # vanished meanwhile: someone else is handling it
    return newest
