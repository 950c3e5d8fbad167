"""Write the artifact: one TorchScript file the service can load with nothing else.

The file holds `ServableVAE` compiled by `torch.jit.script` (not traced, so every method keeps its
control flow) and, as a TorchScript extra file, `metadata.json`: input shape and scaling, latent
size, likelihood, architecture, data summary, metrics, the training command and config, the
torch version, and the calibration scores from which the service derives thresholds and p-values.
A `PATH.sha256` (sha256sum's format) is written beside it. Loading uses `torch.jit.load` alone:
no Python unpickling, no import of this package.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .config import TrainConfig
from .corruptions import Corruptor
from .data import ImageSet, Splits, load_source, split_set
from .local_density import windows_for
from .scoring import LOCAL_SHARE, PEAK_SHARE, PEAK_WINDOW, SCORE_KINDS, SCORE_UNITS, ServableVAE
from .segmenter import LEVELS as SEGMENTER_LEVELS
from .segmenter import WIDTH as SEGMENTER_WIDTH
from .segmenter import batch_size_for

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@torch.no_grad()
def score_images(module: torch.nn.Module, images: np.ndarray | torch.Tensor, kind: str | None = None,
                 batch_size: int = 256) -> np.ndarray:
    """Anomaly scores (N,) of images (N, C, H, W), in batches, with the module's default kind
    unless one is named. Works on the eager `ServableVAE` and on the loaded TorchScript alike."""
    images = torch.as_tensor(images)
    parts = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        parts.append(module.score(x) if kind is None else module.score_by(x, kind))
    return torch.cat(parts).double().numpy() if parts else np.zeros(0)


@torch.no_grad()
def map_scale(module: torch.nn.Module, images: np.ndarray, quantile: float = 0.999, batch_size: int = 256) -> float:
    """A high quantile of the per-pixel anomaly map over normal images: the value a heat map
    shows at full strength, the same for every image of this model."""
    images = torch.as_tensor(images)
    maps = [module.anomaly_map(images[i:i + batch_size]).flatten() for i in range(0, len(images), batch_size)]
    return float(torch.quantile(torch.cat(maps)[:16_000_000].double(), quantile))


LOCAL_FIT_IMAGES = 10_000     # training images the local statistics are fitted on, at most
LOCAL_HELD_OUT_IMAGES = 2_000  # validation images that standardise the combined score, at most


def fitting_images(splits: Splits, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal images to fit a score on, a seeded sample of at most `count` from the training split,
    and held-out ones to standardise it on: the validation split (at most LOCAL_HELD_OUT_IMAGES),
    never the calibration split, whose scores must stay unseen for the thresholds to hold."""
    rng = np.random.default_rng(seed)
    train = splits.train.images
    normal = train[np.sort(rng.permutation(len(train))[:count])]
    held_out = splits.val.images[:LOCAL_HELD_OUT_IMAGES]
    if len(held_out) < 100:      # too few to place a 99th percentile: the training sample serves
        held_out = normal[:LOCAL_HELD_OUT_IMAGES]
    return torch.as_tensor(normal), torch.as_tensor(held_out)


def fit_local_statistics(servable: ServableVAE, splits: Splits, seed: int = 0) -> None:
    """Fit the `local` and `combined` scores: the local Gaussians on (a sample of) the training
    split, the standardisation on the validation split."""
    servable.fit_local(*fitting_images(splits, LOCAL_FIT_IMAGES, seed))


SEGMENTER_FIT_IMAGES = 20_000   # training images the segmenter's corrupted batches are drawn from, at most


def fit_defect_segmenter(servable: ServableVAE, splits: Splits, steps: int, seed: int = 0,
                         progress: bool = True) -> None:
    """Train the `learned` and `fused` scores' segmenter on corrupted copies of (a sample of) the
    training split, and standardise `fused` on the validation split, as `fit_local_statistics` does."""
    servable.fit_segmenter(*fitting_images(splits, SEGMENTER_FIT_IMAGES, seed + 1), steps, seed, progress)


