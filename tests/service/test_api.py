"""Every endpoint through real HTTP: every input and output form, batches and order, fpr, maps,
seeds, metadata, health, metrics."""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.metrics import Metrics
from service.runtime import ModelRuntime
from tests.service.conftest import png_bytes


@pytest.fixture(scope="module")
def runtime(digits_artifact: Path) -> ModelRuntime:
    return ModelRuntime.load(digits_artifact)


def as_json(images: np.ndarray) -> dict:
    return {"images": [image.tolist() for image in images]}


def scores(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([r["score"] for r in response.json()["results"]])


# ---- input forms -------------------------------------------------------------------------------

def test_every_input_form_gives_the_same_scores(client: httpx.Client, digit_images: np.ndarray) -> None:
    images = digit_images[:3]
    pngs = [png_bytes(image) for image in images]
    by_json = scores(client.post("/anomaly-score", json=as_json(images)))
    by_base64 = scores(client.post("/anomaly-score", json={"images": [base64.b64encode(p).decode() for p in pngs]}))
    by_multipart = scores(client.post("/anomaly-score", files=[("files", (f"{i}.png", p, "image/png"))
                                                               for i, p in enumerate(pngs)]))
    by_raw = np.concatenate([scores(client.post("/anomaly-score", content=p, headers={"content-type": "image/png"}))
                             for p in pngs])
    for other in (by_base64, by_multipart, by_raw):
        np.testing.assert_allclose(other, by_json, rtol=1e-5)


def test_channel_first_arrays_and_mixed_json_items(client: httpx.Client, digit_images: np.ndarray) -> None:
    image = digit_images[0]
    items = [image.tolist(), image[None].tolist(), np.repeat(image[None], 3, 0).tolist(),
             base64.b64encode(png_bytes(image)).decode()]
    result = scores(client.post("/anomaly-score", json={"images": items}))
    np.testing.assert_allclose(result, result[0], rtol=1e-5)


def test_other_sizes_are_resized(client: httpx.Client, digit_images: np.ndarray) -> None:
    big = np.asarray(Image.fromarray(digit_images[0]).resize((32, 32), Image.Resampling.BILINEAR))
    response = client.post("/encode", json=as_json(big[None]))
    assert response.status_code == 200 and len(response.json()["mu"]) == 1


# ---- batches, order, concurrency ---------------------------------------------------------------

def test_a_batch_comes_back_in_input_order(client: httpx.Client, digit_images: np.ndarray) -> None:
    batch = scores(client.post("/anomaly-score", json=as_json(digit_images)))
    singles = np.array([scores(client.post("/anomaly-score", json=as_json(digit_images[i:i + 1])))[0]
                        for i in range(0, 40, 7)])
    np.testing.assert_allclose(batch[::7], singles, rtol=1e-5)
    assert len(np.unique(batch)) == 40


def test_concurrent_requests_of_different_sizes_get_their_own_results(base_url: str,
                                                                      digit_images: np.ndarray) -> None:
    sizes = [1, 4, 2, 7, 1, 3, 5, 1, 6, 2]
    starts = np.cumsum([0, *sizes[:-1]])
    with httpx.Client(base_url=base_url, timeout=30) as http:
        expected = scores(http.post("/anomaly-score", json=as_json(digit_images[:sum(sizes)])))

        def call(i: int) -> np.ndarray:
            chunk = digit_images[starts[i]:starts[i] + sizes[i]]
            return scores(http.post("/anomaly-score", json=as_json(chunk)))

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(len(sizes))))
    for i, result in enumerate(results):
        np.testing.assert_allclose(result, expected[starts[i]:starts[i] + sizes[i]], rtol=1e-5)


# ---- /encode, /decode, /reconstruct, /sample, /interpolate ------------------------------------------

