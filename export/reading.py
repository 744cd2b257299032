"""Reading repository files as the server must: regular files only, never through a symlink, size-capped.

A FIFO would block the reader forever, `/dev/zero` would never end, and a symlink would let a
version serve (or make the server read) a file outside the repository. Every repository read on
the serving side goes through `read_regular` or `sha256_regular`. No torch, no onnx.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

_CHUNK = 1 << 20
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer (it is refused below,
# after fstat, without ever reading). It has no effect on regular files.
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class RefusedFileError(OSError):
    """A repository file that is not read: a symlink, not a regular file, or over its size cap."""

    def __str__(self) -> str:
        return str(self.strerror)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: Path, max_bytes: int) -> int:
    """An fd open on `path`, which must be a regular file (not a symlink) of at most max_bytes."""
    try:
        fd = os.open(path, _FLAGS)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RefusedFileError(
                errno.ELOOP, f"{path} is a symbolic link; repository files must be regular files inside the "
                "repository (publish the version again with genserve-export)"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RefusedFileError(errno.EINVAL, f"{path} is {_kind(info.st_mode)}, not a regular file; it is never read")
        if info.st_size > max_bytes:
            raise RefusedFileError(errno.EFBIG, f"{path} is {info.st_size} bytes, over the limit of {max_bytes} bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _chunks(fd: int, path: Path, max_bytes: int):
    total = 0
    while chunk := os.read(fd, _CHUNK):
        total += len(chunk)
        if total > max_bytes:  # it grew after fstat
            raise RefusedFileError(errno.EFBIG, f"{path} grew past the limit of {max_bytes} bytes while being read")
        yield chunk


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file (no symlink, no FIFO or device) of at most max_bytes; else RefusedFileError."""
    fd = _open_regular(path, max_bytes)
    try:
        return b"".join(_chunks(fd, path, max_bytes))
    finally:
        os.close(fd)


def sha256_regular(path: Path, max_bytes: int) -> tuple[str, int]:
    """(sha256 hex, size) of a regular file, read as read_regular reads it, without holding it in memory."""
    fd = _open_regular(path, max_bytes)
    digest, size = hashlib.sha256(), 0
    try:
        for chunk in _chunks(fd, path, max_bytes):
            digest.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest(), size


def unsafe_directory_reason(path: Path, root: Path) -> str | None:
    """Why a directory inside the repository must not be used (a symlink, or resolving outside `root`), or None."""
    if path.is_symlink():
        return f"{path} is a symbolic link; model and version directories must be real directories in the repository"
    try:
        resolved = path.resolve(strict=True)
    except OSError:
        return None  # missing: the caller reports that in its own words
    if not resolved.is_relative_to(root.resolve()):
        return f"{path} resolves to {resolved}, outside the repository {root}"
    return None
