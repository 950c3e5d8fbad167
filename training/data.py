"""Image sources and the seeded split.

Every source becomes an `ImageSet`: float32 images (N, C, H, W) in [0, 1] with optional integer
labels. Sources: scikit-learn's 8x8 digits (values / 16), IDX files (Fashion-MNIST from Debian's
`dataset-fashion-mnist`, or MNIST), `.npy`/`.npz` arrays, and folders of images (recursive).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm"}


@dataclass
class ImageSet:
    images: np.ndarray              # (N, C, H, W) float32 in [0, 1]
    labels: np.ndarray | None       # (N,) int64, or None when the source has none
    class_names: list[str] | None   # name of each label value, when known
    source: str                     # what was loaded, for the metadata

    def __post_init__(self) -> None:
        assert self.images.ndim == 4, f"images must be (N, C, H, W), got {self.images.shape}"
        assert self.labels is None or len(self.labels) == len(self.images), "one label per image"

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> ImageSet:
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.images[index], labels, self.class_names, self.source)

    def summary(self) -> dict:
        n, c, h, w = self.images.shape
        counts = None if self.labels is None else {int(k): int(v) for k, v in
                                                   zip(*np.unique(self.labels, return_counts=True), strict=True)}
        return {"source": self.source, "images": n, "channels": c, "height": h, "width": w,
                "class_counts": counts, "class_names": self.class_names}


# ---- sources ---------------------------------------------------------------------------------

def load_digits_set() -> ImageSet:
    """scikit-learn's 1,797 8x8 digits. Values 0..16 divided by 16 (the seed divides by 15,
    which leaves pixels above 1; a Bernoulli likelihood needs [0, 1])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]      # (N, 1, 8, 8)
    return ImageSet(images, digits.target.astype(np.int64), [str(i) for i in range(10)], "digits")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array: (N, H, W) images or (N,) labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, got {data.size}")
    return data.reshape(dims)


def idx_labels_path(images_path: Path) -> Path | None:
    """The labels file beside an images file, by the usual naming (images-idx3 -> labels-idx1)."""
    candidate = images_path.with_name(images_path.name.replace("images-idx3", "labels-idx1"))
    return candidate if candidate != images_path and candidate.exists() else None


def load_idx_set(path: Path, class_names: list[str] | None = None) -> ImageSet:
    images = read_idx(path)
    if images.ndim != 3:
        raise ValueError(f"{path} holds an array of shape {images.shape}, expected (N, H, W) images")
    labels_path = idx_labels_path(path)
    labels = read_idx(labels_path).astype(np.int64) if labels_path else None
    return ImageSet((images / 255.0).astype(np.float32)[:, None], labels, class_names, str(path))


def load_fashion_mnist() -> ImageSet:
    """All 70,000 Fashion-MNIST images (its train and t10k files), from Debian's package."""
    parts = []
    for stem in ("train", "t10k"):
        path = FASHION_MNIST_DIR / f"{stem}-images-idx3-ubyte.gz"
        if not path.exists():
            raise FileNotFoundError(f"Fashion-MNIST not found at {path}: install it with "
                                    "`apt-get install dataset-fashion-mnist` or set FASHION_MNIST_DIR")
        parts.append(load_idx_set(path, FASHION_MNIST_CLASSES))
    labels = np.concatenate([p.labels for p in parts])
    return ImageSet(np.concatenate([p.images for p in parts]), labels, FASHION_MNIST_CLASSES,
                    "fashion-mnist")


def load_array_set(path: Path, pixel_max: float | None) -> ImageSet:
    """A .npy array, or a .npz with `images` (or `x`) and optional `labels` (or `y`).
    Shapes (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {1, 3}."""
    labels = None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            key = next((k for k in ("images", "x") if k in archive), None)
            if key is None:
                raise ValueError(f"{path} needs an array named 'images' or 'x', has {list(archive)}")
            array = archive[key]
            label_key = next((k for k in ("labels", "y") if k in archive), None)
            labels = archive[label_key].astype(np.int64) if label_key else None
    else:
        array = np.load(path, allow_pickle=False)
    return ImageSet(to_unit_nchw(array, pixel_max, str(path)), labels, None, str(path))


