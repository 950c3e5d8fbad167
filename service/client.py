"""A typed Python client for the VAE inference service, on httpx: `VAEClient` (sync) and
`AsyncVAEClient` (async, same methods). Only httpx, NumPy and the standard library.

    from service.client import VAEClient

    with VAEClient("http://127.0.0.1:8000", retries=2) as vae:
        verdicts = vae.anomaly_score(["scan-1.png", "scan-2.png"], fpr=0.05)
        print(verdicts.scores, verdicts.p_values, verdicts.is_anomaly)
        samples = vae.sample(4, seed=0)             # samples.images: (4, C, H, W) float32 in [0, 1]
        codes = vae.encode(samples.images)          # codes.mu: (4, d)

    async with AsyncVAEClient("http://127.0.0.1:8000") as vae:
        ready = await vae.readyz()

Images in (every `images` argument takes one of these):
  * a NumPy array: 2-D `H x W` is one image; 3-D `N x H x W` is a batch of one-channel images;
    4-D `N x C x H x W` is a batch. A 3-D array is never taken for one `C x H x W` image: pass
    that one as `image[None]` or `[image]`.
  * a list or tuple, one item per image: a 2-D `H x W` or 3-D `C x H x W` array, encoded bytes, or a path;
  * the encoded bytes (PNG, JPEG, ...) of one image, or a path (str or os.PathLike) to one image file.
Float arrays hold pixels in [0, 1]; uint8 arrays are divided by 255. A str is always a path.
On the wire: one file (bytes or path) is the raw body; when every image is a file, one multipart
part named `files` each; otherwise JSON `{"images": [...]}`, arrays as nested lists (and any file
among them as base64). Query parameters at the API's defaults are left out, so one file scored
with the defaults takes the server's lean path.

Images out are float32 arrays `N x C x H x W` in [0, 1], for any channel count.

Errors: a non-2xx response raises `VAEServiceError` (`BadRequest` for 4xx, `Overloaded` for 429
and 503, `ServerError` for other 5xx) with the server's `detail`; network errors and timeouts
propagate as httpx errors. With `retries=k`, a 429 or 503 that carries Retry-After is retried up
to k times after the wait the server asked for (a 503 without it, such as "no model loaded", is not).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Self

import httpx
import numpy as np

__all__ = [
    "AnomalyResult", "AnomalyScores", "AsyncVAEClient", "BadRequest", "Encoding", "Interpolation", "ModelInfo",
    "Overloaded", "Reconstruction", "Samples", "ServerError", "VAEClient", "VAEServiceError",
]

ImageInput = np.ndarray | bytes | str | os.PathLike[str]
ImagesInput = ImageInput | Sequence[ImageInput]


# ---- errors ----------------------------------------------------------------------------------

class VAEServiceError(Exception):
    """The service answered with a non-2xx status; `detail` is its explanation."""

    def __init__(self, status_code: int, detail: str, retry_after: float | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.retry_after = retry_after          # seconds, when the server sent Retry-After
        self.request_id = request_id            # X-Request-ID: quote it when reporting a 5xx


class BadRequest(VAEServiceError):
    """4xx (other than 429): the request was wrong; the detail says what was expected."""


class Overloaded(VAEServiceError):
    """429 or 503: the service is busy (with Retry-After) or not ready (without it)."""


class ServerError(VAEServiceError):
    """5xx other than 503: the service failed; quote `request_id` when reporting it."""


def error_from_response(response: httpx.Response) -> VAEServiceError:
    """The exception for a non-2xx response, of the class of its status family."""
    status = response.status_code
    kind = Overloaded if status in (429, 503) else BadRequest if status < 500 else ServerError
    return kind(status, _detail(response), _retry_after(response.headers.get("retry-after")),
                response.headers.get("x-request-id"))


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return response.text or response.reason_phrase
    return detail if isinstance(detail, str) else str(detail)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: either delay-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _should_retry(error: VAEServiceError, attempt: int, retries: int) -> bool:
    return isinstance(error, Overloaded) and error.retry_after is not None and attempt < retries


# ---- results ---------------------------------------------------------------------------------
# eq=False: == on dataclasses of arrays would compare arrays element-wise and fail on truth value

def _floats(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _images(value: Any) -> np.ndarray:
    """The JSON `images` field as (N, C, H, W): the contract drops C for one channel."""
    images = _floats(value)
    return images[:, None] if images.ndim == 3 else images


@dataclass(frozen=True, eq=False)
class Encoding:
    """Latent means and log-variances (N x d); z (N x d) only when sampled."""
    mu: np.ndarray
    log_var: np.ndarray
    z: np.ndarray | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Encoding:
        z = body.get("z")
        return cls(_floats(body["mu"]), _floats(body["log_var"]), None if z is None else _floats(z))


@dataclass(frozen=True, eq=False)
class Reconstruction:
    """Reconstructed images (N x C x H x W) and each one's reconstruction error (N, nats)."""
    images: np.ndarray
    errors: np.ndarray

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Reconstruction:
        return cls(_images(body["images"]), np.asarray(body["errors"], dtype=np.float64))


