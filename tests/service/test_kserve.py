"""The Open Inference Protocol (KServe V2) routes through real HTTP, with requests shaped as the
spec's examples, and parity with the service's own endpoints for the same pixels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.service.conftest import serve

INFER_OUTPUTS = {"score": ("FP32", 1), "p_value": ("FP64", 1), "is_anomaly": ("BOOL", 1),
                 "mu": ("FP32", 2), "log_var": ("FP32", 2), "reconstruction": ("FP32", 4)}


@pytest.fixture(scope="module")
def model(client: httpx.Client) -> dict[str, Any]:
    """The served model's v2 metadata."""
    name = client.get("/model").json()["name"]
    response = client.get(f"/v2/models/{name}")
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def client(base_url: str) -> httpx.Client:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        yield http


def infer_request(images: np.ndarray, outputs: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A v2 inference request with (N, H, W) or (N, C, H, W) images as one flat FP32 tensor."""
    batch = images if images.ndim == 4 else images[:, None]
    body: dict[str, Any] = {"inputs": [{"name": "images", "shape": list(batch.shape), "datatype": "FP32",
                                        "data": batch.reshape(-1).tolist()}], **extra}
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def infer(client: httpx.Client, model: dict[str, Any], body: dict[str, Any] | bytes) -> dict[str, Any]:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = client.post(f"/v2/models/{model['name']}/infer", **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def tensors(result: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each output's data reshaped to its declared shape."""
    return {out["name"]: np.asarray(out["data"]).reshape(out["shape"]) for out in result["outputs"]}


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


# ---- server and model metadata ------------------------------------------------------------------

def test_server_metadata_and_health(client: httpx.Client) -> None:
    metadata = client.get("/v2").json()
    assert metadata["name"] == "vae-service" and isinstance(metadata["version"], str)
    assert metadata["extensions"] == []
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}


def test_model_metadata_describes_the_tensors(client: httpx.Client, model: dict[str, Any]) -> None:
    info = client.get("/model").json()
    c, h, w = (info["input"][k] for k in ("channels", "height", "width"))
    assert model["name"] == info["name"] and model["versions"] == [info["version"]]
    assert model["platform"]
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, c, h, w]}]
    outputs = {out["name"]: out for out in model["outputs"]}
    assert outputs.keys() == INFER_OUTPUTS.keys()
    assert outputs["mu"]["shape"] == [-1, info["latent_dim"]] and outputs["reconstruction"]["shape"] == [-1, c, h, w]
    for name, (datatype, rank) in INFER_OUTPUTS.items():
        assert outputs[name]["datatype"] == datatype and len(outputs[name]["shape"]) == rank


def test_model_ready_and_versioned_routes(client: httpx.Client, model: dict[str, Any],
                                          digit_images: np.ndarray) -> None:
    name, version = model["name"], model["versions"][0]
    assert client.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
    assert client.get(f"/v2/models/{name}/versions/{version}/ready").status_code == 200
    assert client.get(f"/v2/models/{name}/versions/{version}").json() == model
    response = client.post(f"/v2/models/{name}/versions/{version}/infer", json=infer_request(digit_images[:1]))
    assert response.status_code == 200 and response.json()["model_version"] == version
    error_of(client.get(f"/v2/models/{name}/versions/not-{version}"), 404)


@pytest.mark.parametrize("method, path", [("GET", "/v2/models/nope"), ("GET", "/v2/models/nope/ready"),
                                          ("POST", "/v2/models/nope/infer")])
def test_unknown_model_is_a_404_in_the_spec_form(client: httpx.Client, model: dict[str, Any],
                                                 digit_images: np.ndarray, method: str, path: str) -> None:
    response = client.request(method, path, json=infer_request(digit_images[:1]) if method == "POST" else None)
    assert "nope" in error_of(response, 404) and model["name"] in response.json()["error"]


# ---- inference ----------------------------------------------------------------------------------

def test_infer_returns_the_default_outputs(client: httpx.Client, model: dict[str, Any],
                                           digit_images: np.ndarray) -> None:
    result = infer(client, model, infer_request(digit_images[:5], id="request-7"))
    assert result["model_name"] == model["name"] and result["model_version"] == model["versions"][0]
    assert result["id"] == "request-7"
    assert [(o["name"], o["datatype"], o["shape"]) for o in result["outputs"]] == [
        ("score", "FP32", [5]), ("p_value", "FP64", [5]), ("is_anomaly", "BOOL", [5])]
    values = tensors(result)
    assert values["is_anomaly"].dtype == bool and ((values["p_value"] > 0) & (values["p_value"] <= 1)).all()
    threshold = result["parameters"]["threshold"]
    np.testing.assert_array_equal(values["is_anomaly"], values["score"] > threshold)


