"""Adaptive micro-batching in front of the model.

A request submits k images and awaits its own future. One loop per operation drains the queue
into a batch, cut at `max_images` images (counting images, not requests) or `max_wait` seconds
after the first one arrived, whichever comes first. Up to `concurrency` batches run at once on the
model's executor threads; the loop takes a free slot before it collects, so while every slot is
busy requests pile up and the next batch is larger. Each request gets its own slice of every
output, in order. If a batch fails, each request in it is retried alone, so a request that breaks
the model fails by itself.

A lone one-image request, with the model idle and nobody queued behind it, runs right on the event
loop instead of a model thread (`inline_seconds`): the hop to a thread and back, and the caches
gone cold on an idle core, cost as much as the model call itself. The decision waits two turns of
the event loop: requests that arrive in those turns send it to a model thread instead, and the loop
goes on reading them. (With the decision taken at once, and the only request under way run in its
caller, calls stayed inline under load, in batches of one image: benchmarks/results/serving-1016.md.)
Only while such calls are known to take less than `inline_seconds`, so the loop is never held for
long. With no batching wait (`max_wait` 0, the default) the request decides in its own coroutine
and skips the queue, the batch loop and a task of its own (about 60 µs of a 2.5 ms request); with a
wait, its batch's task decides after the wait.

Requests that would wait longer than `max_queue_wait` for the model, or that would take the
queue past `max_queued` images, are refused at once (`Overloaded`, a 503 with Retry-After), so a
burst never grows latency or memory for everyone. The wait is estimated from the median time per
image of the last few batches, so one slow call (a pause, a busy neighbour) does not refuse the
requests after it; and a request that fits, with everything queued and running, into one batch
is never refused for its wait: it waits for one batch at most, and refusing it would spare nobody.
Stopping drains: queued and running batches finish first, new requests are refused.
This module knows nothing of HTTP or images.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import NotReady, Overloaded

log = logging.getLogger("service.batching")
BatchFunction = Callable[[Tensor], Sequence[Tensor]]


@dataclass
class BatchStats:
    """What one batch did, for the metrics."""
    images: int
    requests: int
    queue_seconds: list[float]
    model_seconds: float


@dataclass
class _Item:
    inputs: Tensor                      # (k, ...) for one request
    images: int                         # k, counted once (len() of a tensor is not free)
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, name: str, run: BatchFunction, executor: Executor, max_images: int = 64,
                 max_wait: float = 0.0, max_queue_wait: float = 2.0, concurrency: int = 1,
                 on_batch: Callable[[str, BatchStats], None] | None = None, max_queued: int = 1 << 30,
                 inline_seconds: float = 0.0) -> None:
        self.name = name
        self._run = run
        self._executor = executor
        self.max_images = max_images
        self.max_wait = max_wait
        self.max_queue_wait = max_queue_wait
        self.max_queued = max_queued
        self.inline_seconds = inline_seconds
        self._closing = False
        self._on_batch = on_batch
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)     # batches running at once
        self._running: set[asyncio.Task] = set()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._carry: _Item | None = None         # took it from the queue, but it did not fit
        self._queued_images = 0
        self._seconds_per_image = RecentMedian()         # of whole batches, for admission
        self._lone_image_seconds = RecentMedian()        # one-image calls, for inline runs
        self._task: asyncio.Task | None = None
        self._alone = 0                                  # lone requests deciding whether to run in their caller

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let the queued and running ones finish (up to drain_timeout), then
        stop; whatever is still queued after that gets NotReady rather than waiting forever."""
        self._closing = True
        deadline = time.monotonic() + drain_timeout
        while self.running and (self._queued_images > 0 or self._running or self._alone) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        leftovers = [self._carry] if self._carry is not None else []
        while not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        for item in leftovers:
            if not item.future.done():
                item.future.set_exception(NotReady("the server is shutting down; retry on another replica"))

    # ---- the request side -----------------------------------------------------------------------
    async def submit(self, inputs: Tensor) -> tuple[Tensor, ...]:
        """Queue one request's inputs (k, ...) and await its outputs, each (k, ...)."""
        item = _Item(inputs, len(inputs), asyncio.get_running_loop().create_future())
        self._admit(item.images)
        if self._may_run_alone(item):
            outputs = await self._run_alone(item)
            if outputs is not None:
                return outputs
        self._queued_images += item.images
        self._queue.put_nowait(item)
        return await item.future

    def _may_run_alone(self, item: _Item) -> bool:
        """No batching wait, and nobody else deciding to run alone: whether it may, it sees after
        its two turns."""
        return self.max_wait == 0 and self._alone == 0 and self._inline_allowed(item.images, own_tasks=0)

    async def _run_alone(self, item: _Item) -> tuple[Tensor, ...] | None:
        """Run a lone request in its caller, after two turns of the event loop: the turns the
        queue's path takes before it decides (the batch loop's, then the batch task's), so requests
        that came meanwhile still send it to the queue. None when they did: the request then
        queues behind them."""
        self._alone += 1
        try:
            for _ in range(2):
                await asyncio.sleep(0)
            if not self._inline_allowed(item.images, own_tasks=0):
                return None
            started = time.perf_counter()
            outputs = tuple(self._call([item.inputs]))
        finally:
            self._alone -= 1
        self._record(BatchStats(1, 1, [started - item.enqueued], time.perf_counter() - started))
        return outputs

    def _admit(self, images: int) -> None:
        if self._closing:
            raise NotReady("the server is shutting down; retry on another replica")
        seconds_per_image = self._seconds_per_image.value
        if self._queued_images and self._queued_images + images > self.max_queued:
            drain_s = self._queued_images * seconds_per_image / self.concurrency
            raise Overloaded(f"the model queue is full ({self._queued_images} images waiting, the limit is "
                             f"{self.max_queued}); retry later", retry_after_s=math.ceil(drain_s))
        if self._queued_images + images <= self.max_images:
            return                                      # it runs in the next batch at the latest
        expected_wait = (self._queued_images + images) * seconds_per_image / self.concurrency
        if self._queued_images and expected_wait > self.max_queue_wait:
            raise Overloaded(f"the model queue is full ({self._queued_images} images waiting, about "
                             f"{expected_wait:.2g} s); retry later", retry_after_s=math.ceil(expected_wait))

    # ---- the model side -----------------------------------------------------------------------
    async def _next(self, timeout: float | None) -> _Item | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return None if self._queue.empty() else self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> list[_Item]:
        """Block for the first request, then take more until the batch is full or the wait is over."""
        first = await self._next(None)
        batch, images = [first], first.images
        deadline = time.perf_counter() + self.max_wait
        while images < self.max_images:
            item = await self._next(deadline - time.perf_counter())
            if item is None:
                break
            if images + item.images > self.max_images:
                self._carry = item                   # starts the next batch
                break
            batch.append(item)
            images += item.images
        return batch

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()            # a free model slot first: batches grow while none is
            batch = await self._collect()
            gone = [item for item in batch if item.future.done()]       # clients that gave up
            self._queued_images -= sum(item.images for item in gone)
            batch = [item for item in batch if not item.future.done()]
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, batch: list[_Item]) -> None:
        try:
            await self._execute(batch)
        except Exception as error:                 # a bug here must not strand the waiting requests
            log.exception("batcher %s failed outside the model call", self.name)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        finally:
            self._slots.release()

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        inputs = [item.inputs for item in batch]
        try:
            if self._runs_inline(batch):
                outputs = self._call(inputs)
            else:
                outputs = await loop.run_in_executor(self._executor, self._call, inputs)
        except Exception as error:
            if len(batch) > 1:          # find the request that broke it: each alone
                for item in batch:
                    await self._execute([item])
                return
            self._queued_images -= batch[0].images
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        model_seconds = time.perf_counter() - started
        images = sum(i.images for i in batch)
        self._queued_images -= images
        self._record(BatchStats(images, len(batch), [started - i.enqueued for i in batch], model_seconds))
        start = 0
        for item in batch:
            end = start + item.images
            if not item.future.done():
                item.future.set_result(tuple(outputs) if len(batch) == 1 else tuple(out[start:end] for out in outputs))
            start = end

    def _record(self, stats: BatchStats) -> None:
        """A batch that ran: its time feeds the estimates (admission, inline runs) and the metrics."""
        self._seconds_per_image.add(stats.model_seconds / stats.images)
        if stats.images == 1:
            self._lone_image_seconds.add(stats.model_seconds)
        if self._on_batch is not None:
            with contextlib.suppress(Exception):            # a metric never fails a request
                self._on_batch(self.name, stats)

    def _runs_inline(self, batch: list[_Item]) -> bool:
        """A batch of one request, which may run on the event loop (its own task is running)."""
        return len(batch) == 1 and self._inline_allowed(batch[0].images, own_tasks=1)

    def _inline_allowed(self, images: int, own_tasks: int) -> bool:
        """One image, no batch running but the caller's own (`own_tasks`), nobody queued, and a
        short model call: the one test both ways of running on the event loop take."""
        return (self.inline_seconds > 0 and images == 1 and len(self._running) <= own_tasks
                and self._carry is None and self._queue.empty()
                and self._lone_image_seconds.value <= self.inline_seconds)

    def _call(self, inputs: list[Tensor]) -> Sequence[Tensor]:
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        outputs = self._run(x)
        if any(len(out) != len(x) for out in outputs):
            raise RuntimeError(f"{self.name}: the model returned outputs not matching {len(x)} inputs")
        return outputs


class RecentMedian:
    """The median of the last `size` values (0 before the first): it follows a lasting change
    within a few values and ignores a single outlier, where a moving average would carry one slow
    first call for dozens of batches."""

    def __init__(self, size: int = 9) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self.value = 0.0

    def add(self, value: float) -> None:
        self._values.append(value)
        self.value = statistics.median(self._values)
