"""Training end to end: both models and likelihoods, logging, early stopping, resume,
reproducibility, the command line, and a two-process torchrun run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import quick_config
from training.calibrate import calibrate
from training.config import TrainConfig
from training.corruptions import Corruptor
from training.export import load_artifact
from training.model import VAEConfig, build_vae
from training.train import Distributed, checkpoint_path, train, train_epoch

ROOT = Path(__file__).resolve().parents[2]


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    module, _ = load_artifact(path)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_seed_configuration_learns_and_logs_rec_kl_total(tmp_path: Path) -> None:
    metadata = train(quick_config(tmp_path, epochs=6))
    history = metadata["history"]
    assert [h["epoch"] for h in history] == list(range(1, 7))
    for h in history:
        for split in ("train", "val"):
            assert h[f"{split}_total"] == pytest.approx(h[f"{split}_rec"] + h[f"{split}_kl"])
    assert history[-1]["val_total"] < history[0]["val_total"] - 5   # it learns
    assert metadata["architecture"]["arch"] == "mlp" and metadata["architecture"]["hidden"] == [16]


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_conv_vae_on_an_rgb_folder(tmp_path: Path, likelihood: str) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "parts"
    folder.mkdir()
    from PIL import Image

    for i in range(60):
        pixels = (rng.random((28, 28, 3)) * 60 + 100).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    denoise = likelihood == "gaussian"          # denoising on RGB with the other likelihood, end to end
    metadata = train(quick_config(tmp_path, data=str(folder), likelihood=likelihood, epochs=2, batch_size=16,
                                  segmenter_steps=3, denoise=denoise))
    assert metadata["training"]["config"]["denoise"] is denoise
    assert metadata["architecture"]["arch"] == "conv" and metadata["score"]["kind"] == "fused"
    assert metadata["score"]["segmenter"] == {**metadata["score"]["segmenter"], "steps": 3, "batch_size": 64}
    assert metadata["input"] == {**metadata["input"], "channels": 3, "height": 28, "width": 28}
    assert metadata["likelihood"] == likelihood
    assert np.isfinite(metadata["metrics"]["test_elbo"])


def test_training_can_give_the_segmenter_three_levels(tmp_path: Path) -> None:
    """`--segmenter-levels 3` trains the deeper segmenter, records it, and the artifact serves and
    recalibrates as one (its quarter-resolution weights travel in the TorchScript module)."""
    metadata = train(quick_config(tmp_path, arch="conv", max_images=400, epochs=1, segmenter_steps=3,
                                  segmenter_levels=3))
    assert metadata["score"]["segmenter"]["levels"] == 3 and metadata["score"]["kind"] == "fused"
    module, stored = load_artifact(tmp_path / "model.pt")
    assert any(name.startswith("segmenter.quarter_res") for name in module.state_dict())
    again = calibrate(tmp_path / "model.pt", tmp_path / "again.pt", command="test")
    assert again["score"]["segmenter"]["levels"] == 3
    assert np.allclose(again["calibration"]["scores"], stored["calibration"]["scores"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="--segmenter-levels must be 2 or 3"):
        train(quick_config(tmp_path, segmenter_levels=4))


def test_early_stopping_restores_the_best_epoch(tmp_path: Path) -> None:
    # a learning rate this high makes validation worse quickly, so patience must trigger
    metadata = train(quick_config(tmp_path, epochs=40, lr=0.5, patience=2))
    history = metadata["history"]
    assert len(history) < 40
    best = min(range(len(history)), key=lambda i: history[i]["val_total"])
    assert metadata["metrics"]["best_epoch"] == best + 1
    assert len(history) == best + 1 + 2


def test_same_seed_repeats_bit_for_bit(tmp_path: Path) -> None:
    a = train(quick_config(tmp_path / "a", seed=5))
    b = train(quick_config(tmp_path / "b", seed=5))
    train(quick_config(tmp_path / "c", seed=6))
    assert a["history"] == b["history"]
    wa, wb, wc = (weights_of(tmp_path / k / "model.pt") for k in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a["calibration"]["scores"] == b["calibration"]["scores"]


@pytest.mark.parametrize("denoise", [False, True])
def test_resume_continues_exactly(tmp_path: Path, denoise: bool) -> None:
    straight = train(quick_config(tmp_path / "straight", epochs=4, checkpoint_every=1, denoise=denoise))
    train(quick_config(tmp_path / "resumed", epochs=2, checkpoint_every=1, denoise=denoise))
    assert checkpoint_path(tmp_path / "resumed" / "model.pt").exists()
    resumed = train(quick_config(tmp_path / "resumed", epochs=4, checkpoint_every=1, resume=True, denoise=denoise))
    assert resumed["history"] == straight["history"]
    ws, wr = weights_of(tmp_path / "straight" / "model.pt"), weights_of(tmp_path / "resumed" / "model.pt")
    assert all(torch.equal(ws[k], wr[k]) for k in ws)


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    train(quick_config(tmp_path, epochs=1, checkpoint_every=1))
    with pytest.raises(ValueError, match="latent_dim"):
        train(quick_config(tmp_path, epochs=2, latent_dim=3, resume=True))


def test_kl_warmup_and_beta_change_the_objective_not_the_logged_elbo(tmp_path: Path) -> None:
    plain = train(quick_config(tmp_path / "p", epochs=2))
    warm = train(quick_config(tmp_path / "w", epochs=2, warmup_epochs=2, beta=0.5))
    assert plain["history"] != warm["history"]
    h = warm["history"][-1]
    assert h["val_total"] == pytest.approx(h["val_rec"] + h["val_kl"])


class RecordingModel(torch.nn.Module):
    """Stands in for the VAE in a training step and records what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x: torch.Tensor, eps: torch.Tensor, target: torch.Tensor | None = None):
        self.calls.append((x.clone(), None if target is None else target.clone()))
        loss = self.weight * x.mean((1, 2, 3))
        return loss, loss


