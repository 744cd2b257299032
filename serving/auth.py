"""Bearer-token authentication: a server interceptor checking `authorization: Bearer <token>` on
every call except the standard health service (load balancers and probes have no token)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

from genserve.serving.calls import end_call
from genserve.serving.metrics import ServerMetrics

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with UNAUTHENTICATED on its headers alone.

    It is request-streaming whatever the method is, so gRPC starts it before any request message
    and it reads none: a client without the token cannot make the server receive and hold a
    large body (unary handlers only start once the whole message is in memory)."""

    async def deny(requests, context: grpc.aio.ServicerContext) -> None:
        end_call(context, grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_streaming(requests, context: grpc.aio.ServicerContext):
        end_call(context, grpc.StatusCode.UNAUTHENTICATED, message)
        return
        yield  # an async generator, as a response-streaming handler must be

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_streaming, **codec)
    return grpc.stream_unary_rpc_method_handler(deny, **codec)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED (compared in constant time)."""

    def __init__(self, token: str, metrics: ServerMetrics | None = None):
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        given = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if isinstance(given, str):
            given = given.encode()
        if given is not None and hmac.compare_digest(given, self._expected):
            return handler
        if self._metrics is not None:
            method = details.method.rsplit("/", 1)[-1]
            self._metrics.requests.labels(method, "", "", grpc.StatusCode.UNAUTHENTICATED.name).inc()
        reason = "missing" if given is None else "wrong"
        return _denying(handler, f"{reason} bearer token: send metadata 'authorization: Bearer <token>'")
