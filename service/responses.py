"""Images out, in the form the client asked for: nested lists, base64 PNGs, or one PNG body."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from . import codecs
from .errors import BadInput
from .metrics import Metrics
from .runtime import ModelRuntime
from .schemas import FastJSONResponse, ImageFormat


def accept_quality(accept: str, media_type: str) -> float:
    """The q-value an Accept header gives a media type, by its most specific matching entry."""
    best, best_specificity = 0.0, -1
    major = media_type.split("/")[0]
    for entry in accept.split(","):
        kind, *params = (part.strip() for part in entry.split(";"))
        specificity = {media_type: 2, f"{major}/*": 1, "*/*": 0}.get(kind.lower(), -1)
        if specificity > best_specificity:
            quality = next((p[2:] for p in params if p.startswith("q=")), "1")
            try:
                best, best_specificity = float(quality), specificity
            except ValueError:
                continue
    return best


def wants_png_body(request: Request, count: int) -> bool:
    """Exactly one image, and the client prefers image/png to JSON: the PNG bytes are the body."""
    accept = request.headers.get("accept", "")
    png = accept_quality(accept, "image/png")
    return count == 1 and png > 0 and png > accept_quality(accept, "application/json")


async def encode_images(images: np.ndarray, fmt: ImageFormat, metrics: Metrics) -> Any:
    """(N, C, H, W) as the JSON `images` field: an array (serialised directly) or base64 PNGs."""
    if fmt == ImageFormat.json:
        return codecs.images_as_json(images)
    started = time.perf_counter()
    encoded = await run_in_threadpool(lambda: [codecs.to_base64_png(image) for image in images])
    metrics.encode_seconds.observe(time.perf_counter() - started)
    return encoded


async def images_response(request: Request, images: np.ndarray, fmt: ImageFormat, metrics: Metrics,
                          **fields: Any) -> Response:
    if wants_png_body(request, len(images)):
        return Response(await run_in_threadpool(codecs.to_png, images[0]), media_type="image/png")
    return FastJSONResponse({"images": await encode_images(images, fmt, metrics), **fields})


def anomaly_verdicts(runtime: ModelRuntime, scores: np.ndarray, fpr: float, metrics: Metrics) -> dict[str, Any]:
    """The /anomaly-score body without maps: the threshold at `fpr`, and per image its score,
    conformal p-value and verdict. An fpr the calibration set cannot promise is a 422."""
    try:
        threshold = runtime.threshold(fpr)
    except ValueError as error:
        raise BadInput(str(error)) from None
    scores = scores.astype(np.float64)
    p_values, flagged = runtime.p_values(scores), scores > threshold
    metrics.anomalies.inc(int(flagged.sum()))
    results = [{"score": float(s), "p_value": float(p), "is_anomaly": bool(f)}
               for s, p, f in zip(scores, p_values, flagged, strict=True)]
    return {"threshold": threshold, "fpr": fpr, "score_kind": runtime.score_kind, "results": results}
