"""Logs as one JSON object per line, for log shippers: the standard logging module with a JSON
formatter. A record's `fields` extra (the access log's method, path, status, ...) is merged into
the object; a traceback, when there is one, goes in `exception` as one string.

Records are formatted and written on a thread of their own (the standard QueueHandler and
QueueListener), so the event loop never waits on the log stream: neither on a slow pipe (a
container's log driver) nor on the formatting of the access line written for every request.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

_HANDLER_NAME = "vae-json"
MAX_QUEUED_RECORDS = 10_000     # past this the stream is stuck: records are counted and dropped, not held


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


def configure_logging(level: str) -> None:
    """JSON lines on stderr for every logger, uvicorn's included (they propagate to the root),
    written by a thread that is flushed at exit. Idempotent: each server process (one per worker)
    calls it once."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if any(handler.get_name() == _HANDLER_NAME for handler in root.handlers):
        return
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(JSONFormatter())
    records: queue.Queue = queue.Queue(MAX_QUEUED_RECORDS)
    listener = logging.handlers.QueueListener(records, writer)
    listener.start()
    atexit.register(listener.stop)          # writes what is queued before the process ends
    handoff = HandOff(records)
    handoff.set_name(_HANDLER_NAME)
    root.addHandler(handoff)


def report_drops_to(on_drop: Callable[[], None] | None) -> None:
    """Have `on_drop` called for every record the log thread's full queue drops (None: stop)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, HandOff):
            handler.on_drop = on_drop