def test_encode_shapes_and_seeded_draws(client: httpx.Client, digit_images: np.ndarray) -> None:
    body = as_json(digit_images[:5])
    plain = client.post("/encode", json=body).json()
    assert np.array(plain["mu"]).shape == (5, 2) and np.array(plain["log_var"]).shape == (5, 2)
    assert "z" not in plain
    first = client.post("/encode?sample=true&seed=7", json=body).json()
    again = client.post("/encode?sample=true&seed=7", json=body).json()
    other = client.post("/encode?sample=true&seed=8", json=body).json()
    assert first["z"] == again["z"] and first["z"] != other["z"]
    mu, log_var, z = (np.array(first[k]) for k in ("mu", "log_var", "z"))
    eps = np.random.default_rng(7).standard_normal(mu.shape, dtype=np.float32)
    np.testing.assert_allclose(z, mu + np.exp(0.5 * log_var) * eps, rtol=1e-5)


def test_decode_of_the_mean_is_the_reconstruction(client: httpx.Client, digit_images: np.ndarray) -> None:
    body = as_json(digit_images[:4])
    mu = client.post("/encode", json=body).json()["mu"]
    decoded = np.array(client.post("/decode", json={"z": mu}).json()["images"])
    reconstructed = client.post("/reconstruct", json=body).json()
    assert decoded.shape == (4, 8, 8)
    np.testing.assert_allclose(decoded, np.array(reconstructed["images"]), atol=1e-6)
    assert len(reconstructed["errors"]) == 4 and min(reconstructed["errors"]) > 0


def test_reconstruction_errors_match_the_model(client: httpx.Client, runtime: ModelRuntime,
                                               digit_images: np.ndarray) -> None:
    import torch

    served = client.post("/reconstruct", json=as_json(digit_images[:6])).json()["errors"]
    _, errors = runtime.reconstruct(torch.from_numpy(digit_images[:6, None]))
    np.testing.assert_allclose(served, errors.numpy(), rtol=1e-5)


def test_sample_is_seeded_and_tempered(client: httpx.Client) -> None:
    first = client.post("/sample", json={"n": 3, "seed": 11}).json()
    again = client.post("/sample", json={"n": 3, "seed": 11}).json()
    assert first == again and np.array(first["images"]).shape == (3, 8, 8)
    hot = client.post("/sample", json={"n": 3, "seed": 11, "temperature": 2.0}).json()
    np.testing.assert_allclose(np.array(hot["z"]), 2 * np.array(first["z"]), rtol=1e-6)
    unseeded = [client.post("/sample", json={"n": 2}).json()["z"] for _ in range(2)]
    assert unseeded[0] != unseeded[1]
    decoded = client.post("/decode", json={"z": first["z"]}).json()["images"]
    np.testing.assert_allclose(decoded, first["images"], atol=1e-6)


def test_interpolate_runs_between_the_two_latent_means(client: httpx.Client, digit_images: np.ndarray) -> None:
    pair = digit_images[:2]
    path = client.post("/interpolate?steps=5", json=as_json(pair)).json()
    mu = np.array(client.post("/encode", json=as_json(pair)).json()["mu"])
    z = np.array(path["z"])
    assert z.shape == (5, 2) and np.array(path["images"]).shape == (5, 8, 8)
    np.testing.assert_allclose(z[[0, -1]], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.diff(z, axis=0), np.diff(z, axis=0)[:1].repeat(4, 0), atol=1e-5)


# ---- output forms ------------------------------------------------------------------------------

def decode_png(text_or_bytes: str | bytes) -> np.ndarray:
    data = base64.b64decode(text_or_bytes) if isinstance(text_or_bytes, str) else text_or_bytes
    return np.asarray(Image.open(io.BytesIO(data))) / 255.0


def test_png_outputs_match_json_outputs(client: httpx.Client) -> None:
    as_lists = client.post("/sample", json={"n": 2, "seed": 3}).json()["images"]
    as_pngs = client.post("/sample?format=png", json={"n": 2, "seed": 3}).json()["images"]
    for lists, png in zip(as_lists, as_pngs, strict=True):
        np.testing.assert_allclose(decode_png(png), np.array(lists), atol=0.5 / 255 + 1e-6)


