"""The serving loop's model half: one batcher per model operation, all feeding one pool of model
threads. Each thread runs one batch at a time with the torch threads it was given, so the pool
keeps the CPUs busy with whole batches (inter-op) rather than splitting small ops (intra-op)."""

from __future__ import annotations

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
        concurrency = settings.resolved_model_concurrency()
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="model")
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
                          concurrency=concurrency, on_batch=metrics.observe_batch)
            for name, run in operations.items()
        }

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    def alive(self) -> bool:
        return all(batcher.running for batcher in self.batchers.values())

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()
        self._executor.shutdown(wait=True)

    async def run(self, operation: str, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """Queue (k, ...) inputs for an operation and return its outputs as arrays, each (k, ...)."""
        try:
            outputs = await self.batchers[operation].submit(torch.from_numpy(inputs))
        except Overloaded:
            self.metrics.rejected.inc()
            raise
        return tuple(np.ascontiguousarray(out.numpy()) for out in outputs)    # orjson needs C order