def build_metadata(*, name: str, config: dict[str, Any], vae_config: Any, data: dict[str, Any],
                   metrics: dict[str, Any], history: list[dict[str, float]], command: str,
                   parameters: int) -> dict[str, Any]:
    """Everything the service and a reader need about the model, in one JSON-able dict."""
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": {
            "channels": vae_config.channels,
            "height": vae_config.height,
            "width": vae_config.width,
            "color_mode": "L" if vae_config.channels == 1 else "RGB",
            "value_range": [0.0, 1.0],
            "scaling": "8-bit pixels / 255; images of another size are resized bilinearly",
        },
        "latent_dim": vae_config.latent_dim,
        "likelihood": vae_config.likelihood,
        "architecture": {**asdict(vae_config), "parameters": parameters},
        "score": {"kind": config["score"], "kinds": list(SCORE_KINDS), "samples": config["score_samples"],
                  "peak": {"window": PEAK_WINDOW, "share": PEAK_SHARE}, "local": local_settings(vae_config),
                  "segmenter": segmenter_settings(config.get("segmenter_steps") or 0, vae_config,
                                                  levels=config.get("segmenter_levels", SEGMENTER_LEVELS)),
                  "higher_is_more_anomalous": True},
        "data": data,
        "metrics": metrics,
        "history": history,
        "training": {"command": command, "config": config, "torch": torch.__version__},
    }


def local_settings(vae_config: Any) -> dict[str, Any]:
    """What the local score looks at, for a reader of the metadata."""
    side = min(vae_config.height, vae_config.width)
    return {"windows": [{"size": w, "stride": s} for w, s in windows_for(side)], "share": LOCAL_SHARE,
            "fitted_on": f"the training split (at most {LOCAL_FIT_IMAGES} images); standardised on the "
                         f"validation split (at most {LOCAL_HELD_OUT_IMAGES})"}


def segmenter_settings(steps: int, vae_config: Any, width: int = SEGMENTER_WIDTH,
                       levels: int = SEGMENTER_LEVELS) -> dict[str, Any]:
    """How the `learned` score's segmenter was built and trained, for a reader of the metadata and
    for `calibrate`, which rebuilds it (steps 0: not trained)."""
    return {"steps": steps, "width": width, "levels": levels,
            "batch_size": batch_size_for(vae_config.height, vae_config.width),
            "trained_on": f"synthetic corruptions (training.corruptions) of at most {SEGMENTER_FIT_IMAGES} "
                          "training-split images; none of the evaluation's defects"}


SELF_CHECK_IMAGES = 2_000        # clean images the segmenter's self-check corrupts, at most
SELF_CHECK_CORRUPTED = 1_000     # corrupted copies it wants: small sets are corrupted more than once
SELF_CHECK_SEED = 1_000_003      # a corruptor seed no training draws