@pytest.mark.parametrize("denoise", [False, True])
def test_denoising_shows_the_encoder_corrupted_copies_and_scores_the_clean_images(denoise: bool) -> None:
    images = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model = RecordingModel()
    config = TrainConfig(batch_size=16, latent_dim=2, denoise=denoise)
    corruptor = Corruptor(1, 16, 16, seed=0, bank_size=32) if denoise else None
    train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), images, config, 0, Distributed(), False, corruptor)
    assert len(model.calls) == 4
    rows = {tuple(image.flatten().tolist()) for image in images}
    changed = 0
    for x, target in model.calls:
        if not denoise:
            assert target is None
            continue
        assert {tuple(image.flatten().tolist()) for image in target} <= rows     # the clean training images
        differs = (x - target).abs().flatten(1).amax(1) > 0.02
        changed += int(differs.sum())
    if denoise:
        assert 16 <= changed < 64           # most copies corrupted, some left clean (as the segmenter's are)


def test_the_vae_scores_its_reconstruction_against_the_target_it_is_given() -> None:
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(arch="mlp", channels=1, height=8, width=8, latent_dim=2, hidden=(8,),
                              conv_channels=(), likelihood="bernoulli"))
    x, clean, eps = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), torch.randn(4, 2)
    rec_self, kl_self = vae(x, eps)
    rec_clean, kl_clean = vae(x, eps, clean)
    mu, log_var = vae.encode(x)                           # z drawn from q(z | x) either way
    logits = vae.decode_logits(vae.reparameterize(mu, log_var, eps))
    assert torch.equal(kl_self, kl_clean)
    assert torch.allclose(rec_self, vae.pixel_nll(x, logits).flatten(1).sum(1))
    assert torch.allclose(rec_clean, vae.pixel_nll(clean, logits).flatten(1).sum(1))
    assert not torch.allclose(rec_self, rec_clean)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_command_line_trains_writes_plots_and_reports_errors(tmp_path: Path) -> None:
    out = tmp_path / "cli" / "digits.pt"
    done = run_cli("train", "--data", "digits", "--out", str(out), "--epochs", "2", "--seed", "1", "--class", "3")
    assert done.returncode == 0, done.stderr
    assert "epoch    2  rec" in done.stdout and "wrote" in done.stdout
    _, metadata = load_artifact(out)
    assert metadata["training"]["command"].startswith("python -m training train --data digits")
    assert metadata["data"]["class_filter"] == 3 and 0 <= metadata["metrics"]["test_auroc_one_class"] <= 1
    report = out.with_name("digits-report")
    assert {p.name for p in report.iterdir()} >= {"loss_curves.png", "latent_space.png", "manifold.png",
                                                 "reconstructions.png", "samples.png"}
    bad = run_cli("train", "--data", str(tmp_path / "missing"), "--out", str(out))
    assert bad.returncode == 2 and "not 'digits'" in bad.stderr and "Traceback" not in bad.stderr


def test_torchrun_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "training", "train", "--data", "digits",
         "--out", str(out), "--epochs", "3", "--quiet", "--no-report", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    assert done.stdout.count("wrote") == 1          # only rank 0 writes
    _, metadata = load_artifact(out)
    history = metadata["history"]
    assert len(history) == 3 and history[-1]["val_total"] < history[0]["val_total"]


def test_torchrun_denoising_resume_continues_exactly(tmp_path: Path) -> None:
    """Each rank draws its own corruptions; the checkpoint must carry every rank's stream, or a
    resumed two-process run would differ from a straight one (rank 1 restarting its stream)."""
    torchrun = Path(sys.executable).with_name("torchrun")

    def run(out: Path, epochs: int, *extra: str) -> None:
        done = subprocess.run(
            [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "training", "train", "--data", "digits",
             "--out", str(out), "--epochs", str(epochs), "--denoise", "--checkpoint-every", "1", "--quiet",
             "--no-report", "--threads", "1", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    run(tmp_path / "straight.pt", 2)
    run(tmp_path / "resumed.pt", 1)
    run(tmp_path / "resumed.pt", 2, "--resume")
    straight, resumed = weights_of(tmp_path / "straight.pt"), weights_of(tmp_path / "resumed.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    streams = torch.load(checkpoint_path(tmp_path / "resumed.pt"), weights_only=True)["corruptor"]
    assert len(streams) == 2 and not torch.equal(streams[0], streams[1])
