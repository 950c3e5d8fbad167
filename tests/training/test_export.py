"""The artifact: loads with torch.jit.load alone, matches the eager model, carries complete metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import load_source, split_set
from training.export import FORMAT_VERSION, load_artifact, replace_atomically, score_images, sha256_of
from training.model import VAEConfig, build_vae
from training.scoring import SCORE_KINDS, ServableVAE

LOAD_WITH_TORCH_ONLY = """
import json, sys, torch
extra = {"metadata.json": ""}
module = torch.jit.load(sys.argv[1], _extra_files=extra)
metadata = json.loads(extra["metadata.json"])
x = torch.rand(3, metadata["input"]["channels"], metadata["input"]["height"], metadata["input"]["width"])
mu, log_var = module.encode(x)
print(json.dumps({"ours": sorted(m for m in sys.modules if m.split(".")[0] in ("training", "service")),
                  "score": module.score(x).shape[0], "decode": list(module.decode(mu).shape)}))
"""


def test_loads_with_torch_jit_alone(digits_artifact: Path) -> None:
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_TORCH_ONLY, str(digits_artifact)],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"ours": [], "score": 3, "decode": [3, 1, 8, 8]}


def test_metadata_is_complete(digits_artifact: Path) -> None:
    _, metadata = load_artifact(digits_artifact)
    assert metadata["format_version"] == FORMAT_VERSION
    assert metadata["input"] == {"channels": 1, "height": 8, "width": 8, "color_mode": "L",
                                 "value_range": [0.0, 1.0], "scaling": metadata["input"]["scaling"]}
    assert metadata["latent_dim"] == 2 and metadata["likelihood"] == "bernoulli"
    assert metadata["architecture"]["arch"] == "mlp" and metadata["architecture"]["parameters"] > 0
    assert metadata["data"]["source"] == "digits" and metadata["data"]["splits"]["cal"] == 270
    assert {"test_elbo", "test_nll_iwae", "best_epoch", "train_seconds"} <= set(metadata["metrics"])
    assert metadata["training"]["torch"] == torch.__version__ and metadata["training"]["config"]["seed"] == 0
    calibration = metadata["calibration"]
    assert calibration["count"] == 270 == len(calibration["scores"])
    assert calibration["scores"] == sorted(calibration["scores"]) and calibration["score_kind"] == "excess"
    assert metadata["score"]["kind"] == "excess"


def test_calibration_scores_are_the_scripted_scores_of_the_calibration_split(digits_artifact: Path) -> None:
    module, metadata = load_artifact(digits_artifact)
    splits = split_set(load_source("digits"), 0.1, 0.15, 0.1, seed=0)
    expected = np.sort(score_images(module, splits.cal.images))
    np.testing.assert_array_equal(np.array(metadata["calibration"]["scores"]), expected)


def test_checksum_sidecar_matches_and_catches_tampering(digits_artifact: Path, tmp_path: Path) -> None:
    sidecar = digits_artifact.with_name(digits_artifact.name + ".sha256").read_text()
    assert sidecar == f"{sha256_of(digits_artifact)}  {digits_artifact.name}\n"
    copy = tmp_path / digits_artifact.name
    tampered = bytearray(digits_artifact.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    copy.write_bytes(bytes(tampered))
    (tmp_path / (copy.name + ".sha256")).write_text(sidecar)
    with pytest.raises(ValueError, match="checksum"):
        load_artifact(copy)


def test_two_writers_of_one_path_each_move_a_whole_file(tmp_path: Path) -> None:
    """Two evaluations sharing a cache rewrite the same calibrated copy; with one fixed temporary
    name the second moved the first's file away and the first failed on its own move."""
    target = tmp_path / "artifact.pt"

    def first(partial: Path) -> None:
        partial.write_text("first")
        replace_atomically(target, lambda other: other.write_text("second"))   # moves in meanwhile

    replace_atomically(target, first)
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.pt"]       # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "artifact.pt"
    target.write_text("old")

    def failing(partial: Path) -> None:
        partial.write_text("new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(target, failing)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["artifact.pt"]


@pytest.mark.parametrize("config", [
    VAEConfig("mlp", 1, 8, 8, 2, (16,), (), "bernoulli"),
    VAEConfig("conv", 1, 28, 28, 8, (64,), (32, 64), "gaussian"),
    VAEConfig("conv", 3, 32, 32, 4, (32,), (16, 16, 16), "bernoulli"),
])
def test_scripted_methods_equal_eager(config: VAEConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = ServableVAE(build_vae(config), "iwae", 8, seed=1).eval()
    shape = (config.channels, config.height, config.width)
    eager.fit_local(torch.rand(64, *shape), torch.rand(32, *shape))      # local and combined need it
    eager.fit_segmenter(torch.rand(64, *shape), torch.rand(32, *shape), steps=1, progress=False)   # learned, fused
    path = tmp_path / "m.pt"
    torch.jit.script(eager).save(str(path))
    scripted = torch.jit.load(str(path))
    x = torch.rand(5, config.channels, config.height, config.width)
    with torch.no_grad():
        for name in ("encode", "forward", "reconstruction_error", "score", "anomaly_map", "excess_map", "local_map",
                     "score_with_map"):
            torch.testing.assert_close(getattr(eager, name)(x), getattr(scripted, name)(x), rtol=0, atol=0)
        z = torch.randn(4, config.latent_dim)
        torch.testing.assert_close(eager.decode(z), scripted.decode(z), rtol=0, atol=0)
        for kind in SCORE_KINDS:
            torch.testing.assert_close(eager.score_by(x, kind), scripted.score_by(x, kind), rtol=0, atol=0)


@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_score_with_map_equals_score_and_anomaly_map(kind: str, tmp_path: Path) -> None:
    """The service's `?map=true` calls one method: it must give exactly what the two calls give,
    for every default kind, scripted as served."""
    torch.manual_seed(0)
    eager = ServableVAE(build_vae(VAEConfig("conv", 1, 28, 28, 4, (32,), (16, 16), "gaussian")), kind, 4).eval()
    eager.fit_local(torch.rand(48, 1, 28, 28), torch.rand(24, 1, 28, 28))
    eager.fit_segmenter(torch.rand(48, 1, 28, 28), torch.rand(24, 1, 28, 28), steps=1, progress=False)
    path = tmp_path / "m.pt"
    torch.jit.script(eager).save(str(path))
    scripted = torch.jit.load(str(path))
    x = torch.rand(6, 1, 28, 28)
    x[0, :, 5:15, 5:15] = 0.5                      # a flat square, so the maps are not all alike
    with torch.no_grad():
        for module in (eager, scripted):
            scores, maps = module.score_with_map(x)
            torch.testing.assert_close(scores, module.score(x), rtol=0, atol=0)
            torch.testing.assert_close(maps, module.anomaly_map(x), rtol=0, atol=0)
            assert maps.shape == (6, 28, 28) and maps.abs().sum() > 0


def test_scores_do_not_depend_on_the_batch(digits_artifact: Path) -> None:
    module, _ = load_artifact(digits_artifact)
    x = torch.as_tensor(load_source("digits").images[:40])
    with torch.no_grad():
        together = module.score(x)
        alone = torch.cat([module.score(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-5)


def test_score_kinds_are_ordered_as_bounds(digits_artifact: Path) -> None:
    """-log p(x) <= iwae bound <= -ELBO on average: the importance-weighted bound is tighter."""
    module, _ = load_artifact(digits_artifact)
    x = torch.as_tensor(load_source("digits").images[:200])
    with torch.no_grad():
        elbo, iwae = module.score_by(x, "elbo"), module.score_by(x, "iwae")
    assert iwae.mean() < elbo.mean()
    with pytest.raises(torch.jit.Error, match="unknown score kind"):
        module.score_by(x, "nonsense")


def test_excess_and_peak_are_read_off_the_anomaly_map() -> None:
    """excess sums the map; peak averages the top share of its box-smoothed version, so a defect
    of a few pixels moves peak far more than it moves the image-wide sum."""
    torch.manual_seed(0)
    servable = ServableVAE(build_vae(VAEConfig("conv", 1, 28, 28, 4, (32,), (16, 16), "bernoulli")),
                           "peak", 4, peak_window=3, peak_share=0.02).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        anomaly_map = servable.anomaly_map(x)
        torch.testing.assert_close(servable.score_by(x, "excess"), anomaly_map.flatten(1).sum(1))
        smoothed = torch.nn.functional.avg_pool2d(anomaly_map.unsqueeze(1), 3, 1, 1, count_include_pad=False)
        top = smoothed.flatten(1).sort(1, descending=True).values[:, :16]      # 2% of 784 pixels
        torch.testing.assert_close(servable.score(x), top.mean(1))
    flat = torch.full((1, 1, 28, 28), 0.5)
    spotted = flat.clone()
    spotted[0, 0, 10:13, 10:13] = 1.0
    with torch.no_grad():
        gain = {k: (servable.score_by(spotted, k) / servable.score_by(flat, k)).item() for k in ("excess", "peak")}
    assert gain["peak"] > gain["excess"] > 1.0