def test_accept_png_with_one_image_returns_the_bytes(client: httpx.Client, digit_images: np.ndarray) -> None:
    response = client.post("/reconstruct", json=as_json(digit_images[:1]), headers={"accept": "image/png"})
    assert response.headers["content-type"] == "image/png"
    assert decode_png(response.content).shape == (8, 8)
    assert float(response.headers["x-reconstruction-errors"]) > 0
    two = client.post("/reconstruct", json=as_json(digit_images[:2]), headers={"accept": "image/png"})
    assert two.headers["content-type"] == "application/json"


@pytest.mark.parametrize(("accept", "png"), [
    ("image/png", True), ("image/*", True), ("image/png, application/json;q=0.5", True),
    ("*/*", False), ("application/json, image/png;q=0.1", False), ("image/png;q=0", False), ("", False),
    ("text/html,application/xhtml+xml,image/avif,image/webp,*/*;q=0.8", False),
])
def test_accept_negotiation(client: httpx.Client, digit_images: np.ndarray, accept: str, png: bool) -> None:
    response = client.post("/reconstruct", json=as_json(digit_images[:1]), headers={"accept": accept})
    assert response.headers["content-type"] == ("image/png" if png else "application/json")


def from_float32(response: httpx.Response) -> np.ndarray:
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-dtype"] == "float32"
    shape = tuple(int(size) for size in response.headers["x-shape"].split(","))
    return np.frombuffer(response.content, dtype="<f4").reshape(shape)


def test_float32_outputs_are_the_json_outputs_exactly(client: httpx.Client, digit_images: np.ndarray) -> None:
    raw = {"accept": "application/octet-stream"}
    calls = [("/reconstruct", {"json": as_json(digit_images[:3])}), ("/sample", {"json": {"n": 4, "seed": 7}}),
             ("/decode", {"json": {"z": [[0.1, -0.2], [1.0, 0.5]]}}),
             ("/interpolate?steps=5", {"json": as_json(digit_images[:2])})]
    for path, body in calls:
        as_lists = np.array(client.post(path, **body).json()["images"], dtype=np.float32)
        as_bytes = from_float32(client.post(path, **body, headers=raw))
        assert as_bytes.shape == (len(as_lists), 1, 8, 8), path            # N, C, H, W
        np.testing.assert_array_equal(as_bytes[:, 0], as_lists, err_msg=path)
    # JSON unless the client prefers the bytes; one image with image/png preferred stays a PNG
    for accept in ("*/*", "application/*", "application/json, application/octet-stream;q=0.5"):
        assert client.post("/sample", json={"n": 2}, headers={"accept": accept}).headers["content-type"] == \
            "application/json", accept
    one = client.post("/sample", json={"n": 1}, headers={"accept": "image/png, application/octet-stream"})
    assert one.headers["content-type"] == "image/png"


# ---- /anomaly-score ------------------------------------------------------------------------------

def test_float32_maps_with_the_verdicts_in_headers(client: httpx.Client, digit_images: np.ndarray) -> None:
    body = as_json(digit_images[:3])
    answer = client.post("/anomaly-score?map=true", json=body).json()
    raw = client.post("/anomaly-score?map=true", json=body, headers={"accept": "application/octet-stream"})
    maps = from_float32(raw)
    assert maps.shape == (3, 8, 8)
    np.testing.assert_array_equal(maps, np.array([r["map"] for r in answer["results"]], dtype=np.float32))
    assert [float(v) for v in raw.headers["x-anomaly-score"].split(",")] == \
        pytest.approx([r["score"] for r in answer["results"]], rel=1e-5)
    assert raw.headers["x-is-anomaly"].split(",") == [str(r["is_anomaly"]).lower() for r in answer["results"]]
    assert float(raw.headers["x-threshold"]) == pytest.approx(answer["threshold"], rel=1e-5)
    no_map = client.post("/anomaly-score", json=body, headers={"accept": "application/octet-stream"})
    assert no_map.headers["content-type"] == "application/json"         # verdicts only: JSON is the form


