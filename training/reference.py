"""A supervised reference for the evaluation's defect suites: how far a detector of our segmenter's
size gets when it is trained on the evaluation's own defects. Never shipped and never a default.

The unsupervised scores never see a defect of the evaluation. When one of them misses a target,
the question is whether a better unsupervised idea would reach it, or whether a model of this size
cannot see the defect at all (a blur on a flat area changes little; noise on a knitted sweater hides
in the knit). The reference answers the second half: the artifact's own segmenter network (its width and
levels, `training.segmenter`), read through the same pooling as `vae:learned` (the top 5% of its 5x5
box-averaged probability map) and trained for as many steps as the artifact's own segmenter, with
the focal loss, on batches half clean and half defective: every kind of the suite applied to the
artifact's training images with a seed the evaluation's test never uses. So:

- `vae:learned` against the reference is what training on synthetic corruptions instead of the real
  defects costs (same network, same pooling, same steps);
- the reference's own misses are what this network, shown the very defects, still does not separate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .data import Splits
from .defects import defective_set
from .export import segmenter_levels_of
from .scoring import PEAK_SHARE, PEAK_WINDOW, box_average, top_mean
from .segmenter import LEVELS, WIDTH, batch_size_for, build_segmenter, fit_segmenter

NAME = "supervised reference"
STEPS = 1500           # for an artifact without a segmenter: the conv recipe's own steps
PER_KIND = 3000        # training images given each defect kind (fewer if the split is smaller)
SEED_OFFSET = 1000     # the defects' seed is the evaluation's plus this: never the test's draws


class SupervisedReference:
    """A scorer (see `training.evaluate.Scorer`) named `supervised reference`, trained on `kinds`."""

    def __init__(self, module: torch.jit.ScriptModule, metadata: dict[str, Any], kinds: Sequence[str], cache: Path,
                 seed: int = 0, steps: int | None = None, per_kind: int = PER_KIND, progress: bool = True) -> None:
        own = metadata["score"].get("segmenter", {})
        self.module, self.kinds, self.cache = module, list(kinds), cache
        # as many steps as the artifact's own segmenter took, so only what it trains on differs
        self.steps = steps or int(own.get("steps") or STEPS)
        self.seed, self.per_kind, self.progress = seed, per_kind, progress
        self.channels, self.width = metadata["input"]["channels"], own.get("width", WIDTH)
        self.levels = segmenter_levels_of(metadata)
        peak = metadata["score"].get("peak", {})        # `learned` pools as `peak` does
        self.share, self.box = float(peak.get("share", PEAK_SHARE)), int(peak.get("window", PEAK_WINDOW))
        self.segmenter: torch.nn.Module | None = None          # by `fit`

    def fit(self, splits: Splits) -> None:
        """Train on the training split (or load the weights a run with the same inputs cached)."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)              # the initial weights, without moving the caller's stream
            self.segmenter = build_segmenter(self.channels, self.width, self.levels)
        path = self.cache / f"reference-{self._digest()}.pt"
        if path.exists():
            self.segmenter.load_state_dict(torch.load(path))
            self.segmenter.eval()
            return
        images = torch.as_tensor(splits.train.images)
        defective, masks = self._defects(splits.train.images[:self.per_kind])
        batch_size = max(2, batch_size_for(*images.shape[2:]))
        order = torch.Generator().manual_seed(self.seed)
        half = batch_size // 2

        def half_defective() -> tuple[Tensor, Tensor]:
            picked = torch.randint(len(defective), (half,), generator=order)
            clean = images[torch.randint(len(images), (batch_size - half,), generator=order)]
            return (torch.cat([defective[picked], clean]),
                    torch.cat([masks[picked], torch.zeros(len(clean), 1, *images.shape[2:])]))

        fit_segmenter(self.segmenter, self.module.forward, half_defective, self.steps, progress=self.progress,
                      desc="supervised reference")
        self.cache.mkdir(parents=True, exist_ok=True)
        torch.save(self.segmenter.state_dict(), path)

    def _defects(self, images: np.ndarray) -> tuple[Tensor, Tensor]:
        """Every kind applied to `images`: (K * N, C, H, W) images and (K * N, 1, H, W) masks."""
        pairs = [defective_set(images, kind, self.seed + SEED_OFFSET)
                 for kind in tqdm(self.kinds, desc="reference defects", leave=False, disable=not self.progress)]
        return (torch.as_tensor(np.concatenate([p[0] for p in pairs])),
                torch.as_tensor(np.concatenate([p[1] for p in pairs]))[:, None].float())

    def _digest(self) -> str:
        """What the trained weights depend on: the VAE's weights and this reference's settings."""
        settings = (self.kinds, self.seed, self.steps, self.per_kind, self.width, self.share, self.box)
        # a 2-level reference keeps the key it had before levels were recorded, so its cache still holds
        settings += () if self.levels == LEVELS else (self.levels,)
        digest = hashlib.sha256(repr(settings).encode())
        for name, tensor in sorted(self.module.state_dict().items()):
            if name.startswith("vae."):
                digest.update(name.encode())
                digest.update(tensor.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()[:12]

    @torch.no_grad()
    def _box_maps(self, images: np.ndarray, batch_size: int = 256) -> Tensor:
        x = torch.as_tensor(images)
        out = []
        for start in range(0, len(x), batch_size):
            batch = x[start:start + batch_size]
            probability = torch.sigmoid(self.segmenter(batch, self.module.forward(batch)))[:, 0]
            out.append(box_average(probability, self.box))
        return torch.cat(out)

    def score(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return {NAME: top_mean(self._box_maps(images), self.share).numpy()}

    def maps(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return {NAME: self._box_maps(images).numpy()}
