"""One measurement session: start a contender, check its answer, warm it up, load it with wrk,
read its CPU time (and our service's /metrics) around the measured window, stop it."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from . import promstats
from .contenders import Contender, Setup
from .load import LoadResult, run_wrk
from .servers import Server

FPR = 0.01


@dataclass
class Run:
    """One contender at one concurrency: wrk's result or the error that stopped it."""
    contender: str
    connections: int
    round: int = 0
    load: LoadResult | None = None
    error: str | None = None
    server_cpu_s: float = 0.0
    load_avg: float = 0.0
    response_bytes: int = 0
    metrics: promstats.Snapshot | None = None
    held_by: list[int] = field(default_factory=list)     # wrk's connections per server process, midway


@dataclass
class Results:
    levels: list[int]
    runs: list[Run] = field(default_factory=list)
    batches: dict[str, LoadResult | str] = field(default_factory=dict)   # contender -> result or error

    def of(self, contender: str, connections: int) -> list[Run]:
        return [r for r in self.runs if r.contender == contender and r.connections == connections]


def expected_response_bytes(model: Path, png: bytes) -> int:
    """The size of our /anomaly-score answer for this image, built as our service builds it
    (compact JSON), for the HTTP floor's constant body."""
    extra = {"metadata.json": ""}
    module = torch.jit.load(str(model), map_location="cpu", _extra_files=extra).eval()
    calibration = json.loads(extra["metadata.json"])["calibration"]
    scores = np.sort(np.asarray(calibration["scores"], dtype=np.float64))
    n = len(scores)
    threshold = float(scores[max(n - math.floor(FPR * (n + 1)), 0)])
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32) / 255.0
    with torch.inference_mode():
        score = float(module.score(torch.from_numpy(pixels[None, None])).double()[0])
    p_value = (1 + n - int(np.searchsorted(scores, score, side="left"))) / (n + 1)
    body = {"threshold": threshold, "fpr": FPR, "score_kind": calibration["score_kind"],
            "results": [{"score": score, "p_value": p_value, "is_anomaly": score > threshold}]}
    return len(json.dumps(body, separators=(",", ":")))


def _check_answer(contender: Contender, answer: bytes) -> None:
    """Every scoring contender must answer with our shape; the floor answers anything."""
    if contender.key.startswith("http-floor"):
        return
    results = json.loads(answer)["results"]
    if not {"score", "p_value", "is_anomaly"} <= set(results[0]):
        raise RuntimeError(f"{contender.key} answered {answer[:200]!r}, not score/p_value/is_anomaly")


def _scrape(server: Server, contender: Contender) -> promstats.Snapshot | None:
    if contender.metrics_path is None:
        return None
    return promstats.parse(httpx.get(server.base_url + contender.metrics_path, timeout=10).text)


def run_session(contender: Contender, setup: Setup, bodies: dict[str, tuple[Path, str]], wrk: str,
                connections: int, args: argparse.Namespace, results: Results, round_index: int) -> None:
    """Measure `contender` at `connections`, recording into `results`; a failure is recorded, not raised.
    The 64-image request is measured in the first session of each contender."""
    measure_batch = contender.key not in results.batches
    run = Run(contender.key, connections, round_index, load_avg=os.getloadavg()[0])
    results.runs.append(run)
    body_path, content_type = bodies[contender.body]
    print(f"  {contender.label:<14} c={connections:<3} starting", end="", flush=True)
    try:
        server = contender.start(setup, contender.prepared)
    except OSError as error:
        run.error = contender.skip_reason = f"could not start: {error}"
        print(f": FAILED {run.error}", flush=True)
        return
    try:
        started = time.monotonic()
        answer = server.wait_ready(contender.path, body_path.read_bytes(), content_type, contender.ready_timeout_s)
        _check_answer(contender, answer)
        run.response_bytes = len(answer)
        print(f" (ready in {time.monotonic() - started:.1f} s)", end="", flush=True)
        url = server.base_url + contender.path
        run_wrk(wrk, url, body_path, content_type, connections, args.warmup)
        _drain(server, contender, body_path.read_bytes(), content_type)
        before, cpu_before = _scrape(server, contender), server.cpu_seconds()
        # wrk keeps its connections: which process holds them is set when they open, so one look will do
        midway = threading.Timer(args.duration / 2,
                                 lambda: setattr(run, "held_by", server.connections_per_process()))
        midway.start()
        try:
            run.load = run_wrk(wrk, url, body_path, content_type, connections, args.duration)
        finally:
            midway.cancel()
        run.server_cpu_s = server.cpu_seconds() - cpu_before
        after = _scrape(server, contender)
        if before is not None and after is not None:
            run.metrics = promstats.difference(after, before)
        print(f": {run.load.rps:8.1f} req/s, p50 {run.load.p50 * 1e3:7.2f} ms, p99 {run.load.p99 * 1e3:8.2f} ms, "
              f"errors {run.load.errors}", flush=True)
        if measure_batch and contender.batch_body is not None:
            _drain(server, contender, body_path.read_bytes(), content_type)
            _measure_batch(contender, server, bodies, wrk, args, results)
    except Exception as error:      # one contender's failure must not end the whole run
        run.error = f"{type(error).__name__}: {error}"
        print(f": FAILED {run.error}", flush=True)
        if not run.response_bytes:      # never answered: do not wait for it again at the other levels
            contender.skip_reason = f"did not start or answer: {run.error}"

    finally:
        server.stop()


def _drain(server: Server, contender: Contender, body: bytes, content_type: str) -> None:
    """Wait for one fresh request's answer: requests wrk abandoned when it stopped may still be in
    the server (a server that blocks its event loop works through them first), and must not eat
    into the next measured window."""
    deadline = time.monotonic() + 120
    while True:
        response = httpx.post(server.base_url + contender.path, content=body, timeout=120,
                              headers={"Content-Type": content_type})
        if response.status_code == 200:
            return
        if response.status_code != 503 or time.monotonic() > deadline:   # 503: still shedding the backlog
            raise RuntimeError(f"the server answered {response.status_code}: {response.text[:300]}")
        time.sleep(0.2)


def _measure_batch(contender: Contender, server: Server, bodies: dict[str, tuple[Path, str]], wrk: str,
                   args: argparse.Namespace, results: Results) -> None:
    """Back-to-back 64-image requests on one connection; wrk's p50 is the latency of one."""
    path, content_type = bodies[contender.batch_body or ""]
    url = server.base_url + contender.path
    try:
        run_wrk(wrk, url, path, content_type, 1, 1)
        _drain(server, contender, path.read_bytes(), content_type)
        result = run_wrk(wrk, url, path, content_type, 1, args.batch_duration)
        results.batches[contender.key] = result
        print(f"  {contender.label:<14} one 64-image request: p50 {result.p50 * 1e3:.2f} ms over "
              f"{result.requests} requests, errors {result.errors}", flush=True)
    except (RuntimeError, httpx.HTTPError) as error:
        results.batches[contender.key] = str(error)
