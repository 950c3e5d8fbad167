"""Images out, in the form the client asked for: nested lists, base64 PNGs, or one PNG body."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from . import codecs
from .metrics import Metrics
from .schemas import FastJSONResponse, ImageFormat


def wants_png_body(request: Request, count: int) -> bool:
    """`Accept: image/png` and exactly one image: the PNG bytes are the whole body."""
    return count == 1 and "image/png" in request.headers.get("accept", "")


async def encode_images(images: np.ndarray, fmt: ImageFormat, metrics: Metrics) -> Any:
    """(N, C, H, W) as the JSON `images` field: an array (serialised directly) or base64 PNGs."""
    if fmt == ImageFormat.json:
        return codecs.images_as_json(images)
    started = time.perf_counter()
    encoded = await run_in_threadpool(lambda: [codecs.to_base64_png(image) for image in images])
    metrics.codec_seconds.labels("encode").observe(time.perf_counter() - started)
    return encoded


async def images_response(request: Request, images: np.ndarray, fmt: ImageFormat, metrics: Metrics,
                          **fields: Any) -> Response:
    if wants_png_body(request, len(images)):
        return Response(await run_in_threadpool(codecs.to_png, images[0]), media_type="image/png")
    return FastJSONResponse({"images": await encode_images(images, fmt, metrics), **fields})
