"""Recalibrate an artifact without retraining: score known-good images with it, store their scores
as its calibration, and optionally switch its default score kind.

    python -m training calibrate models/fashion.pt --score peak
    python -m training calibrate models/brick.pt --data good-patches.npy --out models/brick-site2.pt
    python -m training calibrate models/fashion.pt --retrain-segmenter --segmenter-steps 48000

The weights are copied unchanged into a freshly scripted `ServableVAE` (so an artifact exported by
an older version of this code gains the newer score kinds), the fixed score noise included, so the
elbo and iwae scores stay what they were. An artifact exported before the `local` and `combined`
kinds existed gets their statistics fitted on its own training split (rebuilt from its config); one
switched to `learned` or `fused` without a defect segmenter gets one trained there likewise, and
`--retrain-segmenter` trains a fresh one in place of the one it has.
Without --data the calibration images are the artifact's own calibration split, rebuilt likewise.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import AUTO_DEFAULTS
from .data import Splits, load_source
from .export import (
    artifact_splits,
    export_artifact,
    fit_defect_segmenter,
    fit_local_statistics,
    load_artifact,
    local_settings,
    segmenter_levels_of,
    segmenter_settings,
    self_check_note,
)
from .model import VAEConfig, build_vae
from .scoring import LEARNED_KINDS, LOCAL_KINDS, PEAK_SHARE, PEAK_WINDOW, SCORE_KINDS, ServableVAE
from .segmenter import WIDTH, build_segmenter


def architecture_of(metadata: dict[str, Any]) -> dict[str, Any]:
    """The `VAEConfig` fields an artifact's metadata records."""
    architecture = {k: v for k, v in metadata["architecture"].items() if k != "parameters"}
    return {**architecture, "hidden": tuple(architecture["hidden"]),
            "conv_channels": tuple(architecture["conv_channels"])}


def rebuild_servable(module: torch.jit.ScriptModule, metadata: dict[str, Any], score_kind: str) -> ServableVAE:
    """An eager `ServableVAE` with the scripted module's weights and score noise."""
    vae = build_vae(VAEConfig(**architecture_of(metadata)))
    peak = metadata["score"].get("peak", {})
    segmenter = metadata["score"].get("segmenter", {})
    servable = ServableVAE(vae, score_kind, metadata["score"]["samples"], peak_window=peak.get("window", PEAK_WINDOW),
                           peak_share=peak.get("share", PEAK_SHARE), segmenter_width=segmenter.get("width", WIDTH),
                           segmenter_levels=segmenter_levels_of(metadata))
    servable.load_trained(module.state_dict())
    return servable.eval()


def fit_or_explain(servable: ServableVAE, metadata: dict[str, Any], own_splits: Callable[[], Splits],
                   kind: str) -> None:
    """Fit the local statistics of an artifact exported without them, on its own training split.
    Without that split (its data gone) the artifact keeps the other kinds, unless `kind` needs them."""
    try:
        splits = own_splits()
    except (OSError, ValueError) as error:
        if kind in LOCAL_KINDS:
            raise ValueError(f"--score {kind} needs the artifact's training data to fit its local statistics, "
                             f"and it could not be loaded: {error}") from error
        return
    fit_local_statistics(servable, splits, metadata["training"]["config"].get("seed", 0))


def calibration_images(metadata: dict[str, Any], data: str | None,
                       own_splits: Callable[[], Splits]) -> tuple[np.ndarray, str]:
    """Known-good images, resized and converted to the artifact's input as `train` loads them,
    and where they came from."""
    if data is None:
        return own_splits().cal.images, "the artifact's calibration split"
    shape = metadata["input"]
    return load_source(data, shape["height"], shape["channels"]).images, data


def segmenter_steps_or_default(steps: int | None) -> int:
    """The steps asked for, or (None) as many as training gives a conv model."""
    return AUTO_DEFAULTS["conv"]["segmenter_steps"] if steps is None else steps


