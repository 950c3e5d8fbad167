"""Bad input gets the right 4xx with a message that says what was wrong; broken artifacts give
/readyz 503 with the reason; a 500 never shows a traceback."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import png_bytes, serve, serve_app

GOOD = np.zeros((8, 8)).tolist()


def assert_error(response: httpx.Response, status: int, *phrases: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for phrase in phrases:
        assert phrase in detail, f"{phrase!r} not in {detail!r}"


@pytest.mark.parametrize(("body", "status", "phrase"), [
    ({"images": [np.zeros((2, 8, 8)).tolist()]}, 422, "C x H x W with C 1 or 3"),
    ({"images": [np.full((8, 8), 1.5).tolist()]}, 422, "pixels must lie in [0, 1]"),
    ({"images": [[[0.1, 0.2], [0.3]]]}, 422, "ragged"),
    ({"images": [[[0.1, "x"], [0.3, 0.4]]]}, 422, "non-numeric"),
    ({"images": []}, 422, "no images"),
    ({"pictures": [GOOD]}, 422, '{"images": [...]}'),
    ({"images": ["bm90IGFuIGltYWdl"]}, 422, "not an image"),
    ({"images": ["***"]}, 422, "not valid base64"),
])
def test_bad_json_images(client: httpx.Client, body: dict, status: int, phrase: str) -> None:
    assert_error(client.post("/anomaly-score", json=body), status, phrase)


def test_nan_is_refused(client: httpx.Client) -> None:
    # JSON has no NaN; a client that writes one anyway (Python's json does) gets a 422
    body = '{"images": [[[NaN, 0.0], [0.0, 0.0]]]}'
    response = client.post("/encode", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422)


def test_wrong_size_with_resize_false(client: httpx.Client) -> None:
    response = client.post("/encode?resize=false", json={"images": [np.zeros((16, 16)).tolist()]})
    assert_error(response, 422, "is 16x16; the model takes 8x8")
    assert client.post("/encode?resize=false", json={"images": [GOOD]}).status_code == 200


def test_truncated_png_non_image_and_empty_bodies(client: httpx.Client) -> None:
    noise = np.random.default_rng(0).random((64, 64))
    truncated = png_bytes(noise)[:300]
    headers = {"content-type": "image/png"}
    assert_error(client.post("/encode", content=truncated, headers=headers), 422, "the body")
    assert_error(client.post("/encode", content=b"GIF? no, plain text", headers=headers), 422, "not an image")
    assert_error(client.post("/encode", content=b"", headers=headers), 422, "empty")
    assert_error(client.post("/encode", content=b"", headers={"content-type": "application/json"}), 422, "empty")
    assert_error(client.post("/encode", content=b"{not json", headers={"content-type": "application/json"}),
                 422, "not valid JSON")
    upload = client.post("/encode", files=[("files", ("a.png", truncated, "image/png"))])
    assert_error(upload, 422, "file 0 (a.png)")


def test_unsupported_media_type(client: httpx.Client) -> None:
    assert_error(client.post("/encode", content=b"hello", headers={"content-type": "text/plain"}), 415,
                 "text/plain", "multipart/form-data")
    assert_error(client.post("/encode", content=b"hello"), 415)


def test_multipart_without_files_parts(client: httpx.Client) -> None:
    response = client.post("/encode", data={"note": "hi"}, files=[("other", ("a.png", png_bytes(np.zeros((8, 8)))))])
    assert_error(response, 422, "no images")


@pytest.mark.parametrize(("z", "phrase"), [
    ([[0.1, 0.2, 0.3]], "expected N x 2"),
    ([[0.1, 0.2], [0.3]], "rectangular"),
    ([], "z"),
])
def test_bad_latents(client: httpx.Client, z: list, phrase: str) -> None:
    assert_error(client.post("/decode", json={"z": z}), 422, phrase)


@pytest.mark.parametrize(("body", "phrase"), [
    ({"n": 0}, "greater than 0"),
    ({"n": -3}, "greater than 0"),
    ({"n": 1025}, "above the limit of 1024"),
    ({"n": 2, "temperature": 0}, "temperature"),
    ({"n": "many"}, "n"),
])
def test_bad_sample_requests(client: httpx.Client, body: dict, phrase: str) -> None:
    assert_error(client.post("/sample", json=body), 422, phrase)


@pytest.mark.parametrize("path", ["/anomaly-score", "/decode", "/sample"])
def test_json_nested_too_deeply_is_a_clear_4xx(client: httpx.Client, path: str) -> None:
    key = {"/anomaly-score": "images", "/decode": "z", "/sample": "n"}[path]
    body = f'{{"{key}": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422)
    assert "nested too deeply" in response.json()["detail"] or "depth limit" in response.json()["detail"]


def test_interpolate_needs_two_images_and_bounded_steps(client: httpx.Client) -> None:
    assert_error(client.post("/interpolate", json={"images": [GOOD]}), 422, "exactly two images, got 1")
    assert_error(client.post("/interpolate?steps=1000", json={"images": [GOOD, GOOD]}), 422, "above the limit")
    assert_error(client.post("/interpolate?steps=1", json={"images": [GOOD, GOOD]}), 422, "steps")


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert_error(client.get("/nothing-here"), 404)
    assert_error(client.get("/encode"), 405)


def test_limits_413(digits_artifact: Path) -> None:
    with serve(model_path=digits_artifact, max_images_per_request=2, max_body_bytes=4096,
               max_image_pixels=10_000) as url, httpx.Client(base_url=url) as http:
        assert_error(http.post("/encode", json={"images": [GOOD] * 3}), 413, "3 images", "limit is 2")
        files = [("files", (f"{i}.png", png_bytes(np.zeros((8, 8))), "image/png")) for i in range(3)]
        assert_error(http.post("/encode", files=files), 413, "more than 2 files")
        assert_error(http.post("/encode", content=b"x" * 5000, headers={"content-type": "image/png"}), 413,
                     "over the limit of 4,096 bytes")

        status, body = send_chunked(url, "/encode", [b"x" * 1000] * 10)
        assert status == 413 and "over the limit" in body
        buffer = io.BytesIO()
        Image.new("L", (200, 200)).save(buffer, format="PNG")
        assert_error(http.post("/encode", content=buffer.getvalue(), headers={"content-type": "image/png"}), 413,
                     "40,000 pixels")


def send_chunked(url: str, path: str, chunks: list[bytes]) -> tuple[int, str]:
    """POST a body with no Content-Length (chunked), reading the answer even if the server
    answers and closes before the last chunk, as it should for an oversize body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        with contextlib.suppress(OSError):
            for chunk in chunks:
                conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            conn.sendall(b"0\r\n\r\n")
        reply = b""
        with contextlib.suppress(OSError):
            while part := conn.recv(65536):
                reply += part
                if b"\r\n\r\n" in reply and reply.endswith(b"}"):
                    break
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


