"""Dataset errors whose messages say what is wrong and which command fixes it."""

from __future__ import annotations

import shlex
from pathlib import Path

# Datasets with no single official archive: their download needs a mirror given with --base-url.
_NEEDS_BASE_URL = frozenset({"textures", "cifar10-jpg"})


class DatasetError(ValueError):
    """A dataset is missing, truncated or corrupt, or was asked for in a way it cannot be given."""


class DatasetMissingError(DatasetError, FileNotFoundError):
    """A dataset file or folder is not where the loader looked."""


class DownloadError(DatasetError):
    """A download failed (network, HTTP status, timeout, incomplete transfer)."""


class ChecksumError(DownloadError):
    """A file was fully downloaded (or is on disk) but its checksum is not the one on record."""


def fix_command(name: str, data_dir: str | Path) -> str:
    """The shell command that (re)downloads dataset `name` into `data_dir`."""
    command = f"genserve-data download {name} --data-dir {shlex.quote(str(data_dir))}"
    if name in _NEEDS_BASE_URL:
        command += " --base-url URL"
    return command
