"""Endpoints that make images from latents: /decode and /sample."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from .. import codecs
from ..deps import FormatQuery, InferenceDep, MetricsDep, SettingsDep
from ..errors import BadInput
from ..responses import images_response
from ..schemas import DecodeRequest, ImageFormat, ImagesResponse, SampleRequest, SampleResponse

router = APIRouter(tags=["generate"])


@router.post("/decode", response_model=ImagesResponse)
async def decode(request: Request, body: DecodeRequest, inference: InferenceDep, settings: SettingsDep,
                 metrics: MetricsDep, format: FormatQuery = ImageFormat.json) -> Response:
    """The images the decoder expects for each latent vector z."""
    z = codecs.latents_from_json(body.z, inference.runtime.latent_dim, settings.max_images_per_request)
    (images,) = await inference.run("decode", z)
    return await images_response(request, images, format, metrics)


@router.post("/sample", response_model=SampleResponse)
async def sample(request: Request, body: SampleRequest, inference: InferenceDep, settings: SettingsDep,
                 metrics: MetricsDep, format: FormatQuery = ImageFormat.json) -> Response:
    """New images: z drawn from N(0, temperature^2 I), seeded for reproducibility, then decoded."""
    if body.n > settings.max_sample_n:
        raise BadInput(f"n = {body.n} is above the limit of {settings.max_sample_n} (VAE_MAX_SAMPLE_N)")
    rng = np.random.default_rng(body.seed)
    z = body.temperature * rng.standard_normal((body.n, inference.runtime.latent_dim), dtype=np.float32)
    (images,) = await inference.run("decode", z.astype(np.float32))
    return await images_response(request, images, format, metrics, z=z)