def test_infer_returns_the_requested_outputs_in_order(client: httpx.Client, model: dict[str, Any],
                                                      digit_images: np.ndarray) -> None:
    images = digit_images[:3]
    result = infer(client, model, infer_request(images, ["reconstruction", "mu", "log_var", "mu"]))
    assert [o["name"] for o in result["outputs"]] == ["reconstruction", "mu", "log_var"]
    assert "id" not in result and "parameters" not in result
    values = tensors(result)
    latent = model["outputs"][3]["shape"][1]
    assert values["mu"].shape == values["log_var"].shape == (3, latent)
    assert values["reconstruction"].shape == (3, *model["inputs"][0]["shape"][1:])
    assert ((values["reconstruction"] >= 0) & (values["reconstruction"] <= 1)).all()


def test_nested_and_fp64_data_equal_flat_fp32(client: httpx.Client, model: dict[str, Any],
                                              digit_images: np.ndarray) -> None:
    flat = infer_request(digit_images[:4])
    nested = infer_request(digit_images[:4])
    nested["inputs"][0]["data"] = digit_images[:4, None].tolist()
    fp64 = infer_request(digit_images[:4])
    fp64["inputs"][0]["datatype"] = "FP64"
    expected = tensors(infer(client, model, flat))
    for body in (nested, fp64):
        for name, values in tensors(infer(client, model, body)).items():
            np.testing.assert_array_equal(values, expected[name])


def test_fpr_parameter_moves_the_threshold(client: httpx.Client, model: dict[str, Any],
                                           digit_images: np.ndarray) -> None:
    strict = infer(client, model, infer_request(digit_images, parameters={"fpr": 0.01}))
    loose = infer(client, model, infer_request(digit_images, parameters={"fpr": 0.5}))
    assert loose["parameters"]["threshold"] < strict["parameters"]["threshold"]
    assert tensors(loose)["is_anomaly"].sum() >= tensors(strict)["is_anomaly"].sum()
    anomaly = client.post("/anomaly-score", params={"fpr": 0.5},
                          json={"images": [image.tolist() for image in digit_images]}).json()
    assert anomaly["threshold"] == loose["parameters"]["threshold"]
    error_of(client.post(f"/v2/models/{model['name']}/infer",
                         json=infer_request(digit_images[:1], parameters={"fpr": 1.5})), 400)


# ---- parity with the service's own endpoints ----------------------------------------------------

def test_scores_equal_the_anomaly_score_endpoint(client: httpx.Client, model: dict[str, Any],
                                                 digit_images: np.ndarray) -> None:
    v2 = tensors(infer(client, model, infer_request(digit_images)))
    response = client.post("/anomaly-score", json={"images": [image.tolist() for image in digit_images]})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    np.testing.assert_allclose(v2["score"], [r["score"] for r in results], rtol=1e-6)
    np.testing.assert_allclose(v2["p_value"], [r["p_value"] for r in results], rtol=1e-12)
    np.testing.assert_array_equal(v2["is_anomaly"], [r["is_anomaly"] for r in results])


