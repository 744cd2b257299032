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
from genserve.serving.batcher import DynamicBatcher, RunBatch, Timing
from genserve.serving.codec import all_finite
from genserve.serving.config import ModelSettings
from genserve.serving.errors import InvalidArgument, ServingError
from genserve.serving.runtime import GraphSession
from genserve.serving.sample_health import SampleHealth
from genserve.serving.statistics import GraphStats


class State(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


def finite_rows(outputs: list[np.ndarray]) -> np.ndarray:
    """(N,) bool: which rows of a batch's outputs hold no NaN or infinity (one summing pass per output
    in the common case, the per-row check only when that pass finds some)."""
    rows = len(outputs[0])
    if all(all_finite(output) for output in outputs):
        return np.ones(rows, dtype=bool)
    finite = np.ones(rows, dtype=bool)
    for output in outputs:
        finite &= np.isfinite(output.reshape(rows, -1)).all(axis=1)
    return finite


def checked_run(run: RunBatch, health: SampleHealth | None) -> RunBatch:
    """The batcher's run function for a graph: `run`'s outputs, then one more, `finite_rows` of them,
    which the batcher splits like the others, so each request learns from its own rows whether it may
    be answered OK. Checked (and the sample health observed) in the thread that ran the batch, once
    per execution: a pass over every request's outputs on the event loop cost up to ~90 us per
    64-row dense-decoder call (docs/benchmarks.md)."""

    def run_and_check(rows: np.ndarray) -> list[np.ndarray]:
        outputs = run(rows)
        finite = finite_rows(outputs)
        if health is not None:
            health.observe(outputs[0], finite)
        return [*outputs, finite]

    return run_and_check


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
        """Run rows (N, ...) through the graph via the batcher (whose run is `checked_run`); outputs in
        the manifest's order."""
        started = time.perf_counter()
        try:
            (*outputs, finite), timing = await self.batcher.infer(rows, deadline)
            if not finite.all():  # never an OK with NaN pixels
                raise InvalidArgument(
                    f"{self.oip_name} version {self.version} computed NaN or infinite values for "
                    f"{len(finite) - int(finite.sum())} of this request's {len(finite)} rows; "
                    "send smaller latents (or a lower temperature)"
                )
        except (ServingError, asyncio.CancelledError):
            self.stats.request_done(False, time.perf_counter() - started)
            raise
        self.stats.request_done(True, time.perf_counter() - started)
        return outputs, timing


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
