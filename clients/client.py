"""GenserveClient: a typed Python client for genserve.v1 that speaks numpy.

    from genserve.clients.client import GenserveClient
    with GenserveClient("127.0.0.1:8001") as client:
        samples = client.generate("mnist-vae", 16, seed=1)        # samples.images: (16, 1, 28, 28) float32
        codes = client.encode("mnist-vae", samples.images).latents

Images go in as uint8 or float32 [0, 1] NCHW arrays and come back as float32 [0, 1] NCHW arrays;
on the wire they are raw tensors or PNG files (`image_encoding`). Every call has a deadline
(`timeout`) and is retried with exponential backoff while the server answers UNAVAILABLE (a
restart, a shutdown, a model loading), within that deadline. Failed calls raise GenserveError;
arrays that cannot be sent (or responses that cannot be read) raise CodecError, a ValueError.

Against a server with several worker processes (`genserve-serve --workers N`), `channels=N`
opens N connections and sends calls over them in turn: gRPC keeps all of one channel's calls on one
connection, and the kernel hands each connection to one worker (docs/serving.md, "Workers").

It imports grpc, numpy, PIL and the generated messages, never the server, torch or matplotlib.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from genserve.clients import codec
from genserve.clients.codec import IMAGE_ENCODINGS, CodecError
from genserve.serving.protos import genserve_pb2 as pb  # the generated code only: no server module
from genserve.serving.protos import genserve_pb2_grpc

Response = TypeVar("Response")
DEFAULT_ADDRESS = "127.0.0.1:8001"
RETRIED = (grpc.StatusCode.UNAVAILABLE,)
__all__ = ["DEFAULT_ADDRESS", "CodecError", "Encoding", "GenserveClient", "GenserveError", "Images", "ModelInfo", "ModelSummary",
           "open_channels"]


def open_channels(address: str, count: int = 1, *, options: Sequence[tuple[str, Any]] = (),
                  credentials: grpc.ChannelCredentials | None = None, aio: bool = False) -> list[Any]:
    """`count` channels to `address`, each its own connection (grpc.use_local_subchannel_pool: by
    default gRPC shares one connection among channels with the same target and options), so that
    a server with several workers gets calls on several of them. grpc.aio channels with `aio`."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"channels must be a positive integer, got {count!r}")
    grpc_module: Any = grpc.aio if aio else grpc
    own = [*options, *([("grpc.use_local_subchannel_pool", 1)] if count > 1 else [])]
    if credentials is not None:
        return [grpc_module.secure_channel(address, credentials, options=own) for _ in range(count)]
    return [grpc_module.insecure_channel(address, options=own) for _ in range(count)]


