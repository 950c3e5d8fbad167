"""service.client against the real server: every method, sync and async, every input kind, results
equal to what the raw HTTP API returns for the same input, seeds, error mapping and retries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.client import (
    AnomalyScores,
    AsyncVAEClient,
    BadRequest,
    Overloaded,
    VAEClient,
    VAEServiceError,
)

from .conftest import png_bytes, serve

# the model runs in batches; the same input may meet other batch sizes, so allow float noise
CLOSE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture()
def vae(base_url: str) -> Iterator[VAEClient]:
    with VAEClient(base_url) as client:
        yield client


def raw_post(client: httpx.Client, path: str, params: dict[str, Any] | None = None, **body: Any) -> Any:
    """The JSON of a plain httpx POST, which must succeed."""
    response = client.post(path, params=params, **body)
    assert response.status_code == 200, response.text
    return response.json()


def raw_images(client: httpx.Client, path: str, images: np.ndarray, **params: Any) -> Any:
    """POST (N, H, W) pixels as the contract's JSON form."""
    return raw_post(client, path, params, json={"images": images.tolist()})


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# each kind: (digits, tmp_path) -> (the client's `images` argument, the same pixels as (N, H, W))
InputKind = Callable[[np.ndarray, Path], tuple[Any, np.ndarray]]
INPUT_KINDS: dict[str, InputKind] = {
    "batch NxHxW": lambda d, tmp: (d[:3], d[:3]),
    "batch NxCxHxW": lambda d, tmp: (d[:3, None], d[:3]),
    "one HxW": lambda d, tmp: (d[0], d[:1]),
    "list of HxW and CxHxW": lambda d, tmp: ([d[0], d[1][None]], d[:2]),
    "uint8 batch": lambda d, tmp: (np.rint(d[:2] * 255).astype(np.uint8), d[:2]),
    "bytes": lambda d, tmp: (png_bytes(d[0]), d[:1]),
    "list of bytes": lambda d, tmp: ([png_bytes(d[0]), png_bytes(d[1])], d[:2]),
    "path": lambda d, tmp: (write(tmp / "a.png", png_bytes(d[0])), d[:1]),
    "str paths": lambda d, tmp: ([str(write(tmp / f"{i}.png", png_bytes(d[i]))) for i in range(3)], d[:3]),
    "mixed list": lambda d, tmp: ([d[0], png_bytes(d[1]), write(tmp / "c.png", png_bytes(d[2]))], d[:3]),
}


# ---- sync, method by method ------------------------------------------------------------------

@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_encode_accepts_every_input_kind(vae: VAEClient, client: httpx.Client, digit_images: np.ndarray,
                                         tmp_path: Path, kind: str) -> None:
    images, pixels = INPUT_KINDS[kind](digit_images, tmp_path)
    encoding = vae.encode(images)
    expected = raw_images(client, "/encode", pixels)
    assert encoding.mu.shape == (len(pixels), 2) and encoding.mu.dtype == np.float32
    np.testing.assert_allclose(encoding.mu, expected["mu"], **CLOSE)
    np.testing.assert_allclose(encoding.log_var, expected["log_var"], **CLOSE)
    assert encoding.z is None


def test_encode_sample_is_reproducible_with_seed(vae: VAEClient, client: httpx.Client,
                                                 digit_images: np.ndarray) -> None:
    images = digit_images[:4]
    first, again = vae.encode(images, sample=True, seed=3), vae.encode(images, sample=True, seed=3)
    other = vae.encode(images, sample=True, seed=4)
    np.testing.assert_array_equal(first.z, again.z)
    assert not np.allclose(first.z, other.z)
    expected = raw_images(client, "/encode", images, sample="true", seed=3)
    np.testing.assert_allclose(first.z, expected["z"], **CLOSE)


