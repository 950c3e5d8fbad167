"""The batcher alone, with a counting fake model: batches are cut by image count or wait, each
request gets exactly its own results in order, a bad request fails alone, overload is refused."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from service.batching import Batcher, BatchStats, RecentMedian
from service.errors import NotReady, Overloaded


class CountingModel:
    """y = 2x + 1 per image, remembering each batch size and how many batches ran at once; a NaN
    input makes it raise, like a model that cannot process one image."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.threads: list[str] = []            # the thread each batch ran on
        self.delay = delay
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.isnan(x).any():
            raise ValueError("cannot process NaN")
        with self._lock:
            self.batches.append(len(x))
            self.threads.append(threading.current_thread().name)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.delay)
        with self._lock:
            self.running -= 1
        return 2 * x + 1, x.sum(dim=1)


def run(coro_fn, **batcher_options):  # returns (result, model, stats)
    async def main():
        executor = ThreadPoolExecutor(batcher_options.get("concurrency", 1))
        model = batcher_options.pop("model", CountingModel())
        stats: list[BatchStats] = []
        batcher = Batcher("test", model, executor, on_batch=lambda _, s: stats.append(s), **batcher_options)
        batcher.start()
        try:
            return await coro_fn(batcher), model, stats
        finally:
            await batcher.stop()
            executor.shutdown()
    return asyncio.run(main())


def requests_of(sizes: list[int]) -> list[torch.Tensor]:
    return [torch.arange(k * 3, dtype=torch.float32).view(k, 3) + 100 * i for i, k in enumerate(sizes)]


def test_concurrent_requests_get_their_own_results_in_order() -> None:
    inputs = requests_of([1, 5, 2, 7, 1, 3])

    async def go(batcher: Batcher):
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    results, model, stats = run(go, max_images=64, max_wait=0.05)
    for x, (doubled, sums) in zip(inputs, results, strict=True):
        assert torch.equal(doubled, 2 * x + 1) and torch.equal(sums, x.sum(dim=1))
    assert model.batches == [19]                    # all in one batch: batching proven
    assert stats[0].requests == 6 and stats[0].images == 19


def test_batches_are_cut_at_max_images_counting_images_not_requests() -> None:
    inputs = requests_of([3, 3, 3, 3])

    async def go(batcher: Batcher):
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    results, model, _ = run(go, max_images=7, max_wait=0.05)
    assert model.batches == [6, 6]                  # 3+3 fits in 7, a third would not: carried over
    assert all(torch.equal(r[0], 2 * x + 1) for r, x in zip(results, inputs, strict=True))


def test_a_request_larger_than_a_batch_runs_alone() -> None:
    async def go(batcher: Batcher):
        return await batcher.submit(requests_of([10])[0])

    (doubled, _), model, _ = run(go, max_images=4, max_wait=0.0)
    assert model.batches == [10] and doubled.shape == (10, 3)


def test_a_lone_request_waits_no_longer_than_max_wait() -> None:
    async def go(batcher: Batcher):
        started = time.perf_counter()
        await batcher.submit(requests_of([1])[0])
        return time.perf_counter() - started

    elapsed, _, stats = run(go, max_images=64, max_wait=0.2)
    assert 0.19 <= elapsed < 1.0 and stats[0].queue_seconds[0] >= 0.19
    elapsed, _, _ = run(go, max_images=64, max_wait=0.0)
    assert elapsed < 0.15


def test_a_lone_one_image_request_runs_on_the_event_loop_and_the_rest_on_model_threads() -> None:
    loop_thread = threading.current_thread().name           # asyncio.run runs the loop right here

    async def go(batcher: Batcher):
        lone = await batcher.submit(requests_of([1])[0])
        pair = await batcher.submit(requests_of([2])[0])
        crowd = await asyncio.gather(*(batcher.submit(x) for x in requests_of([1, 1, 1])))
        return lone, pair, crowd

    (lone, pair, crowd), model, _ = run(go, max_images=64, max_wait=0.05, inline_seconds=0.5)
    assert model.batches == [1, 2, 3]
    assert model.threads[0] == loop_thread
    assert model.threads[1] != loop_thread and model.threads[2] != loop_thread
    assert torch.equal(lone[0], 2 * requests_of([1])[0] + 1) and torch.equal(pair[0], 2 * requests_of([2])[0] + 1)
    assert all(torch.equal(r[0], 2 * x + 1) for r, x in zip(crowd, requests_of([1, 1, 1]), strict=True))
    _, model, _ = run(go, max_images=64, max_wait=0.05)            # inline_seconds 0: never on the loop
    assert loop_thread not in model.threads


