"""Codecs, tested directly: every input form to (C, H, W) float32, every malformed input to a
clear error, and the output encoders."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service import codecs
from service.codecs import ImageSpec
from service.errors import BadInput, TooLarge

GRAY8 = ImageSpec(1, 8, 8)
RGB8 = ImageSpec(3, 8, 8)


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(width: int = 8, height: int = 8) -> np.ndarray:
    return (np.arange(width * height).reshape(height, width) * 3 % 256).astype(np.uint8)


def test_gray_png_is_scaled_by_255() -> None:
    pixels = gradient()
    out = codecs.image_from_bytes(encode(Image.fromarray(pixels)), GRAY8)
    assert out.shape == (1, 8, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], pixels / 255.0, atol=1e-7)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "GIF"])
def test_lossless_formats_decode_exactly(fmt: str) -> None:
    pixels = gradient()
    options = {"lossless": True} if fmt == "WEBP" else {}
    out = codecs.image_from_bytes(encode(Image.fromarray(pixels), fmt, **options), GRAY8)
    np.testing.assert_allclose(out[0], pixels / 255.0, atol=1e-7)


def test_jpeg_decodes_approximately() -> None:
    pixels = np.full((8, 8), 128, np.uint8)
    out = codecs.image_from_bytes(encode(Image.fromarray(pixels), "JPEG", quality=95), GRAY8)
    assert abs(out.mean() - 128 / 255) < 0.02


def test_rgb_to_gray_uses_luma_and_gray_to_rgb_repeats() -> None:
    colour = Image.new("RGB", (8, 8), (200, 100, 50))
    gray = codecs.image_from_bytes(encode(colour), GRAY8)
    assert gray[0, 0, 0] == pytest.approx(np.asarray(colour.convert("L"))[0, 0] / 255)
    rgb = codecs.image_from_bytes(encode(Image.fromarray(gradient())), RGB8)
    assert rgb.shape == (3, 8, 8) and np.array_equal(rgb[0], rgb[2])


def test_transparent_pixels_count_as_black() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    rgba.putpixel((2, 3), (255, 255, 255, 255))
    out = codecs.image_from_bytes(encode(rgba), GRAY8)
    assert out[0, 3, 2] == 1.0 and out.sum() == 1.0


def test_palette_and_cmyk_convert() -> None:
    palette = Image.fromarray(gradient()).convert("P")
    assert codecs.image_from_bytes(encode(palette), GRAY8).shape == (1, 8, 8)
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    assert codecs.image_from_bytes(encode(cmyk, "JPEG"), RGB8).mean() > 0.9       # no ink is white


def test_sixteen_bit_keeps_its_range() -> None:
    values = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    out = codecs.image_from_bytes(encode(Image.fromarray(values)), GRAY8)
    np.testing.assert_allclose(out[0], values / 65535.0, atol=1e-6)


def test_exif_rotation_is_applied() -> None:
    pixels = np.zeros((4, 8), np.uint8)
    pixels[0, 0] = 255                                      # top-left of a wide image
    exif = Image.Exif()
    exif[0x0112] = 6                                        # "rotate 90 CW to display"
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=100)
    out = codecs.image_from_bytes(data, ImageSpec(1, 8, 4))
    assert out.shape == (1, 8, 4) and out[0, 0, 3] > 0.5  # now top-right of a tall image


def test_other_sizes_are_resized_or_refused() -> None:
    data = encode(Image.fromarray(gradient(16, 12)))
    assert codecs.image_from_bytes(data, GRAY8).shape == (1, 8, 8)
    with pytest.raises(BadInput, match="is 16x12; the model takes 8x8"):
        codecs.image_from_bytes(data, ImageSpec(1, 8, 8, resize=False))


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty"),
    (b"hello, not an image", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "not an image|could not be decoded"),
])
def test_garbage_bytes_are_422(data: bytes, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        codecs.image_from_bytes(data, GRAY8)


def test_truncated_png_is_422() -> None:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)))
    with pytest.raises(BadInput, match="truncated|could not be decoded|not an image"):
        codecs.image_from_bytes(data[: len(data) // 2], GRAY8)


def test_pixel_limit_is_checked_before_decoding() -> None:
    big = encode(Image.new("L", (5000, 4000)))               # 20 Mpx of zeros: a small file
    with pytest.raises(TooLarge, match="20,000,000 pixels"):
        codecs.image_from_bytes(big, ImageSpec(1, 8, 8, max_pixels=16_000_000))


def test_base64_and_data_urls() -> None:
    data = encode(Image.fromarray(gradient()))
    plain = codecs.image_from_base64(base64.b64encode(data).decode(), GRAY8)
    url = codecs.image_from_base64("data:image/png;base64," + base64.b64encode(data).decode(), GRAY8)
    np.testing.assert_array_equal(plain, url)
    with pytest.raises(BadInput, match="not valid base64"):
        codecs.image_from_base64("%%%not base64%%%", GRAY8)


def test_arrays_of_each_shape() -> None:
    hw = np.random.default_rng(0).random((8, 8))
    np.testing.assert_allclose(codecs.image_from_array(hw.tolist(), GRAY8)[0], hw, atol=1e-7)
    chw = np.random.default_rng(1).random((3, 8, 8))
    assert codecs.image_from_array(chw.tolist(), RGB8).shape == (3, 8, 8)
    gray = codecs.image_from_array(chw.tolist(), GRAY8)
    np.testing.assert_allclose(gray[0], np.tensordot(codecs.LUMA, chw, axes=1), atol=1e-6)


@pytest.mark.parametrize(("value", "message"), [
    ([[0.1, 0.2], [0.3]], "ragged"),
    ([[0.1, "a"], [0.3, 0.4]], "ragged|non-numeric"),
    ([[0.5, float("nan")], [0.1, 0.2]], "NaN"),
    ([[1.5, 0.0], [0.0, 0.0]], r"\[0, 1\]"),
    ([[-0.1, 0.0], [0.0, 0.0]], r"\[0, 1\]"),
    ([[[0.1] * 8] * 8] * 2, "C x H x W with C 1 or 3"),
    ([0.1, 0.2, 0.3], "expected H x W"),
])
def test_bad_arrays_are_422(value: object, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        codecs.image_from_array(value, GRAY8)


def test_json_payload_shape_and_count() -> None:
    image = np.zeros((8, 8)).tolist()
    assert len(codecs.images_from_json({"images": [image, image]}, GRAY8, max_images=2)) == 2
    with pytest.raises(TooLarge, match="3 images in one request; the limit is 2"):
        codecs.images_from_json({"images": [image] * 3}, GRAY8, max_images=2)
    with pytest.raises(BadInput, match="no images"):
        codecs.images_from_json({"images": []}, GRAY8, max_images=2)
    for payload in ([image], {"pictures": [image]}, {"images": image[0][0]}):
        with pytest.raises(BadInput, match='expected a JSON object {"images"'):
            codecs.images_from_json(payload, GRAY8, max_images=2)
    with pytest.raises(BadInput, match="image 1 is a int"):
        codecs.images_from_json({"images": [image, 3]}, GRAY8, max_images=2)


def test_latents() -> None:
    assert codecs.latents_from_json([0.1, 0.2], 2, 10).shape == (1, 2)
    assert codecs.latents_from_json([[0.1, 0.2]] * 3, 2, 10).shape == (3, 2)
    for bad, message in (([[0.1, 0.2, 0.3]], "expected N x 2"), ([[0.1], [0.2, 0.3]], "rectangular"),
                         ([[float("inf"), 0.0]], "NaN or infinite")):
        with pytest.raises(BadInput, match=message):
            codecs.latents_from_json(bad, 2, 10)
    with pytest.raises(TooLarge):
        codecs.latents_from_json([[0.0, 0.0]] * 11, 2, 10)


def test_png_out_round_trips_and_heat_map_is_rgb() -> None:
    image = (np.arange(64).reshape(1, 8, 8) / 63).astype(np.float32)
    back = codecs.image_from_bytes(codecs.to_png(image), GRAY8)
    np.testing.assert_allclose(back, image, atol=0.5 / 255 + 1e-7)
    anomaly_map = np.zeros((8, 8), np.float32)
    anomaly_map[4, 4] = 10.0
    overlay = codecs.heatmap_overlay(anomaly_map, image, scale=5.0)
    assert overlay.shape == (3, 8, 8)
    hot, cold = overlay[:, 4, 4], overlay[:, 0, 0]
    np.testing.assert_allclose(hot, codecs.heat_colours(np.array(1.0)), atol=1e-6)   # saturated
    assert cold.sum() < hot.sum()