def test_decode_matches_raw_api(vae: VAEClient, client: httpx.Client, digit_images: np.ndarray) -> None:
    z = vae.encode(digit_images[:5]).mu
    images = vae.decode(z)
    expected = np.asarray(raw_post(client, "/decode", json={"z": z.tolist()})["images"])
    assert images.shape == (5, 1, 8, 8) and images.dtype == np.float32      # C restored for one channel
    np.testing.assert_allclose(images, expected[:, None], **CLOSE)
    np.testing.assert_allclose(vae.decode(z[0]), images[:1], **CLOSE)       # one d-vector is one row


def test_reconstruct_matches_raw_api(vae: VAEClient, client: httpx.Client, digit_images: np.ndarray) -> None:
    reconstruction = vae.reconstruct(digit_images[:6])
    expected = raw_images(client, "/reconstruct", digit_images[:6])
    assert reconstruction.images.shape == (6, 1, 8, 8)
    np.testing.assert_allclose(reconstruction.images[:, 0], expected["images"], **CLOSE)
    np.testing.assert_allclose(reconstruction.errors, expected["errors"], **CLOSE)


def test_sample_is_reproducible_and_matches_raw_api(vae: VAEClient, client: httpx.Client) -> None:
    samples, again = vae.sample(3, seed=7), vae.sample(3, seed=7)
    np.testing.assert_array_equal(samples.images, again.images)
    expected = raw_post(client, "/sample", json={"n": 3, "seed": 7})
    assert samples.images.shape == (3, 1, 8, 8) and samples.z.shape == (3, 2)
    np.testing.assert_allclose(samples.images[:, 0], expected["images"], **CLOSE)
    np.testing.assert_allclose(samples.z, expected["z"], **CLOSE)
    np.testing.assert_allclose(vae.sample(3, seed=7, temperature=2.0).z, 2 * samples.z, **CLOSE)
    assert not np.allclose(vae.sample(3, seed=8).z, samples.z)


def test_anomaly_score_matches_raw_api(vae: VAEClient, client: httpx.Client, digit_images: np.ndarray) -> None:
    scores = vae.anomaly_score(digit_images)
    expected = raw_images(client, "/anomaly-score", digit_images)
    assert len(scores) == len(digit_images) and scores.maps is None
    np.testing.assert_allclose(scores.scores, [r["score"] for r in expected["results"]], **CLOSE)
    np.testing.assert_allclose(scores.p_values, [r["p_value"] for r in expected["results"]], **CLOSE)
    assert (scores.threshold, scores.fpr, scores.score_kind) == (expected["threshold"], 0.01, "excess")
    np.testing.assert_array_equal(scores.is_anomaly, scores.scores > scores.threshold)


def test_anomaly_score_with_fpr_and_maps(vae: VAEClient, client: httpx.Client, tmp_path: Path,
                                         digit_images: np.ndarray) -> None:
    paths = [write(tmp_path / f"{i}.png", png_bytes(image)) for i, image in enumerate(digit_images[:3])]
    scores = vae.anomaly_score(paths, fpr=0.1, map=True)
    expected = raw_images(client, "/anomaly-score", digit_images[:3], fpr=0.1, map="true")
    assert scores.fpr == 0.1 and scores.threshold == expected["threshold"]
    assert scores.maps.shape == (3, 8, 8)
    np.testing.assert_allclose(scores.maps, [r["map"] for r in expected["results"]], **CLOSE)
    np.testing.assert_allclose(scores.scores, [r["score"] for r in expected["results"]], **CLOSE)


def test_interpolate_matches_raw_api(vae: VAEClient, client: httpx.Client, digit_images: np.ndarray) -> None:
    first, second = digit_images[0], digit_images[1]
    path = vae.interpolate(first[None], png_bytes(second), steps=5)         # a C x H x W array and a PNG
    expected = raw_post(client, "/interpolate", {"steps": 5}, json={"images": [first.tolist(), second.tolist()]})
    assert path.images.shape == (5, 1, 8, 8) and path.z.shape == (5, 2)
    np.testing.assert_allclose(path.images[:, 0], expected["images"], **CLOSE)
    np.testing.assert_allclose(path.z[[0, -1]], vae.encode(digit_images[:2]).mu, **CLOSE)
    assert len(vae.interpolate(png_bytes(first), png_bytes(second)).images) == 8