def test_with_no_wait_a_lone_request_runs_in_its_caller_and_skips_the_queue() -> None:
    loop_thread = threading.current_thread().name
    batch_tasks = []

    async def go(batcher: Batcher):
        run_batch = batcher._run_batch
        batcher._run_batch = lambda batch: batch_tasks.append(batch) or run_batch(batch)
        x = requests_of([1])[0]
        return await batcher.submit(x), x

    (lone, x), model, stats = run(go, max_wait=0.0, inline_seconds=0.5)
    assert model.batches == [1] and model.threads == [loop_thread] and batch_tasks == []
    assert torch.equal(lone[0], 2 * x + 1) and torch.equal(lone[1], x.sum(dim=1))
    assert stats[0].requests == 1 and stats[0].images == 1 and 0 <= stats[0].queue_seconds[0] < 0.1
    batch_tasks.clear()
    _, model, _ = run(go, max_wait=0.01, inline_seconds=0.5)      # a wait: its batch's task decides
    assert model.threads == [loop_thread] and len(batch_tasks) == 1


def test_a_lone_request_that_others_join_before_it_decides_is_batched_instead() -> None:
    """Three one-image requests at once: the first finds the model idle and waits its two turns, the
    others queue meanwhile, so it queues too; none runs alone on the event loop while others wait."""
    loop_thread = threading.current_thread().name
    inputs = requests_of([1, 1, 1])

    async def go(batcher: Batcher):
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    results, model, _ = run(go, max_wait=0.0, inline_seconds=0.5, model=CountingModel(delay=0.01))
    assert all(torch.equal(r[0], 2 * x + 1) for r, x in zip(results, inputs, strict=True))
    assert model.batches[0] >= 2 and model.threads[0] != loop_thread      # those that queued, together
    assert sum(model.batches) == 3


def test_a_slow_model_stops_running_on_the_event_loop() -> None:
    async def go(batcher: Batcher):
        for x in requests_of([1, 1, 1]):
            await batcher.submit(x)

    _, model, _ = run(go, inline_seconds=0.01, model=CountingModel(delay=0.05))
    loop_thread = threading.current_thread().name
    assert model.threads[0] == loop_thread                   # no estimate yet: tried once
    assert loop_thread not in model.threads[1:]              # 50 ms is over 10 ms: model threads


def test_a_failing_lone_request_on_the_event_loop_fails_alone() -> None:
    async def go(batcher: Batcher):
        failed = await asyncio.gather(batcher.submit(torch.full((1, 3), float("nan"))), return_exceptions=True)
        return failed[0], await batcher.submit(requests_of([1])[0])

    (error, (doubled, _)), model, _ = run(go, inline_seconds=0.5)
    assert isinstance(error, ValueError) and torch.equal(doubled, 2 * requests_of([1])[0] + 1)


def test_batches_run_side_by_side_up_to_the_concurrency() -> None:
    inputs = requests_of([2, 2, 2, 2])

    async def go(batcher: Batcher):
        started = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        return results, time.perf_counter() - started

    (results, seconds), model, _ = run(go, max_images=2, concurrency=2, model=CountingModel(delay=0.2))
    assert model.most_at_once == 2 and model.batches == [2, 2, 2, 2]
    assert seconds < 0.6                                 # two rounds of 0.2 s, not four
    assert all(torch.equal(r[0], 2 * x + 1) for r, x in zip(results, inputs, strict=True))
    (_, seconds), model, _ = run(go, max_images=2, concurrency=1, model=CountingModel(delay=0.2))
    assert model.most_at_once == 1 and seconds >= 0.8


def test_a_failing_request_fails_alone() -> None:
    good = requests_of([2, 3])
    bad = torch.full((1, 3), float("nan"))

    async def go(batcher: Batcher):
        return await asyncio.gather(batcher.submit(good[0]), batcher.submit(bad), batcher.submit(good[1]),
                                    return_exceptions=True)

    (first, error, second), model, _ = run(go, max_images=64, max_wait=0.05)
    assert isinstance(error, ValueError) and "NaN" in str(error)
    assert torch.equal(first[0], 2 * good[0] + 1) and torch.equal(second[0], 2 * good[1] + 1)
    assert sorted(model.batches) == [2, 3]          # the batch failed, then each ran alone


def test_the_batcher_keeps_serving_after_a_failure() -> None:
    async def go(batcher: Batcher):
        with pytest.raises(ValueError):
            await batcher.submit(torch.full((1, 3), float("nan")))
        return await batcher.submit(requests_of([2])[0])

    (doubled, _), _, _ = run(go, max_images=8, max_wait=0.0)
    assert doubled.shape == (2, 3)


def test_a_bug_outside_the_model_fails_the_batch_and_keeps_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    def flaky_speed(self: RecentMedian, value: float) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("bookkeeping bug")

    monkeypatch.setattr(RecentMedian, "add", flaky_speed)

    async def go(batcher: Batcher):
        with pytest.raises(RuntimeError, match="bookkeeping bug"):
            await asyncio.wait_for(batcher.submit(requests_of([2])[0]), timeout=5)
        return await asyncio.wait_for(batcher.submit(requests_of([1])[0]), timeout=5)

    (doubled, _), _, _ = run(go, max_images=8, max_wait=0.0)
    assert doubled.shape == (1, 3)


