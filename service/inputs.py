"""HTTP requests to image arrays: picks the input form from the Content-Type, reads the body,
and hands the bytes to the codecs off the event loop."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from . import codecs
from .codecs import ImageSpec
from .errors import BadInput, TooLarge, UnsupportedMediaType

ACCEPTED = "multipart/form-data (parts named files), image/* (one image as the body) or application/json"

# what the OpenAPI document says these endpoints take (they read the body themselves)
IMAGES_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {"$ref": "#/components/schemas/ImagesIn"},
                             "example": {"images": [[[0.0, 0.5], [1.0, 0.25]]]}},
    },
}


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(request: Request) -> Any:
    body = await request.body()
    if not body:
        raise BadInput("the request body is empty; expected JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadInput(f"the body is not valid JSON: {error}") from None


async def read_images(request: Request, spec: ImageSpec, max_images: int) -> np.ndarray:
    """All images of the request as one (N, C, H, W) float32 array, in input order."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        return await _from_multipart(request, spec, max_images)
    if kind.startswith("image/") or kind == "application/octet-stream":
        body = await request.body()
        return (await run_in_threadpool(codecs.image_from_bytes, body, spec, "the body"))[None]
    if kind == "application/json" or kind.endswith("+json"):
        payload = await read_json(request)
        return np.stack(await run_in_threadpool(codecs.images_from_json, payload, spec, max_images))
    raise UnsupportedMediaType(f"Content-Type {kind or '(none)'} is not accepted here; send {ACCEPTED}")


async def _from_multipart(request: Request, spec: ImageSpec, max_images: int) -> np.ndarray:
    try:
        form = await request.form(max_files=max_images, max_fields=16)
    except (MultiPartException, HTTPException) as error:   # Starlette turns the first into a 400
        message = str(getattr(error, "detail", None) or error)
        if "too many files" in message.lower():
            raise TooLarge(f"more than {max_images} files in one request; the limit is {max_images}") from None
        raise BadInput(f"the multipart body could not be parsed: {message}") from None
    try:
        parts = form.getlist("files")
        codecs.check_count(len(parts), max_images)
        if not all(isinstance(part, UploadFile) for part in parts):
            raise BadInput("every part named files must be a file upload, not a text field")
        blobs = [await part.read() for part in parts]
    finally:
        await form.close()
    labelled = [(blob, f"file {i} ({part.filename or 'unnamed'})") for i, (blob, part) in
                enumerate(zip(blobs, parts, strict=True))]
    images = await run_in_threadpool(lambda: [codecs.image_from_bytes(b, spec, label) for b, label in labelled])
    return np.stack(images)
