"""Several worker processes behind one port, as `python -m service` runs them by default on a
multi-core machine: /metrics counts the whole server whichever worker answers, a reload asked of
one worker reaches all of them without a failed request, a restart onto a broken artifact keeps
the old workers, SIGTERM stops everything cleanly, and workers do not outlive a killed supervisor. With
VAE_REUSE_PORT=true a burst of connections is spread evenly over the workers, and a rolling restart
resets none of the connections waiting to be accepted."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from benchmarks.serving.servers import connections_by_process
from service.slots import FOSTER_CHECK_S, SILENT_S
from tests.service.conftest import png_bytes
from tests.service.test_lifecycle import ROOT, Server, ready, running_server, wait_until
from tests.service.test_reload import models_dir  # noqa: F401  (the fixture)

WORKERS = 2


@pytest.fixture()
def workers_server(models_dir: Path, tmp_path: Path) -> Iterator[Server]:  # noqa: F811
    with started_workers(models_dir, tmp_path) as server:
        yield server


@contextlib.contextmanager
def started_workers(artifacts: Path, tmp_path: Path, **settings: str) -> Iterator[Server]:
    env = {**os.environ, "VAE_WORKERS": str(WORKERS), "VAE_ADMIN_WITHOUT_KEYS": "true", "VAE_LOG_LEVEL": "info",
           "VAE_MODELS_DIR": str(artifacts), **settings}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with running_server(["--model", str(artifacts / "digits.pt")], env, tmp_path / "server.log",
                        lambda server: ready(server.url) and len(worker_pids(server)) >= WORKERS, 120) as server:
        time.sleep(1)            # ready answered by one worker; give the other a moment to listen too
        yield server


def worker_pids(server: Server) -> list[int]:
    """Every worker process the server has started, from its log."""
    return [int(re.search(r"\[(\d+)\]", line["message"]).group(1)) for line in server.lines()
            if line.get("message", "").startswith("Started server process")]


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"     # a zombie has exited
    except OSError:
        return False


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def served_sha(url: str) -> str:
    return httpx.get(f"{url}/model", timeout=10).json()["checksum"]["sha256"]


def test_metrics_count_every_worker(workers_server: Server, digit_images) -> None:  # noqa: ANN001
    body = png_bytes(digit_images[0])
    with httpx.Client(base_url=workers_server.url, timeout=30) as http:
        for _ in range(40):      # new connections: the kernel spreads them over the workers
            assert httpx.post(f"{workers_server.url}/anomaly-score", content=body,
                              headers={"Content-Type": "image/png"}, timeout=30).status_code == 200
        scrapes = [http.get("/metrics").text for _ in range(6)]
    counted = {metric(text, 'vae_http_requests_total{endpoint="/anomaly-score"') for text in scrapes}
    assert counted == {40.0}
    assert {metric(text, "vae_model_ready ") for text in scrapes} == {1.0}
    assert all(text.count("vae_model_info{") == 1 for text in scrapes)


def test_a_reload_reaches_every_worker_without_a_failed_request(workers_server: Server, models_dir: Path,  # noqa: F811
                                                                digit_images) -> None:  # noqa: ANN001
    url, body = workers_server.url, png_bytes(digit_images[1])
    old_sha = served_sha(url)
    statuses: list[int | str] = []           # a status, or the transport error a client met
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            try:
                statuses.append(httpx.post(f"{url}/anomaly-score", content=body,
                                           headers={"Content-Type": "image/png"}, timeout=30).status_code)
            except httpx.TransportError as error:
                statuses.append(type(error).__name__)

    clients = [threading.Thread(target=keep_asking) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        answer = httpx.post(f"{url}/admin/reload", json={"path": "other.pt"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "rolling out" and answer.json()["artifact"] == "other.pt"
        # both: ten answers in a row can all come from the first new worker while the second old one still runs
        wait_until(lambda: len(worker_pids(workers_server)) >= 2 * WORKERS
                   and all(served_sha(url) != old_sha for _ in range(10)), 90, "not every worker reloaded")
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    assert len(statuses) > 20 and set(statuses) == {200}
    assert len(worker_pids(workers_server)) >= 2 * WORKERS                   # each worker was replaced

    # the artifact breaks on disk; a restart onto it (SIGHUP to the supervisor) keeps the old workers
    (models_dir / "other.pt").rename(models_dir / "other.pt.good")
    try:
        (models_dir / "other.pt").write_bytes(b"not a model")
        workers_server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: any("keeping worker" in line.get("message", "") for line in workers_server.lines()),
                   60, "the supervisor did not abort the restart")
        assert ready(url) and served_sha(url) != old_sha
    finally:
        (models_dir / "other.pt.good").replace(models_dir / "other.pt")

    workers_server.process.send_signal(signal.SIGTERM)
    assert workers_server.process.wait(60) == 0


def test_workers_stop_when_their_supervisor_is_killed(workers_server: Server) -> None:
    pids = worker_pids(workers_server)
    assert all(running(pid) for pid in pids)
    workers_server.process.kill()                    # SIGKILL: the supervisor cannot stop them itself
    workers_server.process.wait(10)
    wait_until(lambda: not any(running(pid) for pid in pids), 30, "workers outlived their supervisor")


def burst_of_connections(port: int, count: int) -> list[socket.socket]:
    """`count` connections opened at once, as a load generator opens them (non-blocking connects)."""
    clients = []
    for _ in range(count):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        clients.append(client)
    return clients


def test_with_reuse_port_a_burst_of_connections_is_spread_over_the_workers(models_dir: Path,  # noqa: F811
                                                                           tmp_path: Path) -> None:
    """64 connections opened while one worker is busy (here: stopped for a moment). On one shared
    socket the idle worker takes them all, and keeps them (clients reuse their connections); with a
    socket per worker the kernel hashes them over both, and the busy one takes its half when free."""
    with started_workers(models_dir, tmp_path, VAE_REUSE_PORT="true") as server:
        port = int(server.url.rsplit(":", 1)[1])
        pids = [pid for pid in worker_pids(server) if running(pid)]
        os.kill(pids[0], signal.SIGSTOP)
        try:
            clients = burst_of_connections(port, 64)
            time.sleep(0.5)
        finally:
            os.kill(pids[0], signal.SIGCONT)
        try:
            wait_until(lambda: sum(connections_by_process(pids, port).values()) == 64, 30, "connections not accepted")
            counts = connections_by_process(pids, port)
        finally:
            for client in clients:
                client.close()
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert len(counts) == WORKERS and min(counts.values()) >= 16, counts      # Binomial(64, 1/2) < 16: 3e-5


def churn(url: str, body: bytes, stop: threading.Event, outcomes: list[str]) -> None:
    """One image scored per new connection, as fast as they are answered: connections are waiting
    to be accepted whenever a worker stops."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    request = (f"POST /anomaly-score HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    while not stop.is_set():
        try:
            with socket.create_connection((host, int(port)), timeout=30) as client:
                client.sendall(request)
                answer = b""
                while chunk := client.recv(4096):
                    answer += chunk
            outcomes.append(answer.split(b" ", 2)[1].decode() if answer else "no answer")
        except OSError as error:
            outcomes.append(type(error).__name__)


