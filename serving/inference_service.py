"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) with Triton's extensions.

Every exported graph is a model here, named `<model>.<part>` (e.g. mnist-vae.decoder), with the
genserve model's loaded versions as its versions. ModelInfer goes through the same batchers as
genserve.v1. Repository load/unload act on the whole genserve model (all its parts share
versions). Shared memory, tracing, log settings and streaming are not supported (UNIMPLEMENTED).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

import grpc
import numpy as np

from genserve.export.labels import labels_of
from genserve.export.manifest import Manifest
from genserve.serving.calls import Call, Calls, ServerState, end_call, rpc
from genserve.serving.codec import largest_magnitude
from genserve.serving.config import Limits
from genserve.serving.errors import InvalidArgument, NotFound, ServingError
from genserve.serving.models import ModelManager, check_name
from genserve.serving.oip_names import parse_version, split_oip_name, use_graph
from genserve.serving.protos import grpc_service_pb2 as pb
from genserve.serving.protos import grpc_service_pb2_grpc
from genserve.serving.protos import model_config_pb2 as mc
from genserve.serving.statistics import Duration
from genserve.serving.versions import LoadedGraph

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["model_repository", "model_configuration", "statistics"]
FP32 = "FP32"


def server_version() -> str:
    try:
        return version("genserve")
    except PackageNotFoundError:
        return "0+unknown"


def _dims(shape: tuple[int | str, ...]) -> list[int]:
    return [-1 if isinstance(d, str) else int(d) for d in shape]


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _model_name(name: str) -> str:
    """RepositoryModelLoad/Unload take a genserve model or one of its parts (<model>.<part>)."""
    try:
        return split_oip_name(name)[0]
    except ServingError:
        return check_name(name)


def quality_parameters(manifest: Manifest) -> dict[str, float | str]:
    """quality.<metric> -> value for each quality label, and quality_json -> the labels as in the manifest."""
    labels = labels_of(manifest.quality)
    if not labels:
        return {}
    values: dict[str, float | str] = {f"quality.{label.metric}": label.value for label in labels}
    values["quality_json"] = json.dumps([label.to_dict() for label in labels], sort_keys=True)
    return values


