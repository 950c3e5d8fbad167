"""Scores served over HTTP equal the scores the training module computed offline on the same
images: the calibration scores stored at training time, and a folder model whose files the
service must decode and resize exactly as training did."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import quick_config
from tests.service.conftest import serve
from training.calibrate import calibrate
from training.data import load_source, split_set
from training.export import load_artifact, score_images
from training.train import train


def served_scores(http: httpx.Client, **request: object) -> np.ndarray:
    response = http.post("/anomaly-score", **request)
    assert response.status_code == 200, response.text
    return np.array([r["score"] for r in response.json()["results"]])


def test_served_scores_reproduce_the_calibration_scores(client: httpx.Client, digits_artifact: Path) -> None:
    _, metadata = load_artifact(digits_artifact)
    calibration = split_set(load_source("digits"), 0.1, 0.15, 0.1, seed=0).cal.images[:, 0]    # (270, 8, 8)
    scores = np.concatenate([served_scores(client, json={"images": [img.tolist() for img in calibration[i:i + 64]]})
                             for i in range(0, len(calibration), 64)])
    np.testing.assert_allclose(np.sort(scores), metadata["calibration"]["scores"], rtol=1e-6, atol=1e-5)


def test_served_scores_equal_offline_scores_for_each_kind_of_input(client: httpx.Client,
                                                                    digits_artifact: Path) -> None:
    module, _ = load_artifact(digits_artifact)
    images = load_source("digits").images[100:140]                     # (40, 1, 8, 8), multiples of 1/16
    offline = score_images(module, images)
    np.testing.assert_allclose(served_scores(client, json={"images": [i[0].tolist() for i in images]}), offline,
                               rtol=1e-6, atol=1e-5)


def test_a_folder_model_scores_uploaded_files_as_training_loaded_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(48):                             # 20x20 files for a 16x16 model: both sides must resize
        pixels = np.clip(rng.normal(120, 25, (20, 20)) + 60 * np.sin(np.arange(20) / 3 + i), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "parts.pt"
    train(quick_config(tmp_path, data=str(folder), image_size=16, epochs=2, batch_size=8, out=str(out)))
    module, _ = load_artifact(out)
    offline = score_images(module, load_source(str(folder), image_size=16).images)
    paths = sorted(folder.iterdir())
    with serve(model_path=out, default_fpr=0.2) as url, httpx.Client(base_url=url, timeout=30) as http:
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
        served = served_scores(http, files=files)
    np.testing.assert_allclose(served, offline, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["combined", "fused"])
def test_a_combined_or_fused_artifact_serves_its_scores_and_maps(digits_artifact: Path, tmp_path: Path,
                                                                kind: str) -> None:
    """Recalibrated onto `combined` (or `fused`, with a defect segmenter trained for a few steps),
    the artifact's scores and its map (local statistics plus the excess, plus the segmenter's) come
    over HTTP exactly as the module computes them offline."""
    out = tmp_path / f"{kind}.pt"
    calibrate(digits_artifact, out, score_kind=kind, command="test", segmenter_steps=3)
    module, metadata = load_artifact(out)
    images = load_source("digits").images[200:216]
    with torch.no_grad():
        offline_maps = module.anomaly_map(torch.as_tensor(images)).numpy()
    with serve(model_path=out) as url, httpx.Client(base_url=url, timeout=30) as http:
        response = http.post("/anomaly-score?map=true", json={"images": [i[0].tolist() for i in images]})
        model = http.get("/model").json()
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert response.json()["score_kind"] == kind and model["score"]["kind"] == kind
    np.testing.assert_allclose([r["score"] for r in results], score_images(module, images), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.array([r["map"] for r in results]), offline_maps, rtol=1e-5, atol=1e-5)
    assert not np.allclose(offline_maps, module.excess_map(torch.as_tensor(images)).detach().numpy())
