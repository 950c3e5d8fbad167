"""Settings: environment variables with the VAE_ prefix, the CPU count a container really has."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service import settings as settings_module
from service.settings import Settings, available_cpus


def test_environment_variables_with_the_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAE_MODEL_PATH", str(tmp_path / "m.pt"))
    monkeypatch.setenv("VAE_MAX_SAMPLE_N", "12")
    monkeypatch.setenv("VAE_PORT", "")                          # empty means unset
    settings = Settings()
    assert settings.model_path == tmp_path / "m.pt" and settings.max_sample_n == 12 and settings.port == 8000


def test_bad_values_fail_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("VAE_PORT", "0"), ("VAE_DEFAULT_FPR", "1.5"), ("VAE_LOG_LEVEL", "loud"),
                        ("VAE_MAX_BATCH_IMAGES", "100000")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError):
            Settings()
        monkeypatch.delenv(name)


@pytest.mark.parametrize(("cpu_max", "expected"), [("max 100000", 2), ("100000 100000", 1), ("50000 100000", 1),
                                                    ("400000 100000", 2), ("garbage", 2)])
def test_available_cpus_respects_a_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                cpu_max: str, expected: int) -> None:
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda pid: {0, 1})
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert available_cpus(tmp_path / "cpu.max") == expected
    assert available_cpus(tmp_path / "absent") == 2


def test_workers_and_model_concurrency_split_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "available_cpus", lambda: 8)
    assert Settings().resolved_workers() == 8                             # one per CPU, 1 torch thread each
    assert Settings().resolved_model_concurrency() == 1
    assert Settings(torch_threads=2).resolved_workers() == 4
    assert Settings(torch_threads=16).resolved_workers() == 1
    assert Settings(workers=1).resolved_model_concurrency() == 8
    assert Settings(workers=3).resolved_model_concurrency() == 2
    assert Settings(workers=2, torch_threads=2).resolved_model_concurrency() == 2
    assert Settings(workers=16).resolved_model_concurrency() == 1
    assert Settings(model_concurrency=3).resolved_model_concurrency() == 3
