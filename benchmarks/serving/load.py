"""The load generator: wrk (one thread, a fixed number of connections) posting one body, with
post.lua printing its counts and latency percentiles as one JSON line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA_SCRIPT = Path(__file__).resolve().parent / "post.lua"
MARKER = "WRK_JSON "


@dataclass
class LoadResult:
    """One wrk run: throughput, latency percentiles (seconds) and errors."""
    connections: int
    requests: int
    seconds: float
    p50: float
    p90: float
    p99: float
    max: float
    socket_errors: int              # connect + read + write + timeout
    status_errors: int              # HTTP status >= 400 (wrk's definition)
    wrk_cpu_seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return self.socket_errors + self.status_errors


def ensure_wrk() -> str:
    """The wrk binary; installs Debian's package when missing and we are root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: apt-get install -y wrk", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is needed as the load generator: apt-get install wrk (Debian package)")
    return found


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].split(" Copyright")[0].strip()


def run_wrk(wrk: str, url: str, body: Path, content_type: str, connections: int, seconds: float,
            timeout_s: float = 30.0) -> LoadResult:
    """POST `body` to `url` from `connections` keep-alive connections on one thread for `seconds`."""
    command = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={int(timeout_s)}s",
               "-s", str(LUA_SCRIPT), url, "--", str(body), content_type]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            output = proc.stdout.read() if proc.stdout else ""
            # wait4 instead of wait: it also reports the CPU time wrk used (it shares 2 cores with the server)
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()            # interrupted: do not leave wrk running against a server being stopped
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in output.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {output.strip()[-500:]}")
    raw = json.loads(lines[-1][len(MARKER):])
    return LoadResult(
        connections=connections, requests=raw["requests"], seconds=raw["duration_us"] / 1e6,
        p50=raw["p50_us"] / 1e6, p90=raw["p90_us"] / 1e6, p99=raw["p99_us"] / 1e6, max=raw["max_us"] / 1e6,
        socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        status_errors=raw["status"], wrk_cpu_seconds=usage.ru_utime + usage.ru_stime)
