"""Every data source, from small fixtures made here, and the seeded split."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import data
from training.data import load_source, split_set


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_digits_are_scaled_by_16_into_unit_range() -> None:
    digits = load_source("digits")
    assert digits.images.shape == (1797, 1, 8, 8)
    assert digits.images.dtype == np.float32
    assert digits.images.min() == 0.0 and digits.images.max() == 1.0
    assert sorted(set(digits.labels.tolist())) == list(range(10))


@pytest.mark.parametrize("gzipped", [True, False])
def test_idx_images_with_their_labels_file(tmp_path: Path, gzipped: bool) -> None:
    suffix = ".gz" if gzipped else ""
    pixels = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", pixels)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.array([3, 1, 4, 1, 5]))
    loaded = load_source(str(tmp_path / f"train-images-idx3-ubyte{suffix}"))
    assert loaded.images.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(loaded.images[:, 0] * 255, pixels, atol=1e-4)
    assert loaded.labels.tolist() == [3, 1, 4, 1, 5]


def test_truncated_idx_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 8, 8)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_source(str(path))


def test_fashion_mnist_reads_both_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for stem, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", np.full((n, 28, 28), 255))
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    loaded = load_source("fashion-mnist")
    assert loaded.images.shape == (10, 1, 28, 28) and loaded.images.max() == 1.0
    assert loaded.class_names[9] == "ankle boot"


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist")


@pytest.mark.parametrize("layout", ["nhw", "nchw", "nhwc"])
def test_npy_arrays_of_each_layout(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(6, 3, 12, 12), dtype=np.uint8)
    array = {"nhw": base[:, 0], "nchw": base, "nhwc": base.transpose(0, 2, 3, 1)}[layout]
    np.save(tmp_path / "x.npy", array)
    loaded = load_source(str(tmp_path / "x.npy"))
    expected = base[:, :1] if layout == "nhw" else base
    np.testing.assert_allclose(loaded.images, expected / 255.0, atol=1e-6)


def test_npz_with_labels_and_pixel_max(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.full((4, 8, 8), 16.0), labels=np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="--pixel-max"):
        load_source(str(tmp_path / "x.npz"))
    loaded = load_source(str(tmp_path / "x.npz"), pixel_max=16)
    assert loaded.images.max() == 1.0 and loaded.labels.tolist() == [0, 1, 0, 1]


def test_folder_recursive_with_labels_resize_and_channels(tmp_path: Path) -> None:
    for group, colour in (("good", (200, 10, 10)), ("scratched", (10, 200, 10))):
        for i in range(3):
            folder = tmp_path / group / ("deep" if i == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + i, 20), colour).save(folder / f"{i}.png")
    with pytest.raises(ValueError, match="--image-size"):
        load_source(str(tmp_path))
    rgb = load_source(str(tmp_path), image_size=16)
    assert rgb.images.shape == (6, 3, 16, 16)
    assert rgb.class_names == ["good", "scratched"] and rgb.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(rgb.images[0, :, 5, 5], np.array([200, 10, 10]) / 255, atol=1e-6)
    gray = load_source(str(tmp_path), image_size=16, channels=1)
    assert gray.images.shape == (6, 1, 16, 16)


def test_folder_of_grayscale_infers_one_channel(tmp_path: Path) -> None:
    for i in range(3):
        Image.new("L", (10, 10), 40 * i).save(tmp_path / f"{i}.png")
    loaded = load_source(str(tmp_path))
    assert loaded.images.shape == (3, 1, 10, 10) and loaded.labels is None


def test_empty_folder_and_missing_path_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no images"):
        load_source(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not 'digits'"):
        load_source(str(tmp_path / "nope.png"))


def test_resize_and_channel_conversion_of_arrays() -> None:
    digits = load_source("digits", image_size=16, channels=3)
    assert digits.images.shape == (1797, 3, 16, 16)
    assert 0.0 <= digits.images.min() and digits.images.max() <= 1.0


def test_split_is_seeded_disjoint_and_complete() -> None:
    digits = load_source("digits")
    a = split_set(digits, 0.1, 0.15, 0.1, seed=3)
    b = split_set(digits, 0.1, 0.15, 0.1, seed=3)
    c = split_set(digits, 0.1, 0.15, 0.1, seed=4)
    np.testing.assert_array_equal(a.cal.images, b.cal.images)
    assert not np.array_equal(a.cal.images, c.cal.images)
    assert sum(len(getattr(a, k)) for k in ("train", "val", "cal", "test")) == len(digits)
    assert (len(a.val), len(a.cal), len(a.test)) == (180, 270, 180)


def test_class_filter_keeps_test_whole() -> None:
    splits = split_set(load_source("digits"), 0.1, 0.15, 0.1, seed=0, class_filter=7)
    for part in (splits.train, splits.val, splits.cal):
        assert set(part.labels.tolist()) == {7}
    assert len(set(splits.test.labels.tolist())) == 10
    with pytest.raises(ValueError, match="no such class"):
        split_set(load_source("digits"), 0.1, 0.15, 0.1, seed=0, class_filter=11)
