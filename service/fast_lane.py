"""The lean path for the hottest request: one image as the raw body of `POST /anomaly-score`, with
no query string or only `fpr`. Such a request skips FastAPI's routing, dependency solving and
thread hand-offs, which cost more than the model itself for a small image (benchmarks/serving). It
is otherwise the same request: the middleware around it (metrics, access log, API keys, limits)
applies, the verdicts come from the same function as the route's, and its errors are the same
JSON, so a client cannot tell the two paths apart except by speed. Any other request goes on to
the app.

A small image is decoded right on the event loop: a 28x28 PNG takes about 60 µs, less than the
hop to a thread and back. An image whose header declares more than `inline_decode_pixels` is
decoded on a thread, so a large upload never stalls other requests.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import numpy as np
import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from . import codecs
from .codecs import ImageSpec
from .deps import serving_inference
from .errors import ServiceError
from .metrics import Metrics
from .middleware import reject
from .responses import anomaly_verdicts
from .settings import Settings

PATH = "/anomaly-score"
JSON_HEADERS = [(b"content-type", b"application/json")]
PLAIN_NUMBER = re.compile(rb"\d*\.?\d+(?:[eE][-+]?\d+)?")
# what the metrics read from scope["route"] (the route's path template), as the router would set it
LANE_ROUTE = SimpleNamespace(path=PATH)


def raw_image_body(scope: Scope) -> bool:
    """A body the route would read as one raw image: `image/*` or `application/octet-stream`."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            return kind.startswith(b"image/") or kind == b"application/octet-stream"
    return False


def fpr_of(query_string: bytes, default: float) -> float | None:
    """The false-positive rate of a query the lane takes: none (the default), or only a plain
    `fpr=` number strictly between 0 and 1. None for anything else, left to the app to validate."""
    if not query_string:
        return default
    name, _, value = query_string.partition(b"=")
    if name != b"fpr" or not PLAIN_NUMBER.fullmatch(value):
        return None
    fpr = float(value)
    return fpr if 0 < fpr < 1 else None


class AnomalyScoreLane:
    """Pure ASGI middleware, innermost: answers what it can, hands the rest to the app unchanged."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, inline_decode_pixels: int = 4096) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.inline_decode_pixels = inline_decode_pixels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST" or not raw_image_body(scope):
            return await self.app(scope, receive, send)
        fpr = fpr_of(scope["query_string"], self.settings.default_fpr)
        if fpr is None:
            return await self.app(scope, receive, send)
        scope["route"] = LANE_ROUTE
        body = await read_body(receive)
        try:
            answer = await self._score(scope, body, fpr)
        except ServiceError as error:
            return await reject(scope, send, error.status_code, error.detail, error.headers)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*JSON_HEADERS, (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    async def _score(self, scope: Scope, body: bytes, fpr: float) -> bytes:
        inference = serving_inference(scope["app"])
        inference.users += 1                 # held for the whole request, as the route's dependency does
        try:
            images = await self._decode(body, inference.runtime.input_shape)
            (scores,) = await inference.run("score", images)
            verdicts = anomaly_verdicts(inference.runtime, scores, fpr, self.metrics)
        finally:
            inference.users -= 1
        return orjson.dumps(verdicts)

    async def _decode(self, body: bytes, input_shape: tuple[int, int, int]) -> np.ndarray:
        started = time.perf_counter()
        spec = ImageSpec(*input_shape, max_pixels=self.settings.max_image_pixels)
        image = codecs.open_image(body, spec, "the body")              # the header only
        if image.width * image.height <= self.inline_decode_pixels:
            pixels = codecs.decode_image(image, spec, "the body")
        else:
            pixels = await run_in_threadpool(codecs.decode_image, image, spec, "the body")
        self.metrics.decode_seconds.observe(time.perf_counter() - started)
        return pixels[None]                                            # (1, C, H, W)


async def read_body(receive: Receive) -> bytes:
    """The whole request body (the body limit outside has bounded it already)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
