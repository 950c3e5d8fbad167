"""With VAE_REUSE_PORT (the default): a listening socket per worker slot, every slot kept served.

The supervisor opens one listening socket per worker on the same address (SO_REUSEPORT), and the
kernel hashes new connections over them. Every worker is handed all of them and accepts on one:
the first slot whose lock (an flock in the server's shared directory) it can take. The sockets stay
open in the supervisor, so a worker that stops closes only its own copy, and the connections
queued on its socket wait for the next worker to accept there instead of being reset (as a
socket's last close would do to them).

- A rolling restart: the new worker finds every slot held and waits, asking for one; its old
  worker, stopping, stops accepting and gives its slot up, and the new one takes it within
  `CLAIM_POLL_S`.
- A worker that dies (a crash, the OOM killer): the kernel drops its lock, and another worker,
  seeing the slot free at two checks in a row (`FOSTER_CHECK_S` apart, far longer than a waiting
  worker takes to claim one), accepts there too until a new worker asks for a slot.
- A worker whose event loop hangs without dying keeps its lock, and uvicorn's health check does not
  see it (a thread of its own answers). Each worker's loop touches its slot's lock file every
  `FOSTER_CHECK_S`; another worker accepts on a slot silent for `SILENT_S` too, until it beats again.

This module knows uvicorn's Server (its listeners speak the Server's HTTP protocol) but nothing of
the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from . import workers

CLAIM_POLL_S = 0.01
FOSTER_CHECK_S = 0.25
SILENT_S = 2.0            # a slot whose holder's event loop has not beaten for this long is covered
log = logging.getLogger("service")


def listeners(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """The supervisor's: `count` listening sockets on one address, one per worker slot. OSError if
    anything listens there already: with SO_REUSEPORT alone, a second server of the same user would
    bind beside the first and silently take a share of its connections."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:   # without SO_REUSEPORT: fails if taken
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    return [listener(host, port, backlog) for _ in range(count)]


