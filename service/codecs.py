"""Images in and out, as pure functions: bytes, base64 and nested lists become float32 (C, H, W)
arrays in [0, 1] shaped for the model; arrays become nested lists, PNG bytes or heat maps.

Every check raises a `BadInput` (422) or `TooLarge` (413) whose message says what was wrong and
what the model expects. No web framework here: the routes call these off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadInput, TooLarge

# ITU-R 601-2 luma, the weights Pillow's convert("L") uses
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class ImageSpec:
    """What the model takes, and how strict to be about it."""
    channels: int
    height: int
    width: int
    resize: bool = True
    max_pixels: int = 16_000_000

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def describe(self) -> str:
        return f"{self.width}x{self.height} with {self.channels} channel{'s' if self.channels > 1 else ''}"


# ---- images in -------------------------------------------------------------------------------

def image_from_bytes(data: bytes, spec: ImageSpec, label: str = "image") -> np.ndarray:
    """An encoded image (PNG, JPEG, ...) as (C, H, W) float32 in [0, 1]. EXIF rotation is applied,
    transparent pixels count as black, 16-bit images keep their range."""
    return decode_image(open_image(data, spec, label), spec, label)


def open_image(data: bytes, spec: ImageSpec, label: str = "image") -> Image.Image:
    """The image file opened and its size checked against the pixel limit, from its header alone:
    nothing is decoded yet, so this is cheap enough for the event loop."""
    if not data:
        raise BadInput(f"{label} is empty: expected the bytes of an image file")
    with _unreadable_as_bad_input(label):
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > spec.max_pixels:
            raise TooLarge(f"{label} is {width}x{height} = {width * height:,} pixels; "
                           f"the limit is {spec.max_pixels:,}")
        return image


def decode_image(image: Image.Image, spec: ImageSpec, label: str = "image") -> np.ndarray:
    """An image from `open_image`, decoded, turned upright and fitted to the model."""
    with _unreadable_as_bad_input(label):
        image.load()
        ImageOps.exif_transpose(image, in_place=True)       # in place: no copy of an upright image
    return _fit(_pixels(image, spec, label), spec, label)


@contextlib.contextmanager
def _unreadable_as_bad_input(label: str) -> Iterator[None]:
    """Pillow's many ways of failing on a bad file, as one 422 that says which input it was."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadInput(f"{label} is not an image this service can read ({type(error).__name__}); "
                       "send PNG, JPEG, BMP, TIFF, WebP or GIF") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadInput(f"{label} could not be decoded: {error} (truncated or corrupt file?)") from None


def _pixels(image: Image.Image, spec: ImageSpec, label: str) -> np.ndarray:
    """The decoded image as float32 (C, H, W) in [0, 1] with the model's channel count."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        # 16-bit files (PNG, TIFF) open as I;16; "I" is 32-bit, read as 16-bit too; "F" is already [0, 1]
        values = np.asarray(image, dtype=np.float32) / (1.0 if image.mode == "F" else 65535.0)
        if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > 1:
            raise BadInput(f"{label}: a {image.mode} image must hold values in [0, 1] (floats) or 0..65535")
        plane = values[None]
        return plane if spec.channels == 1 else np.repeat(plane, 3, axis=0)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    if image.mode != spec.mode:
        image = image.convert(spec.mode)
    if image.size != (spec.width, spec.height):
        # resize the 8-bit image, exactly as training loads a folder of images
        _allow_resize(image.width, image.height, spec, label)
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def image_from_base64(text: str, spec: ImageSpec, label: str = "image") -> np.ndarray:
    """A base64 string (optionally a data: URL) of an encoded image."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{label} is a string but not valid base64 of an image file") from None
    return image_from_bytes(data, spec, label)


