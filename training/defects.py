"""Synthetic defects on images, with the mask of the pixels each one changed. Pure NumPy.

Every defect takes one image (C, H, W) in [0, 1] and a NumPy generator, and returns the defective
image (still in [0, 1], float32) and its mask (H, W) bool: the pixels inside the defect's region
whose value changed by more than `CHANGED` in some channel. Pixels outside the mask are untouched.
Sizes scale with the image side, so the same kinds apply to 8x8 digits, 28x28 Fashion-MNIST and
64x64 texture patches; a local defect covers about 3-15% of the pixels.

Regions are placed where there is something to damage: near pixels that differ from the image's
background level (for objects on a plain background), or anywhere (for textures, where every
pixel differs from the background). `defective_set` applies one kind to many images, seeded per
image, so a run is reproducible.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

Defect = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
CHANGED = 1e-3          # a pixel counts as changed above this absolute difference
AREA = (0.06, 0.12)     # the share of pixels a region defect covers, drawn uniformly
ATTEMPTS = 10           # redraws when a defect happened to change nothing (e.g. blur on a flat area)


# ---- geometry --------------------------------------------------------------------------------

def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w].astype(np.float64)


def gaussian_blur(plane: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) array, reflecting at the borders."""
    radius = max(1, int(round(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(plane, radius, mode="reflect" if min(plane.shape) > radius else "edge")
    rows = sum(t * padded[:, k:k + plane.shape[1]] for k, t in enumerate(taps))
    return sum(t * rows[k:k + plane.shape[0], :] for k, t in enumerate(taps))


def _pick_center(weights: np.ndarray, margin: float, rng: np.random.Generator) -> tuple[float, float]:
    """A pixel drawn with probability proportional to weights, kept `margin` inside the borders."""
    h, w = weights.shape
    flat = weights.ravel() + 1e-6
    index = rng.choice(flat.size, p=flat / flat.sum())
    cy, cx = divmod(int(index), w)
    lo_y, hi_y = min(margin, (h - 1) / 2), max(h - 1 - margin, (h - 1) / 2)
    lo_x, hi_x = min(margin, (w - 1) / 2), max(w - 1 - margin, (w - 1) / 2)
    return float(np.clip(cy, lo_y, hi_y)), float(np.clip(cx, lo_x, hi_x))


def foreground_weights(image: np.ndarray) -> np.ndarray:
    """Where an object is: the smoothed distance of each pixel from the background level (the
    image's 5th percentile). Near-uniform on textures."""
    gray = image.mean(0)
    far = np.abs(gray - np.percentile(gray, 5))
    return gaussian_blur(far, max(0.7, gray.shape[0] / 16))


def detail_weights(image: np.ndarray) -> np.ndarray:
    """Where detail is: the smoothed gradient magnitude, so blur lands where it removes something."""
    gy, gx = np.gradient(image.mean(0))
    return gaussian_blur(np.hypot(gy, gx), max(0.7, image.shape[1] / 16))


def blob_mask(h: int, w: int, area: float, center: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """An irregular blob of about `area` pixels: a disc whose radius wobbles with the angle."""
    yy, xx = _grid(h, w)
    dy, dx = yy - center[0], xx - center[1]
    angle = np.arctan2(dy, dx)
    wobble = 1.0 + sum(rng.uniform(0, 0.25) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    aspect = rng.uniform(0.7, 1.4)
    radius = np.sqrt(area / np.pi)
    return (dy / aspect) ** 2 + (dx * aspect) ** 2 <= (radius * wobble) ** 2


def rect_mask(h: int, w: int, area: float, center: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """An axis-aligned rectangle of about `area` pixels, aspect ratio between 1:2 and 2:1."""
    aspect = rng.uniform(0.5, 2.0)
    rh = max(1, int(round(np.sqrt(area * aspect))))
    rw = max(1, int(round(area / rh)))
    top = int(np.clip(round(center[0] - rh / 2), 0, max(h - rh, 0)))
    left = int(np.clip(round(center[1] - rw / 2), 0, max(w - rw, 0)))
    mask = np.zeros((h, w), dtype=bool)
    mask[top:top + rh, left:left + rw] = True
    return mask


def line_mask(h: int, w: int, start: tuple[float, float], end: tuple[float, float], width: int) -> np.ndarray:
    """The pixels within width/2 of the segment start-end (at least the pixels it passes through)."""
    mask = np.zeros((h, w), dtype=bool)
    steps = int(np.ceil(np.hypot(end[0] - start[0], end[1] - start[1]) * 2)) + 1
    for t in np.linspace(0.0, 1.0, steps):
        y = start[0] + t * (end[0] - start[0])
        x = start[1] + t * (end[1] - start[1])
        for oy in range(-(width // 2), width - width // 2):
            for ox in range(-(width // 2), width - width // 2):
                yi, xi = int(round(y)) + oy, int(round(x)) + ox
                if 0 <= yi < h and 0 <= xi < w:
                    mask[yi, xi] = True
    return mask


def _region(image: np.ndarray, rng: np.random.Generator, shape: str = "blob",
            weights: np.ndarray | None = None) -> np.ndarray:
    """A region of AREA share of the pixels, centred on the foreground (or on `weights`)."""
    _, h, w = image.shape
    area = rng.uniform(*AREA) * h * w
    center = _pick_center(foreground_weights(image) if weights is None else weights, np.sqrt(area) / 2, rng)
    make = blob_mask if shape == "blob" else rect_mask
    return make(h, w, area, center, rng)


def _finish(image: np.ndarray, changed: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip to [0, 1], keep the change inside the region, and mask the pixels that really changed."""
    out = np.where(region[None], np.clip(changed, 0.0, 1.0), image).astype(np.float32)
    mask = region & (np.abs(out - image).max(0) > CHANGED)
    return out, mask


def _soft(region: np.ndarray) -> np.ndarray:
    """A blending weight that fades over the region's edge on images of 32 px and more (on
    smaller ones a pixel is too coarse for a soft edge)."""
    side = min(region.shape)
    return gaussian_blur(region.astype(np.float64), side / 40) if side >= 32 else region.astype(np.float64)


def _line_width(side: int) -> int:
    return max(1, side // 32)


# ---- defects on any image --------------------------------------------------------------------

def gaussian_noise(image: np.ndarray, rng: np.random.Generator, sigma: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Additive Gaussian noise (sigma 0.2, i.e. 51 grey levels) inside a blob: a noisy sensor patch."""
    region = _region(image, rng)
    return _finish(image, image + rng.normal(0.0, sigma, image.shape), region)


def salt_and_pepper(image: np.ndarray, rng: np.random.Generator, share: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """30% of the pixels inside a blob set to black or white (dead and hot pixels)."""
    region = _region(image, rng)
    hit = rng.random(image.shape[1:]) < share
    value = (rng.random(image.shape[1:]) < 0.5).astype(np.float64)
    return _finish(image, np.where(hit[None], value[None], image), region & hit)


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin straight line (1 px wide below 64 px sides, 2 px at 64), 30-70% of the side long, through
    the foreground, white or black, whichever differs more from the pixels under it."""
    _, h, w = image.shape
    length = rng.uniform(0.3, 0.7) * min(h, w)
    cy, cx = _pick_center(foreground_weights(image), 0, rng)
    angle = rng.uniform(0, np.pi)
    dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
    region = line_mask(h, w, (cy - dy, cx - dx), (cy + dy, cx + dx), _line_width(min(h, w)))
    value = 0.0 if image[:, region].mean() > 0.5 else 1.0
    return _finish(image, np.full_like(image, value), region)


def stain(image: np.ndarray, rng: np.random.Generator, strength: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """A blob (soft-edged from 32 px) blended 60% towards a dark (0.1) or, on dark pixels, a light (0.9) tone."""
    region = _region(image, rng)
    alpha = _soft(region) * strength
    tone = 0.1 if image[:, region].mean() > 0.4 else 0.9
    return _finish(image, image * (1 - alpha) + tone * alpha, alpha > 0.05)


def missing_patch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Occlusion: a black rectangle (cutout) over part of the object."""
    region = _region(image, rng, shape="rect")
    return _finish(image, np.zeros_like(image), region)


def blur(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blur (sigma = side / 20, at least 1 px) inside a blob placed where detail is:
    removes detail, so it lowers a plain reconstruction error."""
    _, h, _ = image.shape
    sigma = max(1.0, h / 20)
    blurred = np.stack([gaussian_blur(plane, sigma) for plane in image])
    region = _region(image, rng, weights=detail_weights(image))
    return _finish(image, blurred, region)


def contrast(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Local contrast around the blob's mean divided by 3 or multiplied by 2 (equally likely), in
    a blob placed where detail is: on a flat area a contrast change changes nothing visible."""
    region = _region(image, rng, weights=detail_weights(image))
    mean = image[:, region].mean(1)[:, None, None]
    factor = 1 / 3 if rng.random() < 0.5 else 2.0
    return _finish(image, mean + factor * (image - mean), region)


# ---- defects for textures --------------------------------------------------------------------

def _walk(h: int, w: int, start: np.ndarray, angle: float, length: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Points of a random walk: unit steps whose direction drifts (a crack's path)."""
    points, point = [], start.astype(np.float64)
    for _ in range(length):
        angle += rng.normal(0.0, 0.25)
        point = point + np.array([np.sin(angle), np.cos(angle)])
        if not (0 <= point[0] < h and 0 <= point[1] < w):
            break
        points.append(point.copy())
    return points


def crack(image: np.ndarray, rng: np.random.Generator, darken: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A thin dark branching line: a wandering path 50-90% of the side long with two branches,
    its pixels darkened to 30% of their value (and by at least 0.15)."""
    _, h, w = image.shape
    start = np.array(_pick_center(np.ones((h, w)), min(h, w) / 4, rng))
    angle = rng.uniform(0, 2 * np.pi)
    path = _walk(h, w, start, angle, int(rng.uniform(0.5, 0.9) * min(h, w)), rng)
    for _ in range(2):
        if len(path) > 4:
            fork = path[rng.integers(len(path) // 4, len(path))]
            turn = rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)
            path += _walk(h, w, fork, angle + turn, int(rng.uniform(0.2, 0.4) * min(h, w)), rng)
    region = np.zeros((h, w), dtype=bool)
    for y, x in path:
        region[int(y), int(x)] = True
    if _line_width(min(h, w)) > 1:       # thicken by one pixel down and right on larger images
        region[1:, :] |= region[:-1, :]
        region[:, 1:] |= region[:, :-1]
    return _finish(image, np.minimum(image * darken, image - 0.15), region)


def intensity_shift(image: np.ndarray, rng: np.random.Generator, shift: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """A blob (soft-edged from 32 px) brighter or darker by 0.2 (a discoloured area)."""
    region = _region(image, rng)
    alpha = _soft(region)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return _finish(image, image + sign * shift * alpha, alpha > 0.05)


def foreign_material(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A blob of another texture pasted in: oriented stripes (period 3-8 px) with fine noise,
    with the image's mean shifted by +-0.1 and 1.5 times its standard deviation."""
    _, h, w = image.shape
    yy, xx = _grid(h, w)
    angle, period = rng.uniform(0, np.pi), rng.uniform(3, 8)
    pattern = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    pattern = pattern + 0.5 * rng.normal(size=(h, w))
    pattern = (pattern - pattern.mean()) / pattern.std()
    mean = image.mean((1, 2))[:, None, None] + rng.choice([-0.1, 0.1])
    std = 1.5 * max(float(image.std()), 0.05)
    return _finish(image, mean + std * pattern[None], _region(image, rng))


def missing_material(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A blob filled with the image's mean colour: texture gone, brightness unchanged, so detail is
    removed and a plain reconstruction error goes down."""
    region = _region(image, rng)
    return _finish(image, np.broadcast_to(image.mean((1, 2))[:, None, None], image.shape), region)


IMAGE_DEFECTS: dict[str, Defect] = {
    "gaussian_noise": gaussian_noise, "salt_and_pepper": salt_and_pepper, "scratch": scratch,
    "stain": stain, "missing_patch": missing_patch, "blur": blur, "contrast": contrast,
}
TEXTURE_DEFECTS: dict[str, Defect] = {
    **IMAGE_DEFECTS, "crack": crack, "intensity_shift": intensity_shift,
    "foreign_material": foreign_material, "missing_material": missing_material,
}
DETAIL_REMOVING = ("blur", "missing_material")   # lower a plain reconstruction error


def apply_defect(image: np.ndarray, kind: str, seed: int | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One defect of `kind` on one image (C, H, W); the same seed gives the same defect. Redraws
    a few times if the first draw changed nothing (e.g. a blur on a flat part)."""
    if kind not in TEXTURE_DEFECTS:
        raise ValueError(f"unknown defect {kind!r}: expected one of {sorted(TEXTURE_DEFECTS)}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected one image (C, H, W), got shape {image.shape}")
    rng = np.random.default_rng(seed)
    for _ in range(ATTEMPTS):
        out, mask = TEXTURE_DEFECTS[kind](image.astype(np.float64), rng)
        if mask.any():
            break
    return out, mask


def defective_set(images: np.ndarray, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`kind` applied to every image (N, C, H, W): the images (N, C, H, W) and masks (N, H, W).
    Image i's defect depends only on (seed, kind, i)."""
    salt = zlib.crc32(kind.encode())          # stable across runs, unlike hash()
    pairs = [apply_defect(image, kind, [seed, salt, i]) for i, image in enumerate(images)]
    if not pairs:
        return np.zeros_like(images, dtype=np.float32), np.zeros((0, *images.shape[2:]), dtype=bool)
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
