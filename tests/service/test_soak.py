"""A short soak: every endpoint under concurrent load for about half a minute against the server
as operators run it; no errors at all, and the server's resident memory after warm-up and at the
end within 10% (a leak per request would show)."""

from __future__ import annotations

import base64
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import png_bytes
from tests.service.test_lifecycle import Server, server  # noqa: F401  (the fixture)

CLIENTS = 6
WARM_UP_S = 6.0
SOAK_S = 20.0


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def calls(digit_images: np.ndarray) -> list[tuple[str, str, dict]]:
    """One request of every kind the service answers."""
    images = digit_images[:6]
    as_json = {"images": [image.tolist() for image in images]}
    pngs = [png_bytes(image) for image in images]
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs[:2])]
    infer = {"inputs": [{"name": "images", "shape": [2, 1, 8, 8], "datatype": "FP32",
                         "data": images[:2].reshape(-1).tolist()}], "outputs": [{"name": "score"}, {"name": "mu"}]}
    return [
        ("POST", "/encode?sample=true&seed=1", {"json": as_json}),
        ("POST", "/decode?format=png", {"json": {"z": [[0.0, 0.0], [1.0, -1.0]]}}),
        ("POST", "/reconstruct", {"content": pngs[0], "headers": {"content-type": "image/png"}}),
        ("POST", "/sample", {"json": {"n": 8, "seed": 3}}),
        ("POST", "/anomaly-score?map=true&format=png", {"files": files}),
        ("POST", "/anomaly-score", {"json": {"images": [base64.b64encode(p).decode() for p in pngs]}}),
        ("POST", "/interpolate?steps=6", {"files": files}),
        ("POST", "/v2/models/digits/infer", {"json": infer}),
        ("GET", "/model", {}), ("GET", "/healthz", {}), ("GET", "/readyz", {}), ("GET", "/metrics", {}),
        ("GET", "/v2/health/ready", {}), ("GET", "/v2/models/digits", {}), ("GET", "/", {}),
    ]


@pytest.mark.soak
def test_every_endpoint_under_load_without_errors_or_growth(server: Server, digit_images: np.ndarray) -> None:  # noqa: F811
    requests = calls(digit_images)
    stop = threading.Event()
    counts: list[int] = []
    failures: list[str] = []

    def client(offset: int) -> None:
        done = 0
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for method, path, options in itertools.islice(itertools.cycle(requests), offset, None):
                if stop.is_set():
                    break
                response = http.request(method, path, **options)
                done += 1
                if response.status_code != 200:
                    failures.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
        counts.append(done)

    with ThreadPoolExecutor(CLIENTS) as pool:
        clients = [pool.submit(client, i * 2) for i in range(CLIENTS)]
        time.sleep(WARM_UP_S)
        warm = rss_kib(server.process.pid)
        time.sleep(SOAK_S)
        end = rss_kib(server.process.pid)
        stop.set()
        for future in clients:
            future.result()
    total = sum(counts)
    print(f"\nsoak: {total} requests in {WARM_UP_S + SOAK_S:.0f} s, {len(failures)} errors, "
          f"RSS {warm / 1024:.1f} MiB after warm-up, {end / 1024:.1f} MiB at the end ({end / warm - 1:+.1%})")
    assert not failures, failures[:5]
    assert total > 200
    assert end <= warm * 1.10, f"RSS grew from {warm} KiB to {end} KiB"