class InferenceService(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, manager: ModelManager, calls: Calls, limits: Limits, state: ServerState):
        self.manager = manager
        self.calls = calls
        self.limits = limits
        self.state = state

    # --- health ---------------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.manager.serving_ready and not self.state.shutting_down)

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, call: Call) -> pb.ModelReadyResponse:
        parse_version(request.version)  # a malformed version is INVALID_ARGUMENT, not "not ready"
        try:
            async with use_graph(self.manager, request.name, request.version) as graph:
                return pb.ModelReadyResponse(ready=self.manager.agreed(graph.model, graph.version))
        except ServingError:
            return pb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="genserve", version=server_version(), extensions=EXTENSIONS)

    # --- models ---------------------------------------------------------------------------------
    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, call: Call) -> pb.ModelMetadataResponse:
        async with use_graph(self.manager, request.name, request.version) as graph:
            call.bind(graph.model, graph.version)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            manifest = self.manager.resolve(graph.model, graph.version).manifest
            parameters = {
                key: pb.InferParameter(string_param=value) if isinstance(value, str) else pb.InferParameter(double_param=value)
                for key, value in quality_parameters(manifest).items()
            }
            return pb.ModelMetadataResponse(
                parameters=parameters,
                name=graph.oip_name,
                versions=[str(v) for v in self.manager.loaded().get(graph.model, [])],
                platform=PLATFORM,
                inputs=[tensor(name=t.name, datatype=FP32, shape=_dims(t.shape)) for t in graph.spec.inputs],
                outputs=[tensor(name=t.name, datatype=FP32, shape=_dims(t.shape)) for t in graph.spec.outputs],
            )

    @rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, call: Call) -> pb.ModelConfigResponse:
        async with use_graph(self.manager, request.name, request.version) as graph:
            call.bind(graph.model, graph.version)
            return pb.ModelConfigResponse(config=self._config(graph))

    def _config(self, graph: LoadedGraph) -> mc.ModelConfig:
        loaded = self.manager.resolve(graph.model, graph.version)
        s = loaded.settings
        return mc.ModelConfig(
            name=graph.oip_name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=s.max_batch_size,
            version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=s.max_loaded_versions)),
            input=[mc.ModelInput(name=t.name, data_type=mc.TYPE_FP32, dims=_dims(t.shape[1:])) for t in graph.spec.inputs],
            output=[mc.ModelOutput(name=t.name, data_type=mc.TYPE_FP32, dims=_dims(t.shape[1:])) for t in graph.spec.outputs],
            dynamic_batching=mc.ModelDynamicBatching(
                max_queue_delay_microseconds=s.max_queue_delay_us,
                default_queue_policy=mc.ModelQueuePolicy(max_queue_size=s.max_queue_size),
            ),
            instance_group=[mc.ModelInstanceGroup(
                count=s.instances, kind=mc.ModelInstanceGroup.KIND_GPU if graph.session.on_gpu else mc.ModelInstanceGroup.KIND_CPU,
            )],
            default_model_filename=graph.session.path.name,
            parameters={
                "execution_provider": mc.ModelParameter(string_value=graph.session.provider),
                "variant": mc.ModelParameter(string_value=graph.variant),
                "genserve_kind": mc.ModelParameter(string_value=loaded.manifest.kind),
                **{key: mc.ModelParameter(string_value=value if isinstance(value, str) else repr(value))
                   for key, value in quality_parameters(loaded.manifest).items()},
            },
        )

    @rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, call: Call) -> pb.ModelStatisticsResponse:
        graphs: list[LoadedGraph] = []
        if request.name:
            model, part = split_oip_name(request.name)
            number = parse_version(request.version)
            versions = [number] if number else self.manager.loaded().get(model, [])
            if not versions:
                self.manager.resolve(model)  # raises NotFound saying why
            for v in versions:
                graph = self.manager.resolve(model, v).graph(part)
                if graph is None:
                    raise NotFound(f"model {model!r} version {v} has no part {part!r}")
                graphs.append(graph)
        else:
            for model, versions in self.manager.loaded().items():
                for v in versions:
                    graphs += sorted(self.manager.resolve(model, v).graphs.values(), key=lambda g: g.part)
        stats = []
        for g in graphs:
            s = g.stats
            stats.append(pb.ModelStatistics(
                name=g.oip_name, version=str(g.version), last_inference=s.last_inference_ms,
                inference_count=s.inference_count, execution_count=s.execution_count,
                inference_stats=pb.InferStatistics(
                    success=_duration(s.success), fail=_duration(s.fail), queue=_duration(s.queue),
                    compute_infer=_duration(s.compute),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(d))
                    for size, d in sorted(s.batches.items())
                ],
            ))
        return pb.ModelStatisticsResponse(model_stats=stats)

    # --- inference ------------------------------------------------------------------------------
    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        async with use_graph(self.manager, request.model_name, request.model_version) as graph:
            call.bind(graph.model, graph.version)
            names = [t.name for t in graph.spec.outputs]
            wanted = [o.name for o in request.outputs] or names
            unknown = [n for n in wanted if n not in names]
            if unknown:  # before running the graph: nothing is computed for a request that cannot be answered
                raise InvalidArgument(f"{graph.oip_name} has no output {unknown[0]!r}; its outputs are {names}")
            rows = self._input(request, graph)
            outputs, timing = await graph.infer(rows, call.deadline)
            call.add(timing)
            response = pb.ModelInferResponse(
                model_name=graph.oip_name, model_version=str(graph.version), id=request.id,
            )
            for name in wanted:
                array = np.ascontiguousarray(outputs[names.index(name)], dtype="<f4")
                response.outputs.add(name=name, datatype=FP32, shape=list(array.shape))
                response.raw_output_contents.append(array.tobytes())
            return response

    def _input(self, request: pb.ModelInferRequest, graph: LoadedGraph) -> np.ndarray:
        """The one input tensor as float32 (N, ...), from raw_input_contents or contents.fp32_contents."""
        spec = graph.spec.inputs[0]
        if len(request.inputs) != 1:
            raise InvalidArgument(f"{graph.oip_name} takes exactly one input ({spec.name!r}), got {len(request.inputs)}")
        tensor = request.inputs[0]
        if tensor.name != spec.name:
            raise InvalidArgument(f"{graph.oip_name} has no input {tensor.name!r}; its input is {spec.name!r}")
        if tensor.datatype != FP32:
            raise InvalidArgument(f"input {spec.name!r} must be FP32, got {tensor.datatype!r}")
        dims = [int(d) for d in spec.shape[1:]]
        shape = list(tensor.shape)
        if len(shape) != len(dims) + 1 or shape[1:] != dims or shape[0] < 1:
            raise InvalidArgument(f"input {spec.name!r} must have shape [N, {', '.join(map(str, dims))}] with N >= 1, got {shape}")
        limit = self.limits.max_images_per_request if len(dims) == 3 else self.limits.max_samples_per_request
        if shape[0] > limit:
            raise InvalidArgument(f"input {spec.name!r} has {shape[0]} rows, over the limit of {limit} per request")
        count = math.prod(shape)
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1 or tensor.HasField("contents"):
                raise InvalidArgument("give the input either in raw_input_contents (one entry) or in contents, not both")
            raw = request.raw_input_contents[0]
            if len(raw) != count * 4:
                raise InvalidArgument(f"input {spec.name!r}: {len(raw)} bytes of raw data, shape {shape} of FP32 needs {count * 4}")
            array = np.frombuffer(raw, dtype="<f4").reshape(shape)
        else:
            others = [f.name for f, _ in tensor.contents.ListFields() if f.name != "fp32_contents"]
            if others:
                raise InvalidArgument(
                    f"input {spec.name!r}: contents has {', '.join(others)}; an FP32 input takes fp32_contents only"
                )
            values = tensor.contents.fp32_contents
            if len(values) != count:
                raise InvalidArgument(
                    f"input {spec.name!r}: {len(values)} values in contents.fp32_contents, shape {shape} needs {count}"
                )
            array = np.asarray(values, dtype=np.float32).reshape(shape)
        largest = largest_magnitude(array)
        if not math.isfinite(largest):
            raise InvalidArgument(f"input {spec.name!r} contains NaN or infinite values")
        if largest > self.limits.max_latent_abs:
            raise InvalidArgument(
                f"input {spec.name!r} has a value of magnitude {largest:.4g}, over limits.max_latent_abs "
                f"({self.limits.max_latent_abs:g})"
            )
        return array

    # --- repository -----------------------------------------------------------------------------
    @rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, call: Call) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        models = []
        for entry in await self.manager.index(ready_only=request.ready):
            names = [f"{entry.name}.{part}" for part in entry.parts] or [entry.name]
            for name in names:
                models.append(index(name=name, version="" if entry.version is None else str(entry.version),
                                    state=entry.state, reason=entry.reason))
        return pb.RepositoryIndexResponse(models=models)

    @rpc
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, call: Call) -> pb.RepositoryModelLoadResponse:
        name = _model_name(request.model_name)
        if request.parameters:
            raise InvalidArgument(
                f"load parameters are not supported (got {sorted(request.parameters)}); genserve loads "
                "the newest valid version from its repository"
            )
        loaded = await self.manager.load(name, explicit=True)
        call.bind(loaded.name, loaded.version)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, call: Call) -> pb.RepositoryModelUnloadResponse:
        name = _model_name(request.model_name)
        await self.manager.unload(name)
        call.bind(name, "")  # only now: an invented name must not become a metric label
        return pb.RepositoryModelUnloadResponse()

    # --- not supported --------------------------------------------------------------------------
    async def _unsupported(self, context: grpc.aio.ServicerContext, what: str) -> None:
        end_call(context, grpc.StatusCode.UNIMPLEMENTED, f"genserve does not support {what}")

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        await self._unsupported(context, "streaming inference (use ModelInfer)")
        return
        yield pb.ModelStreamInferResponse()  # an async generator, as a streaming handler must be

    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext) -> None:
        await self._unsupported(context, "system shared memory")

    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext) -> None:
        await self._unsupported(context, "system shared memory")

    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext) -> None:
        await self._unsupported(context, "system shared memory")

    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext) -> None:
        await self._unsupported(context, "CUDA shared memory")

    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext) -> None:
        await self._unsupported(context, "CUDA shared memory")

    async def CudaSharedMemoryUnregister(self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext) -> None:
        await self._unsupported(context, "CUDA shared memory")

    async def TraceSetting(self, request: pb.TraceSettingRequest, context: grpc.aio.ServicerContext) -> None:
        await self._unsupported(context, "trace settings")

    async def LogSettings(self, request: pb.LogSettingsRequest, context: grpc.aio.ServicerContext) -> None:
        await self._unsupported(context, "log settings")