def test_resize_false_refuses_another_size(vae: VAEClient, client: httpx.Client) -> None:
    big = np.full((16, 16), 0.5, dtype=np.float32)
    with pytest.raises(BadRequest) as caught:
        vae.encode(big, resize=False)
    assert caught.value.status_code == 422 and "resize=false" in caught.value.detail
    np.testing.assert_allclose(vae.encode(big).mu, raw_images(client, "/encode", big[None])["mu"], **CLOSE)


def test_model_info_matches_raw_api(vae: VAEClient, client: httpx.Client, digit_images: np.ndarray) -> None:
    info = vae.model_info()
    assert info.raw == client.get("/model").json()
    assert info.input_shape == (1, 8, 8) and info.latent_dim == vae.encode(digit_images[0]).mu.shape[1]
    assert (info.score_kind, info.default_fpr) == ("excess", 0.01)
    assert info.threshold == vae.anomaly_score(digit_images[0]).threshold


def test_healthz_readyz_and_metrics(vae: VAEClient) -> None:
    assert vae.healthz()["status"] == "ok"
    assert vae.readyz() is True
    text = vae.metrics()
    assert "# TYPE" in text and "/healthz" in text


# ---- errors, headers, retries ----------------------------------------------------------------

def test_decode_with_wrong_latent_size_raises_the_server_detail(vae: VAEClient, client: httpx.Client) -> None:
    raw = client.post("/decode", json={"z": [[0.0, 0.0, 0.0]]})
    with pytest.raises(BadRequest) as caught:
        vae.decode(np.zeros((1, 3)))
    assert caught.value.status_code == raw.status_code == 422
    assert caught.value.detail == raw.json()["detail"]
    assert caught.value.request_id


@pytest.mark.parametrize(("n", "expected"), [(0, "greater than 0"), (5000, "above the limit")])
def test_sample_with_bad_n_raises_bad_request(vae: VAEClient, n: int, expected: str) -> None:
    with pytest.raises(BadRequest) as caught:
        vae.sample(n)
    assert caught.value.status_code == 422 and expected in caught.value.detail


def test_bad_inputs_fail_before_sending(vae: VAEClient, digit_images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="shape"):
        vae.encode(digit_images[None, None])                                 # 5-D
    with pytest.raises(TypeError, match="NumPy array, bytes or a path"):
        vae.encode([digit_images[0].tolist()])                               # nested lists, not an array


