"""A defect segmenter: a small convolutional network that reads an image beside the VAE's
reconstruction of it and says, per pixel, how likely the pixel is part of a defect.

The discriminative half of DRAEM (Zavrtanik et al., 2021), with our trained VAE as the
reconstructive half. The VAE alone scores how badly it reproduces a pixel, which misses what it
reproduces well enough (a faint stain) and what makes the error smaller (a blurred or flattened
region). The segmenter learns what a defect looks like next to its reconstruction from synthetic
corruptions (`training.corruptions`), none of them the evaluation's.

    input x, reconstruction r --> [x, r] --> two 3x3 convs --> stride-2 conv, 3x3 conv --> upsample
                                                  |________________ skip ____________________|
                                              --> 3x3 conv --> 1x1 conv --> defect logits (B, 1, H, W)

That network (`DefectSegmenter`, 2 levels: full and half resolution) reads a window of about 17
pixels across around each pixel. `DeepDefectSegmenter` (3 levels) adds a quarter-resolution stage
and reads about 38, more than a Fashion-MNIST image's side; a pass takes 1.3 to 1.6 times as
long, and it learns more per step (both measured in docs/anomaly-detection.md).
An artifact records its segmenter's levels; one without the field has 2.

Trained with the focal loss (Lin et al., 2017): most pixels are clean, and the loss should come
from the ones it still gets wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .corruptions import BANK_SIZE, Corruptor

WIDTH = 16               # channels at full resolution; twice that at half
LEVELS = 2               # resolutions the segmenter works at (3: DeepDefectSegmenter)
LEVEL_CHOICES = (2, 3)   # every depth build_segmenter makes
FOCAL_GAMMA = 2.0
PRIOR = 0.05             # about the share of defect pixels in a training batch
BATCH_PIXELS = 64 * 28 * 28   # per training batch: 64 images of 28x28, 12 of 64x64


def full_resolution_stage(channels: int, width: int) -> nn.Sequential:
    """The first stage of either segmenter: image and reconstruction side by side, two 3x3 convs."""
    return nn.Sequential(nn.Conv2d(2 * channels, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU())


def logit_head(width: int) -> nn.Sequential:
    """The last stage of either segmenter: the full-resolution features and the upsampled coarse
    ones (width each) to one defect logit per pixel."""
    head = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 1))
    # start at the prior of a defect pixel, not at p = 0.5: the first hundreds of steps would
    # otherwise only learn that most pixels are clean (Lin et al., 2017, section 4.1)
    nn.init.constant_(head[-1].bias, math.log(PRIOR / (1 - PRIOR)))
    return head


class DefectSegmenter(nn.Module):
    def __init__(self, channels: int, width: int = WIDTH) -> None:
        super().__init__()
        self.width = width
        self.levels = 2
        self.full = full_resolution_stage(channels, width)
        self.coarse = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU())
        self.head = logit_head(width)

    def forward(self, x: Tensor, recon: Tensor) -> Tensor:
        """Defect logits (B, 1, H, W) for images x and their reconstructions, both (B, C, H, W)."""
        full = self.full(torch.cat([x, recon], 1))
        coarse = F.interpolate(self.coarse(full), size=full.shape[2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([full, coarse], 1))


class DeepDefectSegmenter(nn.Module):
    """Three levels: full, half and quarter resolution, each coarser one upsampled and joined to the
    one above it, as in a U-Net."""

    def __init__(self, channels: int, width: int = WIDTH) -> None:
        super().__init__()
        self.width = width
        self.levels = 3
        self.full = full_resolution_stage(channels, width)
        self.half_res = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.quarter_res = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
                                         nn.Conv2d(4 * width, 4 * width, 3, padding=1), nn.ReLU(),
                                         nn.Conv2d(4 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.join = nn.Sequential(nn.Conv2d(4 * width, width, 3, padding=1), nn.ReLU())
        self.head = logit_head(width)

    def forward(self, x: Tensor, recon: Tensor) -> Tensor:
        """Defect logits (B, 1, H, W) for images x and their reconstructions, both (B, C, H, W)."""
        full = self.full(torch.cat([x, recon], 1))
        half = self.half_res(full)
        quarter = F.interpolate(self.quarter_res(half), size=half.shape[2:], mode="bilinear", align_corners=False)
        half = self.join(torch.cat([half, quarter], 1))
        coarse = F.interpolate(half, size=full.shape[2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([full, coarse], 1))


def build_segmenter(channels: int, width: int = WIDTH, levels: int = LEVELS) -> nn.Module:
    """A fresh segmenter of 2 or 3 levels; its weights start from torch's current random state."""
    if levels not in LEVEL_CHOICES:
        raise ValueError(f"a defect segmenter has 2 or 3 levels, not {levels}")
    return DefectSegmenter(channels, width) if levels == 2 else DeepDefectSegmenter(channels, width)


def focal_loss(logits: Tensor, mask: Tensor, gamma: float = FOCAL_GAMMA) -> Tensor:
    """The mean focal loss per pixel: cross-entropy weighted by (1 - p_true)^gamma."""
    cross_entropy = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    p_true = torch.exp(-cross_entropy)
    return ((1.0 - p_true) ** gamma * cross_entropy).mean()


def batch_size_for(height: int, width: int) -> int:
    """Images per training batch: about BATCH_PIXELS pixels, so a step costs about the same at any size."""
    return max(8, min(256, BATCH_PIXELS // (height * width)))


def train_segmenter(segmenter: nn.Module, reconstruct: Callable[[Tensor], Tensor], images: Tensor,
                    steps: int, batch_size: int | None = None, lr: float = 1e-3, seed: int = 0,
                    progress: bool = True) -> list[float]:
    """Train on corrupted copies of normal `images` (N, C, H, W) for `steps` batches (of
    `batch_size_for` the image size unless given); `reconstruct` is the VAE's (frozen). Returns the
    loss per step. The learning rate decays by cosine to zero."""
    batch_size = batch_size or batch_size_for(*images.shape[2:])
    corruptor = Corruptor(*images.shape[1:], seed=seed, bank_size=min(BANK_SIZE, steps * batch_size))
    order = torch.Generator().manual_seed(seed)

    def corrupted_batch() -> tuple[Tensor, Tensor]:
        return corruptor(images[torch.randint(len(images), (batch_size,), generator=order)])

    return fit_segmenter(segmenter, reconstruct, corrupted_batch, steps, lr, progress)


def fit_segmenter(segmenter: nn.Module, reconstruct: Callable[[Tensor], Tensor],
                  next_batch: Callable[[], tuple[Tensor, Tensor]], steps: int, lr: float = 1e-3,
                  progress: bool = True, desc: str = "defect segmenter") -> list[float]:
    """The training loop: `steps` batches of (images, defect masks) from `next_batch`, focal loss,
    Adam with a cosine decay to zero. Returns the loss per step."""
    optimizer = torch.optim.Adam(segmenter.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    segmenter.train()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False)
    for _ in bar:
        images, mask = next_batch()
        with torch.no_grad():
            recon = reconstruct(images)
        loss = focal_loss(segmenter(images, recon), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    segmenter.eval()
    return losses
