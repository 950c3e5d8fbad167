"""`python -m service --model PATH --host H --port P`: serve an artifact with uvicorn.

Options override the VAE_* environment variables they mirror (see service/settings.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE

from . import slots, workers
from .app import create_app
from .logs import configure_logging
from .settings import Settings
from .slots import SlotAcceptor

APP = "service.__main__:served_app"
log = logging.getLogger("service")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="artifact to serve (VAE_MODEL_PATH; default: models/digits.pt)")
    parser.add_argument("--host", help="interface (VAE_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (VAE_PORT; default 8000)")
    parser.add_argument("--workers", type=int, help="processes (VAE_WORKERS; default: one per CPU)")
    parser.add_argument("--log-level", help="VAE_LOG_LEVEL (default info)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"model_path": args.model, "host": args.host, "port": args.port, "workers": args.workers,
                 "log_level": args.log_level}
    for field, value in overrides.items():
        if value is not None:
            os.environ[f"VAE_{field.upper()}"] = str(value)      # worker processes read settings from here
    settings = Settings()
    configure_logging(settings.log_level)
    count = settings.resolved_workers()
    os.environ["VAE_WORKERS"] = str(count)            # the workers agree on it (model concurrency)
    shared_state = workers.prepare(count)
    # uvicorn drains on SIGTERM (stops accepting, finishes open requests, runs the lifespan's
    # shutdown), then raises the signal again to die by it; a drained stop is a clean exit
    signal.signal(signal.SIGTERM, exit_cleanly)
    # log_config=None: uvicorn's loggers propagate to the JSON handler instead of their own format;
    # a new worker imports torch and warms its model up before it is ready, which took more than
    # uvicorn's default 5 s on a busy machine (a reload's rolling restart would give up)
    options: dict[str, Any] = {"factory": True, "host": settings.host, "port": settings.port, "workers": count,
                               "log_level": settings.log_level, "access_log": False, "log_config": None,
                               "timeout_graceful_shutdown": 30, "timeout_worker_healthcheck": 60}
    try:
        if count > 1 and settings.reuse_port:
            return serve_on_slots(uvicorn.Config(APP, **options), count)
        uvicorn.run(APP, **options)
    finally:
        workers.clean_up(shared_state)
    return 0


def serve_on_slots(config: uvicorn.Config, count: int) -> int:
    """uvicorn.run with workers, but on a listening socket per worker slot instead of one shared
    socket (VAE_REUSE_PORT, service/slots.py)."""
    try:
        sockets = slots.listeners(config.host, config.port, count, config.backlog)
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, error.strerror)
        return STARTUP_FAILURE                    # what uvicorn exits with when its own socket cannot bind
    log.info("listening on %s:%d, a socket per worker (VAE_REUSE_PORT)", *sockets[0].getsockname()[:2])
    slots.SlotSupervisor(config, sockets=sockets).run()
    return 0


def exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def served_app() -> FastAPI:
    """The app as the server process builds it (each worker process calls this): JSON logs first."""
    settings = Settings()
    configure_logging(settings.log_level)
    pause_before_closing_idle_connections()
    if settings.reuse_port and workers.several():
        accept_on_one_slot()
    return create_app(settings)


def accept_on_one_slot() -> None:
    """Each worker is handed every slot's socket and accepts on one (service/slots.py). uvicorn
    builds its Server inside each worker before loading the app, so, as for the shutdown below, the
    method is wrapped here."""
    original = uvicorn.Server.startup
    if getattr(original, "one_slot", False):
        return

    async def startup(self: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
        await original(self, None if sockets is None else [])
        if sockets is not None:
            self.slot_acceptor = SlotAcceptor(self, sockets)                  # type: ignore[attr-defined]
            self.slot_acceptor_task = asyncio.create_task(self.slot_acceptor.run())  # type: ignore[attr-defined]

    startup.one_slot = True                       # type: ignore[attr-defined]
    uvicorn.Server.startup = startup              # type: ignore[method-assign]


def pause_before_closing_idle_connections(pause_s: float = 0.2) -> None:
    """uvicorn's shutdown stops accepting and, in the same instant, closes every connection with no
    request under way, one accepted a moment ago whose request is still arriving included: that
    client sees a dropped connection. A rolling restart's old worker did this to a test client. A
    short pause between the two lets such requests arrive, and they are answered. (uvicorn builds
    its Server inside each worker, before the app is loaded, so the method is wrapped here.)"""
    original = uvicorn.Server.shutdown
    if getattr(original, "pauses_first", False):
        return

    async def shutdown(self: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()                        # stop accepting; uvicorn's own close repeats it
        if acceptor := getattr(self, "slot_acceptor", None):
            acceptor.stop()                       # (VAE_REUSE_PORT) its slots go to the workers after it
        await asyncio.sleep(pause_s)
        await original(self, sockets)

    shutdown.pauses_first = True                  # type: ignore[attr-defined]
    uvicorn.Server.shutdown = shutdown            # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
