"""The lean path for one raw image POSTed to /anomaly-score: it answers exactly what the full app
answers (the same bytes, the same errors), leaves every other request to the app, and keeps the
middleware around it (API keys, metrics). And the other fix for the tail latency: what start-up
made is frozen out of the garbage collector's way."""

from __future__ import annotations

import gc
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service import fast_lane

from .conftest import png_bytes, serve

KEY = "lane-test-key-0123456789"


@pytest.fixture(scope="module")
def lean_and_full(digits_artifact: Path) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """The same artifact served twice: with the lean path (the default) and without it."""
    with serve(model_path=digits_artifact) as lean_url, serve(model_path=digits_artifact, fast_lane=False) as full_url:
        with httpx.Client(base_url=lean_url, timeout=30) as lean, httpx.Client(base_url=full_url, timeout=30) as full:
            yield lean, full


def post_raw(client: httpx.Client, body: bytes, content_type: str = "image/png", query: str = "",
             **headers: str) -> httpx.Response:
    return client.post(f"/anomaly-score{query}", content=body, headers={"Content-Type": content_type, **headers})


def large_png(size: int, flat: bool = False) -> bytes:
    """A size x size PNG of noise, or of one grey (a few kilobytes, however many pixels)."""
    pixels = np.full((size, size), 128, np.uint8) if flat else \
        np.random.default_rng(size).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def bodies(digit_images: np.ndarray) -> dict[str, bytes]:
    stained = digit_images[1].copy()
    stained[2:5, 2:5] = 1.0
    return {"digit": png_bytes(digit_images[0]), "stained": png_bytes(stained),
            "rgb": png_bytes(np.stack([digit_images[2]] * 3, axis=-1)), "large, resized": large_png(120)}


def test_answers_are_byte_for_byte_those_of_the_full_app(lean_and_full: tuple[httpx.Client, httpx.Client],
                                                          digit_images: np.ndarray, lane_calls: list[bytes]) -> None:
    lean, full = lean_and_full
    for name, body in bodies(digit_images).items():
        for content_type in ("image/png", "application/octet-stream", "image/png; charset=binary"):
            fast, slow = post_raw(lean, body, content_type), post_raw(full, body, content_type)
            assert fast.status_code == slow.status_code == 200, (name, fast.text)
            assert fast.content == slow.content, name
            assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
            assert fast.headers["x-request-id"]
    digit = bodies(digit_images)["digit"]
    for query in ("?fpr=0.2", "?fpr=5e-2", "?fpr=.5"):                    # a plain fpr: still the lean path
        fast, slow = post_raw(lean, digit, query=query), post_raw(full, digit, query=query)
        assert fast.status_code == slow.status_code == 200 and fast.content == slow.content, query
    assert len(lane_calls) == 4 * 3 + 3            # every one of them took the lean path


def test_errors_are_those_of_the_full_app(lean_and_full: tuple[httpx.Client, httpx.Client],
                                          lane_calls: list[bytes]) -> None:
    lean, full = lean_and_full
    bad = {"empty": b"", "not an image": b"hello, world", "truncated": large_png(50)[:200],
           "too many pixels": large_png(5000, flat=True)}
    for name, body in bad.items():
        fast, slow = post_raw(lean, body), post_raw(full, body)
        assert fast.status_code == slow.status_code, name
        assert fast.status_code in (413, 422), name
        assert fast.json() == slow.json(), name
        assert fast.headers["content-type"] == "application/json"
    assert len(lane_calls) == len(bad)
    # an fpr no calibration set can promise (the lane), or out of range (the app): the same 422s
    for query in ("?fpr=5e-324", "?fpr=1", "?fpr=0", "?fpr=abc", "?fpr="):
        body = large_png(8)
        fast, slow = post_raw(lean, body, query=query), post_raw(full, body, query=query)
        assert fast.status_code == slow.status_code == 422 and fast.json() == slow.json(), query
    assert len(lane_calls) == len(bad) + 1


def test_other_requests_go_to_the_app(lean_and_full: tuple[httpx.Client, httpx.Client], digit_images: np.ndarray,
                                      lane_calls: list[bytes]) -> None:
    lean, full = lean_and_full
    body = png_bytes(digit_images[3])
    for query in ("?fpr=0.2&map=true", "?map=true", "?resize=false", "?fpr=0.2&fpr=0.3"):
        fast, slow = post_raw(lean, body, query=query), post_raw(full, body, query=query)
        assert fast.status_code == slow.status_code == 200, query
        assert fast.content == slow.content, query
    multipart = lean.post("/anomaly-score", files=[("files", ("a.png", body, "image/png"))])
    assert multipart.status_code == 200
    assert lean.post("/reconstruct", content=body, headers={"Content-Type": "image/png"}).status_code == 200
    assert lane_calls == []


def test_large_images_are_decoded_off_the_event_loop(lean_and_full: tuple[httpx.Client, httpx.Client],
                                                     digit_images: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    lean, _ = lean_and_full
    threaded: list[str] = []
    original = fast_lane.run_in_threadpool

    async def spy(function, *args):  # noqa: ANN001, ANN202
        threaded.append(function.__name__)
        return await original(function, *args)

    monkeypatch.setattr(fast_lane, "run_in_threadpool", spy)
    assert post_raw(lean, png_bytes(digit_images[0])).status_code == 200       # 8x8: on the loop
    assert threaded == []
    assert post_raw(lean, large_png(120)).status_code == 200                    # 14,400 pixels: a thread
    assert threaded == ["decode_image"]


def test_keys_and_metrics_still_apply(digits_artifact: Path, digit_images: np.ndarray,
                                      lane_calls: list[bytes]) -> None:
    body = png_bytes(digit_images[0])
    with serve(model_path=digits_artifact, api_keys=KEY) as url, httpx.Client(base_url=url, timeout=30) as http:
        refused = post_raw(http, body)
        assert refused.status_code == 401
        assert lane_calls == []                     # refused before the lane saw it
        assert post_raw(http, body, **{"X-API-Key": KEY}).status_code == 200
        metrics = http.get("/metrics").text
    counted = [line for line in metrics.splitlines()
               if line.startswith("vae_http_requests_total{") and 'endpoint="/anomaly-score"' in line]
    assert any('status="200"' in line and line.endswith(" 1.0") for line in counted), counted
    assert len(lane_calls) == 1


def test_no_model_is_a_503_naming_why(tmp_path: Path, digit_images: np.ndarray) -> None:
    missing = tmp_path / "missing.pt"
    with serve(model_path=missing) as url, httpx.Client(base_url=url, timeout=30) as http:
        answer = post_raw(http, png_bytes(digit_images[0]))
    assert answer.status_code == 503
    assert "no model is loaded" in answer.json()["detail"]
    assert "missing.pt" in answer.json()["detail"]


def test_start_up_objects_are_out_of_the_collectors_way(digits_artifact: Path) -> None:
    gc.unfreeze()
    with serve(model_path=digits_artifact):
        frozen = gc.get_freeze_count()
        started = time.perf_counter()
        gc.collect()
        full_collection = time.perf_counter() - started
    gc.unfreeze()
    # torch, FastAPI, the test tools and the model: far over 100,000 objects, walked by no collection
    assert frozen > 100_000
    assert full_collection < 0.05, f"a full collection took {full_collection * 1000:.0f} ms"