class GenserveError(Exception):
    """A call failed: `code` is the gRPC status, `details` the server's message."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, request_id: str | None = None):
        super().__init__(f"{method} failed with {code.name}: {details}" + (f" (request id {request_id})" if request_id else ""))
        self.method = method
        self.code = code
        self.details = details
        self.request_id = request_id


@dataclass(frozen=True)
class ModelSummary:
    name: str
    kind: str
    latest_version: int
    versions: list[int]
    parts: list[str]
    operations: list[str]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    kind: str
    parts: list[str]
    image_shape: tuple[int, int, int]
    latent_dim: int
    prior: dict[str, Any] | None
    class_names: list[str]
    versions: list[int]
    operations: list[str]
    metrics: dict[str, float]
    dataset: str
    created_at: str
    execution_providers: dict[str, list[str]] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)  # the version's quality labels, metric -> value


@dataclass(frozen=True)
class Images:
    """Images (N, C, H, W) float32 in [0, 1] from model `version`; latents where the call has them."""

    images: np.ndarray
    version: int
    latents: np.ndarray | None = None


@dataclass(frozen=True)
class Encoding:
    """VAEs: mean and logvar; autoencoders: codes. `latents` is whichever the model gives."""

    version: int
    mean: np.ndarray | None = None
    logvar: np.ndarray | None = None
    codes: np.ndarray | None = None

    @property
    def latents(self) -> np.ndarray:
        return self.mean if self.mean is not None else self.codes  # type: ignore[return-value]


def _read(value: str | Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class GenserveClient:
    """A connection (or `channels` of them) to one genserve server. Thread-safe; close() it (or use `with`)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: str | Path | bytes | None = None,
        client_certificate: str | Path | bytes | None = None,
        client_key: str | Path | bytes | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        image_encoding: str = "raw",
        max_message_bytes: int = 64 * 1024 * 1024,
        channels: int = 1,
    ):
        if image_encoding not in IMAGE_ENCODINGS:
            raise ValueError(f"image_encoding must be 'raw' or 'png', not {image_encoding!r}")
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # While a channel cannot connect, its calls fail at once with UNAVAILABLE until its next
            # connection attempt: gRPC's own backoff (1 s, growing 1.6x to 120 s) would let every retry
            # below fail against a server that is back. The channel tries as often as the calls retry.
            ("grpc.initial_reconnect_backoff_ms", max(1, int(backoff_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(max_backoff_s * 1000))),
        ]
        credentials = None
        if tls or root_certificates is not None or client_certificate is not None:
            credentials = grpc.ssl_channel_credentials(
                _read(root_certificates), _read(client_key), _read(client_certificate)
            )
        self._channels = open_channels(address, channels, options=options, credentials=credentials)
        self._channel = self._channels[0]
        self._stubs = [genserve_pb2_grpc.GenserveStub(channel) for channel in self._channels]
        self._turn = itertools.count()  # which channel the next call takes (next() is atomic in CPython)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.image_encoding = image_encoding
        self._output_format = pb.IMAGE_FORMAT_PNG if image_encoding == "png" else pb.IMAGE_FORMAT_FLOAT32

    # --- plumbing -------------------------------------------------------------------------------
    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> GenserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """One RPC with a deadline, retried with backoff on UNAVAILABLE while time is left."""
        rpc: Callable[..., Any] = getattr(self._stubs[next(self._turn) % len(self._stubs)], method)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return rpc(request, timeout=max(remaining, 0.001), metadata=self._metadata)
            except grpc.RpcError as error:
                code = error.code()
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
                if code in RETRIED and attempt < self.retries and time.monotonic() + delay < deadline:
                    attempt += 1
                    time.sleep(delay)
                    continue
                trailing = dict(error.trailing_metadata() or ())
                raise GenserveError(method, code, error.details() or "", trailing.get("x-request-id")) from None

    def _images(self, images: np.ndarray) -> pb.Images:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        return codec.images_to_proto(images, self.image_encoding)

    # --- models ---------------------------------------------------------------------------------
    def serving(self, service: str = "", timeout: float | None = None) -> bool:
        """True when grpc.health.v1 says the server (or `service`) is SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def models(self, timeout: float | None = None) -> list[ModelSummary]:
        response = self._call("ListModels", pb.ListModelsRequest(), timeout)
        return [
            ModelSummary(m.name, m.kind, m.latest_version, list(m.versions), list(m.parts), list(m.operations))
            for m in response.models
        ]

    def model(self, name: str, version: int | None = None, timeout: float | None = None) -> ModelInfo:
        r = self._call("GetModel", pb.GetModelRequest(model=name, version=version or 0), timeout)
        return ModelInfo(
            name=r.model.name,
            version=r.model.version,
            kind=r.kind,
            parts=[p.name for p in r.parts],
            image_shape=(r.image_shape.channels, r.image_shape.height, r.image_shape.width),
            latent_dim=r.latent_dim,
            prior=json.loads(r.prior.spec_json) if r.HasField("prior") else None,
            class_names=list(r.class_names),
            versions=list(r.versions),
            operations=list(r.operations),
            metrics=dict(r.metrics),
            dataset=r.dataset,
            created_at=r.created_at,
            execution_providers={p.name: list(p.execution_providers) for p in r.parts},
            quality={q.metric: q.value for q in r.quality},
        )

    # --- operations -----------------------------------------------------------------------------
    def generate(
        self,
        model: str,
        count: int | None = None,
        *,
        seed: int = 0,
        latents: np.ndarray | None = None,
        temperature: float = 1.0,
        version: int | None = None,
        timeout: float | None = None,
    ) -> Images:
        """`count` images from the prior with `seed` (same seed and version: same images), or the
        decoded `latents` (N, latent_dim). Returns the images and the latents they came from."""
        request = pb.GenerateRequest(
            model=model, version=version or 0, seed=seed, temperature=temperature,
            output_format=self._output_format, return_latents=True,
        )
        if latents is not None:
            codec.array_to_tensor(np.asarray(latents, np.float32), into=request.latents)
            request.count = count or 0
        else:
            request.count = 1 if count is None else count
        r = self._call("Generate", request, timeout)
        return Images(codec.images_from_proto(r.images), r.model.version, codec.tensor_to_array(r.latents, "latents").copy())

    def encode(self, model: str, images: np.ndarray, *, version: int | None = None, timeout: float | None = None) -> Encoding:
        r = self._call("Encode", pb.EncodeRequest(model=model, version=version or 0, images=self._images(images)), timeout)

        def array(tensor: pb.Tensor, present: bool) -> np.ndarray | None:
            return codec.tensor_to_array(tensor, "latents").copy() if present else None

        return Encoding(
            r.model.version, array(r.mean, r.HasField("mean")), array(r.logvar, r.HasField("logvar")),
            array(r.codes, r.HasField("codes")),
        )

    def reconstruct(
        self,
        model: str,
        images: np.ndarray,
        *,
        sample: bool = False,
        seed: int = 0,
        version: int | None = None,
        timeout: float | None = None,
    ) -> Images:
        """Encode and decode: the latent mean by default, a posterior sample with `sample`."""
        request = pb.ReconstructRequest(
            model=model, version=version or 0, images=self._images(images), sample=sample, seed=seed,
            output_format=self._output_format,
        )
        r = self._call("Reconstruct", request, timeout)
        return Images(codec.images_from_proto(r.images), r.model.version)

    def denoise(self, model: str, images: np.ndarray, *, version: int | None = None, timeout: float | None = None) -> Images:
        request = pb.DenoiseRequest(model=model, version=version or 0, images=self._images(images), output_format=self._output_format)
        r = self._call("Denoise", request, timeout)
        return Images(codec.images_from_proto(r.images), r.model.version)

    def interpolate(
        self,
        model: str,
        *,
        images: np.ndarray | Sequence[np.ndarray] | None = None,
        latents: np.ndarray | None = None,
        steps: int = 8,
        spherical: bool = False,
        version: int | None = None,
        timeout: float | None = None,
    ) -> Images:
        """`steps` images between two images (encoded to their mean) or two latents, both ends included."""
        if (images is None) == (latents is None):
            raise ValueError("give either two images or two latents")
        request = pb.InterpolateRequest(
            model=model, version=version or 0, steps=steps, output_format=self._output_format,
            method=pb.INTERPOLATION_METHOD_SPHERICAL if spherical else pb.INTERPOLATION_METHOD_LINEAR,
        )
        if images is not None:
            request.images.images.CopyFrom(self._images(np.stack(list(images)) if not isinstance(images, np.ndarray) else images))
        else:
            codec.array_to_tensor(np.asarray(latents, np.float32), into=request.latents.latents)
        r = self._call("Interpolate", request, timeout)
        return Images(codec.images_from_proto(r.images), r.model.version, codec.tensor_to_array(r.latents, "latents").copy())
