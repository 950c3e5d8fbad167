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
from uvicorn.supervisors import Multiprocess

from . import workers
from .app import create_app
from .logs import configure_logging
from .settings import Settings

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
            # uvicorn.run with workers, but on a socket per worker slot instead of one shared socket
            config = uvicorn.Config(APP, **options)
            slots = workers.slot_listeners(settings.host, settings.port, count, config.backlog)
            log.info("listening on %s:%d, a socket per worker (VAE_REUSE_PORT)", *slots[0].getsockname()[:2])
            Multiprocess(config, sockets=slots).run()
        else:
            uvicorn.run(APP, **options)
    finally:
        workers.clean_up(shared_state)
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
    """Each worker is handed every slot's socket (service/workers.py) and accepts on the first free
    slot; a rolling restart's new worker, finding all of them held, takes the one its old worker
    gives up as it stops. uvicorn builds its Server inside each worker before loading the app, so,
    as for the shutdown below, the method is wrapped here."""
    original = uvicorn.Server.startup
    if getattr(original, "one_slot", False):
        return

    async def startup(self: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
        await original(self, None if sockets is None else [])
        if sockets is not None:
            self.slot_claim = asyncio.create_task(accept_on_a_free_slot(self, sockets))  # type: ignore[attr-defined]

    startup.one_slot = True                       # type: ignore[attr-defined]
    uvicorn.Server.startup = startup              # type: ignore[method-assign]


async def accept_on_a_free_slot(server: uvicorn.Server, slots: list[socket.socket], poll_s: float = 0.01) -> None:
    """Claim a free slot, waiting for one if need be, and accept on its socket until the shutdown."""
    config = server.config

    def protocol() -> asyncio.Protocol:         # what uvicorn's startup gives the sockets it is handed
        return config.http_protocol_class(config=config, server_state=server.server_state,  # type: ignore[call-arg]
                                          app_state=server.lifespan.state)

    while not server.should_exit:
        slot = workers.claim_slot(len(slots))
        if slot is None:
            await asyncio.sleep(poll_s)
            continue
        listening = await asyncio.get_running_loop().create_server(protocol, sock=slots[slot], ssl=config.ssl,
                                                                   backlog=config.backlog)
        server.servers.append(listening)
        if server.should_exit:                    # the shutdown began while this one started
            listening.close()
            workers.release_slot()
            return
        log.info("accepting on slot %d of %d", slot + 1, len(slots))
        return


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
        workers.release_slot()                    # (VAE_REUSE_PORT) to the worker replacing this one
        await asyncio.sleep(pause_s)
        await original(self, sockets)

    shutdown.pauses_first = True                  # type: ignore[attr-defined]
    uvicorn.Server.shutdown = shutdown            # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
