"""The local and combined scores: they rise for removed detail, they stand on statistics fitted on
normal images only, and artifacts exported before them gain them by recalibration."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training.calibrate import calibrate, rebuild_servable
from training.defects import gaussian_blur
from training.export import artifact_splits, export_artifact, load_artifact, score_images
from training.local_density import FEATURES, LocalDensity, windows_for
from training.model import VAEConfig, build_vae
from training.scoring import LEARNED_KINDS, LOCAL_KINDS, SCORE_KINDS, ServableVAE

SIDE = 32
WITHOUT_SEGMENTER = [k for k in SCORE_KINDS if k not in LEARNED_KINDS]   # what an artifact without one offers


def grain(count: int, seed: int) -> torch.Tensor:
    """A fine random texture (count, 1, SIDE, SIDE): smoothed noise around mid-grey."""
    rng = np.random.default_rng(seed)
    planes = [0.5 + 2.0 * gaussian_blur(rng.normal(0, 0.1, (SIDE, SIDE)), 0.7) for _ in range(count)]
    return torch.as_tensor(np.clip(np.stack(planes), 0, 1)[:, None], dtype=torch.float32)


@pytest.fixture(scope="module")
def fitted() -> ServableVAE:
    torch.manual_seed(0)
    servable = ServableVAE(build_vae(VAEConfig("conv", 1, SIDE, SIDE, 4, (32,), (8, 16), "gaussian")), "combined", 4)
    servable.fit_local(grain(400, 0), grain(200, 1))
    return servable.eval()


def test_windows_scale_with_the_image() -> None:
    assert windows_for(64) == [(8, 4), (16, 8)]
    assert windows_for(28) == [(4, 2), (7, 3)]
    assert windows_for(8) == [(2, 1), (3, 1)]


def test_a_flattened_or_blurred_region_raises_local_and_lowers_the_error(fitted: ServableVAE) -> None:
    """Removing detail makes a plain reconstruction error smaller, and the local score larger than
    on any clean image."""
    clean = grain(60, 2)
    flattened, blurred = clean.clone(), clean.clone()
    flattened[:, :, 8:22, 8:22] = clean[:, :, 8:22, 8:22].mean((2, 3), keepdim=True)
    for i in range(len(clean)):
        smooth = gaussian_blur(clean[i, 0].numpy().astype(np.float64), 1.6)
        blurred[i, 0, 6:24, 6:24] = torch.as_tensor(smooth[6:24, 6:24], dtype=torch.float32)
    with torch.no_grad():
        local = {name: fitted.score_by(x, "local") for name, x in
                 (("clean", clean), ("flattened", flattened), ("blurred", blurred))}
        for damaged in (flattened, blurred):
            assert (fitted.score_by(damaged, "excess") < fitted.score_by(clean, "excess")).float().mean() > 0.9
    assert local["flattened"].min() > local["clean"].max()
    assert local["blurred"].min() > local["clean"].max()


def test_spread_gives_each_pixel_the_mean_of_its_windows() -> None:
    density = LocalDensity(4, 2)                        # 3 x 3 windows on 8 x 8
    distances = torch.zeros(1, 9)
    distances[0, 0] = 1.0                               # the top-left window only
    spread = density.spread(distances, 8, 8)[0]
    assert spread.shape == (8, 8)
    assert spread[:2, :2].eq(1.0).all()                 # covered by that window alone
    assert spread[2:4, :2].eq(0.5).all() and spread[2:4, 2:4].eq(0.25).all()
    assert spread[4:, :].eq(0.0).all() and spread[:, 4:].eq(0.0).all()


def test_the_map_of_combined_points_at_a_flattened_region(fitted: ServableVAE) -> None:
    """The excess map cannot show missing detail; the combined map does."""
    damaged = grain(20, 3)
    damaged[:, :, 8:22, 8:22] = damaged[:, :, 8:22, 8:22].mean((2, 3), keepdim=True)
    inside = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    inside[8:22, 8:22] = True
    with torch.no_grad():
        combined, excess = fitted.anomaly_map(damaged), fitted.excess_map(damaged)
    assert combined.shape == excess.shape == (20, SIDE, SIDE)
    assert combined[:, inside].mean() > 3 * combined[:, ~inside].mean()
    assert excess[:, inside].mean() < excess[:, ~inside].mean()


def test_combined_is_standardised_on_the_held_out_images(fitted: ServableVAE) -> None:
    """Each half of combined is 0 at the held-out median and 1 at their 99th percentile."""
    held_out = grain(200, 1)
    with torch.no_grad():
        peak, local = fitted.score_by(held_out, "peak"), fitted.score_by(held_out, "local")
    for index, scores in enumerate((peak, local)):
        standard = (scores.double() - fitted.combined_center[index]) / fitted.combined_scale[index]
        assert abs(standard.median().item()) < 0.02
        assert abs(standard.quantile(0.99).item() - 1.0) < 0.05


def test_unfitted_statistics_refuse_with_a_clear_message() -> None:
    density = LocalDensity(4, 2)
    assert not density.fitted and density.mean.shape == (0, FEATURES)
    servable = ServableVAE(build_vae(VAEConfig("mlp", 1, 8, 8, 2, (16,), (), "bernoulli")), "peak", 4)
    assert servable.available_kinds() == [k for k in SCORE_KINDS if k not in (*LOCAL_KINDS, *LEARNED_KINDS)]
    with pytest.raises(torch.jit.Error, match="not fitted"):
        torch.jit.script(servable).score_by(torch.rand(2, 1, 8, 8), "local")


def export_without_local(artifact: Path, out: Path, data: str | None = None) -> dict:
    """The artifact as exported before the local statistics existed (optionally recording another
    training data source)."""
    module, metadata = load_artifact(artifact)
    servable = rebuild_servable(module, metadata, "excess")
    for density in servable.local:
        density.register_buffer("mean", torch.zeros(0, FEATURES))
        density.register_buffer("precision", torch.zeros(0, FEATURES, FEATURES))
    calibration = artifact_splits(metadata).cal.images
    if data is not None:
        training = metadata["training"]
        metadata = {**metadata, "training": {**training, "config": {**training["config"], "data": data}}}
    return export_artifact(servable, metadata, calibration, out)


def test_recalibrating_an_artifact_from_before_fits_its_statistics(digits_artifact: Path, tmp_path: Path) -> None:
    """An artifact without the local statistics (as exported before they existed) gets them fitted
    on its own training split when recalibrated, and can then default to combined."""
    module, metadata = load_artifact(digits_artifact)
    splits = artifact_splits(metadata)
    old = tmp_path / "old.pt"
    exported = export_without_local(digits_artifact, old)
    assert "local" not in exported["score"]["kinds"]

    renewed = calibrate(old, tmp_path / "new.pt", score_kind="combined", command="test")
    assert renewed["score"]["kinds"] == WITHOUT_SEGMENTER
    assert renewed["calibration"]["score_kind"] == "combined"
    new_module, _ = load_artifact(tmp_path / "new.pt")
    np.testing.assert_array_equal(np.sort(score_images(new_module, splits.cal.images)),
                                  renewed["calibration"]["scores"])
    # fitted on the same training split with the same seed: the same statistics the export fitted
    for name, value in module.state_dict().items():
        if name.startswith("local."):
            torch.testing.assert_close(new_module.state_dict()[name], value)


def test_recalibrating_keeps_fitted_statistics(digits_artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.pt"
    shutil.copy(digits_artifact, copy)
    shutil.copy(digits_artifact.with_name("digits.pt.sha256"), tmp_path / "copy.pt.sha256")
    (tmp_path / "copy.pt.sha256").write_text((tmp_path / "copy.pt.sha256").read_text().replace("digits.pt", "copy.pt"))
    calibrate(copy, score_kind="local", command="test")
    before, _ = load_artifact(digits_artifact)
    after, _ = load_artifact(copy)
    for name, value in before.state_dict().items():
        torch.testing.assert_close(after.state_dict()[name], value, rtol=0, atol=0)


def test_without_its_training_data_an_old_artifact_keeps_the_other_kinds(digits_artifact: Path,
                                                                       tmp_path: Path) -> None:
    old = tmp_path / "old.pt"
    export_without_local(digits_artifact, old, data=str(tmp_path / "gone"))
    good = tmp_path / "good.npy"
    np.save(good, (artifact_splits(load_artifact(digits_artifact)[1]).cal.images[:, 0] * 16).astype(np.uint8))
    with pytest.raises(ValueError, match="needs the artifact's training data"):
        calibrate(old, tmp_path / "new.pt", score_kind="combined", data=str(good))
    renewed = calibrate(old, tmp_path / "new.pt", score_kind="peak", data=str(good))
    assert renewed["score"]["kinds"] == [k for k in SCORE_KINDS if k not in (*LOCAL_KINDS, *LEARNED_KINDS)]


def test_one_class_artifacts_with_few_calibration_images_gain_the_local_kinds(tmp_path: Path) -> None:
    """A one-class digits model holds about 25 calibration images: too few for a 1% threshold from
    --data, but its own split is what training had, so fitting the statistics must not refuse it."""
    from tests.conftest import quick_config
    from training.evaluate import with_current_scores
    from training.train import train

    out = tmp_path / "one-class.pt"
    train(quick_config(tmp_path, data="digits", class_filter=3, out=str(out)))
    export_without_local(out, tmp_path / "old.pt")
    upgraded = with_current_scores(tmp_path / "old.pt", tmp_path / "cache")
    _, metadata = load_artifact(upgraded)
    assert metadata["score"]["kinds"] == WITHOUT_SEGMENTER and metadata["calibration"]["count"] < 100
    assert with_current_scores(upgraded, tmp_path / "cache") == upgraded        # already there: itself
    switched = with_current_scores(upgraded, tmp_path / "cache", "combined")
    assert load_artifact(switched)[1]["score"]["kind"] == "combined"