def test_scores_thresholds_and_p_values(client: httpx.Client, runtime: ModelRuntime,
                                        digit_images: np.ndarray) -> None:
    noisy = np.clip(digit_images[:5] + np.random.default_rng(0).normal(0, 0.5, (5, 8, 8)), 0, 1)
    body = client.post("/anomaly-score", json=as_json(np.concatenate([digit_images[:5], noisy]))).json()
    assert body["threshold"] == pytest.approx(runtime.threshold(0.01)) and body["fpr"] == 0.01
    assert body["score_kind"] == "excess"
    result_scores = np.array([r["score"] for r in body["results"]])
    for result in body["results"]:
        assert result["is_anomaly"] == (result["score"] > body["threshold"])
        assert result["p_value"] == pytest.approx(runtime.p_values(np.array([result["score"]]))[0])
    assert result_scores[5:].min() > result_scores[:5].max()     # every noise image outscores every digit
    assert all(r["is_anomaly"] for r in body["results"][5:])


def test_fpr_per_request_moves_the_threshold(client: httpx.Client, runtime: ModelRuntime,
                                             digit_images: np.ndarray) -> None:
    body = as_json(digit_images[:20])
    strict = client.post("/anomaly-score?fpr=0.005", json=body).json()
    loose = client.post("/anomaly-score?fpr=0.3", json=body).json()
    assert strict["threshold"] > loose["threshold"] and loose["threshold"] == pytest.approx(runtime.threshold(0.3))
    assert sum(r["is_anomaly"] for r in loose["results"]) >= sum(r["is_anomaly"] for r in strict["results"])
    for bad in ("0", "1", "-0.1", "abc", "0.001"):
        response = client.post(f"/anomaly-score?fpr={bad}", json=body)
        assert response.status_code == 422 and "fpr" in response.json()["detail"]
    assert "0.00369" in client.get("/model").json()["calibration"]["min_fpr"].__str__()


def test_maps_as_arrays_and_as_heat_maps(client: httpx.Client, digit_images: np.ndarray) -> None:
    body = as_json(digit_images[:2])
    arrays = client.post("/anomaly-score?map=true", json=body).json()["results"]
    assert np.array(arrays[0]["map"]).shape == (8, 8) and np.array(arrays[0]["map"]).min() >= 0
    pngs = client.post("/anomaly-score?map=true&format=png", json=body).json()["results"]
    heat = Image.open(io.BytesIO(base64.b64decode(pngs[0]["map"])))
    assert heat.mode == "RGB" and heat.size == (8, 8)
    plain = client.post("/anomaly-score", json=body).json()["results"]
    assert "map" not in plain[0]
    assert [r["score"] for r in plain] == pytest.approx([r["score"] for r in arrays])


def test_map_points_at_a_defect(client: httpx.Client, digit_images: np.ndarray) -> None:
    image = digit_images[0].copy()
    image[0:3, 0:3] = 1.0                                       # a bright stain in a corner that is dark
    anomaly_map = np.array(client.post("/anomaly-score?map=true", json=as_json(image[None])).json()
                           ["results"][0]["map"])
    assert anomaly_map[0:3, 0:3].sum() > 0.5 * anomaly_map.sum()


def test_heat_map_as_the_body_with_scores_in_headers(client: httpx.Client, digit_images: np.ndarray) -> None:
    response = client.post("/anomaly-score?map=true", content=png_bytes(digit_images[0]),
                           headers={"content-type": "image/png", "accept": "image/png"})
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (8, 8)
    assert response.headers["x-is-anomaly"] in ("true", "false") and float(response.headers["x-p-value"]) <= 1


# ---- /model, /healthz, /readyz, /metrics -----------------------------------------------------------

def test_model_metadata(client: httpx.Client, digits_artifact: Path) -> None:
    info = client.get("/model").json()
    assert info["name"] == "digits" and info["input"]["height"] == 8 and info["latent_dim"] == 2
    assert info["checksum"]["sha256"] == digits_artifact.with_name("digits.pt.sha256").read_text().split()[0]
    assert info["calibration"]["count"] == 270 and info["calibration"]["score_kind"] == "excess"
    assert info["calibration"]["thresholds"]["0.01"] == info["calibration"]["threshold"]
    assert info["training"]["metrics"]["test_elbo"] > 0 and info["score"]["kind"] == "excess"
    assert info["limits"]["max_images_per_request"] == 256


