"""Receiving unary requests: a time limit, a memory budget, and clear statuses for bad messages.

A server interceptor serves every unary-request method as a request-streaming one, so its handler
starts as soon as the call's headers arrive and reads the one request message itself. That lets it
 - end a call whose message does not arrive within `receive_timeout_s` (DEADLINE_EXCEEDED; checked by
   one sweeper task every quarter of the limit, at most every second): a stream that declares a large
   message and stalls would otherwise pin its partial bytes in gRPC forever;
 - answer a call that ends without a message (INVALID_ARGUMENT) instead of leaving it hanging;
 - keep the bytes of requests in flight under a budget (RESOURCE_EXHAUSTED beyond it);
 - turn a message protobuf cannot decode into INVALID_ARGUMENT naming the message type (grpc
   itself would answer UNKNOWN and log a traceback).
Interceptors that come before it (the bearer-token check) still see only the headers.

With `receive_timeout_s` 0 the methods stay unary: gRPC reads the message before the handler
starts, which costs less per call (gRPC's request-streaming path is the dearer one; measured in
docs/benchmarks.md), but a stalled or missing message is then not ended by the server (the call
waits for the client's deadline): use it behind a proxy that times requests out. The budget and
the decoding statuses still apply.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from genserve.serving.calls import end_call


class RequestBudget:
    """The bytes of request messages the server holds now, across calls, with a limit."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.used_bytes = 0

    def reserve(self, size: int) -> bool:
        if self.used_bytes + size > self.limit_bytes:
            return False
        self.used_bytes += size
        return True

    def release(self, size: int) -> None:
        self.used_bytes -= size


class _Received:
    """What the deserializer hands the handler: the message, or the status to end the call with,
    and `size`, the bytes it reserved from the budget (the handler releases them when the call ends)."""

    __slots__ = ("message", "status", "details", "size")

    def __init__(self, message: Any, status: grpc.StatusCode | None = None, details: str = "", size: int = 0):
        self.message, self.status, self.details, self.size = message, status, details, size


def _message_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # FromString is bound to the message class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request message")


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Receives each unary request within a time limit and a memory budget (see the module doc)."""

    def __init__(self, receive_timeout_s: float, budget: RequestBudget):
        """`receive_timeout_s` 0: keep unary methods unary (see the module doc)."""
        self.receive_timeout_s = receive_timeout_s
        self.budget = budget
        # The time limit is kept by one sweeper task, not a timer per call (asyncio.timeout costs
        # 20-45 us of a ~300 us call, docs/benchmarks.md): calls waiting for their message, in the
        # order they began, with time.monotonic() then; the sweeper cancels those past the limit
        # (within a quarter of it, at most a second, after it passes) and exits when none wait.
        self._waiting: dict[asyncio.Task[Any], float] = {}
        self._timed_out: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        # method -> (its handler, the wrapped one): built once per method, not per call
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _deserializer(self, deserializer: Callable[[bytes], Any], name: str) -> Callable[[bytes], _Received]:
        """A method's deserializer; what it reserves from the budget travels with the _Received it
        returns, and the call releases it when it ends. The message is handed over in the same step
        (grpc's reader yields it at once, no await between), so no reservation can be lost."""
        budget = self.budget

        def decode(data: bytes) -> _Received:
            size = len(data)
            if not budget.reserve(size):
                return _Received(None, grpc.StatusCode.RESOURCE_EXHAUSTED, (
                    f"the server holds {budget.used_bytes} bytes of requests in flight; this {size}-byte request "
                    f"would exceed the limit of {budget.limit_bytes} (limits.max_in_flight_request_bytes); "
                    "retry with backoff or send smaller requests"))
            try:
                return _Received(deserializer(data), size=size)
            except Exception as error:  # DecodeError, or anything a custom deserializer raises
                return _Received(None, grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {name}: {error}", size)

        return decode

    async def _receive(self, context: grpc.aio.ServicerContext) -> _Received:
        """The call's one message, or a _Received with the status to end the call with."""
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = time.monotonic()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="receive timeout sweeper")
        try:
            # context.read(), not the request iterator: that is an async generator around read(), and
            # the layer cost 30-40 us per call (docs/benchmarks.md)
            received = await context.read()
            if received is grpc.aio.EOF:
                return _Received(None, grpc.StatusCode.INVALID_ARGUMENT,
                                 "the call ended without a request message; a unary call sends exactly one")
            return received
        except asyncio.CancelledError:
            if task not in self._timed_out:
                raise  # the client cancelled, or the server is stopping
            self._timed_out.discard(task)
            task.uncancel()
            return _Received(None, grpc.StatusCode.DEADLINE_EXCEEDED, (
                f"the request message did not arrive within {self.receive_timeout_s:g} s "
                "(limits.receive_timeout_s); send it in one go, or smaller"))
        finally:
            self._waiting.pop(task, None)

    async def _sweep(self) -> None:
        """Cancel the calls that have waited longer than receive_timeout_s for their message."""
        interval = min(1.0, self.receive_timeout_s / 4)
        waiting = self._waiting
        while waiting:
            await asyncio.sleep(interval)
            cutoff = time.monotonic() - self.receive_timeout_s
            for task, since in list(waiting.items()):
                if since > cutoff:
                    break  # the rest began later (a dict keeps insertion order)
                del waiting[task]
                self._timed_out.add(task)
                task.cancel()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[details.method] = (handler, self._wrap(handler))
        return cached[1]

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` served as a request-streaming method that reads its one message itself, or with
        receive_timeout_s 0, as a unary one whose message gRPC hands over decoded (or with its status)."""
        on_message, on_message_streaming = self._behaviors(handler)
        deserializer = self._deserializer(handler.request_deserializer, _message_name(handler.request_deserializer))
        streams = handler.response_streaming and inspect.isasyncgenfunction(handler.unary_stream)
        if not self.receive_timeout_s:
            make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
            return make(on_message_streaming if streams else on_message,
                        request_deserializer=deserializer, response_serializer=handler.response_serializer)
        receive = self._receive

        async def unary(requests: AsyncIterator[_Received], context: grpc.aio.ServicerContext):
            return await on_message(await receive(context), context)

        async def streaming(requests: AsyncIterator[_Received], context: grpc.aio.ServicerContext):
            async for response in on_message_streaming(await receive(context), context):
                yield response

        # the handler keeps its response kind; a response-streaming one may yield or use context.write
        make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
        return make(streaming if streams else unary, request_deserializer=deserializer,
                    response_serializer=handler.response_serializer)

    def _behaviors(self, handler: grpc.RpcMethodHandler) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """The handler run on a _Received (its message, or the status to end the call with), for a
        single response and for yielded responses; either releases what the message reserved. gRPC
        calls them right after decoding (no await between), so no reservation can be lost."""
        inner = handler.unary_unary or handler.unary_stream
        budget = self.budget

        async def on_message(received: _Received, context: grpc.aio.ServicerContext):
            try:
                if received.status is not None:
                    return end_call(context, received.status, received.details)
                request, received.message = received.message, None
                return await inner(request, context)  # a response, or None (streamed with context.write)
            finally:
                budget.release(received.size)

        async def on_message_streaming(received: _Received, context: grpc.aio.ServicerContext):
            try:
                if received.status is not None:
                    end_call(context, received.status, received.details)
                    return
                request, received.message = received.message, None
                async for response in inner(request, context):
                    yield response
            finally:
                budget.release(received.size)

        return on_message, on_message_streaming
