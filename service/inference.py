"""The serving loop's model half: one batcher per model operation, all feeding one pool of model
threads. Each thread runs one batch at a time with the torch threads it was given, so the pool
keeps the CPUs busy with whole batches (inter-op) rather than splitting small ops (intra-op)."""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .batching import Batcher
from .errors import Overloaded
from .metrics import Metrics
from .runtime import ModelRuntime
from .settings import Settings


class Inference:
    def __init__(self, runtime: ModelRuntime, settings: Settings, metrics: Metrics) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.model_timeout = settings.model_timeout_s
        self.torch_threads = settings.torch_threads
        self.users = 0                  # requests holding this inference (a reload waits for them)
        concurrency = settings.resolved_model_concurrency()
        # each model thread sets its own torch threads: the setting is per thread (OpenMP), and the
        # artifact may have been loaded on another thread (a reload, the lifespan's worker)
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="model",
                                            initializer=torch.set_num_threads, initargs=(settings.torch_threads,))
        operations = {
            "encode": runtime.encode,
            "decode": lambda z: (runtime.decode(z),),
            "reconstruct": runtime.reconstruct,
            "score": runtime.score,
            "score_map": runtime.score_with_map,
        }
        self.batchers = {
            name: Batcher(name, run, self._executor, max_images=settings.max_batch_images,
                          max_wait=settings.max_batch_wait_ms / 1000, max_queue_wait=settings.max_queue_wait_s,
                          concurrency=concurrency, on_batch=metrics.observe_batch,
                          max_queued=settings.max_queued_images, inline_seconds=settings.inline_model_ms / 1000)
            for name, run in operations.items()
        }

    def start(self) -> None:
        """On the event loop's thread, which runs lone one-image requests itself (see Batcher)."""
        torch.set_num_threads(self.torch_threads)
        for batcher in self.batchers.values():
            batcher.start()

    def alive(self) -> bool:
        return all(batcher.running for batcher in self.batchers.values())

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Drain every batcher (queued requests finish), then release the model threads."""
        await asyncio.gather(*(batcher.stop(drain_timeout) for batcher in self.batchers.values()))
        self._executor.shutdown(wait=True)

    async def retire(self, timeout: float = 120.0) -> None:
        """Stop once no request holds this inference any more: after a reload, requests that started
        on the old model finish on it."""
        deadline = time.monotonic() + timeout
        while self.users > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.stop()

    async def run(self, operation: str, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """Queue (k, ...) inputs for an operation and return its outputs as arrays, each (k, ...)."""
        try:
            async with asyncio.timeout(self.model_timeout):     # the deadline: no late answers
                outputs = await self.batchers[operation].submit(torch.from_numpy(inputs))
        except TimeoutError:
            self.metrics.rejected.inc()
            raise Overloaded(f"the model did not answer within {self.model_timeout:g} s (VAE_MODEL_TIMEOUT_S); "
                             "retry later", retry_after_s=math.ceil(self.model_timeout / 4)) from None
        except Overloaded:
            self.metrics.rejected.inc()
            raise
        return tuple(np.ascontiguousarray(out.numpy()) for out in outputs)    # orjson needs C order