def test_with_reuse_port_a_rolling_restart_drops_no_connection(models_dir: Path, tmp_path: Path,  # noqa: F811
                                                                digit_images) -> None:  # noqa: ANN001
    """A stopping worker's listening socket stays open in the supervisor: the connections waiting
    on it are taken by the worker that replaces it, not reset."""
    with started_workers(models_dir, tmp_path, VAE_REUSE_PORT="true") as server:
        outcomes: list[str] = []
        stop = threading.Event()
        body = png_bytes(digit_images[2])
        clients = [threading.Thread(target=churn, args=(server.url, body, stop, outcomes)) for _ in range(16)]
        for client in clients:
            client.start()
        try:
            server.process.send_signal(signal.SIGHUP)              # uvicorn's rolling restart, as a reload asks
            wait_until(lambda: len(worker_pids(server)) >= 2 * WORKERS
                       and sum(running(pid) for pid in worker_pids(server)) == WORKERS, 90,
                       "the workers were not replaced")
            time.sleep(1)
        finally:
            stop.set()
            for client in clients:
                client.join(60)
        failures = {outcome: outcomes.count(outcome) for outcome in set(outcomes) if outcome != "200"}
        assert len(outcomes) > 500 and not failures, (len(outcomes), failures)


def test_with_reuse_port_a_dead_workers_slot_is_served_until_its_replacement_takes_it(
        models_dir: Path, tmp_path: Path, digit_images) -> None:  # noqa: ANN001, F811
    """A worker killed outright leaves its slot's socket to the supervisor: the other worker accepts
    there within a fraction of a second (the replacement takes seconds to load torch and the model),
    and hands it back once the replacement asks for a slot."""
    with started_workers(models_dir, tmp_path, VAE_REUSE_PORT="true") as server:
        port, body = int(server.url.rsplit(":", 1)[1]), png_bytes(digit_images[3])
        victim = worker_pids(server)[0]
        taken_before, handed_before = logged(server, "had no worker"), logged(server, "handed to a new worker")
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
        # new connections, about half of them hashed to the dead slot; its replacement answers no sooner
        # than about 4 s after the kill here (a new process imports torch and loads the model)
        assert scored_on_new_connections(server.url, body, 32, timeout_s=2) == [200] * 32
        assert logged(server, "had no worker") > taken_before

        # (a worker still loading at the start may have had its slot handed to it already)
        wait_until(lambda: logged(server, "handed to a new worker") > handed_before
                   and sum(running(pid) for pid in worker_pids(server)) == WORKERS, 90, "no replacement took the slot")
        counts = spread_of_a_burst([pid for pid in worker_pids(server) if running(pid)], port, 64)
    assert len(counts) == WORKERS and min(counts.values()) >= 16, counts     # the replacement has its own slot


