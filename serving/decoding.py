"""Undecodable requests end with INVALID_ARGUMENT (grpc itself would answer UNKNOWN and log a traceback).

A server interceptor wraps each unary-request handler's deserializer so that a protobuf decoding
error becomes a marker the handler turns into INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc


class _Undecodable:
    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError, or anything a custom deserializer raises
            return _Undecodable(error)

    return decode


def _message_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # FromString is bound to the message class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request message")


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Turns undecodable unary requests into INVALID_ARGUMENT instead of UNKNOWN."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        inner = handler.unary_unary or handler.unary_stream
        message = f"the request is not a valid {_message_name(handler.request_deserializer)}"

        async def reject(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{message}: {request.error}")

        if inspect.isasyncgenfunction(inner):

            async def behavior(request, context):
                if isinstance(request, _Undecodable):
                    await reject(request, context)
                async for response in inner(request, context):
                    yield response

        else:

            async def behavior(request, context):
                if isinstance(request, _Undecodable):
                    await reject(request, context)
                return await inner(request, context)

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.unary_stream_rpc_method_handler
        return make(
            behavior,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
