"""API keys, CORS and the OpenAPI security declaration, through real HTTP."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.auth import KeyRing
from service.settings import Settings
from tests.service.conftest import serve

KEYS = ["first-key-0123456789abcdef", "second-key-0123456789abcdef"]
SAMPLE = {"n": 1, "seed": 0}


@pytest.fixture(scope="module")
def locked_url(digits_artifact: Path) -> Iterator[str]:
    with serve(model_path=digits_artifact, api_keys=KEYS, public_metrics=False,
               cors_origins=["https://ui.example"]) as url:
        yield url


@pytest.fixture()
def http(locked_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=locked_url, timeout=30) as client:
        yield client


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "key" in (response.json().get("detail") or response.json().get("error"))
    for key in KEYS:
        assert key not in response.text


@pytest.mark.parametrize("path", ["/sample", "/encode", "/v2/models/digits/infer", "/admin/reload"])
def test_api_needs_a_key(http: httpx.Client, path: str) -> None:
    assert_unauthorized(http.post(path, json=SAMPLE))
    assert_unauthorized(http.post(path, json=SAMPLE, headers={"Authorization": "Bearer wrong-key-0123456789abcd"}))
    assert_unauthorized(http.post(path, json=SAMPLE, headers={"X-API-Key": KEYS[0][:-1]}))
    assert_unauthorized(http.post(path, json=SAMPLE, headers={"Authorization": f"Basic {KEYS[0]}"}))


@pytest.mark.parametrize("path", ["/model", "/metrics", "/v2", "/v2/models/digits"])
def test_reading_endpoints_need_a_key_too(http: httpx.Client, path: str) -> None:
    assert_unauthorized(http.get(path))
    assert http.get(path, headers={"X-API-Key": KEYS[0]}).status_code == 200


def test_every_configured_key_works_in_either_header(http: httpx.Client) -> None:
    for key in KEYS:
        assert http.post("/sample", json=SAMPLE, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert http.post("/sample", json=SAMPLE, headers={"X-API-Key": key}).status_code == 200
    model = http.get("/model", headers={"X-API-Key": KEYS[1]}).text
    assert not any(key in model for key in KEYS)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/",
                                  "/static/app.js", "/docs", "/openapi.json"])
def test_probes_page_and_docs_stay_open(http: httpx.Client, path: str) -> None:
    assert http.get(path).status_code == 200


def test_the_body_is_not_read_without_a_key(http: httpx.Client) -> None:
    """A 401 comes before the body limit and before any parsing."""
    response = http.post("/anomaly-score", content=b"x" * (20 * 1024 * 1024), headers={"content-type": "image/png"})
    assert_unauthorized(response)


def test_without_keys_everything_is_open_and_admin_is_refused(client: httpx.Client) -> None:
    assert client.post("/sample", json=SAMPLE).status_code == 200
    assert client.get("/metrics").status_code == 200
    response = client.post("/admin/reload")
    assert response.status_code == 403 and "VAE_API_KEYS" in response.json()["detail"]


def test_metrics_are_open_by_default_even_with_keys(digits_artifact: Path) -> None:
    with serve(model_path=digits_artifact, api_keys=KEYS) as url, httpx.Client(base_url=url) as client:
        assert client.get("/metrics").status_code == 200
        assert_unauthorized(client.get("/model"))


def test_openapi_declares_both_schemes_and_locks_the_api(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"
    paths = schema["paths"]
    assert paths["/anomaly-score"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "401" in paths["/admin/reload"]["post"]["responses"]
    assert "security" not in paths["/healthz"]["get"] and "security" not in paths["/v2/health/ready"]["get"]


def test_cors_only_for_configured_origins(http: httpx.Client, client: httpx.Client) -> None:
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key, content-type"}
    response = http.options("/anomaly-score", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://ui.example"
    assert "x-api-key" in response.headers["access-control-allow-headers"].lower()
    other = http.options("/anomaly-score", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    answered = http.post("/sample", json=SAMPLE, headers={"Origin": "https://ui.example", "X-API-Key": KEYS[0]})
    assert answered.headers["access-control-allow-origin"] == "https://ui.example"
    assert "x-request-id" in answered.headers["access-control-expose-headers"].lower()
    # not configured: no CORS headers at all
    assert "access-control-allow-origin" not in client.post("/sample", json=SAMPLE,
                                                            headers={"Origin": "https://ui.example"}).headers


def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAE_API_KEYS", f" {KEYS[0]} , {KEYS[1]} ")
    assert [k.get_secret_value() for k in Settings().api_keys] == KEYS
    monkeypatch.setenv("VAE_API_KEYS", f'["{KEYS[1]}"]')
    settings = Settings()
    assert [k.get_secret_value() for k in settings.api_keys] == [KEYS[1]]
    assert KEYS[1] not in repr(settings) and KEYS[1] not in str(settings.model_dump())
    monkeypatch.setenv("VAE_API_KEYS", "short,secret-but-fine-0123456789")
    with pytest.raises(ValidationError) as error:
        Settings()
    assert "secret-but-fine" not in str(error.value)
    monkeypatch.setenv("VAE_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.delenv("VAE_API_KEYS")
    assert Settings().cors_origins == ["https://a.example", "https://b.example"]


def test_key_ring_compares_every_key() -> None:
    ring = KeyRing(Settings(api_keys=KEYS).api_keys)
    assert ring.accepts(KEYS[0]) and ring.accepts(KEYS[1])
    assert not ring.accepts("") and not ring.accepts(KEYS[0] + "x") and not ring.accepts(KEYS[0].upper())
    assert not KeyRing([]).enabled


def test_keys_never_reach_the_logs(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        http.post("/sample", json=SAMPLE, headers={"X-API-Key": KEYS[0]})
        http.post("/sample", json=SAMPLE, headers={"Authorization": "Bearer not-a-key-0123456789abcdef"})
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "/sample" in text
    assert KEYS[0] not in text and "not-a-key" not in text