def image_from_array(value: Any, spec: ImageSpec, label: str = "image") -> np.ndarray:
    """Nested lists of numbers in [0, 1], shaped H x W or C x H x W (C = 1 or 3)."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise BadInput(f"{label} is not a rectangular array of numbers: rows of different lengths "
                       "(ragged) or non-numeric entries") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise BadInput(f"{label} has shape {list(array.shape)}; expected H x W or C x H x W with C 1 or 3 "
                       f"(the model takes {spec.describe()})")
    if array.shape[1] * array.shape[2] > spec.max_pixels:
        raise TooLarge(f"{label} has {array.shape[1] * array.shape[2]:,} pixels; the limit is {spec.max_pixels:,}")
    if not np.isfinite(array).all():
        raise BadInput(f"{label} contains NaN or infinite values")
    if array.min() < 0 or array.max() > 1:
        raise BadInput(f"{label} has values in [{array.min():g}, {array.max():g}]; pixels must lie in [0, 1]")
    if array.shape[0] != spec.channels:
        array = np.repeat(array, 3, axis=0) if spec.channels == 3 else np.tensordot(LUMA, array, axes=1)[None]
    return _fit(array, spec, label)


def _fit(pixels: np.ndarray, spec: ImageSpec, label: str) -> np.ndarray:
    """Resize (C, H, W) to the model's size, bilinearly as training did, unless resizing is off."""
    c, h, w = pixels.shape
    if (h, w) == (spec.height, spec.width):
        return np.ascontiguousarray(pixels, dtype=np.float32)
    _allow_resize(w, h, spec, label)
    planes = [np.asarray(Image.fromarray(plane, mode="F").resize((spec.width, spec.height),
                                                                  Image.Resampling.BILINEAR)) for plane in pixels]
    return np.clip(np.stack(planes), 0.0, 1.0).astype(np.float32)


def _allow_resize(width: int, height: int, spec: ImageSpec, label: str) -> None:
    if not spec.resize:
        raise BadInput(f"{label} is {width}x{height}; the model takes {spec.width}x{spec.height} "
                       "(drop resize=false to have it resized)")


def images_from_json(payload: Any, spec: ImageSpec, max_images: int) -> list[np.ndarray]:
    """`{"images": [...]}`: each item a base64 string of an image file or nested lists of numbers."""
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise BadInput('expected a JSON object {"images": [...]}, each item a base64 image or nested lists')
    items = payload["images"]
    check_count(len(items), max_images)
    images = []
    for i, item in enumerate(items):
        label = f"image {i}"
        if isinstance(item, str):
            images.append(image_from_base64(item, spec, label))
        elif isinstance(item, list):
            images.append(image_from_array(item, spec, label))
        else:
            raise BadInput(f"{label} is a {type(item).__name__}; expected a base64 string or nested lists")
    return images


def check_count(count: int, max_images: int) -> None:
    if count == 0:
        raise BadInput("no images in the request; send at least one")
    if count > max_images:
        raise TooLarge(f"{count} images in one request; the limit is {max_images}")


def latents_from_json(value: Any, latent_dim: int, max_rows: int) -> np.ndarray:
    """z as (N, d) float32 from nested lists; one flat list counts as one row."""
    try:
        z = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise BadInput("z is not a rectangular array of numbers (ragged rows or non-numeric entries)") from None
    if z.ndim == 1:
        z = z[None]
    if z.ndim != 2 or z.shape[1] != latent_dim or len(z) == 0:
        raise BadInput(f"z has shape {list(z.shape)}; expected N x {latent_dim} (the model's latent size)")
    if len(z) > max_rows:
        raise TooLarge(f"{len(z)} latent vectors in one request; the limit is {max_rows}")
    if not np.isfinite(z).all():
        raise BadInput("z contains NaN or infinite values")
    return z


# ---- images out ------------------------------------------------------------------------------

def images_as_json(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) as the contract's JSON shape: N x H x W for one channel, N x C x H x W otherwise.
    The array itself is returned: the response serialises NumPy directly, without nested lists."""
    return images[:, 0] if images.shape[1] == 1 else images


def to_png(image: np.ndarray) -> bytes:
    """(C, H, W) in [0, 1] as PNG bytes (8-bit gray or RGB)."""
    pixels = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
    picture = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)     # speed over a few bytes
    return buffer.getvalue()


def to_base64_png(image: np.ndarray) -> str:
    return base64.b64encode(to_png(image)).decode("ascii")


# black -> purple -> red -> orange -> pale yellow: dark where normal, bright where anomalous
_HEAT_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]) / 255.0


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape S, as RGB colours, shape (3, *S)."""
    return np.stack([np.interp(values, _HEAT_STOPS, _HEAT_COLOURS[:, k]) for k in range(3)])


def heatmap_overlay(anomaly_map: np.ndarray, image: np.ndarray, scale: float) -> np.ndarray:
    """The map (H, W), divided by scale and clipped to [0, 1], coloured and laid over the input
    image (C, H, W) in gray: the image shows through where the map is low. Returns (3, H, W)."""
    heat = np.clip(anomaly_map / max(scale, 1e-12), 0.0, 1.0)
    gray = image.mean(axis=0, keepdims=True) if image.shape[0] == 3 else image
    alpha = 0.35 + 0.65 * heat                                # some colour everywhere, opaque where hot
    return (1 - alpha) * np.repeat(gray, 3, axis=0) + alpha * heat_colours(heat)
