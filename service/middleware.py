"""Pure ASGI middleware: the request-body limit, and per-request metrics, request ids and access logs."""

from __future__ import annotations

import json
import logging
import time
import uuid
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
            return await _reject(scope, send, 413, self._message(int(declared)))
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


class RequestMetricsMiddleware:
    """Counts and times every request by route template (not raw path, to bound label values),
    gives it an id (X-Request-ID, taken from the client or made), and writes one JSON access-log
    line without any request content."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["state"].get("client_disconnected"):
                status = 499                        # nginx's "client closed request"
            self._record(scope, status, time.perf_counter() - started, request_id)

    def _record(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        try:                                # a metric or a log line never fails a request
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(json.dumps({"request_id": request_id, "method": scope["method"],
                                            "path": scope["path"], "status": status,
                                            "ms": round(seconds * 1000, 2)}))
        except Exception:
            pass


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
            await _reject(scope, send, 500, f"internal error; quote request id {request_id} when reporting it")


async def _reject(scope: Scope, send: Send, status: int, detail: str, headers: dict[str, Any] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
