"""The model manager: which versions of which models are loaded, and how they come and go.

At start the newest valid version of every model is loaded. A poller then watches the repository
and hot-loads new versions: each is marked as served (so `genserve-export --keep` never deletes
it), verified (sha256 and schema), loaded into onnxruntime and warmed up at the batch sizes it
will see, all before it takes traffic. Requests hold a lease on the version they resolved, so a
replaced version finishes its in-flight requests before its batchers stop. A version that fails
any stage is refused (logged, counted in genserve_model_load_failures_total, not retried by the
poller) while the previous one keeps serving. RepositoryModelLoad/Unload load and unload by hand;
an explicitly unloaded model is left alone by the poller until it is loaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export import InvalidNameError, Manifest, PartSpec, Repository, sanitize_name, validate_model_name
from export.manifest import PART_NAMES, RepositoryError
from serving.batcher import DynamicBatcher, Timing
from serving.config import ModelSettings, ServerConfig
from serving.errors import FailedPrecondition, InvalidArgument, NotFound, ServingError, Unavailable
from serving.logs import log_event
from serving.metrics import ServerMetrics
from serving.runtime import GpuRequiredError, GraphSession, load_session
from serving.statistics import GraphStats

log = logging.getLogger("genserve.models")
OPERATIONS = ("Generate", "Encode", "Reconstruct", "Denoise", "Interpolate")


class LoadError(Exception):
    """A version could not be made servable; `stage` is verify, load, gpu or warmup."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


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
            if not all(np.isfinite(output).all() for output in result[0]):  # never an OK with NaN pixels
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

    @property
    def operations(self) -> list[str]:
        """The Genserve RPCs this version supports."""
        parts = set(self.graphs)
        ops = []
        if parts & {"decoder", "generator"}:
            ops.append("Generate")
        if "encoder" in parts:
            ops.append("Encode")
        if {"encoder", "decoder"} <= parts or "denoiser" in parts:
            ops.append("Reconstruct")
        if "denoiser" in parts:
            ops.append("Denoise")
        if parts & {"decoder", "generator"}:
            ops.append("Interpolate")
        return ops


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index: a model version and its state."""

    name: str
    version: int | None
    state: str  # READY | UNAVAILABLE | LOADING
    reason: str = ""
    parts: tuple[str, ...] = ()


def check_declared_shapes(what: str, spec: PartSpec, session: GraphSession, max_row_bytes: int) -> None:
    """LoadError unless every tensor the manifest declares has the graph's own rank and fixed
    dimensions, and one row of it fits in max_row_bytes (limits.max_message_bytes: a bigger row
    could never be sent or answered). Runs before warm-up allocates anything from these shapes."""
    declared = [spec.inputs[0], *spec.outputs]
    actual = [session.input_shape, *session.output_shapes]
    for tensor, graph_shape in zip(declared, actual, strict=True):
        fixed = [d if isinstance(d, int) and d > 0 else None for d in graph_shape]  # None: symbolic
        if len(graph_shape) != len(tensor.shape) or any(
            g is not None and g != d for g, d in zip(fixed[1:], tensor.shape[1:], strict=True)
        ):
            raise LoadError("load", f"{what}: the manifest declares {tensor.name!r} as {list(tensor.shape)}, "
                                    f"but the graph has shape {list(graph_shape)}")
        row_bytes = math.prod(int(d) for d in tensor.shape[1:]) * 4  # float32 I/O
        if row_bytes > max_row_bytes:
            raise LoadError("load", f"{what}: one row of {tensor.name!r} {list(tensor.shape)} is {row_bytes} bytes, "
                                    f"over limits.max_message_bytes ({max_row_bytes}); no request could carry it")


def holder_name(host: str, port: int) -> str:
    """A serving-mark holder name for this server (a valid model name)."""
    return sanitize_name(f"genserve-{host}-{port}", "serving holder name")


def split_oip_name(oip_name: str) -> tuple[str, str]:
    """`mnist-vae.decoder` -> ("mnist-vae", "decoder"); InvalidArgument/NotFound when malformed."""
    model, dot, part = oip_name.rpartition(".")
    if not dot or part not in PART_NAMES:
        raise NotFound(
            f"no model {oip_name!r}: inference models are named <model>.<part> with part one of "
            f"{', '.join(PART_NAMES)} (e.g. mnist-vae.decoder)"
        )
    return check_name(model), part


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
        self._versions: dict[str, dict[int, LoadedVersion]] = {}
        self._failed: dict[tuple[str, int], str] = {}
        self._unloaded: set[str] = set()
        self._loading: set[str] = set()
        # per-name locks, only while a load or unload of that name runs or waits (invented names
        # must not grow the table); `_marked` remembers which names carry this server's mark
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._marked: set[str] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._repository_error: str | None = None  # why the last scan could not read the repository
        self.ready = False

    # --- lookup ---------------------------------------------------------------------------------
    def loaded(self) -> dict[str, list[int]]:
        """Loaded model names -> their versions, ascending."""
        return {name: sorted(vs) for name, vs in sorted(self._versions.items()) if vs}

    def resolve(self, name: str, version: int | None = None) -> LoadedVersion:
        """The loaded version (newest when None or 0); NotFound/Unavailable saying why not."""
        check_name(name)
        versions = self._versions.get(name)
        if not versions:
            if name in self._loading:
                raise Unavailable(f"model {name!r} is loading; retry shortly")
            if name in self._unloaded:
                raise NotFound(f"model {name!r} is unloaded; load it with RepositoryModelLoad")
            failed = sorted((v, why) for (n, v), why in self._failed.items() if n == name)
            if failed:
                raise NotFound(f"model {name!r} has no servable version: version {failed[-1][0]} was refused: {failed[-1][1]}")
            known = ", ".join(self.loaded()) or "none"
            raise NotFound(f"no model {name!r} is loaded (loaded models: {known})")
        if not version:
            return versions[max(versions)]
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidArgument(f"version must be a positive integer or 0 (newest), got {version!r}")
        if version not in versions:
            why = self._failed.get((name, version))
            raise NotFound(
                f"model {name!r} version {version} is not loaded"
                + (f" (it was refused: {why})" if why else "")
                + f"; loaded versions: {sorted(versions)}"
            )
        return versions[version]

    @contextlib.asynccontextmanager
    async def use(self, name: str, version: int | None = None) -> AsyncIterator[LoadedVersion]:
        """Hold a lease on a version for the duration of a request (it is not retired meanwhile)."""
        loaded = self.resolve(name, version)
        loaded.in_flight += 1
        loaded.idle.clear()
        try:
            yield loaded
        finally:
            loaded.in_flight -= 1
            if loaded.in_flight == 0:
                loaded.idle.set()

    @contextlib.asynccontextmanager
    async def use_graph(self, oip_name: str, version: str = "") -> AsyncIterator[LoadedGraph]:
        """Lease the graph an inference-protocol model name (`<model>.<part>`) and version string name."""
        model, part = split_oip_name(oip_name)
        number = parse_version(version)
        async with self.use(model, number) as loaded:
            graph = loaded.graph(part)
            if graph is None:
                raise NotFound(f"model {model!r} version {loaded.version} has no part {part!r}; it has {sorted(loaded.graphs)}")
            yield graph

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

    async def _in_loader(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    async def load_all(self) -> None:
        """Load the newest valid version of every model in the repository (the initial load)."""
        try:
            names = await self._in_loader(self.repository.models)
        except RepositoryError as error:
            log_event(log, "repository_unreadable", level=logging.ERROR, repository=str(self.repository.root), error=str(error))
            self.metrics.repository_errors.inc()
            self._repository_error = str(error)
            names = []
        for name in names:
            await self._load_newest_servable(name)
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
        async with self._exclusive(name):
            if explicit:
                self._unloaded.discard(name)
            try:
                if version is None:
                    version = await self._in_loader(self.repository.latest, name)
            except (RepositoryError, OSError) as error:
                raise Unavailable(f"cannot read the model repository: {error}") from None
            if version is None:
                raise NotFound(f"model {name!r} has no valid version in the repository {self.repository.root}")
            current = self._versions.get(name, {})
            if version in current:
                return current[version]
            if (name, version) in self._failed and not explicit:
                raise FailedPrecondition(f"model {name!r} version {version} was refused: {self._failed[(name, version)]}")
            settings = self.config.settings_for(name)
            await self._in_loader(self._mark, name, {*current, version})
            self._loading.add(name)
            log_event(log, "version_loading", model=name, version=version)
            started = time.perf_counter()
            try:
                manifest, sessions = await self._in_loader(self._prepare, name, version, settings)
            except Exception as error:  # LoadError, or anything unforeseen: the version is refused either way
                failure = error if isinstance(error, LoadError) else LoadError("load", f"{type(error).__name__}: {error}")
                self._failed[(name, version)] = str(failure)
                self.metrics.load_failures.labels(name, failure.stage).inc()
                log_event(
                    log, "version_refused", level=logging.ERROR, model=name, version=version, stage=failure.stage,
                    reason=str(failure),
                )
                await self._in_loader(self._mark, name, set(current))
                raise FailedPrecondition(f"model {name!r} version {version} was refused ({failure.stage}): {failure}") from None
            finally:
                self._loading.discard(name)
            self._failed.pop((name, version), None)
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

    def _prepare(self, name: str, version: int, settings: ModelSettings) -> tuple[Manifest, dict[str, tuple[str, GraphSession]]]:
        """Blocking (loader thread): verify, create sessions, check their I/O and warm them up."""
        try:
            manifest = self.repository.verify(name, version)
        except RepositoryError as error:
            raise LoadError("verify", str(error)) from None
        sessions: dict[str, tuple[str, GraphSession]] = {}
        for part, spec in manifest.parts.items():
            variant = settings.variant if settings.variant in spec.variants else "fp32"
            if variant != settings.variant:
                log_event(log, "variant_missing", level=logging.WARNING, model=name, version=version, part=part,
                          wanted=settings.variant, using=variant)
            path: Path = self.repository.version_dir(name, version) / spec.variants[variant].file
            what = f"{name} version {version} {part} ({variant})"
            try:
                # What onnxruntime loads is exactly the bytes whose sha256 was just checked: loading
                # from the path would read the file a second time, after anyone could have swapped it.
                graph_bytes = self.repository.read_part(manifest, part, variant)
            except RepositoryError as error:
                raise LoadError("verify", str(error)) from None
            try:
                session = load_session(
                    path,
                    model_bytes=graph_bytes,
                    execution_provider=settings.execution_provider,
                    intra_op_threads=settings.intra_op_threads,
                    cpu_memory_arena=settings.cpu_memory_arena,
                    require_gpu=self.config.require_gpu,
                    what=what,
                )
            except GpuRequiredError as error:
                raise LoadError("gpu", str(error)) from None
            except Exception as error:  # onnxruntime raises its own exception types
                raise LoadError("load", f"onnxruntime cannot load {path.name}: {error}") from None
            finally:
                del graph_bytes  # onnxruntime keeps its own copy
            expected_out = [t.name for t in spec.outputs]
            if session.input_name != spec.inputs[0].name or session.output_names != expected_out:
                raise LoadError(
                    "load",
                    f"{what}: the graph's inputs/outputs ({session.input_name!r} -> {session.output_names}) "
                    f"differ from the manifest's ({spec.inputs[0].name!r} -> {expected_out})",
                )
            check_declared_shapes(what, spec, session, self.config.limits.max_message_bytes)
            shape = tuple(int(d) for d in spec.inputs[0].shape[1:])
            for batch in settings.warmup_sizes:
                try:
                    outputs = session.run(np.full((batch, *shape), 0.5, dtype=np.float32))
                except Exception as error:
                    raise LoadError("warmup", f"{what} fails on a warm-up batch of {batch}: {error}") from None
                if any(o.shape[0] != batch for o in outputs):
                    raise LoadError("warmup", f"{what} returned the wrong batch size on a warm-up batch of {batch}")
            sessions[part] = (variant, session)
        return manifest, sessions

    def _activate(self, manifest: Manifest, sessions: dict[str, tuple[str, GraphSession]], settings: ModelSettings) -> LoadedVersion:
        """Give the sessions batchers and put the version into service (on the loop)."""
        name, version = manifest.name, manifest.version
        graphs = {}
        for part, (variant, session) in sessions.items():
            stats = GraphStats(name, version, part, self.metrics)
            batcher = DynamicBatcher(
                f"{name}.{part} version {version}",
                session.run,
                self._executor,
                max_batch_size=settings.max_batch_size,
                max_queue_delay_us=settings.max_queue_delay_us,
                max_queue_size=settings.max_queue_size,
                merge=settings.dynamic_batching,
                instances=settings.instances,
                observer=stats,
            )
            batcher.start()
            graphs[part] = LoadedGraph(name, version, part, variant, manifest.parts[part], session, batcher, stats)
            self.metrics.provider.labels(name, str(version), part, session.provider).set(1)
        loaded = LoadedVersion(manifest, graphs, settings)
        self._versions.setdefault(name, {})[version] = loaded
        self.metrics.model_ready.labels(name, str(version)).set(1)
        self._count()
        return loaded

    def _count(self) -> None:
        total = sum(len(v) for v in self._versions.values())
        self.metrics.models_loaded.set(total)
        self.metrics.models_ready.set(total)

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
        versions = self._versions.get(name, {})
        for version in sorted(versions)[:-keep]:
            self._retire(name, version)

    def _retire(self, name: str, version: int) -> None:
        """Take a version out of service now; its batchers stop once its in-flight requests finish."""
        loaded = self._versions[name].pop(version)
        if not self._versions[name]:
            del self._versions[name]
        self.metrics.model_ready.labels(name, str(version)).set(0)
        self._count()
        task = asyncio.get_running_loop().create_task(self._drain(loaded))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain(self, loaded: LoadedVersion) -> None:
        await loaded.idle.wait()
        for graph in loaded.graphs.values():
            await graph.batcher.close()
            self.metrics.provider.labels(loaded.name, str(loaded.version), graph.part, graph.session.provider).set(0)
        await self._in_loader(self._mark, loaded.name, set(self._versions.get(loaded.name, {})))
        log_event(log, "version_unloaded", model=loaded.name, version=loaded.version)

    async def unload(self, name: str) -> list[int]:
        """Unload every version of `name` (in-flight requests finish first); returns them."""
        check_name(name)
        if name not in self._versions and name not in await self._in_loader(self._known_models):
            raise NotFound(f"no model {name!r} in the repository or loaded")
        async with self._exclusive(name):
            self._unloaded.add(name)
            versions = sorted(self._versions.get(name, {}))
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
            if latest is None or name in self._unloaded or (name, latest) in self._failed:
                continue
            loaded = self._versions.get(name, {})
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
        scanned = await self._in_loader(self._scan)
        entries = []
        for name in sorted(set(scanned) | set(self._versions)):
            loaded = self._versions.get(name, {})
            for version in sorted(loaded):
                entries.append(IndexEntry(name, version, "READY", parts=tuple(loaded[version].graphs)))
            if ready_only:
                continue
            for (failed_name, version), reason in sorted(self._failed.items()):
                if failed_name == name:
                    parts = await self._in_loader(self._parts, name, version)
                    entries.append(IndexEntry(name, version, "UNAVAILABLE", reason, parts))
            if not loaded:
                latest = scanned.get(name)
                parts = await self._in_loader(self._parts, name, latest)
                if name in self._loading:
                    entries.append(IndexEntry(name, latest, "LOADING", parts=parts))
                elif name in self._unloaded:
                    entries.append(IndexEntry(name, latest, "UNAVAILABLE", "unloaded", parts))
                elif not any(n == name for n, _ in self._failed):
                    entries.append(IndexEntry(name, latest, "UNAVAILABLE", "not loaded", parts))
        return entries

    # --- shutdown -------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop polling, retire every version (in-flight requests finish), remove serving marks."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for name in list(self._versions):
            for version in list(self._versions.get(name, {})):
                self._retire(name, version)
        await self.drained()
        for name in sorted(self._marked):
            await self._in_loader(self._mark, name, set())
        self._loader.shutdown(wait=False, cancel_futures=True)
        self.ready = False


_VERSION_TEXT = re.compile(r"[0-9]{1,18}")  # ASCII digits only ("²" and "١" are str.isdigit()), within int64


def parse_version(text: str) -> int | None:
    """An inference-protocol version string ("" = newest) -> int or None; InvalidArgument if not a number."""
    if text == "":
        return None
    if not _VERSION_TEXT.fullmatch(text) or int(text) < 1:
        shown = text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
        raise InvalidArgument(
            f"version must be a positive integer of at most 18 ASCII digits (or empty for the newest), got {shown!r}"
        )
    return int(text)
