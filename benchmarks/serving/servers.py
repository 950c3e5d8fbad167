"""Starting and stopping one contender's server: a process in its own session (so the whole tree,
TorchServe's JVM and workers or LitServe's inference process included, stops together), logs to a
file, readiness by a real scoring request, and the CPU time the tree used."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ESTABLISHED = "01"             # the state column of /proc/net/tcp


def connections_by_process(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections to local `port` held by each of `pids` (from /proc): which
    process the load generator's connections landed on."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == ESTABLISHED:
                    inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in pids:
        with contextlib.suppress(OSError):        # a process that just exited
            counts[pid] = sum(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd"))
    return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running contender: its process (a session leader), base URL and log file."""
    name: str
    process: subprocess.Popen
    base_url: str
    log_path: Path
    extra_ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, name: str, command: list[str], env: dict[str, str], port: int, log_path: Path,
              cwd: Path) -> Server:
        log = open(log_path, "ab")   # the child holds its own copy of the descriptor
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return cls(name, process, f"http://127.0.0.1:{port}", log_path)

    def wait_ready(self, path: str, body: bytes, content_type: str, timeout_s: float) -> bytes:
        """Post the workload's body until it is answered 200; returns that answer."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                response = httpx.post(self.base_url + path, content=body, timeout=10,
                                      headers={"Content-Type": content_type})
                if response.status_code == 200:
                    return response.content
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as error:
                last = f"{type(error).__name__}"
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s ({last}); see {self.log_path}")

    def session_pids(self) -> list[int]:
        """Every live process in the server's session (its children may make process groups of their own)."""
        pids = []
        for entry in os.scandir("/proc"):
            fields = self._stat(entry.name) if entry.name.isdigit() else []
            if fields and int(fields[3]) == self.process.pid:
                pids.append(int(entry.name))
        return pids

    @staticmethod
    def _stat(pid: str) -> list[str]:
        """Fields of /proc/PID/stat after the command name (index 3: session id, 11-12: utime, stime)."""
        try:
            return Path("/proc", pid, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return []

    def connections_per_process(self) -> list[int]:
        """How many of the open connections to its port each process of the server holds, most first
        (processes holding none left out)."""
        port = int(self.base_url.rsplit(":", 1)[1])
        return sorted((n for n in connections_by_process(self.session_pids(), port).values() if n), reverse=True)

    def cpu_seconds(self) -> float:
        """User + system CPU time of every live process in the server's session."""
        ticks = 0
        for pid in self.session_pids():
            fields = self._stat(str(pid))
            if fields:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / CLOCK_TICKS

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left after the grace period."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            if not self._group_alive():
                break
            time.sleep(0.5)
        self._reap_group()

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _reap_group(self) -> None:
        """The leader is gone; give its group a moment, then kill whatever of its session is left."""
        deadline = time.monotonic() + 5.0
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._group_alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in self.session_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
