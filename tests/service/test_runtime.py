"""The runtime: thresholds and p-values from calibration, and every broken-artifact case."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from service.errors import ArtifactError
from service.runtime import ModelRuntime, sha256_of


@pytest.fixture(scope="module")
def runtime(digits_artifact: Path) -> ModelRuntime:
    return ModelRuntime.load(digits_artifact)


def test_loads_metadata_and_checksum(runtime: ModelRuntime, digits_artifact: Path) -> None:
    assert runtime.input_shape == (1, 8, 8) and runtime.latent_dim == 2 and runtime.score_kind == "excess"
    assert runtime.sha256 == sha256_of(digits_artifact)
    assert np.all(np.diff(runtime.calibration_scores) >= 0) and runtime.map_scale > 0


@pytest.mark.parametrize("fpr", [1 / 271, 0.005, 0.01, 0.05, 0.1, 0.5, 0.99])
def test_anomaly_exactly_when_p_value_at_most_fpr(runtime: ModelRuntime, fpr: float) -> None:
    calibration = runtime.calibration_scores
    probes = np.concatenate([calibration, calibration + 1e-4, calibration - 1e-4,
                             np.linspace(calibration[0] - 5, calibration[-1] + 5, 500)])
    flagged = probes > runtime.threshold(fpr)
    np.testing.assert_array_equal(flagged, runtime.p_values(probes) <= fpr)


def test_threshold_keeps_the_false_positive_rate_on_calibration(runtime: ModelRuntime) -> None:
    calibration = runtime.calibration_scores
    for fpr in (0.01, 0.05, 0.1, 0.25):
        observed = np.mean(calibration > runtime.threshold(fpr))
        assert observed <= fpr and observed >= fpr - 2 / len(calibration)


def test_p_value_formula(runtime: ModelRuntime) -> None:
    calibration = runtime.calibration_scores
    n = len(calibration)
    score = calibration[n // 2]
    expected = (1 + np.sum(calibration >= score)) / (n + 1)
    assert runtime.p_values(np.array([score]))[0] == pytest.approx(expected)
    assert runtime.p_values(np.array([calibration[-1] + 1]))[0] == pytest.approx(1 / (n + 1))
    assert runtime.p_values(np.array([calibration[0] - 1]))[0] == pytest.approx(1.0)


def test_p_values_equal_the_count_even_on_ties(runtime: ModelRuntime) -> None:
    calibration = runtime.calibration_scores
    n = len(calibration)
    probes = np.concatenate([calibration, np.nextafter(calibration, np.inf), np.nextafter(calibration, -np.inf),
                             np.linspace(calibration[0] - 5, calibration[-1] + 5, 200)])
    probes = np.concatenate([probes, probes.astype(np.float32)])     # the model's scores are float32
    counted = [(1 + int(np.sum(calibration >= s))) / (n + 1) for s in probes.tolist()]
    assert [runtime.p_value(s) for s in probes.tolist()] == counted
    assert runtime.p_values(probes).tolist() == counted
    assert runtime.p_values(probes.reshape(2, -1)).shape == (2, len(probes) // 2)


def test_an_fpr_below_what_calibration_supports_is_refused(runtime: ModelRuntime) -> None:
    assert runtime.min_fpr == pytest.approx(1 / 271)
    assert runtime.threshold(runtime.min_fpr) == runtime.calibration_scores[-1]
    with pytest.raises(ValueError, match="needs at least 999 calibration scores; this model has 270"):
        runtime.threshold(0.001)


def test_scores_and_maps_are_alike_from_one_call_or_two(runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Artifacts exported before `score_with_map` existed get their maps from two calls instead."""
    x = torch.rand(5, *runtime.input_shape, generator=torch.Generator().manual_seed(0))
    assert runtime.fused_map
    fused = runtime.score_with_map(x)
    monkeypatch.setattr(ModelRuntime, "fused_map", property(lambda self: False))
    apart = runtime.score_with_map(x)
    for one, two in zip(fused, apart, strict=True):
        torch.testing.assert_close(one, two, rtol=0, atol=0)
    assert apart[1].shape == (5, 8, 8)


