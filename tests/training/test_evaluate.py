"""Synthetic defects and the evaluation harness: masks match the change, runs repeat, texture bands
never overlap, the quick evaluation of a tiny digits artifact yields complete tables with the
anchors beside the VAE and the targets table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from service.runtime import ModelRuntime
from tests.conftest import quick_config
from training.calibrate import calibrate
from training.data import load_source
from training.defects import CHANGED, IMAGE_DEFECTS, TEXTURE_DEFECTS, apply_defect, defective_set
from training.evaluate import (
    ANCHOR_NAMES,
    TEXTURES,
    Options,
    build_parser,
    conformal_threshold,
    detection_targets,
    options_from_args,
    run,
    segmenter_check,
    segmenter_sentence,
    texture_patches,
    train_cached,
    with_segmenter,
)
from training.export import artifact_splits, load_artifact, segmenter_levels_of, segmenter_steps_of
from training.reference import NAME as REFERENCE


def sample_images() -> dict[str, np.ndarray]:
    """One 8x8 digit, one 28x28 object on a black background, one 64x64 texture patch."""
    digits = load_source("digits").images[:2]
    yy, xx = np.mgrid[0:28, 0:28]
    shirt = (((yy - 14) / 11) ** 2 + ((xx - 14) / 8) ** 2 < 1) * (0.6 + 0.3 * np.sin(xx / 2.0))
    texture = 0.5 + 0.25 * np.sin(np.mgrid[0:64, 0:64][1] / 3.0) * np.cos(np.mgrid[0:64, 0:64][0] / 5.0)
    return {"digits": digits, "object": shirt[None, None].astype(np.float32),
            "texture": texture[None, None].astype(np.float32)}


@pytest.mark.parametrize("kind", sorted(TEXTURE_DEFECTS))
def test_masks_are_where_pixels_changed_and_images_stay_in_range(kind: str) -> None:
    for name, images in sample_images().items():
        if name != "texture" and kind not in IMAGE_DEFECTS:
            continue
        defective, masks = defective_set(images, kind, seed=3)
        assert defective.shape == images.shape and defective.dtype == np.float32
        assert masks.shape == (len(images), *images.shape[2:]) and masks.dtype == bool
        assert 0.0 <= defective.min() and defective.max() <= 1.0
        change = np.abs(defective - images).max(1)
        assert np.array_equal(change > CHANGED, masks), (name, kind)
        assert np.all(change[~masks] <= CHANGED), (name, kind)    # nothing outside the mask moves
        assert masks.any(axis=(1, 2)).all(), (name, kind)
        assert masks.mean() <= 0.25, (name, kind, masks.mean())   # local, not the whole image


@pytest.mark.parametrize("kind", sorted(TEXTURE_DEFECTS))
def test_defects_are_seeded(kind: str) -> None:
    image = sample_images()["texture"][0]
    first, mask = apply_defect(image, kind, 7)
    again, same_mask = apply_defect(image, kind, 7)
    other, _ = apply_defect(image, kind, 8)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(mask, same_mask)
    assert not np.array_equal(first, other)


def test_region_defects_cover_a_modest_area() -> None:
    texture = sample_images()["texture"].repeat(8, 0)
    for kind in ("gaussian_noise", "stain", "missing_patch", "blur", "contrast", "intensity_shift",
                 "foreign_material", "missing_material"):
        share = defective_set(texture, kind, seed=0)[1].mean()
        assert 0.03 <= share <= 0.15, (kind, share)


def test_unknown_defect_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown defect"):
        apply_defect(np.zeros((1, 8, 8), np.float32), "rust", 0)


def test_threshold_is_the_service_threshold() -> None:
    scores = np.random.default_rng(0).normal(size=250)
    runtime = ModelRuntime(module=None, metadata={}, path=Path("x"), sha256="", calibration_scores=np.sort(scores))
    for fpr in (0.004, 0.01, 0.05, 0.3):
        assert conformal_threshold(scores, fpr) == runtime.threshold(fpr)
    assert np.isnan(conformal_threshold(scores[:50], 0.01))   # too few scores for 1%


def test_quick_evaluation_reports_the_vae_beside_the_anchors(digits_artifact: Path, tmp_path: Path) -> None:
    options = Options(out=tmp_path / "report", digits=digits_artifact, fashion=tmp_path / "absent.pt",
                      suites=("defects", "calibration"), quick=True, progress=False, cache=tmp_path / "cache")
    results = run(options)
    block = results["defects"]["digits"]
    kinds = ("recon", "elbo", "iwae", "excess", "peak", "local", "combined")
    assert list(block["metrics"])[0] == "vae:excess"            # the artifact's default comes first
    assert set(block["metrics"]) == {*(f"vae:{k}" for k in kinds), *ANCHOR_NAMES, REFERENCE}
    for per_kind in block["metrics"].values():
        assert set(per_kind) == {*IMAGE_DEFECTS, "mean"}
        for metrics in per_kind.values():
            assert 0.0 <= metrics["auroc"] <= 1.0 and 0.0 <= metrics["aupr"] <= 1.0
            assert 0.0 <= metrics["recall"] <= 1.0
    assert block["parity"] == "equal to the artifact's calibration scores"
    assert block["segmenter"] is None                              # excess reads no segmenter
    assert all(0.0 <= v <= 1.0 for kind in block["pixel"].values() for v in kind.values())
    observed = results["calibration"]["artifacts"]["digits"]["observed"]
    assert set(observed) == set(block["metrics"])
    report = (tmp_path / "report" / "report.md").read_text()
    assert ("| kind | vae:excess | vae:recon | vae:elbo | vae:iwae | vae:peak | vae:local | vae:combined "
            "| PCA recon | PCA KDE | OC-SVM | IForest | supervised reference |") in report
    assert "## The targets" in report and "digits: observed FPR at the 1% threshold (vae:excess)" in report
    assert "Defect segmenter" not in report
    # trainings depend on the CPU they ran on, so the report names it
    assert results["machine"].endswith(f"torch {torch.__version__}") and f"on {results['machine']}." in report
    assert f"{os.cpu_count()} cores" in results["machine"]
    assert (tmp_path / "report" / "defects-digits-auroc.png").stat().st_size > 0
    assert (tmp_path / "report" / "results.json").exists()


def test_texture_bands_are_disjoint() -> None:
    train, cal, test = texture_patches("brick", stride=32)
    assert train.shape[1:] == cal.shape[1:] == test.shape[1:] == (64, 64)
    assert len(train) > len(test) > 0 and len(cal) > 0
    # no patch of one band reappears in another (the bands are separate columns of the image)
    seen = {p.tobytes() for p in train}
    assert not any(p.tobytes() in seen for p in (*cal, *test))


def test_a_cached_segmenter_of_other_steps_or_levels_is_retrained_on_a_copy(digits_artifact: Path,
                                                                            tmp_path: Path) -> None:
    """The evaluation's trainings are cached by their settings, where the segmenter's steps are
    often `auto`; the steps and levels are checked on the artifact itself, so a changed count or
    depth never reuses a segmenter trained for another."""
    assert with_segmenter(digits_artifact, tmp_path, 6) == digits_artifact      # excess reads none
    fused = tmp_path / "fused.pt"
    calibrate(digits_artifact, fused, score_kind="fused", segmenter_steps=4, command="test")
    assert with_segmenter(fused, tmp_path, 4) == fused
    retrained = with_segmenter(fused, tmp_path, 6, progress=False)
    assert retrained.name == "fused-segmenter6.pt"          # the name it had before levels, so it stays cached
    assert segmenter_steps_of(load_artifact(retrained)[1]) == 6
    assert segmenter_steps_of(load_artifact(fused)[1]) == 4                       # the source untouched
    written = retrained.stat().st_mtime_ns
    assert with_segmenter(fused, tmp_path, 6) == retrained and retrained.stat().st_mtime_ns == written
    deeper = with_segmenter(fused, tmp_path, 4, levels=3, progress=False)
    assert deeper.name == "fused-segmenter4-levels3.pt"
    assert segmenter_levels_of(load_artifact(deeper)[1]) == 3 and segmenter_steps_of(load_artifact(deeper)[1]) == 4
    assert with_segmenter(deeper, tmp_path, 4, levels=3) == deeper
    check = segmenter_check(*load_artifact(deeper), artifact_splits(load_artifact(deeper)[1]).cal.images)
    assert "4 steps at 3 levels" in segmenter_sentence(check)


def test_the_training_cache_is_keyed_without_the_segmenter_steps_or_levels(tmp_path: Path) -> None:
    """Which segmenter a cached training has is `with_segmenter`'s business: asking for other steps
    or levels reuses the cached VAE rather than training it again."""
    config = quick_config(tmp_path, data="digits", epochs=1, score="fused", segmenter_steps=3)
    first = train_cached(config, tmp_path / "cache", "tiny")
    written = first.stat().st_mtime_ns
    again = train_cached(quick_config(tmp_path, data="digits", epochs=1, score="fused", segmenter_steps=5),
                         tmp_path / "cache", "tiny")
    assert again == first and first.stat().st_mtime_ns == written
    deeper = quick_config(tmp_path, data="digits", epochs=1, score="fused", segmenter_steps=3, segmenter_levels=3)
    assert train_cached(deeper, tmp_path / "cache", "tiny") == first and first.stat().st_mtime_ns == written
    assert train_cached(quick_config(tmp_path, data="digits", epochs=2, score="fused", segmenter_steps=3),
                        tmp_path / "cache", "tiny") != first          # the VAE's own settings still count
    assert train_cached(quick_config(tmp_path, data="digits", epochs=1, score="fused", segmenter_steps=3,
                                     denoise=True), tmp_path / "cache", "tiny") != first


def test_the_segmenter_check_is_the_artifacts_own_or_measured_on_the_images_scored(digits_artifact: Path,
                                                                                   tmp_path: Path) -> None:
    fused = tmp_path / "fused.pt"
    calibrate(digits_artifact, fused, score_kind="fused", segmenter_steps=4, command="test")
    module, metadata = load_artifact(fused)
    cal = artifact_splits(metadata).cal.images
    own = segmenter_check(module, metadata, cal)
    assert own == {"steps": 4, "levels": 2, **metadata["score"]["segmenter"]["self_check"]}
    fewer = segmenter_check(module, metadata, cal[:100])                # not what the artifact measured on
    assert fewer["steps"] == 4 and fewer["clean"] == 100 and 0.0 <= fewer["auroc"] <= 1.0
    assert segmenter_check(*load_artifact(digits_artifact), cal) is None
    assert f"Defect segmenter: 4 steps at 2 levels, self-check AUROC {own['auroc']:.3f}" in segmenter_sentence(own)
    assert segmenter_sentence(None) == ""


def test_texture_segmenter_steps_and_levels_are_set_for_all_or_per_texture(
        capsys: pytest.CaptureFixture[str]) -> None:
    def options(*argv: str) -> Options:
        return options_from_args(build_parser().parse_args(list(argv)))

    defaults = Options().texture_segmenter_steps
    assert set(defaults) == set(TEXTURES) and options().texture_segmenter_steps == defaults
    assert options("--texture-segmenter-steps", "3000").texture_segmenter_steps == dict.fromkeys(TEXTURES, 3000)
    assert options("--texture-segmenter-steps", "grass=500").texture_segmenter_steps == {**defaults, "grass": 500}
    levels = Options().texture_segmenter_levels
    assert set(levels) == set(TEXTURES) and options().texture_segmenter_levels == levels
    assert options("--texture-segmenter-levels", "2").texture_segmenter_levels == dict.fromkeys(TEXTURES, 2)
    assert options("--texture-segmenter-levels", "gravel=3").texture_segmenter_levels == {**levels, "gravel": 3}
    assert options("--novelty-segmenter-levels", "3").novelty_segmenter_levels == 3
    for flag, bad, message in [*(("--texture-segmenter-steps", b, "must be a positive count for every texture")
                                 for b in ("moss=100", "grass=many", "0", "grass=-5")),
                               *(("--texture-segmenter-levels", b, "must be 2 or 3 for every texture")
                                 for b in ("4", "brick=1", "moss=3"))]:
        with pytest.raises(SystemExit):
            options(flag, bad)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        options("--novelty-segmenter-levels", "4")


def test_a_kind_where_anchor_and_default_are_both_perfect_counts_as_met_and_says_so() -> None:
    def block(default: dict[str, float], anchor: dict[str, float]) -> dict:
        def metric(values: dict[str, float]) -> dict:
            mean = sum(values.values()) / len(values)
            return {**{k: {"auroc": v} for k, v in values.items()}, "mean": {"auroc": mean}}
        return {"metrics": {"vae:fused": metric(default), **{a: metric(anchor) for a in ANCHOR_NAMES}}}

    tied = detection_targets("t", block({"noise": 1.0, "blur": 0.9}, {"noise": 1.0, "blur": 0.8}), 0.85, 0.95)[2]
    assert tied[1:] == ["1 of 2 (and 1 tied at 1.000)", "2 of 2", "yes"]
    # a tie below 1.0 is not above the anchor, and a lost kind stays a miss
    level = detection_targets("t", block({"noise": 0.9, "blur": 0.9}, {"noise": 0.9, "blur": 0.8}), 0.85, 0.95)[2]
    assert level[1:] == ["1 of 2", "2 of 2", "**no**"]
    lost = detection_targets("t", block({"noise": 0.99, "blur": 0.9}, {"noise": 1.0, "blur": 0.8}), 0.85, 0.95)[2]
    assert lost[1:] == ["1 of 2", "2 of 2", "**no**"]