@dataclass(frozen=True, eq=False)
class Samples:
    """Generated images (N x C x H x W) and the latents they were decoded from (N x d)."""
    images: np.ndarray
    z: np.ndarray

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(_images(body["images"]), _floats(body["z"]))


@dataclass(frozen=True, eq=False)
class Interpolation(Samples):
    """Images (K x C x H x W) along the line from the first image's latent mean to the second's (K x d)."""


@dataclass(frozen=True, eq=False)
class AnomalyResult:
    """One image's verdict: higher score is more anomalous; `map` (H x W) only when asked for."""
    score: float
    p_value: float
    is_anomaly: bool
    map: np.ndarray | None = None

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> AnomalyResult:
        anomaly_map = item.get("map")
        return cls(float(item["score"]), float(item["p_value"]), bool(item["is_anomaly"]),
                   None if anomaly_map is None else _floats(anomaly_map))


@dataclass(frozen=True, eq=False)
class AnomalyScores:
    """The threshold used (for false-positive rate `fpr`) and one result per image, in input order."""
    threshold: float
    fpr: float
    score_kind: str
    results: tuple[AnomalyResult, ...]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> AnomalyScores:
        return cls(float(body["threshold"]), float(body["fpr"]), str(body["score_kind"]),
                   tuple(AnomalyResult.from_json(item) for item in body["results"]))

    def __len__(self) -> int:
        return len(self.results)

    @property
    def scores(self) -> np.ndarray:
        return np.array([r.score for r in self.results], dtype=np.float64)

    @property
    def p_values(self) -> np.ndarray:
        return np.array([r.p_value for r in self.results], dtype=np.float64)

    @property
    def is_anomaly(self) -> np.ndarray:
        return np.array([r.is_anomaly for r in self.results], dtype=bool)

    @property
    def maps(self) -> np.ndarray | None:
        """N x H x W anomaly maps, or None when they were not asked for."""
        if not self.results or self.results[0].map is None:
            return None
        return np.stack([r.map for r in self.results])


@dataclass(frozen=True)
class ModelInfo:
    """The served artifact's key facts; `raw` is all of GET /model."""
    name: str
    version: str | None
    input_shape: tuple[int, int, int]           # (C, H, W)
    latent_dim: int
    score_kind: str
    default_fpr: float
    threshold: float | None                     # at default_fpr; None when calibration is too small for it
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelInfo:
        shape, calibration = body["input"], body["calibration"]
        return cls(body["name"], body.get("version"), (shape["channels"], shape["height"], shape["width"]),
                   int(body["latent_dim"]), str(calibration["score_kind"]), float(calibration["default_fpr"]),
                   None if calibration["threshold"] is None else float(calibration["threshold"]), body)


# ---- requests --------------------------------------------------------------------------------

class _File(NamedTuple):
    name: str
    data: bytes


def _pixels(array: np.ndarray) -> np.ndarray:
    return array / np.float32(255) if array.dtype == np.uint8 else np.asarray(array, dtype=np.float32)