def test_health_ready_and_metrics(client: httpx.Client, digit_images: np.ndarray) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model": "digits"}
    noisy = np.clip(digit_images[:2] + 0.6, 0, 1)
    client.post("/anomaly-score", json=as_json(noisy))
    text = client.get("/metrics").text
    assert 'vae_http_requests_total{endpoint="/anomaly-score",method="POST",status="200"}' in text
    assert "vae_anomalies_flagged_total" in text and 'vae_model_info{' in text
    for family in ("vae_queue_seconds", "vae_model_seconds", "vae_batch_images", "vae_codec_seconds"):
        assert f"{family}_bucket" in text
    assert client.get("/healthz").headers["x-request-id"]
    assert client.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"


def p_value_buckets(client: httpx.Client) -> dict[str, float]:
    """The cumulative counts of the p-value histogram on /metrics, by upper bound."""
    text = client.get("/metrics").text
    pattern = r'^vae_anomaly_p_values_bucket\{le="([^"]+)"\} (\S+)$'
    return {le: float(count) for le, count in re.findall(pattern, text, flags=re.MULTILINE)}


def test_every_p_value_served_lands_in_the_histogram(client: httpx.Client, digit_images: np.ndarray) -> None:
    """Operators watch it for drift: on images like the calibration set it stays about uniform."""
    before = p_value_buckets(client)
    assert "0.01" in before and "+Inf" in before
    served = client.post("/anomaly-score", json=as_json(digit_images[:12])).json()["results"]
    raw = client.post("/anomaly-score", content=png_bytes(digit_images[12]), headers={"content-type": "image/png"})
    served += raw.json()["results"]                                      # the fast lane's path
    v2 = {"inputs": [{"name": "images", "shape": [3, 1, 8, 8], "datatype": "FP32",
                      "data": digit_images[13:16].reshape(-1).tolist()}]}
    outputs = client.post("/v2/models/digits/infer", json=v2).json()["outputs"]
    p_values = [r["p_value"] for r in served] + next(o["data"] for o in outputs if o["name"] == "p_value")
    after = p_value_buckets(client)
    assert len(p_values) == 16
    for le, count in after.items():
        assert count - before[le] == sum(p <= float(le) for p in p_values), le


def test_metrics_count_before_any_model_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    # the codec timers were once made by `serving()`, so anything timed before a model loaded failed
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    metrics.decode_seconds.observe(0.001)
    metrics.encode_seconds.observe(0.002)
    metrics.request_done("/anomaly-score", "POST", 200, 0.01)
    text = metrics.render().decode()
    assert 'vae_codec_seconds_count{stage="decode"} 1.0' in text
    assert 'vae_codec_seconds_count{stage="encode"} 1.0' in text
    assert 'vae_http_requests_total{endpoint="/anomaly-score",method="POST",status="200"} 1.0' in text


def test_openapi_documents_every_endpoint_with_examples(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/encode", "/decode", "/reconstruct", "/sample", "/anomaly-score", "/interpolate",
                 "/model", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    content = spec["paths"]["/anomaly-score"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "application/json"} <= set(content)
    text = client.get("/openapi.json").text
    for path, operations in spec["paths"].items():
        if path.startswith("/v2"):
            continue
        for method, operation in operations.items():
            documented = json.dumps({k: operation.get(k) for k in ("requestBody", "responses")})
            schemas = [ref.split("/")[-1] for ref in re.findall(r'"\$ref": "([^"]+)"', documented)]
            has_example = "example" in documented or any(
                "example" in json.dumps(spec["components"]["schemas"][name]) for name in schemas)
            assert has_example or method == "get" and path in ("/healthz", "/readyz"), (method, path)
    assert "examples" in text
    assert client.get("/docs").status_code == 200
