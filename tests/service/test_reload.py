"""POST /admin/reload: a new artifact is swapped in atomically, a bad one changes nothing, paths
from the network stay inside the models directory, and requests during a reload all succeed."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import quick_config
from tests.service.conftest import png_bytes, serve
from training.train import train

KEY = "reload-test-key-0123456789"
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def models_dir(digits_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's digits model and a second, different one (another seed and latent size)."""
    folder = tmp_path_factory.mktemp("models")
    for suffix in ("", ".sha256"):
        shutil.copy(digits_artifact.with_name(digits_artifact.name + suffix), folder / f"digits.pt{suffix}")
    train(quick_config(folder, data="digits", seed=1, latent_dim=3))          # folder / model.pt
    (folder / "model.pt").rename(folder / "other.pt")
    (folder / "model.pt.sha256").rename(folder / "other.pt.sha256")
    (folder / "corrupt.pt").write_bytes((folder / "digits.pt").read_bytes()[:-100] + b"\0" * 100)
    shutil.copy(folder / "digits.pt.sha256", folder / "corrupt.pt.sha256")
    return folder


@pytest.fixture()
def http(models_dir: Path) -> Iterator[httpx.Client]:
    with serve(model_path=models_dir / "digits.pt", api_keys=[KEY]) as url, \
            httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
        yield client


def served_sha(http: httpx.Client) -> str:
    return http.get("/model").json()["checksum"]["sha256"]


def test_reload_swaps_in_another_artifact(http: httpx.Client, models_dir: Path) -> None:
    before = served_sha(http)
    response = http.post("/admin/reload", json={"path": "other.pt"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["previous_sha256"] == before and body["artifact"] == "other.pt"
    assert served_sha(http) == body["sha256"] != before
    assert http.get("/model").json()["latent_dim"] == 3
    assert len(http.post("/sample", json={"n": 2, "seed": 0}).json()["z"][0]) == 3
    # no body: the artifact served now, read again from disk
    again = http.post("/admin/reload")
    assert again.status_code == 200 and again.json()["sha256"] == body["sha256"]
    assert 'vae_model_reloads_total{outcome="ok"} 2.0' in http.get("/metrics").text


@pytest.mark.parametrize(("path", "status", "phrase"), [
    ("corrupt.pt", 422, "does not match"),
    ("missing.pt", 422, "no model artifact"),
    ("../digits.pt", 403, "not inside the models directory"),
    ("/etc/passwd", 403, "not inside the models directory"),
    ("", 403, "not inside the models directory"),
])
def test_a_failed_reload_keeps_the_old_model(http: httpx.Client, path: str, status: int, phrase: str) -> None:
    before = served_sha(http)
    response = http.post("/admin/reload", json={"path": path})
    assert response.status_code == status, response.text
    assert phrase in response.json()["detail"] and "Traceback" not in response.text
    assert served_sha(http) == before
    assert http.post("/anomaly-score", content=png_bytes(np.zeros((8, 8))),
                     headers={"content-type": "image/png"}).status_code == 200
    assert http.get("/readyz").status_code == 200


def test_admin_without_keys_only_when_allowed(models_dir: Path) -> None:
    with serve(model_path=models_dir / "digits.pt", admin_without_keys=True) as url, httpx.Client(base_url=url) as c:
        assert c.post("/admin/reload", json={"path": "other.pt"}, timeout=60).status_code == 200


def test_requests_during_reloads_all_succeed(http: httpx.Client, digit_images: np.ndarray) -> None:
    """Clients hammer the API while the model is swapped back and forth six times: none fails."""
    stop = threading.Event()
    statuses: list[int] = []
    images = {"images": [image.tolist() for image in digit_images[:8]]}

    def client_loop() -> None:
        with httpx.Client(base_url=str(http.base_url), headers=AUTH, timeout=60) as client:
            while not stop.is_set():
                for path, body in (("/anomaly-score", images), ("/encode", images), ("/sample", {"n": 4})):
                    response = client.post(path, json=body)
                    statuses.append(response.status_code)
                    assert response.status_code == 200, response.text

    with ThreadPoolExecutor(6) as pool:
        clients = [pool.submit(client_loop) for _ in range(6)]
        try:
            for name in ("other.pt", "digits.pt") * 3:
                assert http.post("/admin/reload", json={"path": name}).status_code == 200
        finally:
            stop.set()
        for future in clients:
            future.result()
    assert len(statuses) > 30 and set(statuses) == {200}