class RecordingTransport(httpx.HTTPTransport):
    """The real transport, keeping each request it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return super().handle_request(request)


def test_api_key_and_headers_are_sent(base_url: str) -> None:
    transport = RecordingTransport()
    with VAEClient(base_url, api_key="secret", headers={"X-Team": "search"}, transport=transport) as vae:
        vae.healthz()
    headers = transport.sent[0].headers
    assert headers["authorization"] == "Bearer secret" and headers["x-team"] == "search"
    assert headers["accept"] == "application/json"


def test_server_without_model_is_not_ready(tmp_path: Path, digit_images: np.ndarray) -> None:
    with serve(model_path=tmp_path / "missing.pt") as url, VAEClient(url, retries=3) as vae:
        assert vae.readyz() is False and vae.healthz()["status"] == "ok"
        started = time.perf_counter()
        with pytest.raises(Overloaded) as caught:
            vae.encode(digit_images[:2])
        assert time.perf_counter() - started < 1                            # no Retry-After: not retried
    assert caught.value.status_code == 503 and caught.value.retry_after is None
    assert "no model" in caught.value.detail


async def _burst(url: str, retries: int, images: np.ndarray, count: int = 8) -> list[Any]:
    async with AsyncVAEClient(url, retries=retries) as vae:
        await vae.encode(images[:2])                     # the batcher learns its speed: admission turns on
        calls = [vae.anomaly_score(images) for _ in range(count)]
        return await asyncio.gather(*calls, return_exceptions=True)


def test_overloaded_is_raised_and_retried(digits_artifact: Path) -> None:
    images = np.random.default_rng(0).random((256, 8, 8), dtype=np.float32)
    # a queue wait of ~0 admits a request only to an idle model: a burst gets 503s
    with serve(model_path=digits_artifact, max_queue_wait_s=1e-6) as url:
        refused = []
        for _ in range(5):
            refused = [r for r in asyncio.run(_burst(url, 0, images)) if isinstance(r, VAEServiceError)]
            if refused:
                break
        assert refused and all(isinstance(e, Overloaded) for e in refused)
        assert refused[0].status_code == 503 and refused[0].retry_after >= 1
        retried = asyncio.run(_burst(url, 10, images))
        assert all(isinstance(r, AnomalyScores) for r in retried), retried
        with VAEClient(url, retries=10) as vae, ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(lambda _: vae.anomaly_score(images), range(4)))
        assert all(isinstance(r, AnomalyScores) for r in outcomes)


# ---- async -----------------------------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("kind", INPUT_KINDS)
async def test_async_encode_accepts_every_input_kind(base_url: str, vae: VAEClient, digit_images: np.ndarray,
                                                     tmp_path: Path, kind: str) -> None:
    images, pixels = INPUT_KINDS[kind](digit_images, tmp_path)
    async with AsyncVAEClient(base_url) as async_vae:
        encoding = await async_vae.encode(images)
    np.testing.assert_allclose(encoding.mu, vae.encode(pixels).mu, **CLOSE)


@pytest.mark.anyio
async def test_async_methods_match_sync(base_url: str, vae: VAEClient, digit_images: np.ndarray) -> None:
    images = digit_images[:4]
    async with AsyncVAEClient(base_url) as async_vae:
        encoding = await async_vae.encode(images, sample=True, seed=1)
        decoded = await async_vae.decode(encoding.mu)
        reconstruction = await async_vae.reconstruct(images)
        samples = await async_vae.sample(3, seed=2, temperature=0.5)
        scores = await async_vae.anomaly_score(images, fpr=0.05, map=True)
        path = await async_vae.interpolate(images[0], images[1], steps=4)
        info = await async_vae.model_info()
        assert (await async_vae.healthz())["status"] == "ok" and await async_vae.readyz() is True
        assert "# TYPE" in await async_vae.metrics()
    np.testing.assert_allclose(encoding.z, vae.encode(images, sample=True, seed=1).z, **CLOSE)
    np.testing.assert_allclose(decoded, vae.decode(encoding.mu), **CLOSE)
    np.testing.assert_allclose(reconstruction.errors, vae.reconstruct(images).errors, **CLOSE)
    np.testing.assert_allclose(samples.images, vae.sample(3, seed=2, temperature=0.5).images, **CLOSE)
    expected_scores = vae.anomaly_score(images, fpr=0.05, map=True)
    np.testing.assert_allclose(scores.scores, expected_scores.scores, **CLOSE)
    np.testing.assert_allclose(scores.maps, expected_scores.maps, **CLOSE)
    assert scores.threshold == expected_scores.threshold
    np.testing.assert_allclose(path.images, vae.interpolate(images[0], images[1], steps=4).images, **CLOSE)
    assert info == vae.model_info()


@pytest.mark.anyio
async def test_async_errors_map_like_sync(base_url: str) -> None:
    async with AsyncVAEClient(base_url) as async_vae:
        with pytest.raises(BadRequest) as caught:
            await async_vae.decode([[0.0, 0.0, 0.0]])
        assert caught.value.status_code == 422 and "latent size" in caught.value.detail
        with pytest.raises(BadRequest, match="greater than 0"):
            await async_vae.sample(0)


def test_one_file_scored_with_the_defaults_takes_the_servers_lean_path(vae: VAEClient, digit_images: np.ndarray,
                                                                       lane_calls: list[bytes]) -> None:
    scored = lane_calls
    png = png_bytes(digit_images[0])
    lean = vae.anomaly_score(png)
    assert scored == [png]
    full = vae.anomaly_score([png, png], fpr=0.2)           # two files, a query: the full app
    assert len(scored) == 1 and len(full) == 2
    assert lean.scores[0] == pytest.approx(full.scores[0], rel=1e-6)
