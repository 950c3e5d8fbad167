"""Run-wide fixtures: one tiny digits artifact trained in seconds, shared by every test that
needs a real model (the service tests build their app from it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import TrainConfig
from training.train import train

QUICK = {"epochs": 3, "quiet": True, "report": False, "checkpoint_every": 0}


def quick_config(tmp: Path, **overrides: object) -> TrainConfig:
    """A training config that finishes in a few seconds on 2 cores."""
    return TrainConfig(**{"out": str(tmp / "model.pt"), **QUICK, **overrides})


@pytest.fixture(scope="session")
def digits_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed configuration on digits, trained for a few epochs, with its checksum beside it."""
    out = tmp_path_factory.mktemp("artifact") / "digits.pt"
    train(TrainConfig(data="digits", out=str(out), epochs=8, quiet=True, report=False, checkpoint_every=0))
    return out
