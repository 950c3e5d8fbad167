"""The supervised ceiling benchmark (benchmarks/defect_ceiling.py): what it trains on, what it tests
on, and the report it writes beside the last evaluation's figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import defect_ceiling
from benchmarks.defect_ceiling import classifier, evaluation_figures, main, training_set
from training.defects import defective_set
from training.reference import SEED_OFFSET

ROOT = Path(__file__).resolve().parents[2]


def test_the_training_set_is_half_defective_with_seeds_the_test_never_uses() -> None:
    images = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    x, y = training_set(images, "scratch", 10, seed=0)
    assert y.tolist() == [0.0] * 5 + [1.0] * 5
    picked = images[np.random.default_rng(0).permutation(10)]
    assert torch.equal(x[:5], torch.as_tensor(picked[:5]))                       # clean as they were
    own, _ = defective_set(picked[5:], "scratch", SEED_OFFSET)
    test_draw, _ = defective_set(picked[5:], "scratch", 0)
    assert torch.equal(x[5:], torch.as_tensor(own))
    assert not np.array_equal(own, test_draw)                                    # not the evaluation's draw


def test_the_classifier_scores_any_image_size_with_one_logit() -> None:
    for side in (8, 28):
        assert classifier(1)(torch.zeros(3, 1, side, side)).shape == (3, 1)


def _evaluation(path: Path) -> Path:
    """A results.json as training.evaluate writes it, with made-up figures for digits."""
    per_kind = {"scratch": {"auroc": 0.61}, "blur": {"auroc": 0.42}, "mean": {"auroc": 0.5}}
    metrics = {"vae:excess": per_kind, "supervised reference": {**per_kind, "blur": {"auroc": 0.93}},
               "PCA recon": {**per_kind, "mean": {"auroc": 0.7}}, "IForest": {**per_kind, "mean": {"auroc": 0.4}}}
    path.write_text(json.dumps({"started": "2026-01-02 03:04", "defects": {"digits": {"metrics": metrics}}}))
    return path


def test_the_evaluation_figures_are_the_default_score_the_reference_and_the_best_anchor(tmp_path: Path) -> None:
    figures, started = evaluation_figures(_evaluation(tmp_path / "results.json"), "digits")
    assert started == "2026-01-02 03:04"
    assert figures["blur"] == {"`vae:excess`": 0.42, "supervised reference": 0.93, "best anchor (PCA recon)": 0.42}
    assert evaluation_figures(tmp_path / "missing.json", "digits") == ({}, "")
    assert evaluation_figures(tmp_path / "results.json", "fashion-mnist") == ({}, "")


def test_a_small_run_writes_the_table_and_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ceiling"
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    assert main(["--artifact", str(ROOT / "models" / "digits.pt"), "--kinds", "scratch,blur", "--images", "40",
                 "--epochs", "1", "--test-images", "20", "--threads", "3", "--no-progress",
                 "--evaluation", str(_evaluation(tmp_path / "results.json")), "--out", str(out)]) == 0
    report = out.with_suffix(".md").read_text()
    header = "| kind | supervised CNN (ceiling) | `vae:excess` | supervised reference | best anchor (PCA recon) |"
    assert header in report
    blur = next(line for line in report.splitlines() if line.startswith("| blur |"))
    ceiling = float(blur.split("|")[2].strip(" *"))
    assert 0.0 <= ceiling <= 1.0
    assert "| 0.420 | 0.930 | 0.420 |" in blur
    assert "| **mean** |" in report and "2026-01-02 03:04" in report
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "report:" in capsys.readouterr().out
    # it runs inside the test process: the other tests keep their threads and random stream
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), state)


def test_unknown_kinds_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        defect_ceiling.parse_options(["--kinds", "scratch,dent"])
    assert "--kinds must be some of" in capsys.readouterr().err
