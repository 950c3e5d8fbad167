"""The workload's bodies: real Fashion-MNIST test images encoded as PNG, one alone (the raw body
of every load-test request) and 64 of them as one multipart request (`files` x64)."""

from __future__ import annotations

import gzip
import io
import os
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
PNG = "image/png"


def fashion_test_images(count: int, first: int = 0) -> np.ndarray:
    """`count` 28x28 uint8 images from Fashion-MNIST's t10k file (Debian's dataset-fashion-mnist)."""
    path = FASHION_DIR / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        raise SystemExit(f"{path} not found: apt-get install dataset-fashion-mnist (or set FASHION_MNIST_DIR)")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)   # IDX: 16-byte header
    return images[first:first + count]


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def multipart_body(pngs: list[bytes], field: str = "files") -> tuple[bytes, str]:
    """A multipart/form-data body with one file part per PNG; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for i, png in enumerate(pngs):
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.png"\r\n'
                f"Content-Type: {PNG}\r\n\r\n")
        parts.append(head.encode() + png + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def fashion_pngs(first: int, count: int = 64) -> list[bytes]:
    """`count` consecutive Fashion-MNIST test images as PNG files."""
    return [png_bytes(image) for image in fashion_test_images(count, first)]


def write_bodies(workdir: Path, pngs: list[bytes]) -> dict[str, tuple[Path, str]]:
    """Write the request bodies; returns {name: (path, content type)}: `one` (the first PNG as the
    raw body), `one-multipart` (it as a one-part upload named `file`) and `batch64` (all of them
    as multipart parts named `files`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    one = workdir / "one.png"
    one.write_bytes(pngs[0])
    single, single_type = multipart_body(pngs[:1], field="file")
    (workdir / "one.multipart").write_bytes(single)
    batch, batch_type = multipart_body(pngs)
    (workdir / "batch64.multipart").write_bytes(batch)
    return {"one": (one, PNG), "one-multipart": (workdir / "one.multipart", single_type),
            "batch64": (workdir / "batch64.multipart", batch_type)}
