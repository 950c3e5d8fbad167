"""The synthetic corruptions the defect segmenter learns from. Pure torch, seeded.

After DRAEM (Zavrtanik et al., 2021): a region shaped by smooth random noise is filled with
something that does not belong there, and the segmenter (`training.segmenter`) learns to find it.

- Shapes, from value noise (random values on a coarse grid, upsampled bicubically, plus a finer
  octave): a blob (the noise above a high quantile, 3-25% of the image), thin winding lines (the
  noise close to its median, within a part of the image), or scattered pixels (a share of a blob).
- Fills: a crop of one of scikit-image's bundled photographs (rescaled, rotated, maybe inverted,
  its gamma jittered), another image of the batch, or one flat tone. The fill is blended with the
  image by a random weight, so some corruptions are faint.
- About 40% of the images stay clean, so the segmenter also learns to say "nothing here".

None of `training.defects`' generators is used here: those are the evaluation's, and stay unseen.
The textures the evaluation trains on (brick, grass, gravel) are not among the photographs.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "page", "text", "rocket", "clock",
          "hubble_deep_field", "immunohistochemistry", "cell", "retina")
CLEAN_SHARE = 0.4        # of the images, left as they are
VISIBLE = 0.02           # a pixel counts as corrupted when the change exceeds this in some channel
BANK_SIZE = 2048         # photograph crops drawn once per corruptor


@cache
def photographs(channels: int) -> list[Tensor]:
    """scikit-image's bundled photographs (C, H, W) in [0, 1]: grey, or RGB with grey ones repeated."""
    from skimage import data

    out = []
    for name in PHOTOS:
        image = np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0
        image = image[..., :3] if image.ndim == 3 else image[..., None]
        if channels == 1:
            image = image.mean(2, keepdims=True)
        elif image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        out.append(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
    return out


class Corruptor:
    """Corrupts batches of images (B, C, H, W) in [0, 1]; returns them with their masks (B, 1, H, W),
    1 where a pixel was visibly changed. The same seed gives the same sequence of corruptions."""

    def __init__(self, channels: int, height: int, width: int, seed: int = 0, bank_size: int = BANK_SIZE) -> None:
        self.shape = (channels, height, width)
        self.generator = torch.Generator().manual_seed(seed)
        self.bank = self._crops(photographs(channels), bank_size)

    def _uniform(self, count: int, low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(count, generator=self.generator)

    def _crops(self, photos: list[Tensor], count: int) -> Tensor:
        """Random crops of the photographs, rescaled to the image size, some inverted, gamma jittered."""
        _, h, w = self.shape
        crops = torch.empty(count, *self.shape)
        for i in range(count):
            photo = photos[int(torch.randint(len(photos), (1,), generator=self.generator))]
            largest = min(photo.shape[1:]) // 2          # a crop of at most half the photo...
            smallest = min(max(2, h // 2), largest - 1)  # ...and at least half the image, if the photo allows
            side = int(torch.randint(smallest, largest, (1,), generator=self.generator))
            top = int(torch.randint(photo.shape[1] - side, (1,), generator=self.generator))
            left = int(torch.randint(photo.shape[2] - side, (1,), generator=self.generator))
            crop = F.interpolate(photo[None, :, top:top + side, left:left + side], size=(h, w), mode="bilinear",
                                 align_corners=False, antialias=True)[0].clamp(0.0, 1.0)
            if torch.rand(1, generator=self.generator) < 0.5:
                crop = 1.0 - crop
            crops[i] = crop ** float(torch.exp(0.5 * torch.randn(1, generator=self.generator)))
        return crops

    def _noise(self, count: int) -> Tensor:
        """Smooth random fields (B, 1, H, W): a coarse grid of random values upsampled, plus a finer octave."""
        _, h, w = self.shape
        cells = int(torch.randint(2, max(3, min(h, w) // 4) + 1, (1,), generator=self.generator))
        fields = [F.interpolate(torch.rand(count, 1, n + 1, n + 1, generator=self.generator), size=(h, w),
                                mode="bicubic", align_corners=True) * weight for n, weight in ((cells, 1.0),
                                                                                             (2 * cells, 0.5))]
        return fields[0] + fields[1]

    def _above(self, noise: Tensor, low: float, high: float) -> Tensor:
        """Where each field exceeds its own quantile, drawn in [low, high): (B, 1, H, W) of 0/1."""
        flat = noise.flatten(1).sort(1).values
        index = (self._uniform(len(noise), low, high) * (flat.shape[1] - 1)).long()
        return (noise >= flat.gather(1, index[:, None]).view(-1, 1, 1, 1)).float()

    def masks(self, count: int) -> Tensor:
        """A blob, winding lines or scattered pixels per image, each equally likely; CLEAN_SHARE empty."""
        noise = self._noise(count)
        blob = self._above(noise, 0.75, 0.97)
        median = noise.flatten(1).median(1).values.view(-1, 1, 1, 1)
        line_width = self._uniform(count, 0.01, 0.04).view(-1, 1, 1, 1)
        lines = ((noise - median).abs() < line_width).float() * self._above(self._noise(count), 0.3, 0.8)
        density = self._uniform(count, 0.1, 0.5).view(-1, 1, 1, 1)
        scattered = self._above(noise, 0.6, 0.9) * (torch.rand(noise.shape, generator=self.generator) < density)
        shape = torch.randint(3, (count, 1, 1, 1), generator=self.generator)
        mask = torch.where(shape == 0, blob, torch.where(shape == 1, lines, scattered))
        clean = (torch.rand(count, 1, 1, 1, generator=self.generator) < CLEAN_SHARE).float()
        return mask * (1.0 - clean)

    def fills(self, images: Tensor) -> Tensor:
        """What goes into the region, per image: a photograph crop, another image, or a flat tone."""
        count = len(images)
        crops = self.bank[torch.randint(len(self.bank), (count,), generator=self.generator)]
        crops = torch.rot90(crops, int(torch.randint(4, (1,), generator=self.generator)), (2, 3))
        others = images.roll(1, dims=0)
        tones = torch.rand(count, images.shape[1], 1, 1, generator=self.generator).expand_as(images)
        which = torch.randint(3, (count, 1, 1, 1), generator=self.generator)
        return torch.where(which == 0, crops, torch.where(which == 1, others, tones))

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.masks(len(images))
        keep = self._uniform(len(images), 0.0, 0.6).view(-1, 1, 1, 1)     # how much of the image shows through
        corrupted = images * (1 - mask) + mask * ((1 - keep) * self.fills(images) + keep * images)
        visible = ((corrupted - images).abs().amax(1, keepdim=True) > VISIBLE).float()
        return corrupted, mask * visible