def test_latents_and_reconstructions_equal_the_own_endpoints(client: httpx.Client, model: dict[str, Any],
                                                             digit_images: np.ndarray) -> None:
    images = digit_images[:8]
    v2 = tensors(infer(client, model, infer_request(images, ["mu", "log_var", "reconstruction"])))
    as_json = {"images": [image.tolist() for image in images]}
    encoded = client.post("/encode", json=as_json).json()
    reconstructed = client.post("/reconstruct", json=as_json).json()
    np.testing.assert_allclose(v2["mu"], encoded["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v2["log_var"], encoded["log_var"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v2["reconstruction"][:, 0], reconstructed["images"], rtol=1e-5, atol=1e-6)


# ---- bad requests -------------------------------------------------------------------------------

def one_image_request(**tensor: Any) -> dict[str, Any]:
    """A request for one all-0.5 8x8 image, with some of the tensor's fields replaced."""
    base = {"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
    return {"inputs": [{**base, **tensor}]}


BAD_REQUESTS = {
    "wrong image size": one_image_request(shape=[1, 1, 4, 16]),
    "wrong channels": one_image_request(shape=[1, 3, 8, 8], data=[0.5] * 192),
    "no batch dimension": one_image_request(shape=[1, 8, 8]),
    "empty batch": one_image_request(shape=[0, 1, 8, 8], data=[]),
    "shape not integers": one_image_request(shape=[1, 1, 8.5, 8]),
    "integer datatype": one_image_request(datatype="INT32", data=[0] * 64),
    "bytes datatype": one_image_request(datatype="BYTES"),
    "too little data": one_image_request(data=[0.5] * 63),
    "too much data": one_image_request(data=[0.5] * 65),
    "nested against the shape": one_image_request(data=[[0.5] * 8] * 8),
    "ragged nesting": one_image_request(data=[[0.5] * 8] * 7 + [[0.5] * 7]),
    "strings in data": one_image_request(data=["0.5"] * 64),
    "null in data": one_image_request(data=[None] * 64),
    "booleans in data": one_image_request(data=[True] * 64),
    "above one": one_image_request(data=[0.5] * 63 + [1.5]),
    "below zero": one_image_request(data=[-0.1] + [0.5] * 63),
    "no data": {"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32"}]},
    "unknown input name": one_image_request(name="pixels"),
    "two inputs": {"inputs": one_image_request()["inputs"] * 2},
    "no inputs": {"outputs": [{"name": "score"}]},
    "unknown output": {**one_image_request(), "outputs": [{"name": "score"}, {"name": "logits"}]},
    "id not a string": {**one_image_request(), "id": 7},
    "not an object": [one_image_request()],
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_are_400_in_the_spec_form(client: httpx.Client, model: dict[str, Any], case: str) -> None:
    error_of(client.post(f"/v2/models/{model['name']}/infer", json=BAD_REQUESTS[case]), 400)


def test_error_messages_say_what_was_expected(client: httpx.Client, model: dict[str, Any]) -> None:
    url = f"/v2/models/{model['name']}/infer"
    assert "[N, 1, 8, 8]" in error_of(client.post(url, json=BAD_REQUESTS["wrong image size"]), 400)
    assert "[0, 1]" in error_of(client.post(url, json=BAD_REQUESTS["above one"]), 400)
    assert "63" in error_of(client.post(url, json=BAD_REQUESTS["too little data"]), 400)
    assert "FP32" in error_of(client.post(url, json=BAD_REQUESTS["integer datatype"]), 400)


@pytest.mark.parametrize("body", [
    json.dumps(one_image_request(data=[float("nan")] + [0.5] * 63)).encode(),   # Python writes NaN
    json.dumps(one_image_request(data=[float("inf")] + [0.5] * 63)).encode(),
    b'{"inputs": [',
    b"",
])
def test_nan_and_broken_json_are_400(client: httpx.Client, model: dict[str, Any], body: bytes) -> None:
    response = client.post(f"/v2/models/{model['name']}/infer", content=body,
                           headers={"content-type": "application/json"})
    message = error_of(response, 400)
    if b"NaN" in body or b"Infinity" in body:
        assert "NaN or infinite" in message


def test_binary_tensor_extension_is_refused(client: httpx.Client, model: dict[str, Any]) -> None:
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    response = client.post(f"/v2/models/{model['name']}/infer", content=header + bytes(256),
                           headers={"content-type": "application/octet-stream",
                                    "inference-header-content-length": str(len(header))})
    assert "binary" in error_of(response, 400)


def test_too_many_images_is_413_in_the_spec_form(client: httpx.Client, model: dict[str, Any]) -> None:
    limit = client.get("/model").json()["limits"]["max_images_per_request"]
    body = one_image_request(shape=[limit + 1, 1, 8, 8], data=[0.5] * 64 * (limit + 1))
    assert str(limit) in error_of(client.post(f"/v2/models/{model['name']}/infer", json=body), 413)


# ---- without a model ----------------------------------------------------------------------------

def test_not_ready_without_a_model(tmp_path: Path) -> None:
    with serve(model_path=tmp_path / "missing.pt") as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/v2/health/live").status_code == 200
        ready = http.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert "missing.pt" in error_of(http.get("/v2/models/digits"), 503)
        error_of(http.post("/v2/models/digits/infer", json=one_image_request()), 503)
