"""Shared fixtures: the real datasets in ../shared/data, the embedded MNIST subset, and the golden
repository of every model kind exported (built by helpers.model_repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from genserve.training.data.registry import load_dataset
from genserve.training.data.types import ImageDataset

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


@pytest.fixture(scope="session")
def golden_repository(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only: the cached repository with mnist-<kind> version 1 of every kind (see helpers.py)."""
    from helpers import model_repository  # imported here: it loads the server, which most tests never need

    try:
        cache_root = Path(request.config.cache.mkdir("genserve-serving-models"))
    except (AttributeError, OSError):  # no cache provider, or a read-only checkout
        cache_root = tmp_path_factory.mktemp("genserve-serving-models")
    return model_repository(cache_root)


@pytest.fixture(scope="module")
def channel(server):
    """A gRPC channel to the test module's own `server` fixture (a helpers.RunningServer)."""
    with server.channel() as channel:
        yield channel
