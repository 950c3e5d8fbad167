"""Service fixtures: the real app, served by uvicorn on a loopback port in a background thread,
so tests go through real HTTP, the real lifespan and real concurrency."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from service.app import create_app
from service.fast_lane import AnomalyScoreLane
from service.settings import Settings


@contextmanager
def serve(**settings: Any) -> Iterator[str]:
    """Serve create_app(Settings(**settings)) on 127.0.0.1 and yield its base URL."""
    with serve_app(create_app(Settings(**settings))) as url:
        yield url


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serve an app (lifespan included) on a free loopback port and yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def base_url(digits_artifact: Path) -> Iterator[str]:
    with serve(model_path=digits_artifact) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        yield http


@pytest.fixture(scope="session")
def digit_images() -> np.ndarray:
    """Real 8x8 digits in [0, 1], (N, 8, 8), exactly representable as 8-bit PNGs (k/16 -> round(255 k/16)
    is not exact, so they are snapped to multiples of 1/255)."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:40] / 16.0
    return (np.rint(images * 255) / 255).astype(np.float32)


def png_bytes(pixels: np.ndarray, mode: str | None = None) -> bytes:
    """(H, W) or (H, W, C) in [0, 1] as PNG bytes."""
    image = Image.fromarray(np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def lane_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bodies the lean /anomaly-score path scored (servers run in this process, on a thread)."""
    calls: list[bytes] = []
    original = AnomalyScoreLane._score

    async def counting(self: AnomalyScoreLane, scope: dict, body: bytes, fpr: float) -> bytes:
        calls.append(body)
        return await original(self, scope, body, fpr)

    monkeypatch.setattr(AnomalyScoreLane, "_score", counting)
    return calls
