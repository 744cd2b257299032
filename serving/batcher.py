"""A dynamic batcher for one graph: concurrent requests are merged into batches on a thread pool.

A request (rows of one input tensor) joins a bounded queue. A worker waits until the queue holds
max_batch_size rows or its oldest request has waited max_queue_delay_us, takes the requests that
fit, runs the concatenated batch with `run` in the executor, and hands each request its rows of
the outputs. A request bigger than max_batch_size is split into chunks that are queued together
and reassembled. The queue holds at most max_queue_size requests (chunks); more are rejected
with ResourceExhausted. A request whose deadline has passed is dropped before it runs
(DeadlineExceeded); a cancelled one is removed from the queue at once. With merge=False (dynamic
batching off) every execution runs one request's rows (or one chunk) alone, without waiting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serving.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted, Unavailable
from serving.logs import log_event

log = logging.getLogger("genserve.batcher")
RunBatch = Callable[[np.ndarray], list[np.ndarray]]


class BatchObserver(Protocol):
    """What the batcher reports (metrics, statistics); every method is called on the event loop."""

    def queue_depth(self, depth: int) -> None: ...
    def waited(self, seconds: float) -> None: ...
    def executed(self, rows: int, seconds: float, ok: bool) -> None: ...
    def rejected(self, reason: str) -> None: ...


class NullObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def waited(self, seconds: float) -> None:
        pass

    def executed(self, rows: int, seconds: float, ok: bool) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass


@dataclass
class Timing:
    """Where a request's time went: waiting in the queue and running (summed over its chunks)."""

    queue_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass(eq=False)
class _Item:
    rows: np.ndarray
    future: asyncio.Future[list[np.ndarray]]
    enqueued: float
    deadline: float | None
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0


