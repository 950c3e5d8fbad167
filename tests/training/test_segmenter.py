"""The defect segmenter and its training corruptions: masks say exactly what changed, corruptions
repeat by seed and stay apart from the evaluation's, a trained segmenter finds a defect it never
saw, and an artifact gains the `learned` and `fused` kinds by recalibration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from training.calibrate import calibrate
from training.corruptions import CLEAN_SHARE, PHOTOS, VISIBLE, Corruptor
from training.data import load_source
from training.evaluate import TEXTURES
from training.export import load_artifact, segmenter_self_check
from training.model import VAEConfig, build_vae
from training.scoring import ServableVAE
from training.segmenter import build_segmenter

SIDE = 16


def stripes(count: int, seed: int) -> torch.Tensor:
    """Normal images (count, 1, SIDE, SIDE): soft diagonal stripes of random phase and contrast."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    phase = torch.rand(count, 1, 1, 1, generator=g) * 6.28
    contrast = 0.15 + 0.2 * torch.rand(count, 1, 1, 1, generator=g)
    return (0.5 + contrast * torch.sin((xx + yy) / 2.0 + phase)).float()


def test_masks_mark_exactly_the_visibly_changed_pixels() -> None:
    images = stripes(256, 0)
    corrupted, masks = Corruptor(1, SIDE, SIDE, seed=0, bank_size=64)(images)
    change = (corrupted - images).abs().amax(1, keepdim=True)
    assert corrupted.min() >= 0 and corrupted.max() <= 1 and masks.shape == (256, 1, SIDE, SIDE)
    assert torch.all(change[masks > 0] > VISIBLE) and torch.all(change[masks == 0] <= VISIBLE)
    clean = (masks.flatten(1).sum(1) == 0).float().mean()
    assert CLEAN_SHARE - 0.1 < clean < CLEAN_SHARE + 0.15            # plus the few that changed nothing visible
    areas = masks.flatten(1).mean(1)[masks.flatten(1).sum(1) > 0]
    assert areas.min() < 0.05 and areas.max() > 0.15                  # thin lines and scattered pixels to blobs


def test_the_same_seed_gives_the_same_corruptions() -> None:
    images = stripes(32, 1)
    first, again, other = (Corruptor(1, SIDE, SIDE, seed=s, bank_size=16)(images) for s in (5, 5, 6))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize(("channels", "side"), [(1, 8), (3, 32), (1, 256)])
def test_any_image_size_and_colour_can_be_corrupted(channels: int, side: int) -> None:
    """Crops of the photographs fit images from 8 px to larger than the smallest photograph's half."""
    images = torch.full((4, channels, side, side), 0.5)
    corrupted, masks = Corruptor(channels, side, side, seed=0, bank_size=8)(images)
    assert corrupted.shape == images.shape and masks.shape == (4, 1, side, side)


def test_the_training_corruptions_never_use_the_evaluation_textures() -> None:
    assert not set(PHOTOS) & set(TEXTURES)


def test_a_trained_segmenter_finds_corruptions_and_a_defect_kind_it_never_saw(one_thread: None) -> None:
    """Trained on corrupted stripes, the segmenter finds fresh corruptions, and `learned` ranks
    stripes with a straight dark bar above clean ones, its map peaking on the bar: no straight bar
    is among its corruptions."""
    torch.manual_seed(0)
    servable = ServableVAE(build_vae(VAEConfig("conv", 1, SIDE, SIDE, 4, (32,), (16, 16), "gaussian")), "learned")
    servable.eval()
    losses = servable.fit_segmenter(stripes(2000, 2), stripes(64, 3), steps=300, progress=False)
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])
    corrupted, masks = Corruptor(1, SIDE, SIDE, seed=99, bank_size=64)(stripes(128, 5))
    with torch.no_grad():
        found = torch.sigmoid(servable.segmenter(corrupted, servable(corrupted)))
    assert roc_auc_score(masks.flatten().numpy(), found.flatten().numpy()) > 0.7
    assert segmenter_self_check(servable, stripes(200, 6).numpy())["auroc"] > 0.8
    clean = stripes(64, 4)
    barred = clean.clone()
    barred[:, :, 4:12, 7:9] = 0.05
    with torch.no_grad():
        clean_scores, barred_scores = servable.score(clean), servable.score(barred)
        maps = servable.anomaly_map(barred)
    assert (barred_scores > clean_scores).float().mean() > 0.9
    inside = maps[:, 4:12, 7:9].mean((1, 2))
    assert (inside > maps.mean((1, 2))).float().mean() > 0.9


