"""Access logs: one JSON line per request with its id, never its content; request ids from
clients only when they look like ids."""

from __future__ import annotations

import json
import logging
import queue
import re
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.logs import HandOff, JSONFormatter, LogWriter
from tests.service.conftest import png_bytes, serve

FIELDS = {"time", "level", "logger", "message", "request_id", "method", "path", "status", "duration_ms", "client",
          "bytes_in", "bytes_out"}


def test_one_json_line_per_request_without_the_body(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    image = png_bytes(np.full((8, 8), 0.5))
    with caplog.at_level(logging.INFO, logger="service.access"):
        response = client.post("/encode?sample=true&seed=7", content=image, headers={
            "content-type": "image/png", "x-request-id": "trace-0042", "authorization": "Bearer secret-value"})
    records = [r for r in caplog.records if r.name == "service.access" and "/encode" in r.getMessage()]
    assert len(records) == 1
    line = JSONFormatter().format(records[0])
    assert "\n" not in line
    entry = json.loads(line)
    assert FIELDS <= set(entry)
    assert entry["request_id"] == "trace-0042" == response.headers["x-request-id"]
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/encode", 200)
    assert entry["bytes_in"] == len(image) and entry["bytes_out"] == len(response.content)
    assert "seed" not in line and "secret-value" not in line and "mu" not in line     # no query, header or body


@pytest.mark.parametrize("offered", ["has spaces", "quote\"d", "x" * 129, "new\\nline", "ünïcode"])
def test_odd_request_ids_are_replaced(client: httpx.Client, offered: str) -> None:
    response = client.get("/healthz", headers={"x-request-id": offered.encode("utf-8")})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_made_ids_are_unique(client: httpx.Client) -> None:
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_the_formatter_keeps_tracebacks_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("service", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    entry = json.loads(JSONFormatter().format(record))
    assert entry["message"] == "failed here" and "ValueError: boom" in entry["exception"]


def test_records_are_written_by_their_own_thread_and_flushed_at_exit() -> None:
    """The event loop hands records over; the writer thread formats them, and what is still queued
    when the process ends is written, traceback included."""
    program = ("import logging; from service.logs import configure_logging; configure_logging('info'); "
               "log = logging.getLogger('service.test'); "
               "[log.info('line %d of %s', i, 'many') for i in range(500)]; "
               "exec('try:\\n raise ValueError(\"boom\")\\nexcept ValueError:\\n log.exception(\"failed\")')")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert [e["message"] for e in entries[:500]] == [f"line {i} of many" for i in range(500)]
    assert entries[500]["message"] == "failed" and "ValueError: boom" in entries[500]["exception"]


def test_a_stuck_log_stream_drops_records_and_says_how_many() -> None:
    records: queue.Queue = queue.Queue(2)
    handoff = HandOff(records)
    log = logging.getLogger("service.test.handoff")
    for i in range(5):
        handoff.handle(log.makeRecord(log.name, logging.INFO, __file__, 1, "record %d", (i,), None))
    assert handoff.dropped == 3 and records.qsize() == 2          # nothing blocked, nothing grew
    assert [records.get_nowait().getMessage() for _ in range(2)] == ["record 0", "record 1"]
    handoff.handle(log.makeRecord(log.name, logging.INFO, __file__, 1, "record %d", (5,), None))
    warning, after = records.get_nowait(), records.get_nowait()
    assert warning.levelno == logging.WARNING and warning.getMessage().startswith("3 log records dropped")
    assert after.getMessage() == "record 5" and handoff.dropped == 0


def test_dropped_records_are_counted_in_metrics(digits_artifact: Path) -> None:
    """Operators alert on /metrics, not on a warning line in the very stream that is stuck."""
    stuck = HandOff(queue.Queue(1))                     # like configure_logging's, full after one record
    stuck.addFilter(lambda record: record.name == "service.test.stuck")      # only this test's records
    root = logging.getLogger()
    root.addHandler(stuck)
    try:
        with serve(model_path=digits_artifact) as url, httpx.Client(base_url=url) as http:
            for i in range(4):
                logging.getLogger("service.test.stuck").warning("record %d", i)
            metrics = http.get("/metrics").text
    finally:
        root.removeHandler(stuck)
    assert stuck.dropped == 3 and "vae_log_records_dropped_total 3.0" in metrics
    assert stuck.on_drop is None                        # the stopped app counts no more


def record(message: str) -> logging.LogRecord:
    return logging.makeLogRecord({"name": "service.test", "levelno": logging.INFO, "levelname": "INFO",
                                  "msg": message})


def test_the_writer_writes_queued_records_in_batches_not_one_by_one() -> None:
    """Queueing a record wakes no thread (a wake-up per request cost 0.13 to 0.34 ms of CPU): the
    writer writes what is queued when its interval comes, or when it stops."""
    records: queue.Queue = queue.Queue()
    stream = StringIO()
    writer = LogWriter(records, stream, interval=60.0)
    writer.start()
    try:
        for i in range(3):
            records.put_nowait(record(f"line {i}"))
        time.sleep(0.2)
        assert stream.getvalue() == ""                   # a per-record writer would have written them
    finally:
        writer.stop()
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["line 0", "line 1", "line 2"]


def test_the_writer_wakes_on_its_interval() -> None:
    records: queue.Queue = queue.Queue()
    stream = StringIO()
    writer = LogWriter(records, stream, interval=0.02)
    writer.start()
    try:
        records.put_nowait(record("soon"))
        deadline = time.monotonic() + 5
        while not stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert json.loads(stream.getvalue())["message"] == "soon"
    finally:
        writer.stop()


def test_a_record_that_cannot_be_formatted_costs_only_its_own_line() -> None:
    records: queue.Queue = queue.Queue()
    stream = StringIO()
    odd = record("odd")
    odd.fields = {1: "a non-string key"}              # orjson refuses non-string keys
    for item in (record("before"), odd, record("after")):
        records.put_nowait(item)
    assert LogWriter(records, stream).write_queued() == 3
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["message"] for e in (entries[0], entries[2])] == ["before", "after"]
    assert entries[1]["level"] == "error" and "could not be formatted" in entries[1]["message"]


def test_a_stuck_stream_does_not_hold_the_process_at_exit() -> None:
    class StuckStream(StringIO):
        def write(self, text: str) -> int:
            threading.Event().wait()                    # a full pipe nobody reads
            return 0

    records: queue.Queue = queue.Queue()
    records.put_nowait(record("never written"))
    writer = LogWriter(records, StuckStream(), interval=0.01)
    writer.start()
    time.sleep(0.1)                                     # the writer is stuck in write() by now
    started = time.monotonic()
    writer.stop(timeout=0.2)
    assert time.monotonic() - started < 2