class DynamicBatcher:
    """Batches requests for one graph. Create and use it on one event loop; call start() first."""

    def __init__(
        self,
        name: str,
        run: RunBatch,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_size: int,
        instances: int = 1,
        merge: bool = True,
        observer: BatchObserver | None = None,
    ):
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.merge = merge
        self._run = run
        self._executor = executor
        self._observer = observer or NullObserver()
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._running = 0
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if not self._workers:
            self._workers = [
                asyncio.get_running_loop().create_task(self._work(), name=f"batcher {self.name} #{i}")
                for i in range(self.instances)
            ]

    async def infer(self, rows: np.ndarray, deadline: float | None = None) -> tuple[list[np.ndarray], Timing]:
        """Run `rows` (N, ...) as part of batches; returns the outputs (N, ...) and the timing.

        `deadline` is in loop.time() seconds. Raises InvalidArgument (more chunks than the queue can ever hold),
        ResourceExhausted (queue full), DeadlineExceeded,
        Unavailable (closing) or Internal (the graph failed).
        """
        if self._closed:
            raise Unavailable(f"{self.name} is being unloaded; retry")
        if len(rows) == 0:
            raise ValueError("a request needs at least one row")
        loop = asyncio.get_running_loop()
        now = loop.time()
        chunks = [rows[i : i + self.max_batch_size] for i in range(0, len(rows), self.max_batch_size)]
        if len(chunks) > self.max_queue_size:  # could never be queued, however empty the queue: no retry helps
            raise InvalidArgument(
                f"{self.name}: {len(rows)} rows need {len(chunks)} batches of at most {self.max_batch_size}, "
                f"more than the queue holds ({self.max_queue_size}); send at most "
                f"{self.max_batch_size * self.max_queue_size} rows per request, or raise max_queue_size"
            )
        if len(self._queue) + len(chunks) > self.max_queue_size:
            self._observer.rejected("queue_full")
            raise ResourceExhausted(
                f"{self.name}: the queue is full ({len(self._queue)} of {self.max_queue_size} requests waiting"
                + (f"; this request needs {len(chunks)} batches of at most {self.max_batch_size} rows" if len(chunks) > 1 else "")
                + "); retry later or raise max_queue_size"
            )
        items = [_Item(chunk, loop.create_future(), now, deadline) for chunk in chunks]
        self._queue.extend(items)
        self._observer.queue_depth(len(self._queue))
        self._wakeup.set()
        try:
            # one chunk (the common case) is awaited directly: gather would add a future and callbacks
            results = [await items[0].future] if len(items) == 1 else await asyncio.gather(*(item.future for item in items))
        except BaseException as error:
            self._forget(items, cancelled=isinstance(error, asyncio.CancelledError))
            raise
        timing = Timing(max(i.queue_seconds for i in items), sum(i.compute_seconds for i in items))
        if len(results) == 1:
            return results[0], timing
        return [np.concatenate(parts) for parts in zip(*results, strict=True)], timing

    def _forget(self, items: list[_Item], cancelled: bool) -> None:
        """Take a request's still-queued chunks out of the queue (it was cancelled or a chunk failed)."""
        removed = False
        for item in items:
            if not item.future.done():
                item.future.cancel()
            try:
                self._queue.remove(item)
                removed = True
            except ValueError:
                pass
        if removed:
            self._observer.queue_depth(len(self._queue))
        if cancelled:
            self._observer.rejected("cancelled")

    def _expired(self, item: _Item, now: float) -> bool:
        if item.deadline is not None and now >= item.deadline:
            if not item.future.done():
                item.future.set_exception(
                    DeadlineExceeded(f"{self.name}: the deadline passed while the request waited in the queue")
                )
            self._observer.rejected("deadline")
            return True
        return False

    def _queued_rows(self) -> int:
        """Rows of the live requests at the head of the queue, counting up to max_batch_size."""
        rows = 0
        for item in self._queue:
            if not item.future.done():
                rows += len(item.rows)
                if rows >= self.max_batch_size:
                    break
        return rows

    async def _next_batch(self) -> list[_Item]:
        """Wait until the queue holds a full batch or its oldest request has waited max_queue_delay,
        then take requests from the head while they fit. Waiting requests stay in the queue (they
        count towards max_queue_size and can be cancelled) until their batch is taken."""
        loop = asyncio.get_running_loop()
        while True:
            while self._queue and (self._queue[0].future.done() or self._expired(self._queue[0], loop.time())):
                self._queue.popleft()
            if not self._queue:
                self._observer.queue_depth(0)
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            close_at = self._queue[0].enqueued + self.max_queue_delay
            if not self.merge or loop.time() >= close_at or self._queued_rows() >= self.max_batch_size:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), close_at - loop.time())
        batch: list[_Item] = []
        rows = 0
        now = loop.time()
        while self._queue:
            head = self._queue[0]
            if head.future.done() or self._expired(head, now):
                self._queue.popleft()
                continue
            if batch and (not self.merge or rows + len(head.rows) > self.max_batch_size):
                break
            batch.append(self._queue.popleft())
            rows += len(head.rows)
        self._observer.queue_depth(len(self._queue))
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = loop.time()
            for item in batch:
                item.queue_seconds = started - item.enqueued
                self._observer.waited(item.queue_seconds)
            inputs = batch[0].rows if len(batch) == 1 else np.concatenate([item.rows for item in batch])
            self._running += 1
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, inputs)
            except Exception as error:
                seconds = loop.time() - started
                self._observer.executed(len(inputs), seconds, ok=False)
                log_event(log, "execution_failed", level=logging.ERROR, graph=self.name, rows=len(inputs), error=repr(error))
                failure = Internal(f"{self.name}: onnxruntime failed on a batch of {len(inputs)}: {error}")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(failure)
                continue
            finally:
                self._running -= 1
            seconds = loop.time() - started
            self._observer.executed(len(inputs), seconds, ok=True)
            offset = 0
            for item in batch:
                n = len(item.rows)
                item.compute_seconds = seconds
                if not item.future.done():
                    item.future.set_result([out[offset : offset + n] for out in outputs])
                offset += n

    async def close(self) -> None:
        """Refuse new requests, let queued and running ones finish, then stop the workers."""
        self._closed = True
        while self._queue or self._running:
            await asyncio.sleep(0.005)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
