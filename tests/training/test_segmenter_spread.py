"""The segmenter spread benchmark (benchmarks/segmenter_spread.py): a fresh segmenter per seed,
only the segmenter changed, and the report's ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import segmenter_spread
from benchmarks.segmenter_spread import Options, load_subject, main, retrained, spread_rows

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits.pt"


def test_a_seed_trains_a_fresh_segmenter_and_leaves_the_vae_alone() -> None:
    subject = load_subject(Options(artifact=DIGITS, test_images=10))
    first, again, other = (retrained(subject, seed, steps=3, progress=False) for seed in (1, 1, 2))
    weights = [dict(m.segmenter.state_dict()) for m in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])          # the seed decides
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    vae = subject.module.state_dict()
    assert all(torch.equal(v, vae[f"vae.{k}"]) for k, v in first.vae.state_dict().items())
    assert first.segmenter_trained and int(first.segmenter_steps) == 3


def test_levels_choose_the_fresh_segmenters_network() -> None:
    subject = load_subject(Options(artifact=DIGITS, test_images=10))
    assert retrained(subject, 1, steps=2, progress=False).segmenter.levels == 2
    assert retrained(subject, 1, steps=2, progress=False, levels=3).segmenter.levels == 3


def test_the_rows_give_each_run_then_the_range() -> None:
    figures = {"shipped": {"fused": {"blur": 0.6, "mean": 0.7}}, "seed 1": {"fused": {"blur": 0.9, "mean": 0.8}}}
    assert spread_rows(figures, "fused") == [["blur", "0.600", "0.900", "0.600", "0.900", "**0.300**"],
                                             ["**mean**", "0.700", "0.800", "0.700", "0.800", "**0.100**"]]


def test_a_small_run_writes_the_tables_and_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "spread"
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    assert main(["--artifact", str(DIGITS), "--seeds", "1,2", "--steps", "3", "--test-images", "20",
                 "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    report = out.with_suffix(".md").read_text()
    assert "| defect | seed 1 | seed 2 | lowest | highest | range |" in report      # digits ships no segmenter
    assert "## `learned`" in report and "## `fused`" in report
    assert report.count("| **mean** |") == 2 and "| salt and pepper |" in report
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "report:" in capsys.readouterr().out
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), state)


def test_an_artifact_without_a_segmenter_needs_steps() -> None:
    with pytest.raises(ValueError, match="pass --steps"):
        segmenter_spread.run(Options(artifact=DIGITS, seeds=(1,), test_images=4, progress=False), "test")


def test_bad_seeds_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        segmenter_spread.parse_options(["--seeds", "1,two"])
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err


def test_seeds_trained_in_worker_processes_give_the_same_figures(tmp_path: Path) -> None:
    common = ["--artifact", str(DIGITS), "--seeds", "1,2", "--steps", "3", "--test-images", "20",
              "--threads", "1", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "serial" / "spread")]) == 0
    assert main([*common, "--jobs", "2", "--out", str(tmp_path / "parallel" / "spread")]) == 0
    serial, parallel = ((tmp_path / run / "spread.md").read_text().splitlines() for run in ("serial", "parallel"))
    assert serial[4:] == parallel[4:]          # every table row; the first lines hold the command and the time
    assert "| **mean** |" in "\n".join(parallel)


def test_jobs_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        segmenter_spread.parse_options(["--jobs", "0"])
    assert "--jobs and --threads must be at least 1" in capsys.readouterr().err
