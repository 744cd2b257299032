"""A dynamic batcher for one graph: concurrent requests are merged into batches on a thread pool.

A request (rows of one input tensor) joins a bounded queue. A worker takes the requests that fit
into max_batch_size rows, runs the concatenated batch with `run` in the executor, and hands each
request its rows of the outputs. When the worker closes a batch depends on the policy:
 - adaptive (the default): the batch closes at once unless company is likely: while another request
   holds a lease on the version (`company`), or while requests arrive less than max_queue_delay_us / 4
   apart, the worker waits for more, until the next one is overdue (two recent gaps after the newest),
   for at most max_queue_delay_us after the oldest arrived. It stops waiting at once when the queue
   holds as many requests as were recently inside the batcher at one time (`_crowd`): in a closed
   loop of N clients, all N are then here and nobody else can come. A lone client is never delayed:
   its next request waits for this one's answer, so its requests are a whole round trip apart.
 - fixed (Triton's dynamic batcher): the batch closes when the queue holds max_batch_size rows or
   its oldest request has waited max_queue_delay_us, whether or not anyone else is coming.
Under both, requests that arrive while a batch runs are merged into the next one. With one
instance, a batch whose size recently ran in less than `inline_below_us` runs on the event loop's
thread: handing a small graph's run to the executor and back costs more than the run.
A request bigger than max_batch_size is split into chunks that are queued together
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
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from genserve.serving.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from genserve.serving.logs import log_event

log = logging.getLogger("genserve.batcher")
RunBatch = Callable[[np.ndarray], list[np.ndarray]]
POLICIES = ("adaptive", "fixed")
# Per execution, the remembered crowd (the most requests inside the batcher at once) shrinks by this
# factor unless the present one is bigger: after a burst, a smaller crowd stops waiting within a few batches.
CROWD_DECAY = 0.9


def _deliver(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    """On the loop: an executor job's outcome into its future, unless the waiter has gone (cancelled)."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


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
        policy: str = "adaptive",
        company: Callable[[], int] | None = None,
        inline_below_us: int = 0,
        observer: BatchObserver | None = None,
    ):
        """`company()`: how many requests may still join (adaptive policy), counting those inside
        this batcher too (the version's leases); None: assume some may, while the loop brings them.
        `inline_below_us`: with one instance, a batch whose size recently ran in less than this runs
        on the event loop's thread instead of the executor (0: never); see `_work`."""
        if policy not in POLICIES:
            raise ValueError(f"batching policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.merge = merge
        self.adaptive = policy == "adaptive"
        self.company = company
        self.inline_below = inline_below_us / 1e6 if instances == 1 else 0.0
        self._run_seconds: dict[int, float] = {}  # bit length of a batch's rows -> its recent run time (EWMA)
        self._run = run
        self._executor = executor
        self._observer = observer or NullObserver()
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._running = 0
        self._inside = 0  # requests in infer() now: queued, running, or not yet resumed with their result
        self._last_arrival = -1e9  # loop.time() of the newest request
        self._gap = 1.0  # recent time between requests (EWMA, seconds)
        # the most requests inside at one time, recently (decays by CROWD_DECAY per execution)
        self._crowd = 0.0
        self._closed = False
        self.executions = 0  # batches run (successful or not), for tests and statistics
        self.waits = 0  # times a worker waited for company before closing a batch

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
        size = self.max_batch_size
        chunks = [rows] if len(rows) <= size else [rows[i : i + size] for i in range(0, len(rows), size)]
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
        gap = now - self._last_arrival
        self._last_arrival = now
        self._gap = 0.8 * self._gap + 0.2 * min(gap, 1.0)
        self._inside += 1
        if self._inside > self._crowd:
            self._crowd = self._inside
        try:
            # one chunk (the common case) is awaited directly: gather would add a future and callbacks
            results = [await items[0].future] if len(items) == 1 else await asyncio.gather(*(item.future for item in items))
        except BaseException as error:
            self._forget(items, cancelled=isinstance(error, asyncio.CancelledError))
            raise
        finally:
            self._inside -= 1
        if len(items) == 1:
            item = items[0]
            return results[0], Timing(item.queue_seconds, item.compute_seconds)
        timing = Timing(max(i.queue_seconds for i in items), sum(i.compute_seconds for i in items))
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

    def _adaptive_wait(self, close_at: float, now: float) -> float:
        """Adaptive policy: how long to wait for company now (0: run the batch)."""
        if self.company is not None and self.company() > self._inside:
            # another request holds the version and may join: wait as the fixed policy does, but look
            # again every quarter of the delay (it may have finished instead)
            return min(close_at - now, self.max_queue_delay / 4)
        if len(self._queue) >= self._crowd:
            # as many are queued as were recently inside at once: with N clients in a closed loop,
            # all N are here, and waiting longer only delays them
            return 0.0
        if self._gap < self.max_queue_delay / 4:
            # requests arrive less than a quarter of the delay apart: wait while they keep coming,
            # until the next one is overdue (two gaps after the newest). A lone client's next request
            # waits for this one's answer, a whole round trip: its gaps are long, it never waits here.
            return min(close_at, self._last_arrival + 2 * self._gap) - now
        return 0.0

    async def _next_batch(self) -> list[_Item]:
        """Wait until the policy closes the batch (see the module doc), then take requests from the
        head while they fit. Waiting requests stay in the queue (they count towards max_queue_size
        and can be cancelled) until their batch is taken."""
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
            now = loop.time()
            wait = self._adaptive_wait(close_at, now) if self.adaptive else close_at - now
            if wait <= 0:
                break
            self.waits += 1
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait)
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
            self._crowd = max(self._inside, CROWD_DECAY * self._crowd)
            for item in batch:
                item.queue_seconds = started - item.enqueued
                self._observer.waited(item.queue_seconds)
            inputs = batch[0].rows if len(batch) == 1 else np.concatenate([item.rows for item in batch])
            self._running += 1
            self.executions += 1
            size = len(inputs).bit_length()
            expected = self._run_seconds.get(size)
            try:
                # A short run goes on the loop's thread: handing it to the executor and back (two thread
                # wake-ups and the GIL passed twice) costs more CPU than a small graph's execution.
                if expected is not None and expected < self.inline_below:
                    outputs, took = self._timed_run(inputs, time.perf_counter)
                else:
                    outputs, took = await self._in_executor(loop, inputs)
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
            self._run_seconds[size] = took if expected is None else 0.75 * expected + 0.25 * took
            seconds = loop.time() - started
            self._observer.executed(len(inputs), seconds, ok=True)
            offset = 0
            for item in batch:
                n = len(item.rows)
                item.compute_seconds = seconds
                if not item.future.done():
                    item.future.set_result([out[offset : offset + n] for out in outputs])
                offset += n

    def _in_executor(self, loop: asyncio.AbstractEventLoop, inputs: np.ndarray) -> asyncio.Future[tuple[list[np.ndarray], float]]:
        """`_timed_run` in the executor, its result delivered to a loop future by call_soon_threadsafe:
        run_in_executor's chain of a concurrent and an asyncio future (wrap_future, _copy_future_state,
        all Python) cost the loop's thread 15-30 us more per execution (docs/benchmarks.md)."""
        future = loop.create_future()

        def job() -> None:
            try:
                result = self._timed_run(inputs, time.thread_time)
            except BaseException as error:  # delivered to the worker, which fails the batch's requests
                loop.call_soon_threadsafe(_deliver, future, None, error)
            else:
                loop.call_soon_threadsafe(_deliver, future, result, None)

        self._executor.submit(job)
        return future

    def _timed_run(self, inputs: np.ndarray, clock: Callable[[], float]) -> tuple[list[np.ndarray], float]:
        """`run` and how long it took by `clock`. In the executor that is the thread's CPU time: the
        wall time there includes waiting for the GIL after the run, long when the loop is busy.
        (CPU time misses work on other threads; a run moved inline is timed by the wall clock, so
        one that is slower than it looked moves back.)"""
        started = clock()
        outputs = self._run(inputs)
        return outputs, clock() - started

    async def close(self) -> None:
        """Refuse new requests, let queued and running ones finish, then stop the workers."""
        self._closed = True
        while self._queue or self._running:
            await asyncio.sleep(0.005)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
