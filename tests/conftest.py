"""Shared fixtures: the real datasets in ../shared/data and the embedded MNIST subset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.data.registry import load_dataset
from training.data.types import ImageDataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Decode caches go to a temporary dir (unless GENSERVE_CACHE is set), never to ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get("GENSERVE_CACHE"):
            patch.setenv("GENSERVE_CACHE", str(tmp_path_factory.mktemp("genserve-cache")))
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets: $GENSERVE_DATA, else ../shared/data beside the repository."""
    path = Path(os.environ.get("GENSERVE_DATA") or REPO.parent / "shared" / "data")
    if not (path / "mnist").is_dir():
        pytest.fail(f"real datasets not found at {path}; set GENSERVE_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def mnist_5k() -> ImageDataset:
    """The embedded 5,000-digit MNIST subset (4,500 train / 500 test), loaded once per session."""
    return load_dataset("mnist-5k")
