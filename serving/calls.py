"""What every RPC goes through: a request id, shutdown refusal, error -> status code mapping,
one structured log line, and the request metrics. Handlers raise ServingError subclasses; any
other exception becomes INTERNAL with the request id (the traceback goes to the log, not the client).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import grpc

from genserve.serving.batcher import Timing
from genserve.serving.errors import ServingError, Unavailable
from genserve.serving.logs import log_event
from genserve.serving.metrics import ServerMetrics

log = logging.getLogger("genserve.rpc")
REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Error details echo what the client sent (a model name, a version): capped, so a long one cannot
# push the status past gRPC's metadata limit (the client would see RESOURCE_EXHAUSTED, not the error).
MAX_DETAILS_CHARS = 1000
_OK = grpc.StatusCode.OK
# Generated request ids: a random prefix per process and a counter (cheaper than a uuid4 per call).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)
Body = Callable[[Any, Any, "Call"], Awaitable[Any]]


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


def end_call(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End the call with `code` when the handler returns (which it must do next, returning None).

    Not context.abort(): abort raises, and the exception's traceback keeps the handler's frames,
    and with them the request message (up to limits.max_message_bytes), alive in a reference cycle
    until some later garbage collection; 96 rejected 60 MiB requests held 3 GiB that way."""
    if len(details) > MAX_DETAILS_CHARS:
        details = f"{details[:MAX_DETAILS_CHARS]}... ({len(details)} characters)"
    context.set_code(code)
    context.set_details(details)


@dataclass
class Call:
    """One RPC in progress: its id, deadline and, once resolved, the model version serving it."""

    method: str
    request_id: str
    deadline: float | None  # loop.time() seconds, from the client's deadline
    model: str = ""
    version: str = ""
    timing: Timing = field(default_factory=Timing)

    def bind(self, model: str, version: int | str) -> None:
        self.model, self.version = model, str(version)

    def add(self, timing: Timing) -> None:
        self.timing.queue_seconds += timing.queue_seconds
        self.timing.compute_seconds += timing.compute_seconds


@dataclass
class ServerState:
    """Shared by the server and its calls: while `shutting_down`, new calls are refused with
    UNAVAILABLE; `in_flight` counts the calls running now (streams such as health Watch excluded)."""

    shutting_down: bool = False
    in_flight: int = 0
    last_call_at: float = 0.0  # time.monotonic() of the newest call
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    def call_started(self) -> None:
        self.in_flight += 1
        self.last_call_at = time.monotonic()
        self._idle.clear()

    def call_ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call runs (True) or `timeout` seconds pass (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_quiet(self, quiet: float, timeout: float) -> bool:
        """Wait until no call is running and none has started for `quiet` seconds (True), or
        `timeout` seconds pass (False)."""
        end = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= end:
                return False
            if not await self.wait_idle(end - now):
                return False
            calm_until = self.last_call_at + quiet
            if time.monotonic() >= calm_until and self.in_flight == 0:
                return True
            await asyncio.sleep(min(calm_until, end) - time.monotonic())


class Calls:
    """Runs RPC bodies with the bookkeeping every call shares (see `rpc`, the decorator that uses it)."""

    def __init__(self, metrics: ServerMetrics, state: ServerState):
        self.metrics = metrics
        self.state = state
        # label children by label values: .labels() validates and locks on every call, a dict lookup does not
        self._requests: dict[tuple[str, str, str, grpc.StatusCode], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    async def run(self, method: str, context: grpc.aio.ServicerContext, body: Body, service: Any, request: Any) -> Any:
        """`body(service, request, call)`'s response, or None once the call is ended with an error
        status (end_call)."""
        started = perf_counter()
        request_id = ""
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_KEY:
                request_id = value if isinstance(value, str) and _REQUEST_ID.fullmatch(value) else ""
        if not request_id:
            request_id = f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"
        remaining = context.time_remaining()
        call = Call(method, request_id, None if remaining is None else _loop_time() + remaining)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        code, details = _OK, ""
        state = self.state
        state.call_started()
        try:
            if state.shutting_down:
                raise Unavailable("the server is shutting down; retry on another instance")
            response = await body(service, request, call)
        except ServingError as error:
            code, details = error.code, str(error)
        except asyncio.CancelledError:
            self._record(call, grpc.StatusCode.CANCELLED, started, "the client cancelled the call or its deadline passed")
            raise
        except Exception as error:
            log.exception("unexpected error in %s (request id %s)", method, request_id)
            code = grpc.StatusCode.INTERNAL
            details = f"internal error in {method} ({type(error).__name__}); request id {request_id}"
        finally:
            state.call_ended()
        if code is _OK:
            self._record(call, code, started, details)
            return response
        if len(details) > MAX_DETAILS_CHARS:
            details = f"{details[:MAX_DETAILS_CHARS]}... ({len(details)} characters)"
        self._record(call, code, started, details)
        return end_call(context, code, details)

    def _record(self, call: Call, code: grpc.StatusCode, started: float, details: str) -> None:
        """The call's metrics (always, exact) and its access-log line: at debug level for OK calls
        (a line per call costs 10-20 % of a small call's throughput), at warning for failed ones."""
        seconds = perf_counter() - started
        key = (call.method, call.model, call.version, code)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.metrics.requests.labels(call.method, call.model, call.version, code.name)
        counter.inc()
        duration_key = (call.method, call.model)
        duration = self._durations.get(duration_key)
        if duration is None:
            duration = self._durations[duration_key] = self.metrics.request_duration.labels(call.method, call.model)
        duration.observe(seconds)
        level = logging.DEBUG if code is _OK else logging.WARNING
        if not log.isEnabledFor(level):
            return
        log_event(
            log,
            "rpc",
            level=level,
            request_id=call.request_id,
            method=call.method,
            model=call.model or None,
            version=call.version or None,
            code=code.name,
            ms=round(seconds * 1000, 2),
            queue_ms=round(call.timing.queue_seconds * 1000, 2),
            compute_ms=round(call.timing.compute_seconds * 1000, 2),
            error=details or None,
        )


def rpc(body: Callable[[Any, Any, Call], Awaitable[Any]]) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """Turn `async def Method(self, request, call) -> Response` into the gRPC handler
    `Method(self, request, context)` run through `self.calls` (Calls.run): the method's name is the
    metric and log label, ServingError becomes the call's status, anything else INTERNAL."""
    method = body.__name__

    @functools.wraps(body)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.calls.run(method, context, body, self, request)

    return handler
