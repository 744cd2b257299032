"""Where genserve keeps what it can rebuild (decoded datasets, domain classifiers)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$GENSERVE_CACHE, else $XDG_CACHE_HOME/genserve, else ~/.cache/genserve; then `parts` below it."""
    if os.environ.get("GENSERVE_CACHE"):
        root = Path(os.environ["GENSERVE_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genserve"
    return root.joinpath(*parts)
