"""Endpoints that take images: /encode, /reconstruct, /anomaly-score, /interpolate."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from .. import codecs
from ..deps import FormatQuery, ImagesDep, InferenceDep, MetricsDep, SettingsDep
from ..errors import BadInput
from ..inputs import IMAGES_REQUEST_BODY
from ..responses import (
    anomaly_verdicts,
    float32_response,
    images_response,
    verdict_headers,
    wants_float32_body,
    wants_png_body,
)
from ..schemas import (
    AnomalyResponse,
    EncodeResponse,
    FastJSONResponse,
    ImageFormat,
    InterpolateResponse,
    ReconstructResponse,
)

router = APIRouter(tags=["images"])
TAKES_IMAGES = {"requestBody": IMAGES_REQUEST_BODY}


@router.post("/encode", response_model=EncodeResponse, openapi_extra=TAKES_IMAGES)
async def encode(images: ImagesDep, inference: InferenceDep,
                 sample: Annotated[bool, Query(description="also draw z = mu + exp(log_var / 2) * eps")] = False,
                 seed: Annotated[int | None, Query(ge=0, lt=2**63, description="seeds eps")] = None) -> Response:
    """Latent means and log-variances of each image; with sample=true, a draw z as well."""
    mu, log_var = await inference.run("encode", images)
    body = {"mu": mu, "log_var": log_var}
    if sample:
        eps = np.random.default_rng(seed).standard_normal(mu.shape, dtype=np.float32)
        body["z"] = mu + np.exp(0.5 * log_var) * eps
    return FastJSONResponse(body)


@router.post("/reconstruct", response_model=ReconstructResponse, openapi_extra=TAKES_IMAGES)
async def reconstruct(request: Request, images: ImagesDep, inference: InferenceDep, metrics: MetricsDep,
                      format: FormatQuery = ImageFormat.json) -> Response:
    """Each image as the model reconstructs it (decoded at z = mu), with its reconstruction error."""
    recon, errors = await inference.run("reconstruct", images)
    response = await images_response(request, recon, format, metrics, errors=errors)
    response.headers["X-Reconstruction-Errors"] = ",".join(f"{e:.6g}" for e in errors)
    return response


@router.post("/anomaly-score", response_model=AnomalyResponse, openapi_extra=TAKES_IMAGES)
async def anomaly_score(
    request: Request, images: ImagesDep, inference: InferenceDep, settings: SettingsDep, metrics: MetricsDep,
    map: Annotated[bool, Query(description="add a per-pixel anomaly map to each result")] = False,
    fpr: Annotated[float | None, Query(gt=0, lt=1, description="false-positive rate for the threshold "
                                                              "(default VAE_DEFAULT_FPR)")] = None,
    format: Annotated[ImageFormat, Query(description="maps as nested lists (json) or as base64 PNG "
                                                     "heat maps over the input (png)")] = ImageFormat.json,
) -> Response:
    """Anomaly score, conformal p-value and verdict per image, optionally with anomaly maps. With
    map=true and `Accept: application/octet-stream` the body is the maps as float32 (N, H, W) and
    the verdicts travel in headers; with `Accept: image/png` and one image, its heat map."""
    runtime = inference.runtime
    fpr = fpr or settings.default_fpr
    outputs = await inference.run("score_map" if map else "score", images)
    verdicts = anomaly_verdicts(runtime, outputs[0], fpr, metrics)
    results = verdicts["results"]
    if map:
        png_body = wants_png_body(request, len(images))
        if not png_body and wants_float32_body(request):
            return float32_response(outputs[1], verdict_headers(verdicts))
        if format == ImageFormat.png or png_body:
            maps = await run_in_threadpool(_heat_maps, outputs[1], images, runtime.map_scale)
            if png_body:
                return Response(maps[0], media_type="image/png", headers=verdict_headers(verdicts))
            maps = [base64.b64encode(png).decode("ascii") for png in maps]
        else:
            maps = outputs[1]
        for result, anomaly_map in zip(results, maps, strict=True):
            result["map"] = anomaly_map
    return FastJSONResponse(verdicts)


def _heat_maps(maps: np.ndarray, images: np.ndarray, scale: float) -> list[bytes]:
    """Each per-pixel map as a PNG heat map laid over its input image."""
    return [codecs.to_png(codecs.heatmap_overlay(m, image, scale)) for m, image in zip(maps, images, strict=True)]


@router.post("/interpolate", response_model=InterpolateResponse, openapi_extra=TAKES_IMAGES)
async def interpolate(request: Request, images: ImagesDep, inference: InferenceDep, settings: SettingsDep,
                      metrics: MetricsDep, format: FormatQuery = ImageFormat.json,
                      steps: Annotated[int, Query(ge=2, description="images on the path, ends included "
                                                                     "(at most VAE_MAX_INTERPOLATE_STEPS)")] = 8,
                      ) -> Response:
    """Images decoded along the straight line between two images' latent means."""
    if len(images) != 2:
        raise BadInput(f"interpolation needs exactly two images, got {len(images)}")
    if steps > settings.max_interpolate_steps:
        raise BadInput(f"steps = {steps} is above the limit of {settings.max_interpolate_steps}")
    mu, _ = await inference.run("encode", images)
    weights = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    z = (1 - weights) * mu[0] + weights * mu[1]                               # (steps, d)
    (decoded,) = await inference.run("decode", z)
    return await images_response(request, decoded, format, metrics, z=z)
