"""The compute floor, in process and without HTTP: decoding PNGs with Pillow and scoring them with
the TorchScript module, per image, at batch 1 and at batch 64."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass
class ComputeFloor:
    """Median seconds per image; decode and score apart, and together."""
    threads: int
    decode_1: float
    score_1: float
    total_1: float
    decode_64: float
    score_64: float
    total_64: float
    when: str = "start"
    round: int | None = None        # measured beside this round's lowest concurrency (None: start or end)

    @property
    def floor_1(self) -> float:
        """A floor is a lower bound: the smaller of decode + score timed together and timed apart
        (on a shared machine a noisy moment inflates one of them)."""
        return min(self.total_1, self.decode_1 + self.score_1)


def decode_png(data: bytes) -> np.ndarray:
    """One grayscale PNG as (1, H, W) float32 in [0, 1]."""
    image = Image.open(io.BytesIO(data)).convert("L")
    return (np.asarray(image, dtype=np.float32) / 255.0)[None]


def _median_seconds(call: Callable[[], object], budget_s: float, min_rounds: int = 10) -> float:
    """Median wall time of `call` over as many rounds as fit in the budget (at least min_rounds)."""
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_rounds or time.perf_counter() < deadline:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(model: Path, pngs: list[bytes], threads: int, budget_s: float = 1.5, when: str = "start",
            round_index: int | None = None) -> ComputeFloor:
    """Per-image decode, score and decode+score times at batch 1 and batch len(pngs), with
    `threads` torch threads (restored afterwards)."""
    module = torch.jit.load(str(model), map_location="cpu").eval()
    one, many = pngs[0], pngs
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)

    def score(x: torch.Tensor) -> None:
        with torch.inference_mode():
            module.score(x)

    try:
        x1 = torch.from_numpy(decode_png(one)[None])
        xn = torch.from_numpy(np.stack([decode_png(p) for p in many]))
        for _ in range(10):          # first calls of a scripted module pay for profiling and fusion
            score(x1)
            score(xn)
        n = len(many)
        return ComputeFloor(
            threads=threads,
            decode_1=_median_seconds(lambda: decode_png(one), budget_s),
            score_1=_median_seconds(lambda: score(x1), budget_s),
            total_1=_median_seconds(lambda: score(torch.from_numpy(decode_png(one)[None])), budget_s),
            decode_64=_median_seconds(lambda: [decode_png(p) for p in many], budget_s) / n,
            score_64=_median_seconds(lambda: score(xn), budget_s) / n,
            total_64=_median_seconds(lambda: score(torch.from_numpy(np.stack([decode_png(p) for p in many]))),
                                     budget_s) / n,
            when=when,
            round=round_index,
        )
    finally:
        torch.set_num_threads(previous)
