"""What the server knows about each model version: one `VersionState` record per version (Triton's
model states), and, for a version that takes traffic, its sessions and batchers (`LoadedVersion`).

A version has a record from the moment a load of it starts until it has been unloaded:

    LOADING      verify, create sessions, warm up (serving/loader.py)
    READY        takes traffic (`loaded` holds its graphs)
    UNLOADING    retired: finishes its in-flight requests, then its record is dropped
    UNAVAILABLE  refused at some load stage; `reason` says why (the poller does not retry it)

A version without a record (in the repository, never tried, or unloaded) is UNAVAILABLE too, as
the repository index reports it: "not loaded", or "unloaded" when the model was unloaded by hand.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

import numpy as np

from genserve.export import Manifest, PartSpec
from genserve.serving.batcher import DynamicBatcher, Timing
from genserve.serving.codec import all_finite
from genserve.serving.config import ModelSettings
from genserve.serving.errors import InvalidArgument, ServingError
from genserve.serving.runtime import GraphSession
from genserve.serving.statistics import GraphStats


class State(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class LoadedGraph:
    """One part of one loaded version: its session, its batcher and its statistics."""

    model: str
    version: int
    part: str
    variant: str
    spec: PartSpec
    session: GraphSession
    batcher: DynamicBatcher
    stats: GraphStats

    @property
    def oip_name(self) -> str:
        return f"{self.model}.{self.part}"

    async def infer(self, rows: np.ndarray, deadline: float | None = None) -> tuple[list[np.ndarray], Timing]:
        """Run rows (N, ...) through the graph via the batcher; outputs in the manifest's order."""
        started = time.perf_counter()
        try:
            result = await self.batcher.infer(rows, deadline)
            if not all(all_finite(output) for output in result[0]):  # never an OK with NaN pixels
                raise InvalidArgument(
                    f"{self.oip_name} version {self.version} computed NaN or infinite values for these inputs; "
                    "send smaller latents (or a lower temperature)"
                )
        except (ServingError, asyncio.CancelledError):
            self.stats.request_done(False, time.perf_counter() - started)
            raise
        self.stats.request_done(True, time.perf_counter() - started)
        return result


@dataclass
class LoadedVersion:
    """A model version that takes traffic; `in_flight` counts the requests holding it."""

    manifest: Manifest
    graphs: dict[str, LoadedGraph]
    settings: ModelSettings
    loaded_at: float = field(default_factory=time.time)
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def graph(self, part: str) -> LoadedGraph | None:
        return self.graphs.get(part)


class Lease:
    """A request's hold on a loaded version (it is not retired meanwhile), as an async context
    manager that gives `held`: the version or one of its graphs. A plain class: a generator-based
    context manager per request costs several times as much."""

    __slots__ = ("version", "held")

    def __init__(self, version: LoadedVersion, held: LoadedVersion | LoadedGraph):
        self.version, self.held = version, held

    async def __aenter__(self) -> LoadedVersion | LoadedGraph:
        version = self.version
        version.in_flight += 1
        version.idle.clear()
        return self.held

    async def __aexit__(self, *exc_info: object) -> None:
        version = self.version
        version.in_flight -= 1
        if version.in_flight == 0:
            version.idle.set()


@dataclass
class VersionState:
    """One version's state; `reason` says why it is UNAVAILABLE (which stage refused it, and how)."""

    state: State
    reason: str = ""
    loaded: LoadedVersion | None = None  # while READY or UNLOADING

    @property
    def refused(self) -> bool:
        return self.state is State.UNAVAILABLE


@dataclass
class ModelStates:
    """The records of one model's versions, and whether it was unloaded by hand (a choice about the
    model, not a state of any version: the poller leaves it alone until it is loaded again, even
    versions published after the unload)."""

    versions: dict[int, VersionState] = field(default_factory=dict)
    unloaded: bool = False

    def in_state(self, state: State) -> dict[int, VersionState]:
        """This model's versions in `state`, ascending."""
        return {v: record for v, record in sorted(self.versions.items()) if record.state is state}

    def ready(self) -> dict[int, LoadedVersion]:
        """The versions that take traffic, ascending."""
        return {v: record.loaded for v, record in self.in_state(State.READY).items()}  # type: ignore[misc]

    @property
    def empty(self) -> bool:
        return not self.versions and not self.unloaded


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index: a model version and its state."""

    name: str
    version: int | None
    state: str  # READY | UNAVAILABLE | LOADING | UNLOADING
    reason: str = ""
    parts: tuple[str, ...] = ()
