"""Files on disk: durable, atomic writes, and configuration files read into plain mappings.

A durable write goes to a temporary file beside its final name, is fsynced, renamed over that name
in one step (a reader sees the old file or the whole new one, never a partial one), and the
directory is fsynced so that the rename survives a crash. Training, the exporter and the model
repository all write this way. Standard library and PyYAML only: the server imports this module
(through the model repository), and it must stay free of torch.
"""

from __future__ import annotations

import errno
import os
import secrets
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")
# fsync of a directory fails with these where the filesystem cannot do it (some network and FUSE
# filesystems): nothing more can be done there, so it is skipped; any other error is raised.
_DIRECTORY_SYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


class ConfigFileError(ValueError):
    """A configuration file is missing, unreadable, of an unknown type, malformed or not a mapping."""


def fsync_dir(path: Path) -> None:
    """fsync a directory so that the names created, renamed or removed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _DIRECTORY_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file that another writer (safetensors, numpy, a builder) wrote and closed."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write `data` to a new file (never over an existing one) and fsync it; the caller renames it
    or fsyncs its directory once when all its files are written."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write; when the block ends without an
    error it is fsynced and renamed to `path`, and the directory fsynced. On an error it is removed
    and `path` is left as it was.

        with atomic_write(dest) as tmp:
            save_file(tensors, str(tmp))
    """
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a partial file after an error
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (see atomic_write)."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML (.yaml, .yml, .json) or TOML (.toml) configuration file holds, exactly as
    written; ConfigFileError saying what is wrong otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"cannot read config file {path}: {error}") from error
    if path.suffix not in CONFIG_SUFFIXES:
        raise ConfigFileError(f"config file {path} must end in {', '.join(CONFIG_SUFFIXES[:-1])} or {CONFIG_SUFFIXES[-1]}")
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ConfigFileError(f"config file {path} is not valid: {_syntax_problem(error)}") from error
    if values is None:  # an empty YAML file
        return {}
    if not isinstance(values, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping of option names to values")
    return values


def _syntax_problem(error: Exception) -> str:
    """One line: PyYAML's messages span several lines, with the position on the last."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None and getattr(error, "problem", None):
        return f"{error.problem} (at line {mark.line + 1}, column {mark.column + 1})"  # type: ignore[attr-defined]
    return " ".join(str(error).split())
