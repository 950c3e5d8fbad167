"""The texture drift benchmark (benchmarks/texture_drift.py): where its patches sit in the
photograph, which rows calibrate and which are scored, the rates it reports, and its report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import texture_drift
from benchmarks.texture_drift import SPLITS, interleaved, main, measure, patch_positions, top_and_bottom
from training.evaluate import conformal_threshold, texture_patches


def test_positions_are_where_the_evaluation_crops_its_patches() -> None:
    from skimage import data as textures

    image = textures.brick()
    bands = texture_patches("brick", stride=32)
    positions = patch_positions(*image.shape, stride=32)
    for band, patches in zip(("train", "cal", "test"), bands, strict=True):
        tops, lefts = positions[band]
        assert len(tops) == len(patches)
        crops = np.stack([image[t:t + 64, x:x + 64] for t, x in zip(tops, lefts, strict=True)])
        assert np.array_equal(crops, patches), band


BRICK_TEST_TOPS = np.repeat(np.arange(0, 512 - 64 + 1, 8), 9)      # brick's test band: 57 rows of 9 patches


def _rows_apart(calibration: np.ndarray, scored: np.ndarray) -> bool:
    """No calibration patch shares a pixel row with a scored one (the patches are 64 px tall)."""
    return all(abs(int(a) - int(b)) >= 64 for a in BRICK_TEST_TOPS[calibration] for b in BRICK_TEST_TOPS[scored])


def test_top_and_bottom_calibrates_on_the_top_rows_and_scores_the_rows_below_them() -> None:
    calibration, scored = top_and_bottom(BRICK_TEST_TOPS)
    assert calibration.sum() == 28 * 9 and scored.sum() == 22 * 9
    assert BRICK_TEST_TOPS[calibration].max() < BRICK_TEST_TOPS[scored].min()
    assert _rows_apart(calibration, scored)


def test_interleaved_stripes_share_no_pixel_and_reach_across_the_band() -> None:
    calibration, scored = interleaved(BRICK_TEST_TOPS)
    assert calibration.sum() == scored.sum() == 2 * 9 * 9       # two stripes of 128 px each, 9 patch rows in each
    assert _rows_apart(calibration, scored)
    assert BRICK_TEST_TOPS[calibration].min() == 0 and BRICK_TEST_TOPS[scored].max() == 448


def test_rates_are_measured_on_the_scored_patches_against_both_thresholds() -> None:
    tops = BRICK_TEST_TOPS
    rng = np.random.default_rng(0)
    scores = rng.normal(size=len(tops)) + tops / 100.0      # the photograph drifts downwards
    shipped = rng.normal(size=300)                         # calibrated where there was no drift
    result = measure(scores, shipped, tops, (0.01, 0.05))
    assert result["band_as_shipped"]["0.01"] == np.mean(scores > conformal_threshold(shipped, 0.01))
    for split, masks in SPLITS.items():
        calibration, scored = masks(tops)
        block = result["splits"][split]
        assert (block["calibration"], block["scored"]) == (calibration.sum(), scored.sum())
        for rate in (0.01, 0.05):
            assert block["as_shipped"][str(rate)] == np.mean(scores[scored] > conformal_threshold(shipped, rate))
            assert block["in_band"][str(rate)] == np.mean(
                scores[scored] > conformal_threshold(scores[calibration], rate))
            assert block["as_shipped"][str(rate)] > block["in_band"][str(rate)]          # the drift shows
    # below its top half the band drifts further than the stripes, which sample every height
    in_band = {split: block["in_band"]["0.05"] for split, block in result["splits"].items()}
    assert in_band["top and bottom"] > in_band["interleaved stripes"]


def _fake_scores(name: str, options: texture_drift.Options) -> tuple:
    """Scores of every clean patch of a 512x512 photograph that drifts from left to right."""
    positions = patch_positions(512, 512, 8)
    rng = np.random.default_rng(len(name))
    scores = {band: rng.normal(size=len(lefts)) + lefts / 100.0 for band, (_, lefts) in positions.items()}
    shipped = rng.normal(size=len(positions["cal"][0])) + 320 / 100.0
    return scores, shipped, {"calibration": {"score_kind": "fused"}}, (512, 512)


def test_a_run_writes_the_table_and_the_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(texture_drift, "texture_scores", _fake_scores)
    out = tmp_path / "drift"
    threads = torch.get_num_threads()
    assert main(["--textures", "brick,gravel", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    report = out.with_suffix(".md").read_text()
    assert report.count("| brick | `fused` |") == 2 and report.count("| gravel | `fused` |") == 2
    assert "| whole test band, as shipped | top and bottom: as shipped | top and bottom: in band |" in report
    brick = next(line for line in report.splitlines() if line.startswith("| brick | `fused` | 1% |"))
    whole, _, _, shipped, in_band = (float(brick.split("|")[k].split("%")[0]) for k in range(4, 9))
    assert whole > in_band and shipped > in_band                  # the fake photograph drifts to the right
    assert "python -m benchmarks.texture_drift --textures brick,gravel" in report
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "report:" in capsys.readouterr().out
    assert torch.get_num_threads() == threads


def test_unknown_textures_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        texture_drift.parse_options(["--textures", "brick,marble"])
    assert "--textures must be some of" in capsys.readouterr().err
