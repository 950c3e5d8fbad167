"""What the anomaly benchmarks share (benchmarks/common.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from benchmarks.common import ROOT, command_line, isolated, made_by, shown


def test_a_report_names_paths_inside_the_repository_relative_to_it() -> None:
    assert shown(ROOT / "models" / "fashion.pt") == "models/fashion.pt"
    assert shown(Path("/elsewhere/model.pt")) == "/elsewhere/model.pt"


def test_the_command_line_quotes_its_arguments() -> None:
    assert command_line("benchmarks.texture_drift", []) == "python -m benchmarks.texture_drift"
    assert command_line("benchmarks.x", ["--out", "a b"]) == "python -m benchmarks.x --out 'a b'"


def test_a_report_says_how_and_where_it_was_made() -> None:
    line = made_by("python -m benchmarks.x", 61.4)
    assert line.startswith("`python -m benchmarks.x`, ") and " UTC, 61 s in all, on " in line
    assert f"{os.cpu_count()} cores" in line and line.endswith(f"torch {torch.__version__}.")


def test_isolated_restores_threads_and_the_random_stream_even_on_error() -> None:
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    with pytest.raises(RuntimeError), isolated(threads + 1):
        assert torch.get_num_threads() == threads + 1
        torch.manual_seed(123)
        raise RuntimeError("inside")
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), state)