def train_or_explain(servable: ServableVAE, metadata: dict[str, Any], own_splits: Callable[[], Splits],
                     kind: str, steps: int | None, progress: bool = True, levels: int | None = None) -> int:
    """Train a fresh defect segmenter of `levels` (None: as many as the artifact's) on the
    artifact's own training split, for `steps` batches (None: the conv default), from the training
    seed. Returns the steps trained."""
    steps = segmenter_steps_or_default(steps)
    if steps <= 0:
        raise ValueError(f"--score {kind} needs the defect segmenter: --segmenter-steps must be above 0")
    try:
        splits = own_splits()
    except (OSError, ValueError) as error:
        raise ValueError(f"--score {kind} needs the artifact's training data to train its defect segmenter, "
                         f"and it could not be loaded: {error}") from error
    seed = metadata["training"]["config"].get("seed", 0)
    with torch.random.fork_rng():       # fresh weights from the seed, not from whatever ran before
        torch.manual_seed(seed)
        servable.segmenter = build_segmenter(servable.vae.config.channels, servable.segmenter.width,
                                             levels or servable.segmenter.levels)
    fit_defect_segmenter(servable, splits, steps, seed, progress)
    return steps


def calibrate(path: Path, out: Path | None = None, score_kind: str | None = None, data: str | None = None,
              command: str = "", segmenter_steps: int | None = None, progress: bool = True,
              retrain_segmenter: bool = False, segmenter_levels: int | None = None) -> dict[str, Any]:
    """Write the recalibrated artifact to `out` (default: over `path`) and return its metadata.
    A kind that needs the defect segmenter trains it if the artifact has none (`segmenter_steps`,
    `segmenter_levels`); `retrain_segmenter` replaces the one it has (the VAE and the local
    statistics stay)."""
    module, metadata = load_artifact(path)
    kind = score_kind or metadata["calibration"]["score_kind"]
    if kind not in SCORE_KINDS:
        raise ValueError(f"--score must be one of {', '.join(SCORE_KINDS)}, got {kind!r}")
    if retrain_segmenter and kind not in LEARNED_KINDS:
        raise ValueError(f"--retrain-segmenter is for the scores that read it (learned, fused), not {kind}: "
                         "add --score fused")
    own_splits = cache(lambda: artifact_splits(metadata))     # loaded once, and only if needed
    images, source = calibration_images(metadata, data, own_splits)
    if data is not None and len(images) < 100:      # the artifact's own split is what training had
        raise ValueError(f"{len(images)} calibration images are too few for a 1% threshold (need at least 100)")
    servable = rebuild_servable(module, metadata, kind)
    if not servable.local_fitted:
        fit_or_explain(servable, metadata, own_splits, kind)
    trained = int(servable.segmenter_steps)
    trains = kind in LEARNED_KINDS and (retrain_segmenter or not servable.segmenter_trained)
    if segmenter_levels is not None and not trains:
        raise ValueError("--segmenter-levels shapes a freshly trained segmenter, and this artifact keeps its "
                         "own: add --retrain-segmenter (and --score fused or learned)")
    if trains:
        trained = train_or_explain(servable, metadata, own_splits, kind, segmenter_steps, progress, segmenter_levels)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    history = [*metadata.get("recalibrations", []), {
        "date": now, "command": command, "score_kind": kind, "images": len(images), "data": source}]
    kept = {k: v for k, v in metadata.items() if k != "calibration"}
    # a new file is a new version for clients that cache thresholds by it; the training date stays
    kept.update(created=now, trained=metadata.get("trained", metadata["created"]))
    kept["score"] = {**metadata["score"], "peak": {"window": servable.peak_window, "share": servable.peak_share}}
    if servable.local_fitted:
        kept["score"]["local"] = local_settings(servable.vae.config)
    kept["score"]["segmenter"] = segmenter_settings(trained, servable.vae.config, width=servable.segmenter.width,
                                                    levels=servable.segmenter.levels)
    return export_artifact(servable, {**kept, "recalibrations": history}, images, out or path)


def describe(metadata: dict[str, Any], path: Path | str) -> str:
    """The command's one line: where it wrote, and the new calibration at a glance."""
    scores = np.asarray(metadata["calibration"]["scores"])
    return (f"wrote {path}: score {metadata['calibration']['score_kind']}, {len(scores)} calibration scores, "
            f"median {np.median(scores):.4g}, 99th percentile {np.quantile(scores, 0.99):.4g}"
            f"{self_check_note(metadata)}")
