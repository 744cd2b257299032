"""The model manager: which versions of which models are loaded, and how they come and go.

At start the newest valid version of every model is loaded. A poller then watches the repository
and hot-loads new versions: each is marked as served (so `genserve-export --keep` never deletes
it), verified (sha256 and schema), loaded into onnxruntime and warmed up at the batch sizes it
will see (serving/loader.py), all before it takes traffic; only then are versions beyond
max_loaded_versions retired. Requests hold a lease on the version they resolved, so a replaced
version finishes its in-flight requests before its batchers stop. A version that fails any stage
is refused (logged, counted in genserve_model_load_failures_total, not retried by the poller)
while the previous one keeps serving. RepositoryModelLoad/Unload load and unload by hand; an
explicitly unloaded model is left alone by the poller until it is loaded again.

Every version's state is one record in one map (serving/versions.py), which lookups, the poller,
the repository index and the "why not" of every error read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor

from genserve.export import InvalidNameError, Manifest, Repository, sanitize_name, validate_model_name
from genserve.export.manifest import RepositoryError
from genserve.serving.config import ModelSettings, ServerConfig
from genserve.serving.errors import FailedPrecondition, InvalidArgument, NotFound, ServingError, Unavailable
from genserve.serving.loader import LoadError, PreparedSessions, prepare_version, start_version
from genserve.serving.logs import log_event
from genserve.serving.metrics import ServerMetrics
from genserve.serving.versions import IndexEntry, Lease, LoadedVersion, ModelStates, State, VersionState
from genserve.serving.worker_group import WorkerGroup

log = logging.getLogger("genserve.models")


def holder_name(host: str, port: int) -> str:
    """A serving-mark holder name for this server (a valid model name)."""
    return sanitize_name(f"genserve-{host}-{port}", "serving holder name")


def check_name(name: str) -> str:
    """The name if it is a valid model name, else InvalidArgument (path separators, '..', ...)."""
    try:
        return validate_model_name(name)
    except InvalidNameError as error:
        raise InvalidArgument(str(error)) from None


class ModelManager:
    """Loads, serves and retires model versions from one repository. Use on one event loop."""

    def __init__(
        self,
        repository: Repository,
        config: ServerConfig,
        metrics: ServerMetrics,
        executor: Executor,
        holder: str,
    ):
        self.repository = repository
        self.config = config
        self.metrics = metrics
        self.holder = holder
        self._executor = executor
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="genserve-loader")
        self._models: dict[str, ModelStates] = {}  # every version's state, by model name
        self._serving: dict[str, dict[int, LoadedVersion]] = {}  # the READY versions, by name (kept by _set)
        # per-name locks, only while a load or unload of that name runs or waits (invented names
        # must not grow the table); `_marked` remembers which names carry this server's mark
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._marked: set[str] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        # why the last scan could not read the repository: a state of the repository, not of any
        # version (what is loaded keeps its state and keeps serving)
        self._repository_error: str | None = None
        self.ready = False
        # the initial load's names not yet tried: a call for one is told to retry (UNAVAILABLE), not
        # that the model does not exist (None: the repository has not been listed yet)
        self._initial_queue: set[str] | None = None
        self.group: WorkerGroup | None = None  # the other workers, when this is one of several

    # --- states ---------------------------------------------------------------------------------
    def _states(self, name: str) -> ModelStates:
        """The (possibly empty) records of `name`; an empty one is not kept (see _set)."""
        return self._models.get(name) or ModelStates()

    def _ready(self, name: str) -> dict[int, LoadedVersion]:
        return self._states(name).ready()

    def _set(self, name: str, version: int, record: VersionState | None) -> None:
        """Record a version's state (None: forget it); a model with no records and no choice is dropped."""
        states = self._models.setdefault(name, ModelStates())
        if record is None:
            states.versions.pop(version, None)
        else:
            states.versions[version] = record
        ready = states.ready()
        if ready:
            self._serving[name] = ready
        else:
            self._serving.pop(name, None)
        if states.empty:
            del self._models[name]

    def _set_unloaded(self, name: str, unloaded: bool) -> None:
        states = self._models.setdefault(name, ModelStates())
        states.unloaded = unloaded
        if states.empty:
            del self._models[name]

    # --- lookup ---------------------------------------------------------------------------------
    def loaded(self) -> dict[str, list[int]]:
        """Model names -> the versions that serve, ascending: the loaded ones, with workers those
        every worker has (all loaded ones while none is agreed yet, see _newest)."""
        held = self.held()
        if self.group is None:
            return held
        return {name: [v for v in versions if self.group.others_have(name, v)] or versions
                for name, versions in held.items()}

    def held(self) -> dict[str, list[int]]:
        """Model names -> the versions loaded in this process, ascending (what a worker publishes)."""
        return {name: list(ready) for name in sorted(self._models) if (ready := self._ready(name))}

    def resolve(self, name: str, version: int | None = None) -> LoadedVersion:
        """The loaded version (newest when None or 0); NotFound/Unavailable saying why not."""
        versions = self._serving.get(name)
        if not versions:  # only names that passed check_name are ever served
            check_name(name)
            states = self._states(name)
            if states.in_state(State.LOADING):
                raise Unavailable(f"model {name!r} is loading; retry shortly")
            if not self.ready and (self._initial_queue is None or name in self._initial_queue):
                raise Unavailable(f"the server is still loading its models ({len(self.loaded())} loaded so far); "
                                  "retry shortly")
            if states.unloaded:
                raise NotFound(f"model {name!r} is unloaded; load it with RepositoryModelLoad")
            failed = states.in_state(State.UNAVAILABLE)
            if failed:
                newest = max(failed)
                raise NotFound(f"model {name!r} has no servable version: version {newest} was refused: {failed[newest].reason}")
            known = ", ".join(self.loaded()) or "none"
            raise NotFound(f"no model {name!r} is loaded (loaded models: {known})")
        if not version:
            return versions[self._newest(name, versions)]
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidArgument(f"version must be a positive integer or 0 (newest), got {version!r}")
        if version not in versions:
            record = self._states(name).versions.get(version)
            why = record.reason if record is not None and record.refused else None
            raise NotFound(
                f"model {name!r} version {version} is not loaded"
                + (f" (it was refused: {why})" if why else "")
                + f"; loaded versions: {sorted(versions)}"
            )
        return versions[version]

    def use(self, name: str, version: int | None = None) -> Lease:
        """`async with use(...) as loaded`: hold a lease on a version for the duration of a request."""
        loaded = self.resolve(name, version)
        return Lease(loaded, loaded)

    # --- workers (serving/worker_group.py) -------------------------------------------------------
    def agreed(self, name: str, version: int) -> bool:
        """Whether a version is SERVING: loaded here and, with workers, by every ready worker."""
        return version in self._ready(name) and (self.group is None or self.group.others_have(name, version))

    @property
    def serving_ready(self) -> bool:
        """The initial load is done (with workers: by every worker)."""
        return self.ready and (self.group is None or self.group.all_ready(self.ready))

    def _newest(self, name: str, versions: dict[int, LoadedVersion]) -> int:
        """The version requests without one get, of the loaded `versions`: the newest SERVING one
        (the newest loaded one while no version is agreed yet, as when this worker alone loaded a
        new model). On every request's path: no more work than max() without workers."""
        if self.group is None:
            return max(versions)
        return max([v for v in versions if self.group.others_have(name, v)] or versions)

    def regroup(self) -> None:
        """The workers' versions changed: retire what every worker has replaced, update the gauges."""
        for name, versions in self.held().items():
            self._retire_beyond(name, self._ready(name)[versions[-1]].settings.max_loaded_versions)
        for name, versions in self.held().items():
            for version in versions:
                self.metrics.model_ready.labels(name, str(version)).set(int(self.agreed(name, version)))
        self._count()

    def _one_process_only(self, what: str) -> None:
        if self.group is not None:
            raise FailedPrecondition(
                f"{what} would reach one of the {self.group.context.workers} workers only; with --workers, "
                "publish versions into the repository (genserve-export) and every worker loads them"
            )

    # --- loading --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        """One load or unload of `name` at a time; the lock is dropped once nobody holds or awaits it."""
        lock, users = self._locks.setdefault(name, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[name]

    async def _in_loader(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._loader, functools.partial(fn, *args, **kwargs))

    @staticmethod
    async def _in_reader(fn, *args, **kwargs):
        """Blocking reads of the repository that must not queue behind a load (which can take
        seconds) on the loader thread: RepositoryIndex answers while a model loads."""
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))

    async def load_all(self) -> None:
        """Load the newest valid version of every model in the repository (the initial load)."""
        try:
            names = await self._in_loader(self.repository.models)
        except RepositoryError as error:
            log_event(log, "repository_unreadable", level=logging.ERROR, repository=str(self.repository.root), error=str(error))
            self.metrics.repository_errors.inc()
            self._repository_error = str(error)
            names = []
        self._initial_queue = set(names)
        for name in names:
            try:
                await self._load_newest_servable(name)
            finally:
                self._initial_queue.discard(name)
        self.ready = True

    async def _load_newest_servable(self, name: str) -> None:
        """Load the newest version of `name` that loads, falling back to older valid versions when
        newer ones are refused (a damaged newest version must not take the model down on restart;
        a running server keeps what it serves anyway)."""
        try:
            candidates = await self._in_loader(self._valid_versions, name)
        except (RepositoryError, OSError) as error:
            log_event(log, "scan_failed", level=logging.WARNING, model=name, error=str(error))
            return
        for version in candidates:
            try:
                await self.load(name, version)
            except ServingError:
                continue
            if version != candidates[0]:
                log_event(log, "version_fallback", level=logging.WARNING, model=name, version=version,
                          newest=candidates[0], hint="the newer versions were refused; see version_refused")
            return

    def _valid_versions(self, name: str) -> list[int]:
        """Blocking: the versions of `name` whose manifest is valid, newest first."""
        return [s.version for s in reversed(self.repository.status(name)) if s.valid]

    async def load(self, name: str, version: int | None = None, *, explicit: bool = False) -> LoadedVersion:
        """Load `version` (default: the newest valid one) of `name` and put it into service.

        Returns the loaded version (the one already loaded if it is). Raises NotFound when there
        is nothing to load, FailedPrecondition when the version is refused (the previous version
        keeps serving); a refused version is only tried again when `explicit`.
        """
        check_name(name)
        if explicit:
            self._one_process_only("RepositoryModelLoad")
        async with self._exclusive(name):
            if explicit:
                self._set_unloaded(name, False)
            try:
                if version is None:
                    version = await self._in_loader(self.repository.latest, name)
            except (RepositoryError, OSError) as error:
                raise Unavailable(f"cannot read the model repository: {error}") from None
            if version is None:
                raise NotFound(f"model {name!r} has no valid version in the repository {self.repository.root}")
            current = self._ready(name)
            if version in current:
                return current[version]
            before = self._states(name).versions.get(version)
            if before is not None and before.refused and not explicit:
                raise FailedPrecondition(f"model {name!r} version {version} was refused: {before.reason}")
            settings = self.config.settings_for(name)
            await self._in_loader(self._mark, name, {*current, version})
            self._set(name, version, VersionState(State.LOADING))
            log_event(log, "version_loading", model=name, version=version)
            started = time.perf_counter()
            try:
                manifest, sessions = await self._in_loader(
                    prepare_version, self.repository, name, version, settings,
                    require_gpu=self.config.require_gpu, max_row_bytes=self.config.limits.max_message_bytes,
                )
            except Exception as error:  # LoadError, or anything unforeseen: the version is refused either way
                failure = error if isinstance(error, LoadError) else LoadError("load", f"{type(error).__name__}: {error}")
                self._set(name, version, VersionState(State.UNAVAILABLE, str(failure)))
                self.metrics.load_failures.labels(name, failure.stage).inc()
                log_event(
                    log, "version_refused", level=logging.ERROR, model=name, version=version, stage=failure.stage,
                    reason=str(failure),
                )
                await self._in_loader(self._mark, name, set(current))
                raise FailedPrecondition(f"model {name!r} version {version} was refused ({failure.stage}): {failure}") from None
            except BaseException:  # cancelled (shutdown): the version is left as it was before
                self._set(name, version, before)
                raise
            loaded = self._activate(manifest, sessions, settings)
            log_event(
                log,
                "version_ready",
                model=name,
                version=version,
                parts=",".join(sorted(loaded.graphs)),
                providers=",".join(sorted({g.session.provider for g in loaded.graphs.values()})),
                seconds=round(time.perf_counter() - started, 3),
            )
            self._retire_beyond(name, settings.max_loaded_versions)
            return loaded

    def _activate(self, manifest: Manifest, sessions: PreparedSessions, settings: ModelSettings) -> LoadedVersion:
        """Put a prepared version into service (on the loop)."""
        loaded = start_version(manifest, sessions, settings, self._executor, self.metrics)
        self._set(loaded.name, loaded.version, VersionState(State.READY, loaded=loaded))
        self.metrics.model_ready.labels(loaded.name, str(loaded.version)).set(int(self.agreed(loaded.name, loaded.version)))
        self.metrics.show_quality(manifest)
        self._count()
        return loaded

    def _count(self) -> None:
        loaded = self.held()
        self.metrics.models_loaded.set(sum(len(versions) for versions in loaded.values()))
        self.metrics.models_ready.set(sum(self.agreed(n, v) for n, versions in loaded.items() for v in versions))

    def _mark(self, name: str, versions: set[int]) -> None:
        """Blocking (loader thread): rewrite this server's serving mark for `name`."""
        self._marked.add(name)
        try:
            if versions:
                self.repository.mark_serving(name, versions, self.holder)
            else:
                self.repository.clear_serving(name, self.holder)
        except (OSError, RepositoryError) as error:
            log_event(log, "serving_mark_failed", level=logging.WARNING, model=name, error=str(error))

    # --- retiring -------------------------------------------------------------------------------
    def _retire_beyond(self, name: str, keep: int) -> None:
        """Keep the `keep` newest SERVING versions, and any newer one not yet loaded by every worker."""
        versions = list(self._ready(name))
        serving = [v for v in versions if self.agreed(name, v)]
        if not serving:
            return
        for version in [v for v in versions if v <= serving[-1]][:-keep]:
            self._retire(name, version)

    def _retire(self, name: str, version: int) -> None:
        """Take a version out of service now; its batchers stop once its in-flight requests finish."""
        record = self._models[name].versions[version]
        loaded = record.loaded
        assert loaded is not None and record.state is State.READY
        self._set(name, version, VersionState(State.UNLOADING, loaded=loaded))
        self.metrics.model_ready.labels(name, str(version)).set(0)
        self.metrics.show_quality(loaded.manifest, serving=False)
        self._count()
        task = asyncio.get_running_loop().create_task(self._drain(loaded))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain(self, loaded: LoadedVersion) -> None:
        await loaded.idle.wait()
        for graph in loaded.graphs.values():
            await graph.batcher.close()
            self.metrics.provider.labels(loaded.name, str(loaded.version), graph.part, graph.session.provider).set(0)
        record = self._states(loaded.name).versions.get(loaded.version)
        if record is not None and record.state is State.UNLOADING and record.loaded is loaded:  # not loaded again since
            self._set(loaded.name, loaded.version, None)
        await self._in_loader(self._mark, loaded.name, set(self._ready(loaded.name)))
        log_event(log, "version_unloaded", model=loaded.name, version=loaded.version)

    async def unload(self, name: str) -> list[int]:
        """Unload every version of `name` (in-flight requests finish first); returns them."""
        check_name(name)
        self._one_process_only("RepositoryModelUnload")
        if not self._ready(name) and name not in await self._in_loader(self._known_models):
            raise NotFound(f"no model {name!r} in the repository or loaded")
        async with self._exclusive(name):
            self._set_unloaded(name, True)
            versions = list(self._ready(name))
            for version in versions:
                self._retire(name, version)
            await self.drained()
            return versions

    async def drained(self) -> None:
        """Wait until every retired version has stopped."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    # --- polling --------------------------------------------------------------------------------
    def _known_models(self) -> list[str]:
        try:
            return self.repository.models()
        except RepositoryError:
            return []

    def _scan(self) -> dict[str, int | None]:
        """Blocking: each model's newest valid version in the repository. A repository that cannot
        be read (gone, unmounted, no permission) is reported once, and again when it is back;
        what is loaded keeps serving meanwhile."""
        try:
            names = self.repository.models()
        except (RepositoryError, OSError) as error:
            self.metrics.repository_errors.inc()
            if self._repository_error is None:
                log_event(log, "repository_unreadable", level=logging.ERROR, repository=str(self.repository.root),
                          error=str(error), hint="loaded models keep serving; new versions are not picked up")
            self._repository_error = str(error)
            return {}
        if self._repository_error is not None:
            log_event(log, "repository_readable", repository=str(self.repository.root))
            self._repository_error = None
        result = {}
        for name in names:
            try:
                result[name] = self.repository.latest(name)
            except (RepositoryError, OSError) as error:
                log_event(log, "scan_failed", level=logging.WARNING, model=name, error=str(error))
        return result

    async def poll_once(self) -> None:
        """Load every model version that is newer than what is loaded (and was not refused)."""
        for name, latest in (await self._in_loader(self._scan)).items():
            states = self._states(name)
            record = states.versions.get(latest) if latest is not None else None
            if latest is None or states.unloaded or (record is not None and record.refused):
                continue
            loaded = states.ready()
            if loaded and latest <= max(loaded):
                continue
            with contextlib.suppress(ServingError):
                await self.load(name, latest)

    def start_polling(self, interval_s: float) -> None:
        if interval_s > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever(interval_s), name="repository poller")

    async def _poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll_once()
            except Exception:  # never let the poller die
                log.exception("repository poll failed")

    # --- index ----------------------------------------------------------------------------------
    def _parts(self, name: str, version: int | None) -> tuple[str, ...]:
        """Blocking: the parts a version's manifest lists (() when it cannot be read)."""
        if version is None:
            return ()
        try:
            return tuple(self.repository.load_manifest(name, version).parts)
        except (RepositoryError, OSError, ValueError):
            return ()

    async def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model in the repository (and every loaded one) with its versions' states."""
        scanned = await self._in_reader(self._scan)
        entries = []
        served = {name for name, states in self._models.items() if states.ready() or states.in_state(State.UNLOADING)}
        for name in sorted(set(scanned) | served):
            states = self._states(name)
            loaded = states.ready()
            for version, ready in loaded.items():
                if self.agreed(name, version):
                    entries.append(IndexEntry(name, version, State.READY.value, parts=tuple(ready.graphs)))
                elif not ready_only and self.group is not None:
                    waiting = f"loaded by this worker; {self.group.waiting_for(name, version)} other worker(s) still loading it"
                    entries.append(IndexEntry(name, version, State.LOADING.value, waiting, tuple(ready.graphs)))
            if ready_only:
                continue
            for version, record in sorted(states.versions.items()):
                if record.state is State.UNLOADING:
                    entries.append(IndexEntry(name, version, record.state.value, parts=tuple(record.loaded.graphs)))
                elif record.state is not State.READY:
                    parts = await self._in_reader(self._parts, name, version)
                    entries.append(IndexEntry(name, version, record.state.value, record.reason, parts))
            # say why nothing serves, unless a LOADING or refused version above says it
            quiet = not loaded and not states.in_state(State.LOADING)
            if quiet and (states.unloaded or not states.in_state(State.UNAVAILABLE)):
                latest = scanned.get(name)
                parts = await self._in_reader(self._parts, name, latest)
                reason = "unloaded" if states.unloaded else "not loaded"
                entries.append(IndexEntry(name, latest, State.UNAVAILABLE.value, reason, parts))
        return entries

    # --- shutdown -------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop polling, retire every version (in-flight requests finish), remove serving marks."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for name in list(self._models):
            for version in list(self._ready(name)):
                self._retire(name, version)
        await self.drained()
        for name in sorted(self._marked):
            await self._in_loader(self._mark, name, set())
        self._loader.shutdown(wait=False, cancel_futures=True)
        self.ready = False

