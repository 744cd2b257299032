"""genserve.v1.Genserve: generative operations composed from a version's graphs.

Latents are sampled and interpolated in numpy (serving.latents), never in a graph; every graph
runs through its batcher. Each call holds a lease on one version from start to end, so a hot
reload never mixes two versions in one response.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, TypeVar

import numpy as np

from genserve.export.labels import labels_of
from genserve.export.manifest import Manifest
from genserve.serving import codec, latents
from genserve.serving.calls import Call, Calls, rpc
from genserve.serving.config import Limits
from genserve.serving.errors import FailedPrecondition, InvalidArgument
from genserve.serving.models import ModelManager
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc
from genserve.serving.versions import LoadedGraph, LoadedVersion

Response = TypeVar("Response", pb.GenerateResponse, pb.ReconstructResponse, pb.DenoiseResponse, pb.InterpolateResponse)


def operations(loaded: LoadedVersion) -> list[str]:
    """The Genserve RPCs a version supports, from the parts it has."""
    parts = set(loaded.graphs)
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


def _shape(spec_shape: tuple[int | str, ...]) -> list[int]:
    return [-1 if isinstance(d, str) else int(d) for d in spec_shape]


def _prior_message(prior: dict[str, Any] | None) -> pb.Prior | None:
    if not prior:
        return None
    message = pb.Prior(distribution=str(prior.get("distribution", "")), dim=int(prior.get("dim", 0)),
                       spec_json=json.dumps(prior, sort_keys=True))
    for key in ("mean", "std", "low", "high"):
        value = prior.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            setattr(message, key, float(value))
    if isinstance(prior.get("weights"), list):
        message.weights.extend(float(w) for w in prior["weights"])
    if isinstance(prior.get("means"), list):
        message.means.extend(pb.Vector(values=[float(v) for v in mean]) for mean in prior["means"])
    return message


def _numbers(values: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a metrics dict, nested keys joined with '.' (class_coverage.3)."""
    if not isinstance(values, dict):
        return {}
    result = {}
    for key, value in values.items():
        if isinstance(value, dict):
            result.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            result[f"{prefix}{key}"] = float(value)
    return result


def _quality(manifest: Manifest) -> list[pb.QualityLabel]:
    """The version's quality labels as messages (validated when the manifest was loaded)."""
    return [
        pb.QualityLabel(
            metric=label.metric, value=label.value, better=label.better, unit=label.unit, samples=label.samples,
            protocol=label.protocol, reference_dataset=str(label.reference.get("dataset", "")),
            reference_split=str(label.reference.get("split", "")),
            feature_extractor=str((label.feature_extractor or {}).get("name", "")),
            feature_extractor_sha256=str((label.feature_extractor or {}).get("sha256", "")),
            graphs=[pb.MeasuredGraph(part=g.part, file=g.file, sha256=g.sha256) for g in label.graphs],
            label_json=json.dumps(label.to_dict(), sort_keys=True),
        )
        for label in labels_of(manifest.quality)
    ]


