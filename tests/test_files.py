"""genserve.training.files: the one way genserve writes files durably and reads configuration files."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import environment_for_subprocess

from genserve.serving.config import ConfigError, load_config
from genserve.training.config import read_config_file
from genserve.training.files import (
    ConfigFileError,
    atomic_write,
    fsync_dir,
    read_config_mapping,
    write_atomic,
    write_bytes_durable,
)


def test_the_server_imports_only_this_module_of_training() -> None:
    """The helpers live in training/ (the lowest layer) so export and serving can share them; the
    serving process must still load no torch."""
    code = "import json, sys, genserve.serving.server, genserve.serving.cli; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environment_for_subprocess()
    )
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout))
    assert sorted(m for m in modules if m.startswith("genserve.training")) == ["genserve.training", "genserve.training.files"]
    assert "torch" not in modules


# --- durable writes -------------------------------------------------------------------------------
def test_write_atomic_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b"one\n")
    write_atomic(path, b"two\n")
    assert path.read_bytes() == b"two\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_write(path) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_atomic_write_hands_out_a_hidden_path_beside_the_target(tmp_path: Path) -> None:
    with atomic_write(tmp_path / "cache.npz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".cache.npz.tmp-") and not tmp.exists()
        tmp.write_bytes(b"x")
    assert (tmp_path / "cache.npz").read_bytes() == b"x"


def test_write_bytes_durable_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "decoder.onnx"
    write_bytes_durable(path, b"graph")
    with pytest.raises(FileExistsError):
        write_bytes_durable(path, b"another graph")
    assert path.read_bytes() == b"graph"


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_fsync_dir_skips_filesystems_that_cannot_sync_a_directory(tmp_path: Path, monkeypatch, code: int) -> None:
    def unsupported(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", unsupported)
    fsync_dir(tmp_path)  # no error: nothing more can be done there


def test_fsync_dir_raises_real_io_errors(tmp_path: Path, monkeypatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output error"):
        fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        fsync_dir(_write(tmp_path / "file", ""))


# --- configuration files --------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("run.yaml", "epochs: 3\nlimits: {max_batch: 2}\n"),
        ("run.yml", "epochs: 3\nlimits:\n  max_batch: 2\n"),
        ("run.toml", "epochs = 3\n[limits]\nmax_batch = 2\n"),
        ("run.json", '{"epochs": 3, "limits": {"max_batch": 2}}'),
    ],
)
def test_config_files_read_as_written(tmp_path: Path, name: str, text: str) -> None:
    assert read_config_mapping(_write(tmp_path / name, text)) == {"epochs": 3, "limits": {"max_batch": 2}}


def test_an_empty_yaml_file_is_an_empty_mapping(tmp_path: Path) -> None:
    assert read_config_mapping(_write(tmp_path / "empty.yaml", "")) == {}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.yaml", None, r"config file .*missing.yaml does not exist"),
        ("run.ini", "epochs=3", r"must end in .yaml, .yml, .toml or .json"),
        ("bad.yaml", "epochs: [3\n", r"bad.yaml is not valid: expected ',' or '\]', but got .* \(at line 2, column 1\)"),
        ("bad.toml", "epochs = \n", r"bad.toml is not valid: Invalid value \(at line 1, column 10\)"),
        ("list.yaml", "- 1\n- 2\n", "must hold a mapping of option names to values"),
    ],
)
def test_config_file_errors_say_what_is_wrong(tmp_path: Path, name: str, text: str | None, message: str) -> None:
    path = tmp_path / name if text is None else _write(tmp_path / name, text)
    with pytest.raises(ConfigFileError, match=message) as error:
        read_config_mapping(path)
    assert isinstance(error.value, ValueError) and len(str(error.value).splitlines()) == 1


def test_training_and_serving_read_config_files_the_same_way(tmp_path: Path) -> None:
    assert read_config_file(_write(tmp_path / "t.toml", "batch-size = 16\nkl_warmup = 0.5\n")) == {
        "batch_size": 16, "kl_warmup": 0.5,
    }
    config = load_config(_write(tmp_path / "s.json", '{"repository": "/m", "port": 9001}'))
    assert (config.repository, config.port) == ("/m", 9001)
    with pytest.raises(ConfigError, match="bad.yaml is not valid"):
        load_config(_write(tmp_path / "bad.yaml", "port: [1\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
