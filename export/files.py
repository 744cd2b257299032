"""Strict JSON and hashing for the model repository (no torch, no onnx: the server imports this).

Durable writes are training.files (write_bytes_durable, write_atomic, fsync_dir), shared with training.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, so it serialises as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dump_json(data: Any) -> bytes:
    """Strict, stable JSON (sorted keys, no NaN) with a trailing newline."""
    return (json.dumps(json_safe(data), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
