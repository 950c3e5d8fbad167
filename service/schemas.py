"""Request and response models: the contract of ../shared/API.md as types, with OpenAPI examples.

Responses are serialised straight from NumPy by `FastJSONResponse`; these models describe them
in the OpenAPI document and validate request bodies."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response


class FastJSONResponse(Response):
    """JSON via orjson, NumPy arrays included, with no nested-list conversion on the way."""
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def as_float_list(values: np.ndarray) -> np.ndarray:
    """float32 arrays serialise exactly and compactly; other dtypes are cast."""
    return np.ascontiguousarray(values, dtype=np.float32)


class ImageFormat(StrEnum):
    json = "json"
    png = "png"


# a 2x2 example keeps the docs readable; real images are the model's size
_EXAMPLE_IMAGE = [[0.0, 0.5], [1.0, 0.25]]


class ImagesIn(BaseModel):
    """The JSON input form: each item a base64 image file or nested lists in [0, 1]."""
    images: list[str | list[Any]] = Field(..., min_length=1, examples=[[_EXAMPLE_IMAGE]])


class EncodeResponse(BaseModel):
    mu: list[list[float]] = Field(..., examples=[[[0.12, -1.3]]], description="N x d latent means")
    log_var: list[list[float]] = Field(..., examples=[[[-3.1, -2.8]]], description="N x d log variances")
    z: list[list[float]] | None = Field(None, description="N x d draws, only with sample=true")


class DecodeRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"z": [[0.0, 0.0], [1.0, -0.5]]}]})
    z: list[Any] = Field(..., min_length=1, description="N x d latent vectors (d = the model's latent size)")


class SampleRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"n": 4, "seed": 0, "temperature": 1.0}]})
    n: int = Field(1, gt=0, description="how many images (at most VAE_MAX_SAMPLE_N)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="makes the draw reproducible")
    temperature: float = Field(1.0, gt=0, le=100, description="z ~ N(0, temperature^2 I)")


class ImagesResponse(BaseModel):
    images: list[Any] = Field(..., description="H x W (one channel) or C x H x W nested lists in [0, 1], "
                                                "or base64 PNG strings with format=png")


class ReconstructResponse(ImagesResponse):
    errors: list[float] = Field(..., description="per image: -log p(x | z = mu), nats (the training log's rec)")


class SampleResponse(ImagesResponse):
    z: list[list[float]] = Field(..., description="N x d latents the images were decoded from")


class InterpolateResponse(SampleResponse):
    pass


class AnomalyResult(BaseModel):
    score: float = Field(..., examples=[31.7], description="higher is more anomalous")
    p_value: float = Field(..., examples=[0.0037], description="conformal p-value against the calibration scores")
    is_anomaly: bool = Field(..., examples=[True], description="score > threshold")
    map: Any | None = Field(None, description="H x W per-pixel anomaly (map=true), or a base64 PNG heat map "
                                              "laid over the input (map=true&format=png)")


class AnomalyResponse(BaseModel):
    threshold: float = Field(..., examples=[29.4], description="the calibration score at the false-positive rate")
    fpr: float = Field(..., examples=[0.01], description="false-positive rate the threshold was chosen for")
    score_kind: str = Field(..., examples=["excess"])
    results: list[AnomalyResult]


class Status(BaseModel):
    status: str = Field(..., examples=["ok"])
    model: str | None = None