@pytest.mark.parametrize("breakage", ["missing", "corrupt", "no-sidecar"])
def test_broken_artifact_gives_readyz_503_and_clear_errors(digits_artifact: Path, tmp_path: Path,
                                                           breakage: str) -> None:
    path = tmp_path / "model.pt"
    if breakage != "missing":
        data = bytearray(digits_artifact.read_bytes())
        if breakage == "corrupt":
            data[len(data) // 2] ^= 0xFF
            (tmp_path / "model.pt.sha256").write_text(digits_artifact.with_name("digits.pt.sha256").read_text())
        path.write_bytes(bytes(data))
    with serve(model_path=path) as url, httpx.Client(base_url=url) as http:
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        expected = {"missing": "no model artifact", "corrupt": "does not match", "no-sidecar": "no checksum"}
        assert_error(ready, 503, expected[breakage])
        assert_error(http.post("/encode", json={"images": [GOOD]}), 503, "no model is loaded")
        assert "vae_model_ready 0.0" in http.get("/metrics").text


def test_a_small_calibration_set_serves_but_refuses_an_unsupported_fpr(tmp_path: Path) -> None:
    from tests.conftest import quick_config
    from training.train import train

    train(quick_config(tmp_path, epochs=1, max_images=80))              # 12 calibration images
    with serve(model_path=tmp_path / "model.pt") as url, httpx.Client(base_url=url) as http:
        assert http.get("/readyz").status_code == 200
        assert http.post("/encode", json={"images": [GOOD]}).status_code == 200
        assert_error(http.post("/anomaly-score", json={"images": [GOOD]}), 422, "needs at least 99", "has 12")
        assert http.post("/anomaly-score?fpr=0.2", json={"images": [GOOD]}).status_code == 200
        assert http.get("/model").json()["calibration"]["threshold"] is None


def test_a_client_that_leaves_mid_body_is_a_quiet_499(base_url: str, caplog: pytest.LogCaptureFixture) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 5000\r\n\r\n" + b"\x89PNG" * 10)
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=base_url) as http:
        while 'endpoint="/encode",method="POST",status="499"' not in http.get("/metrics").text:
            assert time.monotonic() < deadline, "the disconnect was not recorded"
            time.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_internal_errors_are_500_without_traceback(digits_artifact: Path) -> None:
    app = create_app(Settings(model_path=digits_artifact))
    with serve_app(app) as url, httpx.Client(base_url=url) as http:
        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("secret internal state /etc/passwd")

        app.state.inference.run = broken
        response = http.post("/encode", json={"images": [GOOD]}, headers={"x-request-id": "req-42"})
        assert_error(response, 500, "req-42")
        assert "secret" not in response.text and "Traceback" not in response.text
        assert http.get("/readyz").status_code == 200              # still serving