def segmenter_self_check(module: torch.nn.Module, images: np.ndarray) -> dict[str, Any]:
    """How well the `learned` score tells images from copies of them with the segmenter's own kind
    of corruption (`training.corruptions`, from a seed no training draws): its AUROC, scored as the
    service scores. It involves no evaluation defect, so it can be read on anyone's images; well
    below 1, it says the segmenter has not learned even what it was taught, for these images (too
    few steps, or images unlike the ones it was trained on)."""
    clean = torch.as_tensor(images[:SELF_CHECK_IMAGES])
    corruptor = Corruptor(*clean.shape[1:], seed=SELF_CHECK_SEED, bank_size=256)
    corrupted = []
    for _ in range(min(8, -(-SELF_CHECK_CORRUPTED // max(1, len(clean))))):
        copies, masks = corruptor(clean)
        corrupted.append(copies[masks.flatten(1).amax(1) > 0])     # the ones it left clean are not defects
    corrupted = torch.cat(corrupted)
    scores = np.r_[score_images(module, clean, "learned"), score_images(module, corrupted, "learned")]
    labels = np.r_[np.zeros(len(clean)), np.ones(len(corrupted))]
    return {"auroc": round(float(roc_auc_score(labels, scores)), 4), "clean": len(clean),
            "corrupted": len(corrupted), "seed": SELF_CHECK_SEED,
            "what": "AUROC of the learned score: these images against copies with the segmenter's own "
                    "kind of corruption (training.corruptions); no evaluation defect"}


def self_check_note(metadata: dict[str, Any]) -> str:
    """'; defect segmenter ...' with its steps and self-check, for an artifact that has one; else ''."""
    segmenter = metadata["score"].get("segmenter", {})
    if "self_check" not in segmenter:
        return ""
    return (f"; defect segmenter: {segmenter['steps']} steps, self-check AUROC {segmenter['self_check']['auroc']:.3f} "
            "(its own kind of corruption on these images)")


def segmenter_steps_of(metadata: dict[str, Any]) -> int:
    """The steps an artifact's defect segmenter was trained for (0: it has none)."""
    return int(metadata["score"].get("segmenter", {}).get("steps", 0))


def segmenter_levels_of(metadata: dict[str, Any]) -> int:
    """The levels of an artifact's defect segmenter: 2 for one made before they were recorded."""
    return int(metadata["score"].get("segmenter", {}).get("levels", SEGMENTER_LEVELS))


def export_artifact(servable: ServableVAE, metadata: dict[str, Any], calibration_images: np.ndarray,
                    path: Path) -> dict[str, Any]:
    """Script the servable, score the calibration images with the scripted module (exactly as
    the service will), and write the artifact atomically with its sha256 beside it."""
    scripted = torch.jit.script(servable.eval())
    scores = score_images(scripted, calibration_images)
    score = {**metadata["score"], "kind": servable.score_kind, "kinds": servable.available_kinds(),
             "units": SCORE_UNITS[servable.score_kind]}
    if servable.segmenter_trained:
        check = segmenter_self_check(scripted, calibration_images)
        score["segmenter"] = {**score.get("segmenter", {}), "self_check": check}
    metadata = {**metadata, "score": score, "calibration": {
        "split": "calibration",
        "count": len(scores),
        "score_kind": servable.score_kind,
        "scores": [float(s) for s in np.sort(scores)],
        "map_scale": map_scale(scripted, calibration_images),
    }}
    text = json.dumps(metadata, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda partial: scripted.save(str(partial), _extra_files={METADATA_FILE: text}))
    checksum = f"{sha256_of(path)}  {path.name}\n"
    replace_atomically(path.with_name(path.name + ".sha256"), lambda partial: partial.write_text(checksum))
    return json.loads(text)         # exactly what the file holds


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a file under a name of its own beside `path`, then move it into place: a reader never
    sees half a file, and two processes writing one path (two evaluations sharing a cache) each
    move a whole file of their own instead of one taking the other's half-written one away."""
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_artifact(path: Path, verify: bool = True) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The scripted module and its metadata; with verify, the sha256 sidecar must match."""
    if verify:
        sidecar = path.with_name(path.name + ".sha256")
        expected = sidecar.read_text().split()[0]
        if sha256_of(path) != expected:
            raise ValueError(f"{path} does not match its checksum in {sidecar}")
    extra = {METADATA_FILE: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), json.loads(extra[METADATA_FILE])


def artifact_splits(metadata: dict[str, Any], source: ImageSet | None = None) -> Splits:
    """The very split the artifact was trained, calibrated and tested on, rebuilt from the config it
    carries (a seeded permutation: the same config gives the same images), from `source` when the
    caller has loaded the config's data already."""
    config = TrainConfig.from_dict(metadata["training"]["config"])
    if source is None:
        source = load_source(config.data, config.image_size, config.channels, config.pixel_max)
    return split_set(source, config.val_fraction, config.cal_fraction, config.test_fraction, config.seed,
                     config.class_filter, config.max_images)