def listener(host: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class SlotSupervisor(Multiprocess):
    """uvicorn's supervisor, handing its workers the slots' sockets. SIGTTIN (one more worker) opens
    a slot for the new worker first, or it would find every slot held and accept nothing. SIGTTOU
    (one fewer) leaves the stopped worker's slot to the others, as a dead worker's; but workers
    started before a SIGTTIN lack the sockets opened since, so the rest are restarted (rolling) to
    be handed all of them."""

    def handle_ttin(self) -> None:
        self.sockets = [*self.sockets, listener(self.config.host, self.config.port, self.config.backlog)]
        super().handle_ttin()

    def handle_ttou(self) -> None:
        workers_before = len(self.processes)
        super().handle_ttou()
        if len(self.processes) < workers_before:
            self.restart_all()


class SlotLocks:
    """Which worker holds which slot: an flock per slot (the kernel drops it if its holder dies),
    and a file per worker waiting for a slot."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.held: dict[int, int] = {}          # slot -> descriptor of its lock file

    def claim(self, slot: int) -> bool:
        if slot in self.held:
            return True
        descriptor = os.open(self.state / f"slot-{slot}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return False
        self.held[slot] = descriptor
        os.utime(descriptor)                    # a new holder beats at once: its slot is not silent
        return True

    def beat(self) -> None:
        """Say that this worker's event loop runs: touch the lock file of every slot it holds."""
        for descriptor in self.held.values():
            os.utime(descriptor)

    def silent_for(self, slot: int) -> float:
        """Seconds since the holder of `slot` last beat (0 once the server has removed the files)."""
        try:
            return time.time() - (self.state / f"slot-{slot}.lock").stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def release(self, slot: int) -> None:
        descriptor = self.held.pop(slot, None)
        if descriptor is not None:
            os.close(descriptor)                # closing the only descriptor drops the flock

    def release_all(self) -> None:
        for slot in list(self.held):
            self.release(slot)

    def want(self, wanting: bool) -> None:
        """Say (or stop saying) that this worker waits for a slot."""
        marker = self.state / f"wanted-{os.getpid()}"
        if wanting:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    def wanted_by_another(self) -> bool:
        """Whether a live worker other than this one waits for a slot (a dead one's marker is dropped)."""
        for marker in self.state.glob("wanted-*"):
            pid = int(marker.name.removeprefix("wanted-"))
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
                return True
            except (ProcessLookupError, PermissionError):   # gone (the pid may be another user's now)
                marker.unlink(missing_ok=True)
        return False


class SlotAcceptor:
    """In a worker: accepts on a slot of its own, on a dead worker's slot until a new worker asks
    for one, and on a silent worker's slot until it beats again."""

    def __init__(self, server: uvicorn.Server, sockets: list[socket.socket]) -> None:
        state = workers.state_dir()
        if state is None:
            raise RuntimeError("slots are for workers of a running multi-process server")
        self.server = server
        self.sockets = sockets
        self.locks = SlotLocks(state)
        self.listening: dict[int, asyncio.AbstractServer] = {}
        self.own: int | None = None

    async def run(self) -> None:
        await self._take_own_slot()
        await self._foster_orphans()

    def stop(self) -> None:
        """At shutdown: stop accepting everywhere, then give every slot up to whoever waits."""
        for listening in self.listening.values():
            listening.close()
        self.listening.clear()
        self.locks.release_all()
        self.locks.want(False)

    async def _take_own_slot(self) -> None:
        while not self.server.should_exit:
            slot = next((slot for slot in range(len(self.sockets)) if self.locks.claim(slot)), None)
            if slot is not None:
                self.locks.want(False)
                self.own = slot
                await self._accept(slot)
                log.info("accepting on slot %d of %d", slot + 1, len(self.sockets))
                return
            self.locks.want(True)
            await asyncio.sleep(CLAIM_POLL_S)

    async def _foster_orphans(self) -> None:
        free_before: set[int] = set()
        while not self.server.should_exit:
            await asyncio.sleep(FOSTER_CHECK_S)
            self.locks.beat()
            if self.locks.wanted_by_another():
                for slot in [slot for slot in self.listening if slot != self.own and slot in self.locks.held]:
                    self._stop_accepting(slot)
                    log.info("slot %d handed to a new worker", slot + 1)
                free_before.clear()
                continue
            free_now = set()
            for slot in range(len(self.sockets)):
                if slot in self.locks.held:
                    continue
                if not self.locks.claim(slot):
                    await self._cover_if_silent(slot)
                elif slot in self.listening:
                    log.warning("slot %d's silent worker is gone: accepting on it until a new worker takes it",
                                slot + 1)
                elif slot in free_before:
                    await self._accept(slot)
                    log.warning("slot %d had no worker: accepting on it too until a new worker takes it",
                                slot + 1)
                else:
                    self.locks.release(slot)   # free once: perhaps a worker is about to take it
                    free_now.add(slot)
            free_before = free_now

    async def _cover_if_silent(self, slot: int) -> None:
        """Accept on another worker's slot while its event loop is silent, and stop once it beats."""
        silent_s = self.locks.silent_for(slot)
        if silent_s > SILENT_S and slot not in self.listening:
            await self._accept(slot)
            log.warning("slot %d's worker has been silent for %.1f s: accepting on it too", slot + 1, silent_s)
        elif silent_s <= SILENT_S and slot in self.listening:
            self._stop_accepting(slot)
            log.info("slot %d's worker answers again", slot + 1)

    async def _accept(self, slot: int) -> None:
        config, server = self.server.config, self.server

        def protocol() -> asyncio.Protocol:     # what uvicorn's startup gives the sockets it is handed
            return config.http_protocol_class(config=config, server_state=server.server_state,  # type: ignore[call-arg]
                                              app_state=server.lifespan.state)

        # a copy of the descriptor: closing the listener later leaves the slot's socket open here
        listening = await asyncio.get_running_loop().create_server(protocol, sock=self.sockets[slot].dup(),
                                                                   ssl=config.ssl, backlog=config.backlog)
        self.listening[slot] = listening
        if server.should_exit:                  # the shutdown began while this one started
            self._stop_accepting(slot)

    def _stop_accepting(self, slot: int) -> None:
        with contextlib.suppress(KeyError):
            self.listening.pop(slot).close()
        self.locks.release(slot)
