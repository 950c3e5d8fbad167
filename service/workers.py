"""Several server processes behind one port, as one service: shared metrics, and reloads that
reach every worker.

`python -m service` with more than one worker makes a private directory before uvicorn spawns
them and names it in the environment they inherit. In it prometheus-client keeps each process's
metric values, so /metrics, whichever worker answers, counts the whole server; and a reload asked
of any worker leaves there the artifact to serve, then asks uvicorn's supervisor (the parent
process) for a rolling restart with SIGHUP: each new worker loads that artifact and is ready before
its old one is stopped, so the port never goes unserved. A worker whose supervisor is killed
outright stops by itself.

By default (`VAE_REUSE_PORT`) each worker accepts on a listening socket of its own (a slot) rather
than on one socket all of them share (SO_REUSEPORT): the kernel then spreads connections over the
workers by a hash of the client's address, where on a shared socket the first worker awake takes
a whole burst (64 persistent connections split from 2/62 to 29/35 in eight runs here; p99
127 ms at 2/62, 71 ms at 29/35). service/slots.py says how the slots are kept served.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from pathlib import Path

from prometheus_client import multiprocess

STATE_DIR = "_VAE_WORKERS_STATE_DIR"         # set by the parent for its workers; not a setting
SUPERVISOR = "_VAE_WORKERS_SUPERVISOR_PID"   # the parent's pid, known before any worker starts
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"     # prometheus-client's own variable
_ARTIFACT = "artifact"                       # the file naming the artifact to serve
_SERVED = "served"                           # exists once a worker has served: later failures abort restarts


def prepare(workers: int) -> Path | None:
    """In the parent, before the workers start: the shared directory, or None for one process."""
    if workers <= 1:
        return None
    state = Path(tempfile.mkdtemp(prefix="vae-service-"))
    (state / "metrics").mkdir()
    os.environ[STATE_DIR] = str(state)
    os.environ[SUPERVISOR] = str(os.getpid())
    os.environ.setdefault(METRICS_DIR, str(state / "metrics"))
    return state


def clean_up(state: Path | None) -> None:
    if state is not None:
        shutil.rmtree(state, ignore_errors=True)


def state_dir() -> Path | None:
    """The server's shared directory, in a worker of a multi-process server."""
    value = os.environ.get(STATE_DIR)
    return Path(value) if value else None


def several() -> bool:
    """True in a worker of a multi-process server."""
    return state_dir() is not None


def artifact_to_serve(configured: Path) -> Path:
    """The artifact the last reload chose, else the configured one."""
    state = state_dir()
    chosen = state / _ARTIFACT if state else None
    return Path(chosen.read_text()) if chosen is not None and chosen.exists() else configured


def has_served() -> bool:
    """Whether a worker of this server has served a model: then a worker that cannot load one is a
    failed restart (the old worker should stay), not a first start (which waits, not ready)."""
    state = state_dir()
    return state is not None and (state / _SERVED).exists()


def mark_served() -> None:
    state = state_dir()
    if state is not None:
        (state / _SERVED).touch()


def roll_out(artifact: Path) -> None:
    """Serve `artifact` from now on, in every worker: record it, then ask the supervisor to replace
    the workers one by one (the file is swapped in atomically, so no worker reads half a path)."""
    state, supervisor = state_dir(), _supervisor()
    if state is None or os.getppid() != supervisor:        # never signal whoever adopted an orphan
        raise RuntimeError("roll_out is for workers of a running multi-process server")
    pending = state / f"{_ARTIFACT}.{os.getpid()}"
    pending.write_text(str(artifact))
    pending.replace(state / _ARTIFACT)
    os.kill(supervisor, signal.SIGHUP)


def _supervisor() -> int:
    return int(os.environ.get(SUPERVISOR) or os.getppid())


async def exit_with_the_supervisor(poll_s: float = 1.0) -> None:
    """Stop this worker (gracefully, as SIGTERM does) once the supervisor that started it is gone: a
    supervisor killed outright (SIGKILL, the OOM killer) would otherwise leave workers holding the
    port with nobody to stop them."""
    supervisor = _supervisor()
    while os.getppid() == supervisor:
        await asyncio.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGTERM)


def worker_exiting() -> None:
    """Drop this process's live gauges (in flight, ready, model) from the shared metrics."""
    if os.environ.get(METRICS_DIR) and several():
        multiprocess.mark_process_dead(os.getpid())
