"""What the workers of one `genserve-serve --workers N` know of each other: a shared state folder.

Each worker writes one small JSON record, `worker-<slot>.json` (atomically: a reader sees the old
record or the new one, never half of one), whenever what it serves changes:

    {"slot": 0, "pid": 4242, "ready": true, "loaded": {"mnist-vae": [1, 2]}}

and reads the others' every FOLLOW_INTERVAL_S. From the records of the live workers (the
supervisor removes a dead worker's record; a record whose pid is gone is ignored anyway):

  * a model version is SERVING only when every ready worker has it loaded (`agreed`); a worker
    routes requests without a version to the newest agreed version, keeps the older ones loaded
    until a newer one is agreed, and reports a version loaded here but not yet everywhere as
    LOADING;
  * health is SERVING only when all N workers are ready.

No locks and no sockets between workers: a record is a snapshot, and each worker decides from
the snapshots alone, so a worker that dies or hangs cannot block the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from genserve.serving.logs import log_event
from genserve.training.files import write_atomic

FOLLOW_INTERVAL_S = 0.1  # how often a worker publishes its own record and reads the others'
log = logging.getLogger("genserve.workers")


@dataclass(frozen=True)
class WorkerContext:
    """Who a worker process is: its slot (0..workers-1), the group's size, the shared folder."""

    slot: int
    workers: int
    state_dir: str
    supervisor_pid: int


@dataclass(frozen=True)
class WorkerRecord:
    slot: int
    pid: int
    ready: bool
    loaded: dict[str, tuple[int, ...]]


class LoadedModels(Protocol):
    """What the group reads of a worker's model manager."""

    ready: bool

    def held(self) -> dict[str, list[int]]: ...


def record_path(state_dir: str | Path, slot: int) -> Path:
    return Path(state_dir) / f"worker-{slot}.json"


def read_records(state_dir: str | Path) -> dict[int, WorkerRecord]:
    """The records of live workers, by slot; unreadable ones and ones whose process is gone are left out."""
    records = {}
    for path in Path(state_dir).glob("worker-*.json"):
        try:
            data = json.loads(path.read_text())
            record = WorkerRecord(int(data["slot"]), int(data["pid"]), bool(data["ready"]),
                                  {str(k): tuple(int(v) for v in vs) for k, vs in data["loaded"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # removed meanwhile, or not a record
        if _alive(record.pid):
            records[record.slot] = record
    return records


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class WorkerGroup:
    """One worker's view of the group: publishes its own record, reads the others'."""

    def __init__(self, context: WorkerContext):
        self.context = context
        self.path = record_path(context.state_dir, context.slot)
        self._others: dict[int, WorkerRecord] = {}
        self._published: tuple[bool, dict[str, list[int]]] | None = None

    # --- what the others have --------------------------------------------------------------------
    def others_have(self, name: str, version: int) -> bool:
        """Whether every other ready worker has `version` of `name` loaded (workers still starting
        do not count: they load the newest version anyway)."""
        return all(version in r.loaded.get(name, ()) for r in self._others.values() if r.ready)

    def all_ready(self, own_ready: bool) -> bool:
        """This worker and every other slot of the group are ready."""
        others_ready = sum(1 for r in self._others.values() if r.ready)
        return own_ready and others_ready == self.context.workers - 1

    def waiting_for(self, name: str, version: int) -> int:
        """How many ready workers do not have `version` of `name` yet (for the index's reason)."""
        return sum(1 for r in self._others.values() if r.ready and version not in r.loaded.get(name, ()))

    # --- publishing and following -------------------------------------------------------------
    def publish(self, ready: bool, loaded: dict[str, list[int]]) -> bool:
        """Write this worker's record when it changed; returns whether it did."""
        state = (ready, loaded)
        if state == self._published:
            return False
        record = {"slot": self.context.slot, "pid": os.getpid(), "ready": ready, "loaded": loaded}
        write_atomic(self.path, json.dumps(record, sort_keys=True).encode())
        self._published = state
        return True

    def refresh(self) -> bool:
        """Read the other workers' records; returns whether anything changed."""
        others = {slot: r for slot, r in read_records(self.context.state_dir).items() if slot != self.context.slot}
        changed = others != self._others
        self._others = others
        return changed

    def withdraw(self) -> None:
        """Remove this worker's record (at shutdown)."""
        self.path.unlink(missing_ok=True)
        self._published = None

    async def follow(self, models: LoadedModels, on_change: Callable[[], Awaitable[None]]) -> None:
        """Until cancelled: publish this worker's state, read the others', and call `on_change`
        whenever either changed. A worker whose supervisor is gone shuts itself down (SIGTERM)."""
        first = True
        while True:
            try:
                mine = self.publish(models.ready, models.held())
                theirs = self.refresh()
            except OSError as error:  # the state folder is gone: the supervisor is ending
                log_event(log, "worker_state_unavailable", level=logging.WARNING, error=str(error))
                mine = theirs = False
            if mine or theirs or first:
                first = False
                await on_change()
            if os.getppid() != self.context.supervisor_pid:
                log_event(log, "supervisor_gone", level=logging.ERROR, supervisor_pid=self.context.supervisor_pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(os.getpid(), signal.SIGTERM)
                return
            await asyncio.sleep(FOLLOW_INTERVAL_S)