class LearnedOnly:
    """Stands in for an artifact: scores images by `learned` with the given function."""

    def __init__(self, score: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.score = score

    def score_by(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        assert kind == "learned"
        return self.score(x)


def test_the_self_check_reads_chance_for_a_blind_segmenter_and_one_for_a_perfect_one() -> None:
    clean = stripes(50, 7)
    blind = segmenter_self_check(LearnedOnly(lambda x: torch.zeros(len(x))), clean.numpy())
    # knows the clean images, so any visible corruption is found: the corrupted copies score above 0
    knowing = LearnedOnly(lambda x: torch.cdist(x.flatten(1), clean.flatten(1)).amin(1))
    perfect = segmenter_self_check(knowing, clean.numpy())
    assert blind["auroc"] == 0.5 and perfect["auroc"] == 1.0
    assert blind["clean"] == 50 and blind["corrupted"] > 50          # a small set is corrupted more than once
    assert segmenter_self_check(knowing, clean.numpy()) == perfect      # seeded: the same figure every time


def test_an_artifact_gains_the_learned_kinds_by_recalibration(digits_artifact: Path, tmp_path: Path) -> None:
    before = load_artifact(digits_artifact)[1]
    assert "fused" not in before["score"]["kinds"] and before["score"]["segmenter"]["steps"] == 0
    out = tmp_path / "fused.pt"
    metadata = calibrate(digits_artifact, out, score_kind="fused", segmenter_steps=4, command="test")
    module, stored = load_artifact(out)
    assert stored == metadata and stored["score"]["kind"] == "fused"
    assert {"learned", "fused"} <= set(stored["score"]["kinds"]) and stored["score"]["segmenter"]["steps"] == 4
    assert "self_check" not in before["score"]["segmenter"]
    assert 0.0 <= stored["score"]["segmenter"]["self_check"]["auroc"] <= 1.0
    # recalibrating again keeps the trained segmenter: same scores, no second training
    again = calibrate(out, tmp_path / "again.pt", score_kind="learned", segmenter_steps=99, command="test")
    assert again["score"]["segmenter"]["steps"] == 4
    images = torch.as_tensor(load_source("digits").images[:32])
    with torch.no_grad():
        torch.testing.assert_close(module.score_by(images, "learned"),
                                   load_artifact(tmp_path / "again.pt")[0].score(images))


def test_retrain_segmenter_replaces_only_the_segmenter(digits_artifact: Path, tmp_path: Path) -> None:
    first = tmp_path / "fused.pt"
    calibrate(digits_artifact, first, score_kind="fused", segmenter_steps=4, command="test")
    metadata = calibrate(first, tmp_path / "again.pt", segmenter_steps=6, retrain_segmenter=True, command="test")
    assert metadata["score"]["kind"] == "fused" and metadata["score"]["segmenter"]["steps"] == 6
    before, after = load_artifact(first)[0], load_artifact(tmp_path / "again.pt")[0]
    images = torch.as_tensor(load_source("digits").images[:32])
    with torch.no_grad():
        torch.testing.assert_close(before(images), after(images))             # the same VAE
        torch.testing.assert_close(before.score_by(images, "local"), after.score_by(images, "local"))
        assert not torch.allclose(before.score_by(images, "learned"), after.score_by(images, "learned"))
    # the same command twice trains the same segmenter: its weights start from the training seed
    calibrate(first, tmp_path / "twice.pt", segmenter_steps=6, retrain_segmenter=True, command="test")
    with torch.no_grad():
        torch.testing.assert_close(after.score(images), load_artifact(tmp_path / "twice.pt")[0].score(images))


def test_retrain_segmenter_needs_a_kind_that_reads_it(digits_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--retrain-segmenter is for the scores that read it"):
        calibrate(digits_artifact, tmp_path / "x.pt", score_kind="peak", retrain_segmenter=True)


def test_learned_kinds_without_a_segmenter_are_refused_clearly(digits_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--segmenter-steps must be above 0"):
        calibrate(digits_artifact, tmp_path / "x.pt", score_kind="learned", segmenter_steps=0)
    module, _ = load_artifact(digits_artifact)
    with pytest.raises(torch.jit.Error, match="defect segmenter is not trained"):
        module.score_by(torch.rand(2, 1, 8, 8), "learned")


def test_a_three_level_segmenter_reads_further_than_two_levels() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 1, 64, 64)
    poked = x.clone()
    poked[0, 0, 32, 32] = 1.0 - poked[0, 0, 32, 32]
    for levels, reaches in ((2, False), (3, True)):
        segmenter = build_segmenter(1, levels=levels).eval()
        assert segmenter.levels == levels
        with torch.no_grad():
            before, after = segmenter(x, x), segmenter(poked, x)
        assert before.shape == (1, 1, 64, 64)
        moved = (after - before)[0, 0].abs() > 0
        assert moved[31:34, 31:34].any()                                    # both see next door
        assert bool(moved[44:50, 29:36].any()) == reaches                   # 12 to 17 rows below
        assert not moved[60:, :].any() and not moved[:4, :].any()           # neither sees 28 away


@pytest.mark.parametrize(("channels", "side"), [(1, 8), (3, 13), (1, 64)])
def test_a_three_level_segmenter_takes_any_size_and_scripts(channels: int, side: int) -> None:
    segmenter = build_segmenter(channels, levels=3).eval()
    x, recon = torch.rand(2, channels, side, side), torch.rand(2, channels, side, side)
    with torch.no_grad():
        logits = segmenter(x, recon)
        torch.testing.assert_close(torch.jit.script(segmenter)(x, recon), logits)
    assert logits.shape == (2, 1, side, side)


def test_only_two_or_three_levels_exist() -> None:
    with pytest.raises(ValueError, match="2 or 3 levels, not 4"):
        build_segmenter(1, levels=4)


def test_recalibration_trains_a_three_level_segmenter_and_keeps_it(digits_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "deep.pt"
    metadata = calibrate(digits_artifact, out, score_kind="fused", segmenter_steps=4, segmenter_levels=3,
                         command="test")
    assert metadata["score"]["segmenter"]["levels"] == 3
    # recalibrating rebuilds a 3-level segmenter from the metadata, so the weights load and score alike
    again = calibrate(out, tmp_path / "again.pt", score_kind="learned", command="test")
    assert again["score"]["segmenter"]["levels"] == 3 and again["score"]["segmenter"]["steps"] == 4
    images = torch.as_tensor(load_source("digits").images[:32])
    with torch.no_grad():
        torch.testing.assert_close(load_artifact(out)[0].score_by(images, "learned"),
                                   load_artifact(tmp_path / "again.pt")[0].score(images))
    with pytest.raises(ValueError, match="add --retrain-segmenter"):
        calibrate(out, tmp_path / "x.pt", segmenter_levels=2, command="test")
    back = calibrate(out, tmp_path / "back.pt", segmenter_steps=4, segmenter_levels=2, retrain_segmenter=True)
    assert back["score"]["segmenter"]["levels"] == 2
