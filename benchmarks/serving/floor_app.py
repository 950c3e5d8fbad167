"""The HTTP floor: a raw ASGI app (no framework) answering every request with one constant JSON
body, under the same uvicorn as our service, so "HTTP cost without any work" is known.

The body's size comes from BENCH_FLOOR_BYTES (the size of our /anomaly-score answer for one image).
Run: BENCH_FLOOR_BYTES=120 uvicorn benchmarks.serving.floor_app:app
"""

from __future__ import annotations

import os
from typing import Any

SIZE = int(os.environ.get("BENCH_FLOOR_BYTES", "128"))
_PREFIX = b'{"pad":"'
_SUFFIX = b'"}'
BODY = _PREFIX + b"x" * max(SIZE - len(_PREFIX) - len(_SUFFIX), 0) + _SUFFIX
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Read the whole request body (as a real endpoint must), then send the constant answer."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
