"""The server as operators run it, `python -m service` in its own process: SIGTERM drains (every
request already in gets its answer, then a clean exit), SIGHUP reloads, and stderr is JSON lines."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 50
IMAGES_PER_REQUEST = 64


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def lines(self) -> list[dict]:
        """The log's complete lines: the server may be halfway through writing the last one."""
        text = self.log.read_text()
        complete = text[:text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(args: list[str], env: dict[str, str], log: Path, started: Callable[[Server], bool],
                   timeout: float = 90) -> Iterator[Server]:
    """`python -m service ARGS --port P` in its own process, until it has started; stopped after."""
    port = free_port()
    with open(log, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "service", *args, "--port", str(port)], cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_until(lambda: started(server), timeout, "the server did not start")
        yield server
    finally:
        if process.poll() is None:
            process.terminate()                      # SIGTERM: worker processes stop with it
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@pytest.fixture()
def server(digits_artifact: Path, tmp_path: Path) -> Iterator[Server]:
    # a queue wait and deadline this long so that the busy test machine never turns a request away;
    # one process: SIGHUP then reloads in place and the soak's RSS is the serving process's
    # (several workers: tests/service/test_workers.py)
    env = {**os.environ, "VAE_MAX_QUEUE_WAIT_S": "60", "VAE_MODEL_TIMEOUT_S": "120", "VAE_LOG_LEVEL": "info",
           "VAE_WORKERS": "1"}
    with running_server(["--model", str(digits_artifact)], env, tmp_path / "server.log",
                        lambda server: ready(server.url)) as server:
        yield server


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_until(condition, timeout: float, message: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("vae_http_requests_in_flight "))


def test_sigterm_finishes_every_request_in_flight_then_exits_0(server: Server, digit_images: np.ndarray) -> None:
    """50 requests of 64 images each are in the middle of sending their bodies when SIGTERM comes:
    the server stops accepting connections, answers all 50 with 200, and exits 0."""
    body = orjson.dumps({"images": [digit_images[i % 40].tolist() for i in range(IMAGES_PER_REQUEST)]})
    halfway = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        halfway.wait(60)
        yield body[len(body) // 2:]

    def one_request() -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            return client.post("/anomaly-score", content=slow_body(), headers={"content-type": "application/json"})

    with ThreadPoolExecutor(REQUESTS) as pool:
        futures = [pool.submit(one_request) for _ in range(REQUESTS)]
        try:
            wait_until(lambda: in_flight(server.url) >= REQUESTS + 1, 60, "the requests did not all arrive")
            server.process.send_signal(signal.SIGTERM)
            wait_until(lambda: not accepts_connections(server.url), 10, "the server still accepts connections")
        finally:
            halfway.set()
        responses = [future.result() for future in futures]
    assert [r.status_code for r in responses] == [200] * REQUESTS
    assert all(len(r.json()["results"]) == IMAGES_PER_REQUEST for r in responses)
    assert server.process.wait(60) == 0
    access = [line for line in server.lines() if line.get("path") == "/anomaly-score"]
    assert len(access) == REQUESTS and {line["status"] for line in access} == {200}


def accepts_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def test_sighup_reloads_and_logs_are_json_lines(server: Server) -> None:
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: any("reloaded" in line["message"] for line in server.lines()), 60, "no reload after SIGHUP")
    response = httpx.post(f"{server.url}/sample?format=png", json={"n": 3, "seed": 1},
                          headers={"X-Request-ID": "client-id-42"}, timeout=30)
    assert response.status_code == 200 and response.headers["x-request-id"] == "client-id-42"
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    lines = server.lines()                     # every line parses as JSON (json.loads above)
    (access,) = [line for line in lines if line.get("request_id") == "client-id-42"]
    assert access["method"] == "POST" and access["path"] == "/sample" and access["status"] == 200
    assert access["bytes_in"] == len(b'{"n":3,"seed":1}') and access["bytes_out"] == len(response.content)
    assert access["duration_ms"] > 0 and access["client"].startswith("127.0.0.1:")
    assert "iVBOR" not in server.log.read_text()              # no image data in the logs
    assert {line["level"] for line in lines} <= {"info", "warning"}
