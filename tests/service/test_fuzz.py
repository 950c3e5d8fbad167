"""Fuzzing against a real server: schemathesis on the app's own OpenAPI document (no 5xx, every
response as documented, auth enforced), and Hypothesis feeding random bytes, odd images and
random JSON to every image endpoint: always a 2xx, or a 4xx with a JSON `detail` (`error` on /v2).
Example counts are small so the module runs in well under a minute on two busy cores."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import positive_data_acceptance

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import serve

KEY = "fuzz-key-0123456789abcdef"
IMAGE_ENDPOINTS = ["/encode", "/reconstruct", "/anomaly-score", "/anomaly-score?map=true&format=png", "/interpolate"]
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
# the schema is the same whatever the settings; building it needs no model
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@pytest.fixture(scope="module")
def fuzz_url(digits_artifact: Path) -> Iterator[str]:
    with serve(model_path=digits_artifact, api_keys=[KEY]) as url:
        yield url


@pytest.fixture(scope="module")
def http(fuzz_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_url, timeout=60, headers={"X-API-Key": KEY}) as client:
        yield client


@schema.parametrize()
@FUZZ
def test_the_openapi_document_holds(case: schemathesis.Case, fuzz_url: str) -> None:
    # positive_data_acceptance is left out: some schema-valid requests are rightly refused for
    # what a schema cannot say (z of the model's latent size, an fpr above 1/(n+1), an artifact
    # that exists); every other check runs, not_a_server_error and the schema conformance included
    case.call_and_validate(base_url=fuzz_url, headers={"X-API-Key": KEY}, excluded_checks=[positive_data_acceptance])


def assert_handled(response: httpx.Response) -> None:
    """2xx, or a 4xx whose JSON says what was wrong; never a 5xx."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        message = body.get("error") if response.url.path.startswith("/v2") else body.get("detail")
        assert isinstance(message, str) and message, body


@FUZZ
@given(blob=st.binary(max_size=2048), endpoint=st.sampled_from(IMAGE_ENDPOINTS),
       media_type=st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "image/gif"]))
def test_random_bytes_as_a_raw_body(http: httpx.Client, blob: bytes, endpoint: str, media_type: str) -> None:
    assert_handled(http.post(endpoint, content=blob, headers={"content-type": media_type}))


@FUZZ
@given(blobs=st.lists(st.binary(max_size=1024), min_size=1, max_size=3), endpoint=st.sampled_from(IMAGE_ENDPOINTS),
       name=st.text(max_size=20))
def test_random_bytes_as_multipart_files(http: httpx.Client, blobs: list[bytes], endpoint: str, name: str) -> None:
    files = [("files", (name or "x", blob, "application/octet-stream")) for blob in blobs]
    assert_handled(http.post(endpoint, files=files))


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]
FORMATS = {"PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}, "TIFF": set(MODES) - {"YCbCr"},
           "JPEG": {"L", "RGB", "CMYK", "YCbCr"}, "BMP": {"1", "L", "P", "RGB"}, "GIF": {"L", "P"},
           "WEBP": {"RGB", "RGBA"}}


@st.composite
def odd_images(draw: st.DrawFn) -> bytes:
    """An encoded image of a random size, mode and format, sometimes with an EXIF rotation."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(sorted(FORMATS[fmt])))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if fmt in {"JPEG", "PNG", "TIFF", "WEBP"} and draw(st.booleans()):
        exif[0x0112] = draw(st.integers(1, 8))              # Orientation
    image.save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


@FUZZ
@given(blobs=st.lists(odd_images(), min_size=1, max_size=2), endpoint=st.sampled_from(IMAGE_ENDPOINTS))
def test_odd_images_are_read_or_refused_clearly(http: httpx.Client, blobs: list[bytes], endpoint: str) -> None:
    files = [("files", (f"{i}.img", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]
    response = http.post(endpoint, files=files)
    assert_handled(response)
    if endpoint != "/interpolate" or len(blobs) == 2:
        assert response.status_code == 200, response.text              # every one of these is a real image


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children,
                                                                                      max_size=4), max_leaves=30)
JSON_ENDPOINTS = [*IMAGE_ENDPOINTS, "/decode", "/sample", "/v2/models/digits/infer"]


@FUZZ
@given(payload=JSON | st.fixed_dictionaries({"images": JSON}) | st.fixed_dictionaries({"z": JSON})
       | st.fixed_dictionaries({"inputs": JSON}), endpoint=st.sampled_from(JSON_ENDPOINTS))
def test_random_json_everywhere(http: httpx.Client, payload: object, endpoint: str) -> None:
    body = json.dumps(payload, allow_nan=True).encode()       # NaN and Infinity too, as Python writes them
    assert_handled(http.post(endpoint, content=body, headers={"content-type": "application/json"}))