@pytest.mark.parametrize("reuse_port", ["true", "false"])
def test_a_port_already_listened_on_stops_the_server_with_a_message(models_dir: Path, tmp_path: Path,  # noqa: F811
                                                                    reuse_port: str) -> None:
    """SO_REUSEPORT alone would let a second server of the same user bind beside a running one and
    take a share of its connections unnoticed."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)     # as a running server's slot has it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "VAE_WORKERS": str(WORKERS), "VAE_REUSE_PORT": reuse_port}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        finished = subprocess.run([sys.executable, "-m", "service", "--model", str(models_dir / "digits.pt"),
                                   "--port", str(port)], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=60)
    assert finished.returncode == 3                                      # uvicorn's STARTUP_FAILURE
    assert "address already in use" in finished.stderr.lower(), finished.stderr[-2000:]


def test_sigttin_adds_a_worker_with_a_slot_of_its_own_and_sigttou_leaves_its_slot_served(
        models_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """uvicorn's signal for one more worker: the supervisor opens a socket for it, so the kernel
    spreads connections over three workers, not two and an idle one."""
    with started_workers(models_dir, tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        server.process.send_signal(signal.SIGTTIN)
        wait_until(lambda: any(line.get("message") == f"accepting on slot {WORKERS + 1} of {WORKERS + 1}"
                               for line in server.lines()), 90, "the new worker took no slot")
        counts = spread_of_a_burst([pid for pid in worker_pids(server) if running(pid)], port, 96)
        assert len(counts) == WORKERS + 1 and min(counts.values()) >= 12, counts    # any of 3 below 12: 2e-6

        added = worker_pids(server)[WORKERS]
        server.process.send_signal(signal.SIGTTOU)          # one fewer (the last added): its slot must stay served
        wait_until(lambda: not running(added), 30, "SIGTTOU stopped no worker")
        wait_until(lambda: every_connection_accepted(server, port, 30), 90,
                   "connections left waiting on a slot no worker serves")


def every_connection_accepted(server: Server, port: int, count: int, within_s: float = 5) -> bool:
    """Whether a burst of `count` new connections is all accepted by the server's live workers (a
    third of them hashed to a slot nobody serves would wait in its backlog)."""
    clients = burst_of_connections(port, count)
    try:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            live = [pid for pid in worker_pids(server) if running(pid)]
            if sum(connections_by_process(live, port).values()) == count:
                return True
            time.sleep(0.2)
        return False
    finally:
        for client in clients:
            client.close()


def scored_on_new_connections(url: str, body: bytes, count: int, timeout_s: float) -> list[int]:
    """The statuses of `count` /anomaly-score requests, 16 at a time, each on a new connection (so
    the kernel hashes them over every slot)."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda _: httpx.post(f"{url}/anomaly-score", content=body, timeout=timeout_s,
                                                  headers={"Content-Type": "image/png"}).status_code, range(count)))


def logged(server: Server, text: str) -> int:
    """How many of the server's log lines say `text`."""
    return sum(text in line.get("message", "") for line in server.lines())


def spread_of_a_burst(pids: list[int], port: int, count: int) -> dict[int, int]:
    """Connections held by each of `pids` once a burst of `count` new ones has all been accepted."""
    clients = burst_of_connections(port, count)
    try:
        wait_until(lambda: sum(connections_by_process(pids, port).values()) == count, 30, "connections not accepted")
        return connections_by_process(pids, port)
    finally:
        for client in clients:
            client.close()


def test_a_silent_workers_slot_is_served_until_it_answers_again(models_dir: Path, tmp_path: Path,  # noqa: F811
                                                                 digit_images) -> None:  # noqa: ANN001
    """A worker whose event loop hangs (here: stopped) keeps its slot's lock, and uvicorn's health
    check does not notice (a thread answers it); the other worker accepts on the silent slot too."""
    with started_workers(models_dir, tmp_path) as server:
        body = png_bytes(digit_images[4])
        silent = worker_pids(server)[0]
        os.kill(silent, signal.SIGSTOP)
        try:
            time.sleep(SILENT_S + 2 * FOSTER_CHECK_S + 0.5)
            statuses = scored_on_new_connections(server.url, body, 32, timeout_s=2)   # about half on its slot
        finally:
            os.kill(silent, signal.SIGCONT)
        assert statuses == [200] * 32
        wait_until(lambda: logged(server, "answers again") > 0, 30, "the other worker kept the slot after its worker "
                   "came back")
        assert logged(server, "has been silent") > 0
