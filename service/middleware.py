"""Pure ASGI middleware: the request-body limit, and per-request metrics, request ids and access logs."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import TooLarge
from .metrics import Metrics

access_log = logging.getLogger("service.access")
error_log = logging.getLogger("service")


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes`: at once from Content-Length, or as the bytes arrive when the
    length is not declared (chunked), so no handler ever holds more than the limit. (FastAPI's own
    `max_body_size` answers a declared oversize body in plain text, without the limit; the
    contract wants JSON that says what was wrong.)"""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await reject(scope, send, 413, self._message(int(declared)))
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise TooLarge(self._message(received))
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, size: int) -> str:
        return f"request body of {size:,} bytes or more is over the limit of {self.max_bytes:,} bytes"


# a client's id is kept when it looks like an id (UUIDs, hex, trace ids), else replaced: it goes
# into logs and headers, so no spaces, quotes or control characters, and no megabyte ids
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# liveness and readiness probes (ours and the Open Inference Protocol's)
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
# probes and scraping must answer even when the API is saturated
UNLIMITED_PATHS = PROBE_PATHS | {"/metrics"}


def request_id_of(headers: dict[bytes, bytes]) -> str:
    offered = headers.get(b"x-request-id", b"").decode("latin-1")
    return offered if REQUEST_ID.match(offered) else os.urandom(16).hex()      # as random as a uuid4


class RequestMetricsMiddleware:
    """Counts and times every request by route template (not raw path, to bound label values),
    gives it an id (X-Request-ID, taken from the client or made), and writes one JSON access-log
    line: never the body, the query string (it could hold secrets) or any header value but the id."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = request_id_of(dict(scope.get("headers") or []))
        scope.setdefault("state", {})["request_id"] = request_id
        status, received, sent = 500, 0, 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, counting_receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            if scope["state"].get("client_disconnected"):
                status = 499                        # nginx's "client closed request"
            self._record(scope, status, time.perf_counter() - started, request_id, received, sent)

    def _record(self, scope: Scope, status: int, seconds: float, request_id: str, received: int, sent: int) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        try:                                # a metric or a log line never fails a request
            self.metrics.request_done(endpoint, scope["method"], status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                fields = {"request_id": request_id, "method": scope["method"], "path": scope["path"],
                          "status": status, "duration_ms": round(seconds * 1000, 2),
                          "client": f"{client[0]}:{client[1]}" if client else None,
                          "bytes_in": received, "bytes_out": sent}
                access_log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, seconds * 1000,
                                extra={"fields": fields})
        except Exception:
            pass


class InFlightLimitMiddleware:
    """At most `limit` requests handled at once; past it a 503 with Retry-After at once, before the
    body is read, so a flood costs neither memory nor latency for the requests already in."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            self.metrics.rejected.inc()
            return await reject(scope, send, 503, f"the server is handling {self.limit} requests, its limit; "
                                                  "retry later", {"Retry-After": "1"})
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class InternalErrorMiddleware:
    """Answers an unexpected exception with a JSON 500 that names the request id, and logs the
    traceback. Unlike Starlette's last-resort handler it does not re-raise, so the server keeps
    the client's connection open instead of dropping it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # the client left before its body arrived: nobody to answer, nothing went wrong here
            scope.setdefault("state", {})["client_disconnected"] = True
            access_log.info("client disconnected during %s %s", scope["method"], scope["path"])
        except Exception:
            request_id = scope.get("state", {}).get("request_id", "")
            error_log.exception("unexpected error in %s %s (request %s)", scope["method"], scope["path"], request_id)
            if started:        # half a response is out: nothing sensible left to send
                raise
            await reject(scope, send, 500, f"internal error; quote request id {request_id} when reporting it")


async def reject(scope: Scope, send: Send, status: int, detail: str, headers: dict[str, Any] | None = None) -> None:
    """A JSON error answered by middleware; the Open Inference Protocol's routes (/v2) get its
    `{"error": ...}` form, the rest `{"detail": ...}`."""
    field = "error" if scope["path"] == "/v2" or scope["path"].startswith("/v2/") else "detail"
    body = json.dumps({field: detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
