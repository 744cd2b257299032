"""Making one model version servable: the blocking preparation (verify, create sessions, check
their I/O against the manifest, warm up) that runs on the manager's loader thread, then, on the
event loop, the batchers and metrics that put the prepared sessions into service.

A stage that fails raises LoadError naming the stage (verify, load, gpu or warmup), which the
manager records as the version's reason for being UNAVAILABLE and counts in
genserve_model_load_failures_total.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from genserve.export import Manifest, PartSpec, Repository
from genserve.export.manifest import RepositoryError
from genserve.serving.batcher import DynamicBatcher
from genserve.serving.config import ModelSettings
from genserve.serving.logs import log_event
from genserve.serving.metrics import ServerMetrics
from genserve.serving.runtime import GpuRequiredError, GraphSession, load_session
from genserve.serving.sample_health import sample_health
from genserve.serving.statistics import GraphStats
from genserve.serving.versions import LoadedGraph, LoadedVersion, checked_run

log = logging.getLogger("genserve.models")  # the manager's logger: its events read as one story

PreparedSessions = dict[str, tuple[str, GraphSession]]  # part -> (variant, session)


class LoadError(Exception):
    """A version could not be made servable; `stage` is verify, load, gpu or warmup."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


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


def prepare_version(
    repository: Repository, name: str, version: int, settings: ModelSettings, *, require_gpu: bool, max_row_bytes: int
) -> tuple[Manifest, PreparedSessions]:
    """Blocking (loader thread): verify, create sessions, check their I/O and warm them up."""
    try:
        manifest = repository.verify(name, version)
    except RepositoryError as error:
        raise LoadError("verify", str(error)) from None
    sessions: PreparedSessions = {}
    for part, spec in manifest.parts.items():
        variant = settings.variant if settings.variant in spec.variants else "fp32"
        if variant != settings.variant:
            log_event(log, "variant_missing", level=logging.WARNING, model=name, version=version, part=part,
                      wanted=settings.variant, using=variant)
        what = f"{name} version {version} {part} ({variant})"
        session = _create_session(repository, manifest, part, variant, settings, require_gpu, what)
        _check_io(what, spec, session, max_row_bytes)
        _warm_up(what, spec, session, settings.warmup_sizes)
        sessions[part] = (variant, session)
    return manifest, sessions


def _create_session(repository: Repository, manifest: Manifest, part: str, variant: str, settings: ModelSettings,
                    require_gpu: bool, what: str) -> GraphSession:
    path: Path = repository.version_dir(manifest.name, manifest.version) / manifest.parts[part].variants[variant].file
    try:
        # What onnxruntime loads is exactly the bytes whose sha256 was just checked: loading
        # from the path would read the file a second time, after anyone could have swapped it.
        graph_bytes = repository.read_part(manifest, part, variant)
    except RepositoryError as error:
        raise LoadError("verify", str(error)) from None
    try:
        return load_session(
            path,
            model_bytes=graph_bytes,
            execution_provider=settings.execution_provider,
            intra_op_threads=settings.intra_op_threads,
            cpu_memory_arena=settings.cpu_memory_arena,
            require_gpu=require_gpu,
            what=what,
        )
    except GpuRequiredError as error:
        raise LoadError("gpu", str(error)) from None
    except Exception as error:  # onnxruntime raises its own exception types
        raise LoadError("load", f"onnxruntime cannot load {path.name}: {error}") from None
    finally:
        del graph_bytes  # onnxruntime keeps its own copy


def _check_io(what: str, spec: PartSpec, session: GraphSession, max_row_bytes: int) -> None:
    expected_out = [t.name for t in spec.outputs]
    if session.input_name != spec.inputs[0].name or session.output_names != expected_out:
        raise LoadError(
            "load",
            f"{what}: the graph's inputs/outputs ({session.input_name!r} -> {session.output_names}) "
            f"differ from the manifest's ({spec.inputs[0].name!r} -> {expected_out})",
        )
    check_declared_shapes(what, spec, session, max_row_bytes)


def _warm_up(what: str, spec: PartSpec, session: GraphSession, batch_sizes: tuple[int, ...]) -> None:
    shape = tuple(int(d) for d in spec.inputs[0].shape[1:])
    for batch in batch_sizes:
        try:
            outputs = session.run(np.full((batch, *shape), 0.5, dtype=np.float32))
        except Exception as error:
            raise LoadError("warmup", f"{what} fails on a warm-up batch of {batch}: {error}") from None
        if any(o.shape[0] != batch for o in outputs):
            raise LoadError("warmup", f"{what} returned the wrong batch size on a warm-up batch of {batch}")


def start_version(manifest: Manifest, sessions: PreparedSessions, settings: ModelSettings, executor: Executor,
                  metrics: ServerMetrics) -> LoadedVersion:
    """On the loop: give the prepared sessions their batchers and statistics, ready for traffic."""
    name, version = manifest.name, manifest.version
    graphs = {}
    for part, (variant, session) in sessions.items():
        stats = GraphStats(name, version, part, metrics)
        health = sample_health(metrics, manifest, part)  # image outputs: watched as each execution returns
        batcher = DynamicBatcher(
            f"{name}.{part} version {version}",
            checked_run(session.run, health),
            executor,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_queue_size=settings.max_queue_size,
            merge=settings.dynamic_batching,
            policy=settings.batching_policy,
            inline_below_us=settings.inline_execution_us,
            instances=settings.instances,
            observer=stats,
        )
        batcher.start()
        graphs[part] = LoadedGraph(name, version, part, variant, manifest.parts[part], session, batcher, stats)
        metrics.provider.labels(name, str(version), part, session.provider).set(1)
    loaded = LoadedVersion(manifest, graphs, settings)
    for graph in graphs.values():  # who may still join a batch: the requests holding this version
        graph.batcher.company = lambda: loaded.in_flight
    return loaded