class CallRecorder:
    """Stands in for the scripted module and notes which of its methods get called."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module, self.called = module, set()

    def __getattr__(self, name: str) -> object:
        self.called.add(name)
        return getattr(self.module, name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.called.add("forward")
        return self.module(x)


def test_warm_up_calls_every_method_that_serving_calls(runtime: ModelRuntime) -> None:
    """A method first called by a request costs it TorchScript's profiling and optimisation (and
    the batcher a wrong idea of the model's speed): the warm-up must have called it already."""
    warmed, served = CallRecorder(runtime.module), CallRecorder(runtime.module)
    dataclasses.replace(runtime, module=warmed).warm_up(rounds=1)
    serving = dataclasses.replace(runtime, module=served)
    x = torch.rand(3, *runtime.input_shape)
    serving.reconstruct(x), serving.score(x), serving.score_with_map(x), serving.decode(serving.encode(x)[0])
    assert served.called <= warmed.called, f"not warmed up: {served.called - warmed.called}"
    assert {"score", "score_with_map", "encode", "decode", "forward"} <= served.called


def copy_artifact(source: Path, folder: Path, sidecar: bool = True) -> Path:
    target = folder / source.name
    target.write_bytes(source.read_bytes())
    if sidecar:
        (folder / (source.name + ".sha256")).write_text(f"{sha256_of(target)}  {target.name}\n")
    return target


def rewrite_metadata(path: Path, change: dict) -> None:
    """Rewrite the artifact's metadata.json entry (a TorchScript file is a zip archive)."""
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in entries if n.endswith("extra/metadata.json"))
    metadata = json.loads(entries[name])
    metadata.update(change)
    entries[name] = json.dumps(metadata).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    (path.parent / (path.name + ".sha256")).write_text(f"{sha256_of(path)}  {path.name}\n")


def test_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no model artifact at"):
        ModelRuntime.load(tmp_path / "absent.pt")


def test_missing_checksum(digits_artifact: Path, tmp_path: Path) -> None:
    path = copy_artifact(digits_artifact, tmp_path, sidecar=False)
    with pytest.raises(ArtifactError, match="no checksum file"):
        ModelRuntime.load(path)
    assert ModelRuntime.load(path, verify=False).latent_dim == 2


def test_corrupt_artifact_fails_its_checksum(digits_artifact: Path, tmp_path: Path) -> None:
    path = copy_artifact(digits_artifact, tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match"):
        ModelRuntime.load(path)


def test_not_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"definitely not a model")
    (tmp_path / "junk.pt.sha256").write_text(f"{sha256_of(path)}  junk.pt\n")
    with pytest.raises(ArtifactError, match="not a TorchScript VAE artifact"):
        ModelRuntime.load(path)


@pytest.mark.parametrize(("change", "message"), [
    ({"format_version": 99}, "format version 99"),
    ({"calibration": {"scores": [], "score_kind": "elbo"}}, "no calibration scores"),
])
def test_incompatible_metadata(digits_artifact: Path, tmp_path: Path, change: dict, message: str) -> None:
    path = copy_artifact(digits_artifact, tmp_path)
    rewrite_metadata(path, change)
    with pytest.raises(ArtifactError, match=message):
        ModelRuntime.load(path)


def test_p_values_are_flat_on_held_out_images_and_pile_up_near_zero_on_drifted_ones(
        runtime: ModelRuntime, digits_artifact: Path) -> None:
    """What the README tells operators to watch in `vae_anomaly_p_values`."""
    from training.export import artifact_splits, load_artifact

    test = artifact_splits(load_artifact(digits_artifact)[1]).test.images          # never calibrated on
    held_out = runtime.p_values(runtime.score(torch.as_tensor(test))[0].numpy())
    brighter = runtime.p_values(runtime.score(torch.as_tensor(np.clip(test + 0.3, 0, 1)))[0].numpy())
    assert len(held_out) == 180
    assert 0.35 <= np.mean(held_out <= 0.5) <= 0.65 and np.mean(held_out <= 0.05) <= 0.12
    assert np.mean(brighter <= 0.01) >= 0.5
