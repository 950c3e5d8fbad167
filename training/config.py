"""Every training setting in one flat dataclass.

The command line (`python -m training train --help`) is generated from these fields, and the whole
resolved config is stored in the artifact's metadata, so a model can always be rebuilt from it.
`None` means "auto": the value is chosen from the data once it is loaded (see `resolve`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .scoring import LEARNED_KINDS, SCORE_KINDS
from .segmenter import LEVEL_CHOICES, LEVELS


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainConfig:
    # ---- data -----------------------------------------------------------------------------
    data: str = _opt("digits", "digits, fashion-mnist, an IDX images file, a .npy/.npz array or a folder")
    out: str = _opt("model.pt", "artifact path; its .sha256 and report are written beside it")
    image_size: int | None = _opt(None, "square side the model takes (auto: the data's own)")
    channels: int | None = _opt(None, "1 (grayscale) or 3 (RGB) (auto: the data's own)")
    class_filter: int | None = _opt(None, "keep only this class for training (one-class)", flag="--class")
    pixel_max: float | None = _opt(None, "divide .npy values by this (auto: 255 for uint8, else 1)")
    max_images: int | None = _opt(None, "use at most this many images (a random subset)")
    val_fraction: float = _opt(0.1, "share held out for validation and early stopping")
    cal_fraction: float = _opt(0.15, "share held out to calibrate anomaly thresholds")
    test_fraction: float = _opt(0.1, "share held out for the final test metrics")
    # ---- model ----------------------------------------------------------------------------
    arch: str = _opt("auto", "mlp, conv, or auto (mlp up to 16x16 pixels, conv above)")
    hidden: tuple[int, ...] | None = _opt(None, "hidden widths, comma separated (auto: 16 mlp, 256 conv)")
    conv_channels: tuple[int, ...] | None = _opt(None, "conv stage widths (auto: from the image size)")
    latent_dim: int | None = _opt(None, "latent size d (auto: 2 mlp, 16 conv)")
    likelihood: str = _opt("bernoulli", "bernoulli (BCE, the seed's) or gaussian (learned sigma)")
    # ---- objective ------------------------------------------------------------------------
    beta: float = _opt(1.0, "weight of the KL term")
    warmup_epochs: int = _opt(0, "epochs over which the KL weight rises linearly from 0 to beta")
    denoise: bool = _opt(False, "train the encoder on copies with synthetic corruptions (training.corruptions) "
                                "and the decoder to give back the clean image, so a defect is reconstructed "
                                "away rather than copied (a denoising VAE)")
    # ---- optimisation ---------------------------------------------------------------------
    epochs: int | None = _opt(None, "epochs (auto: 201 mlp as the seed, 30 conv)")
    batch_size: int | None = _opt(None, "global batch size, split across processes (auto: 32 mlp, 64 conv)")
    lr: float = _opt(1e-3, "Adam learning rate")
    weight_decay: float = _opt(0.0, "Adam weight decay")
    grad_clip: float = _opt(0.0, "clip the gradient norm to this (0: off)")
    patience: int | None = _opt(None, "stop after this many epochs without a better validation loss "
                                      "(0: never; auto: 0 mlp, 5 conv)")
    seed: int = _opt(0, "seeds the split, the initial weights, the shuffles and the noise")
    device: str = _opt("cpu", "cpu, cuda or auto")
    threads: int | None = _opt(None, "torch threads per process (auto: 1 mlp, whose tiny matrices only "
                                     "wait for a second core; all cores for conv)")
    # ---- scoring and output ---------------------------------------------------------------
    score: str | None = _opt(None, "default anomaly score: recon, elbo, iwae, excess, peak, local, combined, "
                                   "learned or fused (auto: excess for the mlp's small images, fused for conv)")
    score_samples: int = _opt(16, "fixed latent samples the elbo/iwae scores average over")
    segmenter_steps: int | None = _opt(None, "batches the defect segmenter of the learned and fused scores "
                                             "trains for (0: none; auto: 0 mlp, 1500 conv)")
    segmenter_levels: int = _opt(LEVELS, "resolutions the defect segmenter works at: 2 (full and half) or 3, which "
                                    "adds a quarter, reads further around each pixel and learns more per step "
                                    "(a pass costs 1.3-1.6 times as much)")
    checkpoint_every: int = _opt(1, "write a checkpoint every N epochs (0: never)")
    resume: bool = _opt(False, "continue from the checkpoint beside --out")
    name: str | None = _opt(None, "model name in the metadata (auto: the file's stem)")
    report: bool = _opt(True, "write the plots beside the artifact")
    quiet: bool = _opt(False, "no progress bar; one line per logged epoch only")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
        return cls(**clean)


# The auto defaults: the seed's configuration for small images, a conv VAE above. The score:
# on a small image any defect is a large part of it, so the whole-image `excess` is the better
# test there; on larger ones `fused` adds what `peak` sees (a small defect, undiluted by the
# clean rest), what `local` sees (detail removed) and what the defect segmenter learned to see
# (a stain or blur the reconstruction shares), measured over defects, textures and one-class
# novelty together (`python -m training.evaluate`).
AUTO_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": (16,), "latent_dim": 2, "epochs": 201, "batch_size": 32, "patience": 0, "threads": 1,
            "score": "excess", "segmenter_steps": 0},
    "conv": {"hidden": (256,), "latent_dim": 16, "epochs": 30, "batch_size": 64, "patience": 5, "score": "fused",
             "threads": os.cpu_count() or 1, "segmenter_steps": 1500},
}
MLP_MAX_PIXELS = 16 * 16


def conv_stages(height: int, width: int, max_stages: int = 4, min_side: int = 4) -> int:
    """How many stride-2 stages fit: each halves both sides exactly and leaves at least min_side."""
    stages = 0
    while (stages < max_stages and height % 2 == 0 and width % 2 == 0
           and min(height, width) // 2 >= min_side):
        height, width, stages = height // 2, width // 2, stages + 1
    return stages


def resolve(config: TrainConfig, height: int, width: int) -> TrainConfig:
    """Fill every auto (None) field from the image shape the model will take."""
    arch = config.arch
    if arch == "auto":
        arch = "mlp" if height * width <= MLP_MAX_PIXELS else "conv"
    if arch not in AUTO_DEFAULTS:
        raise ValueError(f"--arch must be mlp, conv or auto, got {config.arch!r}")
    chosen = {k: v for k, v in AUTO_DEFAULTS[arch].items() if getattr(config, k) is None}
    if arch == "conv" and config.conv_channels is None:
        stages = conv_stages(height, width)
        if stages == 0:
            raise ValueError(f"a {height}x{width} image is too small or odd-sized for the conv VAE; "
                             "use --arch mlp or --image-size")
        chosen["conv_channels"] = tuple(min(32 * 2**i, 256) for i in range(stages))
    resolved = replace(config, arch=arch, **chosen)
    if resolved.score in LEARNED_KINDS and resolved.segmenter_steps == 0:
        raise ValueError(f"--score {resolved.score} needs the defect segmenter, which the {arch} model does "
                         "not train by default: add --segmenter-steps 1500")
    return resolved


def validate(config: TrainConfig) -> None:
    """Refuse settings that cannot work, with the fix in the message."""
    checks = [
        (config.likelihood in ("bernoulli", "gaussian"), "--likelihood must be bernoulli or gaussian"),
        (config.score in (None, *SCORE_KINDS), f"--score must be one of {', '.join(SCORE_KINDS)}"),
        (config.device in ("cpu", "cuda", "auto"), "--device must be cpu, cuda or auto"),
        (config.channels in (None, 1, 3), "--channels must be 1 or 3"),
        (config.image_size is None or config.image_size >= 4, "--image-size must be at least 4"),
        (config.beta >= 0, "--beta must be >= 0"),
        (config.lr > 0, "--lr must be > 0"),
        (config.score_samples >= 1, "--score-samples must be >= 1"),
        (config.segmenter_steps is None or config.segmenter_steps >= 0, "--segmenter-steps must be >= 0"),
        (config.segmenter_levels in LEVEL_CHOICES, "--segmenter-levels must be 2 or 3"),
        (config.score not in LEARNED_KINDS or config.segmenter_steps != 0,
         f"--score {config.score} needs the defect segmenter: leave --segmenter-steps auto or above 0"),
        (min(config.val_fraction, config.cal_fraction, config.test_fraction) > 0
         and config.val_fraction + config.cal_fraction + config.test_fraction < 0.9,
         "--val/--cal/--test fractions must each be > 0 and leave at least 10% for training"),
        (config.epochs is None or config.epochs >= 1, "--epochs must be >= 1"),
        (config.batch_size is None or config.batch_size >= 1, "--batch-size must be >= 1"),
        (config.latent_dim is None or config.latent_dim >= 1, "--latent-dim must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