def _one_image(image: ImageInput, index: int) -> np.ndarray | _File:
    """One image as float pixels (H x W or C x H x W) or as a file's bytes."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"image {index} has shape {image.shape}; one image is H x W or C x H x W")
        return _pixels(image)
    if isinstance(image, bytes | bytearray | memoryview):
        return _File(f"image-{index}", bytes(image))
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return _File(path.name, path.read_bytes())
    raise TypeError(f"image {index} is a {type(image).__name__}; expected a NumPy array, bytes or a path")


def _split(images: ImagesInput) -> list[np.ndarray | _File]:
    """The images of an `images` argument, in order (the module docstring has the rules)."""
    if isinstance(images, np.ndarray):
        if images.ndim == 2:
            return [_pixels(images)]
        if images.ndim in (3, 4):               # N x H x W or N x C x H x W
            return [_pixels(image) for image in images]
        raise ValueError(f"images have shape {images.shape}; expected H x W, N x H x W or N x C x H x W")
    if isinstance(images, bytes | bytearray | memoryview | str | os.PathLike):
        return [_one_image(images, 0)]
    if isinstance(images, Sequence):
        return [_one_image(image, i) for i, image in enumerate(images)]
    raise TypeError(f"images is a {type(images).__name__}; expected an array, bytes, a path, or a list of them")


def _image_body(items: list[np.ndarray | _File]) -> dict[str, Any]:
    """httpx keyword arguments: one file as the raw body, multipart when every image is a file,
    JSON otherwise."""
    if len(items) == 1 and isinstance(items[0], _File):
        return {"content": items[0].data, "headers": {"Content-Type": "application/octet-stream"}}
    if items and all(isinstance(item, _File) for item in items):
        return {"files": [("files", (item.name, item.data, "application/octet-stream")) for item in items]}
    return {"json": {"images": [item.tolist() if isinstance(item, np.ndarray)
                                else base64.b64encode(item.data).decode("ascii") for item in items]}}


# the API's defaults, left out of the query: one raw image to /anomaly-score with no query but fpr
# takes the server's lean path
API_DEFAULTS = {"resize": True, "map": False, "format": "json", "sample": False}


def _query(params: Mapping[str, Any]) -> dict[str, Any]:
    """Query parameters without the unset ones (httpx would send `seed=` for None) or the defaults."""
    return {key: value for key, value in params.items()
            if value is not None and not (key in API_DEFAULTS and value == API_DEFAULTS[key])}


def _sample_body(n: int, seed: int | None, temperature: float) -> dict[str, Any]:
    # plain Python numbers: json cannot serialise NumPy integers such as a seed from an array
    return {"n": int(n), "seed": None if seed is None else int(seed), "temperature": float(temperature)}


def _default_headers(headers: Mapping[str, str] | None, api_key: str | None) -> dict[str, str]:
    # JSON, never the single-image PNG body the server gives to Accept: image/png
    merged = {"Accept": "application/json", **(headers or {})}
    if api_key is not None:
        merged["Authorization"] = f"Bearer {api_key}"
    return merged


# ---- clients ---------------------------------------------------------------------------------

class VAEClient:
    """Blocking client. `transport` replaces httpx's (e.g. `httpx.HTTPTransport(retries=...)`)."""

    def __init__(self, base_url: str, *, timeout: float | httpx.Timeout = 30.0,
                 headers: Mapping[str, str] | None = None, api_key: str | None = None,
                 transport: httpx.BaseTransport | None = None, retries: int = 0) -> None:
        self.retries = retries
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=_default_headers(headers, api_key),
                                  transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, params: Mapping[str, Any] | None = None, **body: Any) -> httpx.Response:
        """The 2xx response, or the error it became after `retries` retries of a busy service."""
        attempt = 0
        while True:
            response = self._http.request(method, path, params=_query(params or {}), **body)
            if response.is_success:
                return response
            error = error_from_response(response)
            if not _should_retry(error, attempt, self.retries):
                raise error
            time.sleep(error.retry_after)
            attempt += 1

    def _post_images(self, path: str, images: ImagesInput, **params: Any) -> Any:
        return self._send("POST", path, params, **_image_body(_split(images))).json()

    def encode(self, images: ImagesInput, *, sample: bool = False, seed: int | None = None,
               resize: bool = True) -> Encoding:
        """Latent means and log-variances; with sample=True also z = mu + sigma * eps, seeded by `seed`."""
        return Encoding.from_json(self._post_images("/encode", images, sample=sample, seed=seed, resize=resize))

    def decode(self, z: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """Images (N x C x H x W) for latents z (N x d, or one d-vector)."""
        z_list = np.asarray(z, dtype=np.float32).tolist()
        return _images(self._send("POST", "/decode", {"format": "json"}, json={"z": z_list}).json()["images"])

    def reconstruct(self, images: ImagesInput, *, resize: bool = True) -> Reconstruction:
        """Each image decoded at its latent mean, with its reconstruction error."""
        return Reconstruction.from_json(self._post_images("/reconstruct", images, resize=resize, format="json"))

    def sample(self, n: int, *, seed: int | None = None, temperature: float = 1.0) -> Samples:
        """n new images from z ~ N(0, temperature^2 I); the same seed gives the same images."""
        body = _sample_body(n, seed, temperature)
        return Samples.from_json(self._send("POST", "/sample", {"format": "json"}, json=body).json())

    def anomaly_score(self, images: ImagesInput, *, fpr: float | None = None, map: bool = False,
                      resize: bool = True) -> AnomalyScores:
        """Score, p-value and verdict per image, at the threshold for `fpr` (default: the server's)."""
        return AnomalyScores.from_json(self._post_images("/anomaly-score", images, fpr=fpr, map=map,
                                                         resize=resize, format="json"))

    def interpolate(self, first: ImageInput, second: ImageInput, *, steps: int = 8,
                    resize: bool = True) -> Interpolation:
        """`steps` images decoded on the straight line between two images' latent means, ends included.
        Each of first and second is one image, so a 3-D array here is C x H x W."""
        items = [_one_image(first, 0), _one_image(second, 1)]
        body = self._send("POST", "/interpolate", {"steps": steps, "resize": resize, "format": "json"},
                          **_image_body(items)).json()
        return Interpolation.from_json(body)

    def model_info(self) -> ModelInfo:
        """The served artifact's metadata."""
        return ModelInfo.from_json(self._send("GET", "/model").json())

    def healthz(self) -> dict[str, Any]:
        """The liveness answer ({"status": "ok"}); raises if the service answers otherwise."""
        return self._send("GET", "/healthz").json()

    def readyz(self) -> bool:
        """True when a model is loaded and answering, False on 503; other failures raise."""
        response = self._http.get("/readyz")
        if response.status_code == 503:
            return False
        if not response.is_success:
            raise error_from_response(response)
        return True

    def metrics(self) -> str:
        """The Prometheus text exposition."""
        return self._send("GET", "/metrics").text


class AsyncVAEClient:
    """Non-blocking client with VAEClient's methods, awaited. Retry waits use asyncio.sleep, and
    paths are read with blocking file I/O (images are small)."""

    def __init__(self, base_url: str, *, timeout: float | httpx.Timeout = 30.0,
                 headers: Mapping[str, str] | None = None, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, retries: int = 0) -> None:
        self.retries = retries
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout,
                                       headers=_default_headers(headers, api_key), transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                    **body: Any) -> httpx.Response:
        """The 2xx response, or the error it became after `retries` retries of a busy service."""
        attempt = 0
        while True:
            response = await self._http.request(method, path, params=_query(params or {}), **body)
            if response.is_success:
                return response
            error = error_from_response(response)
            if not _should_retry(error, attempt, self.retries):
                raise error
            await asyncio.sleep(error.retry_after)
            attempt += 1

    async def _post_images(self, path: str, images: ImagesInput, **params: Any) -> Any:
        return (await self._send("POST", path, params, **_image_body(_split(images)))).json()

    async def encode(self, images: ImagesInput, *, sample: bool = False, seed: int | None = None,
                     resize: bool = True) -> Encoding:
        """As VAEClient.encode."""
        return Encoding.from_json(await self._post_images("/encode", images, sample=sample, seed=seed,
                                                          resize=resize))

    async def decode(self, z: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """As VAEClient.decode."""
        z_list = np.asarray(z, dtype=np.float32).tolist()
        response = await self._send("POST", "/decode", {"format": "json"}, json={"z": z_list})
        return _images(response.json()["images"])

    async def reconstruct(self, images: ImagesInput, *, resize: bool = True) -> Reconstruction:
        """As VAEClient.reconstruct."""
        return Reconstruction.from_json(await self._post_images("/reconstruct", images, resize=resize,
                                                                format="json"))

    async def sample(self, n: int, *, seed: int | None = None, temperature: float = 1.0) -> Samples:
        """As VAEClient.sample."""
        body = _sample_body(n, seed, temperature)
        return Samples.from_json((await self._send("POST", "/sample", {"format": "json"}, json=body)).json())

    async def anomaly_score(self, images: ImagesInput, *, fpr: float | None = None, map: bool = False,
                            resize: bool = True) -> AnomalyScores:
        """As VAEClient.anomaly_score."""
        return AnomalyScores.from_json(await self._post_images("/anomaly-score", images, fpr=fpr, map=map,
                                                               resize=resize, format="json"))

    async def interpolate(self, first: ImageInput, second: ImageInput, *, steps: int = 8,
                          resize: bool = True) -> Interpolation:
        """As VAEClient.interpolate."""
        items = [_one_image(first, 0), _one_image(second, 1)]
        response = await self._send("POST", "/interpolate", {"steps": steps, "resize": resize, "format": "json"},
                                    **_image_body(items))
        return Interpolation.from_json(response.json())

    async def model_info(self) -> ModelInfo:
        """As VAEClient.model_info."""
        return ModelInfo.from_json((await self._send("GET", "/model")).json())

    async def healthz(self) -> dict[str, Any]:
        """As VAEClient.healthz."""
        return (await self._send("GET", "/healthz")).json()

    async def readyz(self) -> bool:
        """As VAEClient.readyz."""
        response = await self._http.get("/readyz")
        if response.status_code == 503:
            return False
        if not response.is_success:
            raise error_from_response(response)
        return True

    async def metrics(self) -> str:
        """As VAEClient.metrics."""
        return (await self._send("GET", "/metrics")).text
