"""Shared resources as FastAPI dependencies, each with an Annotated alias for the handlers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Query, Request

from .codecs import ImageSpec
from .errors import NotReady
from .inference import Inference
from .inputs import read_images
from .metrics import Metrics
from .schemas import ImageFormat
from .settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def current_inference(request: Request) -> Inference:
    """The model being served now (a reload may replace it at any time); 503 while there is none."""
    return serving_inference(request.app)


def serving_inference(app: Any) -> Inference:
    """As current_inference, from the app itself (for code below the routes: the lean path)."""
    inference = app.state.inference
    if inference is None:
        raise NotReady(f"no model is loaded: {app.state.load_error or 'still starting'}")
    return inference


async def get_inference(request: Request) -> AsyncIterator[Inference]:
    """The current model, held for the whole request: a reload swaps in a new one for new requests,
    and stops the old one only once every request holding it is done."""
    inference = current_inference(request)
    inference.users += 1
    try:
        yield inference
    finally:
        inference.users -= 1


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
InferenceDep = Annotated[Inference, Depends(get_inference)]


async def get_images(request: Request, inference: InferenceDep, settings: SettingsDep, metrics: MetricsDep,
                     resize: Annotated[bool, Query(description="resize images of another size to the "
                                                               "model's; false makes that a 422")] = True,
                     ) -> np.ndarray:
    """The request's images as (N, C, H, W) float32, decoded off the event loop."""
    c, h, w = inference.runtime.input_shape
    spec = ImageSpec(c, h, w, resize=resize, max_pixels=settings.max_image_pixels)
    started = time.perf_counter()
    images = await read_images(request, spec, settings.max_images_per_request)
    metrics.decode_seconds.observe(time.perf_counter() - started)
    return images


ImagesDep = Annotated[np.ndarray, Depends(get_images)]
FormatQuery = Annotated[ImageFormat, Query(description="json: nested lists in [0, 1]; png: base64 PNG strings")]
