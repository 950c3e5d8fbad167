"""About the service: /model, /healthz, /readyz, /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from ..deps import InferenceDep, MetricsDep, SettingsDep, current_inference
from ..errors import NotReady
from ..schemas import FastJSONResponse, Status

router = APIRouter(tags=["service"])
REPORTED_FPRS = (0.001, 0.005, 0.01, 0.05, 0.1)
MODEL_EXAMPLE = {
    "name": "digits", "version": "2026-11-29T03:13:22+00:00", "format_version": 1,
    "checksum": {"sha256": "0e86e0624879c564ab4915bc0150d737af8e7a2e090f16278918126e25b9e216", "verified": True},
    "input": {"channels": 1, "height": 8, "width": 8, "color_mode": "L", "value_range": [0.0, 1.0]},
    "latent_dim": 2, "likelihood": "bernoulli", "score": {"kind": "excess", "units": "nats per image"},
    "calibration": {"count": 270, "score_kind": "excess", "default_fpr": 0.01, "threshold": 16.81,
                    "thresholds": {"0.005": 17.58, "0.01": 16.81, "0.05": 13.56, "0.1": 12.20}, "min_fpr": 0.0037},
    "training": {"metrics": {"test_elbo": 25.27}, "command": "python -m training train --data digits --out ..."},
    "limits": {"max_images_per_request": 256, "max_sample_n": 1024},
}
METRICS_EXAMPLE = ('# TYPE vae_http_requests_total counter\n'
                   'vae_http_requests_total{endpoint="/anomaly-score",method="POST",status="200"} 42.0\n')


@router.get("/model", responses={200: {"content": {"application/json": {"example": MODEL_EXAMPLE}}}})
async def model(inference: InferenceDep, settings: SettingsDep) -> Response:
    """The artifact's metadata: identity, input shape, latent size, score, calibration, training."""
    return FastJSONResponse(model_info(inference.runtime, settings))


def model_info(runtime: Any, settings: Any) -> dict[str, Any]:
    meta = runtime.metadata
    scores = runtime.calibration_scores
    return {
        "name": runtime.name,
        "version": meta.get("created"),
        "format_version": meta["format_version"],
        "checksum": {"sha256": runtime.sha256, "verified": settings.verify_checksum},
        "input": meta["input"],
        "latent_dim": runtime.latent_dim,
        "likelihood": meta.get("likelihood"),
        "architecture": meta.get("architecture"),
        "score": meta.get("score", {"kind": runtime.score_kind}),
        "calibration": {
            "count": len(scores), "score_kind": runtime.score_kind, "default_fpr": settings.default_fpr,
            "threshold": runtime.threshold(settings.default_fpr) if settings.default_fpr >= runtime.min_fpr else None,
            "thresholds": {str(f): runtime.threshold(f) for f in REPORTED_FPRS if f >= runtime.min_fpr},
            "min_fpr": runtime.min_fpr,
            "min": float(scores[0]), "median": float(scores[len(scores) // 2]), "max": float(scores[-1]),
            "map_scale": runtime.map_scale,
        },
        "training": {"data": meta.get("data"), "metrics": meta.get("metrics"),
                     "command": meta.get("training", {}).get("command"),
                     "config": meta.get("training", {}).get("config"),
                     "torch": meta.get("training", {}).get("torch")},
        "limits": {"max_images_per_request": settings.max_images_per_request,
                   "max_body_bytes": settings.max_body_bytes, "max_image_pixels": settings.max_image_pixels,
                   "max_sample_n": settings.max_sample_n, "max_interpolate_steps": settings.max_interpolate_steps},
    }


@router.get("/healthz", response_model=Status, response_model_exclude_none=True)
async def healthz() -> Status:
    """200 while the process lives."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"description": "no model loaded or answering"}})
async def readyz(request: Request) -> Status:
    """200 when a model is loaded and its batchers are running, else 503."""
    inference = current_inference(request)
    if not inference.alive():
        raise NotReady("the model loop has stopped")
    return Status(status="ready", model=inference.runtime.name)


@router.get("/metrics", responses={200: {"content": {"text/plain": {"example": METRICS_EXAMPLE}}}})
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