class GenserveService(genserve_pb2_grpc.GenserveServicer):
    def __init__(self, manager: ModelManager, calls: Calls, limits: Limits):
        self.manager = manager
        self.calls = calls
        self.limits = limits

    # --- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _ref(loaded: LoadedVersion) -> pb.ModelRef:
        return pb.ModelRef(name=loaded.name, version=loaded.version)

    @staticmethod
    def _latent_graph(loaded: LoadedVersion, operation: str) -> LoadedGraph:
        graph = loaded.graph("decoder") or loaded.graph("generator")
        if graph is None:
            raise FailedPrecondition(
                f"{operation}: model {loaded.name!r} ({loaded.manifest.kind}) has no decoder or generator; "
                f"it supports {', '.join(operations(loaded))}"
            )
        return graph

    @staticmethod
    def _require(loaded: LoadedVersion, part: str, operation: str) -> LoadedGraph:
        graph = loaded.graph(part)
        if graph is None:
            raise FailedPrecondition(
                f"{operation}: model {loaded.name!r} ({loaded.manifest.kind}) has no {part}; "
                f"it supports {', '.join(operations(loaded))}"
            )
        return graph

    async def _images_in(self, images: pb.Images, loaded: LoadedVersion, what: str = "images") -> np.ndarray:
        shape = loaded.manifest.image_shape
        if images.WhichOneof("encoding") == "png":  # decoding PNGs is CPU work: off the loop
            return await asyncio.to_thread(codec.decode_images, images, shape, self.limits.max_images_per_request, what)
        return codec.decode_images(images, shape, self.limits.max_images_per_request, what)

    async def _images_response(self, response_type: type[Response], loaded: LoadedVersion, images: np.ndarray,
                               image_format: int) -> Response:
        """A response with `model` set and `images` encoded in place (no copy of a finished message)."""
        response = response_type()
        response.model.name, response.model.version = loaded.name, loaded.version  # no ModelRef to copy in
        if image_format == pb.IMAGE_FORMAT_PNG:  # encoding PNGs is CPU work: off the loop
            await asyncio.to_thread(codec.encode_images, images, image_format, response.images)
        else:
            codec.encode_images(images, image_format, response.images)
        return response

    async def _run(self, graph: LoadedGraph, rows: np.ndarray, call: Call) -> list[np.ndarray]:
        outputs, timing = await graph.infer(rows, call.deadline)
        call.add(timing)
        return outputs

    async def _encode_means(self, loaded: LoadedVersion, images: np.ndarray, call: Call) -> tuple[np.ndarray, np.ndarray | None]:
        """Images -> (mean or codes, logvar or None)."""
        outputs = await self._run(self._require(loaded, "encoder", call.method), images, call)
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)

    def _check_count(self, count: int, what: str) -> int:
        if count < 1:
            raise InvalidArgument(f"{what} must be at least 1, got {count}")
        if count > self.limits.max_samples_per_request:
            raise InvalidArgument(f"{what} {count} is over the limit of {self.limits.max_samples_per_request} per request")
        return count

    # --- RPCs -----------------------------------------------------------------------------------
    @rpc
    async def ListModels(self, request: pb.ListModelsRequest, call: Call) -> pb.ListModelsResponse:
        models = []
        for name, versions in self.manager.loaded().items():
            newest = self.manager.resolve(name)
            models.append(pb.ModelSummary(
                name=name, kind=newest.manifest.kind, latest_version=newest.version, versions=versions,
                parts=sorted(newest.graphs), ready=True, operations=operations(newest),
                quality=_quality(newest.manifest),
            ))
        return pb.ListModelsResponse(models=models)

    @rpc
    async def GetModel(self, request: pb.GetModelRequest, call: Call) -> pb.GetModelResponse:
        loaded = self.manager.resolve(request.model, request.version)
        call.bind(loaded.name, loaded.version)
        m = loaded.manifest
        c, h, w = m.image_shape
        parts = [
            pb.Part(
                name=part,
                inputs=[pb.TensorInfo(name=t.name, dtype=t.dtype, shape=_shape(t.shape)) for t in g.spec.inputs],
                outputs=[pb.TensorInfo(name=t.name, dtype=t.dtype, shape=_shape(t.shape)) for t in g.spec.outputs],
                variant=g.variant,
                execution_providers=g.session.providers,
                oip_model_name=g.oip_name,
            )
            for part, g in sorted(loaded.graphs.items())
        ]
        return pb.GetModelResponse(
            model=self._ref(loaded), kind=m.kind, parts=parts,
            image_shape=pb.ImageShape(channels=c, height=h, width=w), latent_dim=m.latent_dim or 0,
            prior=_prior_message(m.prior), class_names=m.class_names or [],
            versions=self.manager.loaded().get(loaded.name, []),
            metrics=_numbers(m.training.get("final_metrics")), dataset=m.dataset or "",
            created_at=m.created_at, operations=operations(loaded), manifest_json=m.to_json().decode(),
            quality=_quality(m), quality_gate_forced=bool(m.quality.get("gate", {}).get("forced")),
        )

    @rpc
    async def Generate(self, request: pb.GenerateRequest, call: Call) -> pb.GenerateResponse:
        codec.check_image_format(request.output_format)
        async with self.manager.use(request.model, request.version) as loaded:
            call.bind(loaded.name, loaded.version)
            graph = self._latent_graph(loaded, call.method)
            dim = int(graph.spec.inputs[0].shape[1])
            if request.HasField("latents"):
                z = codec.latents_from_tensor(request.latents, dim, max_abs=self.limits.max_latent_abs)
                self._check_count(len(z), "the number of latents")
                if request.count not in (0, len(z)):
                    raise InvalidArgument(f"count is {request.count} but {len(z)} latents were given; give 0 or {len(z)}")
            else:
                count = self._check_count(request.count, "count")
                prior = loaded.manifest.prior
                if not prior:
                    raise FailedPrecondition(
                        f"model {loaded.name!r} ({loaded.manifest.kind}) has no prior to sample from; pass latents"
                    )
                if int(prior.get("dim", -1)) != dim:
                    raise FailedPrecondition(f"the prior's dim {prior.get('dim')} differs from the graph's input ({dim})")
                temperature = request.temperature or 1.0
                if not (math.isfinite(temperature) and 0 < temperature <= self.limits.max_temperature):
                    raise InvalidArgument(
                        f"temperature must be a positive number of at most {self.limits.max_temperature:g} "
                        f"(limits.max_temperature), got {temperature:.4g}"
                    )
                z = latents.sample_prior(prior, count, request.seed, temperature)
            images = (await self._run(graph, z, call))[0]
            response = await self._images_response(pb.GenerateResponse, loaded, images, request.output_format)
            if request.return_latents:
                codec.array_to_tensor(z, into=response.latents)
            return response

    @rpc
    async def Encode(self, request: pb.EncodeRequest, call: Call) -> pb.EncodeResponse:
        async with self.manager.use(request.model, request.version) as loaded:
            call.bind(loaded.name, loaded.version)
            self._require(loaded, "encoder", call.method)
            images = await self._images_in(request.images, loaded)
            mean, logvar = await self._encode_means(loaded, images, call)
            response = pb.EncodeResponse(model=self._ref(loaded))
            if logvar is None:
                codec.array_to_tensor(mean, into=response.codes)
            else:
                codec.array_to_tensor(mean, into=response.mean)
                codec.array_to_tensor(logvar, into=response.logvar)
            return response

    @rpc
    async def Reconstruct(self, request: pb.ReconstructRequest, call: Call) -> pb.ReconstructResponse:
        codec.check_image_format(request.output_format)
        async with self.manager.use(request.model, request.version) as loaded:
            call.bind(loaded.name, loaded.version)
            if loaded.graph("encoder") and loaded.graph("decoder"):
                images = await self._images_in(request.images, loaded)
                mean, logvar = await self._encode_means(loaded, images, call)
                z = latents.sample_posterior(mean, logvar, request.seed) if request.sample and logvar is not None else mean
                out = (await self._run(self._require(loaded, "decoder", call.method), z, call))[0]
            elif loaded.graph("denoiser"):
                images = await self._images_in(request.images, loaded)
                out = (await self._run(self._require(loaded, "denoiser", call.method), images, call))[0]
            else:
                raise FailedPrecondition(
                    f"{call.method}: model {loaded.name!r} ({loaded.manifest.kind}) has no encoder and decoder; "
                    f"it supports {', '.join(operations(loaded))}"
                )
            return await self._images_response(pb.ReconstructResponse, loaded, out, request.output_format)

    @rpc
    async def Denoise(self, request: pb.DenoiseRequest, call: Call) -> pb.DenoiseResponse:
        codec.check_image_format(request.output_format)
        async with self.manager.use(request.model, request.version) as loaded:
            call.bind(loaded.name, loaded.version)
            graph = self._require(loaded, "denoiser", call.method)
            images = await self._images_in(request.images, loaded)
            out = (await self._run(graph, images, call))[0]
            return await self._images_response(pb.DenoiseResponse, loaded, out, request.output_format)

    @rpc
    async def Interpolate(self, request: pb.InterpolateRequest, call: Call) -> pb.InterpolateResponse:
        codec.check_image_format(request.output_format)
        if request.method not in pb.InterpolationMethod.values():
            raise InvalidArgument(f"method {request.method} is not an InterpolationMethod")
        steps = request.steps
        if steps < 2:
            raise InvalidArgument(f"steps must be at least 2 (both endpoints are included), got {steps}")
        self._check_count(steps, "steps")
        async with self.manager.use(request.model, request.version) as loaded:
            call.bind(loaded.name, loaded.version)
            graph = self._latent_graph(loaded, call.method)
            dim = int(graph.spec.inputs[0].shape[1])
            endpoints = request.WhichOneof("endpoints")
            if endpoints == "latents":
                pair = codec.latents_from_tensor(
                    request.latents.latents, dim, "latents.latents", max_abs=self.limits.max_latent_abs)
            elif endpoints == "images":
                self._require(loaded, "encoder", f"{call.method} between images")
                images = await self._images_in(request.images.images, loaded, "images.images")
                pair = (await self._encode_means(loaded, images, call))[0]
            else:
                raise InvalidArgument("give the endpoints: images (two images) or latents (two latents)")
            if len(pair) != 2:
                raise InvalidArgument(f"interpolation needs exactly 2 endpoints, got {len(pair)}")
            path = latents.interpolate(pair[0], pair[1], steps, request.method == pb.INTERPOLATION_METHOD_SPHERICAL)
            out = (await self._run(graph, path, call))[0]
            response = await self._images_response(pb.InterpolateResponse, loaded, out, request.output_format)
            codec.array_to_tensor(path, into=response.latents)
            return response
