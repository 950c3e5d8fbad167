"""Images out, in the form the client asked for: nested lists, base64 PNGs, one PNG body, or raw
float32 (`Accept: application/octet-stream`), so a client can skip JSON entirely."""

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

FLOAT32 = "application/octet-stream"


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


def wants_float32_body(request: Request) -> bool:
    """The client prefers raw float32 bytes to JSON (ties go to JSON: `*/*` means JSON)."""
    accept = request.headers.get("accept", "")
    raw = accept_quality(accept, FLOAT32)
    return raw > 0 and raw > accept_quality(accept, "application/json")


def float32_response(array: np.ndarray, headers: dict[str, str] | None = None) -> Response:
    """The array as little-endian float32 in C order; X-Shape gives its shape (N,C,H,W for images)."""
    body = np.ascontiguousarray(array, dtype="<f4").tobytes()
    shape = {"X-Shape": ",".join(str(size) for size in array.shape), "X-Dtype": "float32"}
    return Response(body, media_type=FLOAT32, headers={**shape, **(headers or {})})


def verdict_headers(verdicts: dict[str, Any]) -> dict[str, str]:
    """The verdicts of /anomaly-score as headers beside a binary body, comma-separated per image."""
    results = verdicts["results"]
    return {"X-Anomaly-Score": ",".join(f"{r['score']:.6g}" for r in results),
            "X-P-Value": ",".join(f"{r['p_value']:.6g}" for r in results),
            "X-Is-Anomaly": ",".join(str(r["is_anomaly"]).lower() for r in results),
            "X-Threshold": f"{verdicts['threshold']:.6g}"}


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
    if wants_float32_body(request):
        return float32_response(images)
    return FastJSONResponse({"images": await encode_images(images, fmt, metrics), **fields})


def anomaly_verdicts(runtime: ModelRuntime, scores: np.ndarray, fpr: float, metrics: Metrics) -> dict[str, Any]:
    """The /anomaly-score body without maps: the threshold at `fpr`, and per image its score,
    conformal p-value and verdict. An fpr the calibration set cannot promise is a 422."""
    try:
        threshold = runtime.threshold(fpr)
    except ValueError as error:
        raise BadInput(str(error)) from None
    # one score at a time in Python: requests hold one image or a few, and for those a handful of
    # NumPy calls (astype, searchsorted, a comparison, three tolist) cost more than the loop
    results = [{"score": score, "p_value": runtime.p_value(score), "is_anomaly": score > threshold}
               for score in scores.tolist()]
    flagged = sum(result["is_anomaly"] for result in results)
    if flagged:                         # a shared counter's write is not free: only when it moves
        metrics.anomalies.inc(flagged)
    for result in results:
        metrics.p_values.observe(result["p_value"])
    return {"threshold": threshold, "fpr": fpr, "score_kind": runtime.score_kind, "results": results}
