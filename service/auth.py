"""Optional API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, checked by a pure ASGI
middleware before any body is read, so an unauthenticated client cannot make the service parse
16 MiB of JSON first. Every path needs a key except the open ones listed here (deny by default:
a route added later is protected without anyone remembering to).

Keys are compared as SHA-256 digests with hmac.compare_digest against every configured key,
without stopping at a match: the time taken says neither which key matched nor how long keys are.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from .middleware import PROBE_PATHS, reject

# health probes (kubelet and KServe hold no secrets), the page and its assets (their API calls
# still need a key), and the API's own documentation
OPEN_PATHS = PROBE_PATHS | {"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico"}
OPEN_PREFIXES = ("/static/",)
METRICS_PATH = "/metrics"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="vae-service"'}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an API key from VAE_API_KEYS"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "an API key from VAE_API_KEYS"},
}


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """The configured keys, kept only as digests."""

    def __init__(self, keys: Iterable[SecretStr]) -> None:
        self._digests = [digest(key.get_secret_value()) for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, presented: str) -> bool:
        candidate = digest(presented)
        matched = False
        for known in self._digests:           # no early exit: every key is compared every time
            matched |= hmac.compare_digest(candidate, known)
        return matched


def presented_keys(headers: dict[bytes, bytes]) -> list[str | None]:
    """Every credential a request carries: a Bearer token and an X-API-Key, each when present
    (None for an Authorization header that is not a Bearer token: a wrong credential)."""
    keys: list[str | None] = []
    if b"authorization" in headers:
        scheme, _, token = headers[b"authorization"].decode("latin-1").strip().partition(" ")
        keys.append(token.strip() or None if scheme.lower() == "bearer" else None)
    if b"x-api-key" in headers:
        keys.append(headers[b"x-api-key"].decode("latin-1").strip() or None)
    return keys


def is_open(path: str, public_metrics: bool) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or (public_metrics and path == METRICS_PATH)


class APIKeyMiddleware:
    """401 with `WWW-Authenticate: Bearer` for a request to a protected path without a valid key."""

    def __init__(self, app: ASGIApp, keys: KeyRing, public_metrics: bool) -> None:
        self.app = app
        self.keys = keys
        self.public_metrics = public_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or is_open(scope["path"], self.public_metrics):
            return await self.app(scope, receive, send)
        keys = presented_keys(dict(scope.get("headers") or []))
        if not keys:
            return await reject(scope, send, 401, "this endpoint needs an API key: send Authorization: Bearer "
                                                  "<key> or X-API-Key: <key>", CHALLENGE)
        # every credential sent must be valid: a wrong one beside a right one is still refused
        valid = [key is not None and self.keys.accepts(key) for key in keys]
        if not all(valid):
            return await reject(scope, send, 401, "the API key is not valid", CHALLENGE)
        await self.app(scope, receive, send)


def add_security_to_openapi(schema: dict[str, Any], public_metrics: bool) -> dict[str, Any]:
    """Declare both schemes, and require one of them on every protected operation, so /docs shows an
    Authorize button and a lock on what needs a key."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    for path, operations in schema.get("paths", {}).items():
        if is_open(path, public_metrics):
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
            operation.setdefault("responses", {})["401"] = {
                "description": "no API key, or not a valid one (only when the server has VAE_API_KEYS set)"}
    return schema