def to_unit_nchw(array: np.ndarray, pixel_max: float | None, what: str) -> np.ndarray:
    """Any (N, H, W) / (N, C, H, W) / (N, H, W, C) array of pixels as float32 NCHW in [0, 1]."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[1] not in (1, 3) and array.shape[-1] in (1, 3):
        array = array.transpose(0, 3, 1, 2)                               # NHWC -> NCHW
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"{what}: expected (N, H, W) or (N, C, H, W) with C 1 or 3, got {array.shape}")
    if pixel_max is None:
        pixel_max = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else 1.0
    images = array.astype(np.float32) / np.float32(pixel_max)
    if not np.isfinite(images).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"{what}: values span [{images.min():g}, {images.max():g}] after dividing "
                         f"by {pixel_max:g}; pass --pixel-max so they fall in [0, 1]")
    return images


def open_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """One image file as float32 (C, H, W) in [0, 1]: EXIF rotation applied, converted to mode
    ('L' or 'RGB'), resized bilinearly to size (W, H) if given. The service decodes the same way."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert(mode)
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_folder_set(root: Path, image_size: int | None, channels: int | None) -> ImageSet:
    """Every image under root (recursive). Labels come from the first-level sub-folder names
    when there are several; size and channels are inferred when not given."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    size = (image_size, image_size) if image_size else None
    if size is None or channels is None:
        shapes, modes = set(), set()
        for p in paths:
            with Image.open(p) as image:
                shapes.add(image.size)
                modes.add(image.mode)
        if size is None and len(shapes) > 1:
            raise ValueError(f"images under {root} have {len(shapes)} different sizes "
                             f"(e.g. {sorted(shapes)[:3]}); pass --image-size")
        size = size or shapes.pop()
        if channels is None:
            channels = 1 if modes <= {"L", "1", "I", "I;16", "F", "LA"} else 3
    mode = "L" if channels == 1 else "RGB"
    images = np.stack([open_image(p, mode, size) for p in paths])
    groups = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in paths]
    names = sorted(set(groups))
    labels = np.array([names.index(g) for g in groups], dtype=np.int64) if len(names) > 1 else None
    return ImageSet(images, labels, names if labels is not None else None, str(root))


def load_source(spec: str, image_size: int | None = None, channels: int | None = None,
                pixel_max: float | None = None) -> ImageSet:
    """Load a source by name or path, then bring it to the asked size and channels."""
    path = Path(spec)
    if spec == "digits":
        data = load_digits_set()
    elif spec == "fashion-mnist":
        data = load_fashion_mnist()
    elif path.is_dir():
        return load_folder_set(path, image_size, channels)
    elif not path.exists():
        raise FileNotFoundError(f"--data {spec!r}: not 'digits', 'fashion-mnist' or an existing path")
    elif path.suffix in (".npy", ".npz"):
        data = load_array_set(path, pixel_max)
    else:
        data = load_idx_set(path)
    return reshape_set(data, image_size, channels)


# ---- shaping ---------------------------------------------------------------------------------

def reshape_set(data: ImageSet, image_size: int | None, channels: int | None) -> ImageSet:
    images = data.images
    if channels is not None and channels != images.shape[1]:
        if channels == 3:
            images = np.repeat(images, 3, axis=1)
        else:  # ITU-R 601-2 luma, as Pillow's convert("L")
            images = np.tensordot(images, np.array([0.299, 0.587, 0.114], np.float32), ([1], [0]))[:, None]
    if image_size is not None and images.shape[2:] != (image_size, image_size):
        images = resize_images(images, image_size)
    return ImageSet(np.ascontiguousarray(images, dtype=np.float32), data.labels, data.class_names,
                    data.source)


def resize_images(images: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize of float images, channel by channel, with Pillow's float mode."""
    n, c = images.shape[:2]
    out = np.empty((n, c, side, side), dtype=np.float32)
    for i in range(n):
        for k in range(c):
            plane = Image.fromarray(images[i, k], mode="F").resize((side, side), Image.Resampling.BILINEAR)
            out[i, k] = np.asarray(plane)
    return np.clip(out, 0.0, 1.0)


# ---- split -----------------------------------------------------------------------------------

@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    cal: ImageSet
    test: ImageSet    # keeps every class, so one-class runs can measure novelty detection


def split_set(data: ImageSet, val: float, cal: float, test: float, seed: int,
              class_filter: int | None = None, max_images: int | None = None) -> Splits:
    """A seeded permutation cut into train / validation / calibration / test. With a class
    filter, train, validation and calibration keep only that class; test keeps all."""
    order = np.random.default_rng(seed).permutation(len(data))
    if max_images is not None:
        order = order[:max_images]
    n = len(order)
    n_val, n_cal, n_test = (max(1, round(f * n)) for f in (val, cal, test))
    parts = np.split(order, np.cumsum([n_test, n_cal, n_val]))
    test_idx, cal_idx, val_idx, train_idx = parts
    if class_filter is not None:
        if data.labels is None:
            raise ValueError(f"--class {class_filter}: the source {data.source} has no labels")
        if class_filter not in set(data.labels.tolist()):
            raise ValueError(f"--class {class_filter}: no such class in {data.source}")
        keep = lambda idx: idx[data.labels[idx] == class_filter]  # noqa: E731
        train_idx, val_idx, cal_idx = keep(train_idx), keep(val_idx), keep(cal_idx)
    if min(len(train_idx), len(val_idx), len(cal_idx)) == 0:
        raise ValueError(f"too few images ({n}) to split into train/validation/calibration")
    return Splits(*(data.subset(np.sort(i)) for i in (train_idx, val_idx, cal_idx, test_idx)))
