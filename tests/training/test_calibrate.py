"""Recalibration: new default score, same weights, scores the service will reproduce, clear refusals."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.calibrate import calibrate
from training.export import artifact_splits, load_artifact, score_images
from training.scoring import LEARNED_KINDS, SCORE_KINDS


@pytest.fixture()
def artifact_copy(digits_artifact: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    shutil.copy(digits_artifact, path)
    (tmp_path / "model.pt.sha256").write_text(digits_artifact.with_name("digits.pt.sha256").read_text()
                                              .replace("digits.pt", "model.pt"))
    return path


def test_switching_the_score_keeps_the_weights_and_recalibrates(digits_artifact: Path, artifact_copy: Path) -> None:
    metadata = calibrate(artifact_copy, score_kind="peak", command="test")
    before, old = load_artifact(digits_artifact)
    after, reloaded = load_artifact(artifact_copy)            # the new checksum sidecar matches
    assert reloaded == metadata
    assert metadata["score"]["kind"] == metadata["calibration"]["score_kind"] == "peak"
    assert metadata["score"]["units"] == "nats per pixel"
    assert metadata["score"]["kinds"] == [k for k in SCORE_KINDS if k not in LEARNED_KINDS]   # no segmenter trained
    assert metadata["recalibrations"][-1]["score_kind"] == "peak"
    assert metadata["metrics"] == old["metrics"] and metadata["training"] == old["training"]
    splits = artifact_splits(old)
    np.testing.assert_array_equal(np.sort(score_images(after, splits.cal.images)), metadata["calibration"]["scores"])
    test = splits.test.images[:100]
    for kind in ("recon", "elbo", "iwae"):                     # same weights, same fixed noise
        np.testing.assert_array_equal(score_images(after, test, kind), score_images(before, test, kind))


def test_calibration_on_other_known_good_images(artifact_copy: Path, tmp_path: Path) -> None:
    _, metadata = load_artifact(artifact_copy)
    good = artifact_splits(metadata).test.images[:150]
    np.save(tmp_path / "good.npy", good)
    written = calibrate(artifact_copy, tmp_path / "site2.pt", data=str(tmp_path / "good.npy"))
    assert written["calibration"]["count"] == 150
    assert written["recalibrations"][-1]["data"].endswith("good.npy")
    assert (tmp_path / "site2.pt.sha256").exists()


def test_refusals_say_what_is_wrong(artifact_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--score must be one of"):
        calibrate(artifact_copy, score_kind="loudness")
    np.save(tmp_path / "few.npy", np.zeros((20, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="too few"):
        calibrate(artifact_copy, data=str(tmp_path / "few.npy"))
    with pytest.raises(FileNotFoundError):
        calibrate(artifact_copy, data=str(tmp_path / "absent.npy"))


def test_other_sizes_and_colours_are_converted_as_for_training(artifact_copy: Path, tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).random((120, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "rgb.npy", rgb)
    written = calibrate(artifact_copy, tmp_path / "rgb.pt", data=str(tmp_path / "rgb.npy"))
    assert written["calibration"]["count"] == 120


def test_command_line(artifact_copy: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "training", "calibrate", str(artifact_copy), "--score", "excess"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "score excess, 270 calibration scores" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "training", "calibrate", str(artifact_copy), "--score", "x"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--score: invalid choice: 'x' (choose from 'recon'" in bad.stderr