def test_cancelled_requests_are_skipped() -> None:
    async def go(batcher: Batcher):
        slow = asyncio.ensure_future(batcher.submit(requests_of([2])[0]))     # occupies the model
        await asyncio.sleep(0.01)
        doomed = asyncio.ensure_future(batcher.submit(requests_of([5])[0]))
        await asyncio.sleep(0.01)
        doomed.cancel()
        kept = await batcher.submit(requests_of([1])[0])
        await slow
        return kept

    _, model, _ = run(go, max_images=64, max_wait=0.0, model=CountingModel(delay=0.1))
    assert 5 not in model.batches and model.batches == [2, 1]


def test_overload_is_refused_at_once_with_retry_after() -> None:
    async def go(batcher: Batcher):
        await batcher.submit(requests_of([4])[0])               # teaches it ~0.05 s per image
        waiting = [asyncio.ensure_future(batcher.submit(requests_of([4])[0])) for _ in range(3)]
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(requests_of([4])[0])
        refusal_seconds = time.perf_counter() - started
        done = await asyncio.gather(*waiting)                   # accepted requests are all answered
        return refused.value, refusal_seconds, done

    (error, seconds, done), _, _ = run(go, max_images=4, max_wait=0.0, max_queue_wait=0.7,
                                       model=CountingModel(delay=0.2))
    assert seconds < 0.05 and int(error.headers["Retry-After"]) >= 1
    assert len(done) == 3 and all(d[0].shape == (4, 3) for d in done)


def test_one_slow_call_does_not_refuse_the_requests_after_it() -> None:
    """A first call that is slow (TorchScript optimising, a busy neighbour) is an outlier: once the
    model runs at its usual speed again, a queue worth milliseconds is admitted."""
    model = CountingModel(delay=0.5)

    async def go(batcher: Batcher):
        await batcher.submit(requests_of([4])[0])               # 0.125 s per image
        model.delay = 0.001
        for x in requests_of([4, 4, 4]):                        # 0.25 ms per image
            await batcher.submit(x)
        return await asyncio.gather(*(batcher.submit(x) for x in requests_of([4] * 4)))

    done, _, _ = run(go, max_images=4, max_wait=0.0, max_queue_wait=0.2, model=model)
    assert len(done) == 4 and all(d[0].shape == (4, 3) for d in done)


def test_a_request_that_fits_in_the_next_batch_is_not_refused_for_its_wait() -> None:
    """The estimate says 1.2 s for the queue, far over max_queue_wait, but the requests fit in
    the next batch: refusing them would shorten nobody's wait."""

    async def go(batcher: Batcher):
        await batcher.submit(requests_of([4])[0])               # teaches it 0.1 s per image
        waiting = [asyncio.ensure_future(batcher.submit(x)) for x in requests_of([4, 4, 4])]
        await asyncio.sleep(0.01)                               # 4 running, 8 queued: 12 of 16
        with pytest.raises(Overloaded):                         # 20 images: more than one batch
            await batcher.submit(requests_of([8])[0])
        return await asyncio.gather(*waiting)

    done, model, _ = run(go, max_images=16, max_wait=0.0, max_queue_wait=0.2, model=CountingModel(delay=0.4))
    assert len(done) == 3 and model.batches == [4, 12]


def test_a_full_queue_is_refused_by_image_count() -> None:
    async def flood(batcher: Batcher):
        first = asyncio.create_task(batcher.submit(torch.zeros(3, 3)))
        await asyncio.sleep(0.02)                       # running, still counted until it finishes
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(torch.zeros(3, 3))
        return await first, refused.value

    (outputs, refused), _, _ = run(flood, model=CountingModel(delay=0.3), max_queued=4)
    assert len(outputs[0]) == 3
    assert "limit is 4" in refused.detail and int(refused.headers["Retry-After"]) >= 1


def test_stop_drains_what_is_queued_and_refuses_new_requests() -> None:
    async def main():
        executor = ThreadPoolExecutor(1)
        batcher = Batcher("test", CountingModel(delay=0.05), executor, max_images=2)
        batcher.start()
        inputs = requests_of([2] * 6)
        pending = [asyncio.create_task(batcher.submit(x)) for x in inputs]
        await asyncio.sleep(0.01)
        await batcher.stop()                            # six batches of 0.05 s still to run
        results = await asyncio.gather(*pending)
        with pytest.raises(NotReady):
            await batcher.submit(inputs[0])
        executor.shutdown()
        return inputs, results

    inputs, results = asyncio.run(main())
    for x, (y, _) in zip(inputs, results, strict=True):
        assert torch.equal(y, 2 * x + 1)
