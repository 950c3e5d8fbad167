"""Logs as one JSON object per line, for log shippers: the standard logging module with a JSON
formatter. A record's `fields` extra (the access log's method, path, status, ...) is merged into
the object; a traceback, when there is one, goes in `exception` as one string.

Records are formatted and written on a thread of their own, so the event loop never waits on the
log stream: neither on a slow pipe (a container's log driver) nor on the formatting of the access
line written for every request. The event loop only puts each record on a queue (the standard
QueueHandler). The writer thread does not wait on that queue, which would wake it for every record:
a wake-up per request, and the two threads taking the interpreter lock from each other, cost 0.13
to 0.34 ms of CPU per request here (README, Benchmarks), about a tenth of all the request cost.
It wakes every `WRITE_INTERVAL_S` instead and writes everything queued in one go.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

_HANDLER_NAME = "vae-json"
MAX_QUEUED_RECORDS = 10_000     # past this the stream is stuck: records are counted and dropped, not held
WRITE_INTERVAL_S = 0.05         # how long a record may wait for the writer


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # orjson: about a tenth of json.dumps's time, on a line written for every request
        return orjson.dumps(entry, default=str).decode()


class HandOff(logging.handlers.QueueHandler):
    """Queues records for the writer thread. The message is resolved here, on the caller's thread,
    so later changes to its arguments cannot alter it; the JSON and the write happen on the writer's.
    A full queue drops records and counts them; the next record that fits reports how many, and
    `on_drop` (the app's counter in /metrics, where an alert can see it) hears of each one."""

    def __init__(self, records: queue.Queue) -> None:
        super().__init__(records)
        self.dropped = 0
        self.on_drop: Callable[[], None] | None = None

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg, record.args = record.getMessage(), None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                self.queue.put_nowait(logging.makeLogRecord({
                    "name": "service.logs", "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": f"{self.dropped} log records dropped: the log stream did not keep up"}))
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()


class LogWriter:
    """The writer thread: every `interval` seconds it formats what is queued as JSON lines and
    writes them to `stream` at once; `stop` writes what is left. Nothing waits on the queue, so
    putting a record on it wakes nobody."""

    def __init__(self, records: queue.Queue, stream: TextIO, interval: float = WRITE_INTERVAL_S) -> None:
        self.records = records
        self.stream = stream
        self.interval = interval
        self.formatter = JSONFormatter()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued and end the thread; a stream stuck for `timeout` seconds (a full
        pipe nobody reads) is left behind rather than holding the process at exit."""
        self._stopping.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.write_queued()
        self.write_queued()

    def write_queued(self) -> int:
        """Write every record queued now; returns how many."""
        lines = []
        while True:
            try:
                record = self.records.get_nowait()
            except queue.Empty:
                break
            lines.append(self._line(record))
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):       # a closed or broken stream: nothing left to tell
                pass
        return len(lines)

    def _line(self, record: logging.LogRecord) -> str:
        try:
            return self.formatter.format(record)
        except Exception as error:              # one odd record must not take the others with it
            return orjson.dumps({"level": "error", "logger": "service.logs",
                                 "message": f"a log record could not be formatted: {error!r}"}).decode()


def configure_logging(level: str) -> None:
    """JSON lines on stderr for every logger, uvicorn's included (they propagate to the root),
    written by a thread that is flushed at exit. Idempotent: each server process (one per worker)
    calls it once."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if any(handler.get_name() == _HANDLER_NAME for handler in root.handlers):
        return
    records: queue.Queue = queue.Queue(MAX_QUEUED_RECORDS)
    writer = LogWriter(records, sys.stderr)
    writer.start()
    atexit.register(writer.stop)            # writes what is queued before the process ends
    handoff = HandOff(records)
    handoff.set_name(_HANDLER_NAME)
    root.addHandler(handoff)


def report_drops_to(on_drop: Callable[[], None] | None) -> None:
    """Have `on_drop` called for every record the log thread's full queue drops (None: stop)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, HandOff):
            handler.on_drop = on_drop
