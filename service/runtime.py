"""The model runtime: the one module that touches `torch.jit`.

It loads an artifact (after checking its sha256 sidecar and format version), reads the metadata
it carries, sets torch's threads, warms the model up, and exposes tensor-in, tensor-out calls.
Thresholds and p-values come from the calibration scores inside the artifact.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ArtifactError

SUPPORTED_FORMAT_VERSIONS = {1}
METADATA_FILE = "metadata.json"
REQUIRED_METHODS = ("encode", "decode", "forward", "reconstruction_error", "score", "anomaly_map")
log = logging.getLogger("service.runtime")


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_checksum(path: Path) -> str:
    """The artifact's sha256, checked against `PATH.sha256`; raises ArtifactError if they differ."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.exists():
        raise ArtifactError(f"{path}: no checksum file {sidecar.name} beside it "
                            "(set VAE_VERIFY_CHECKSUM=false to serve it unchecked)")
    expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
    actual = sha256_of(path)
    if actual != expected:
        raise ArtifactError(f"{path}: sha256 {actual[:12]}… does not match {sidecar.name} "
                            f"({expected[:12]}…); the file is corrupt or was replaced")
    return actual


@dataclass
class ModelRuntime:
    module: torch.jit.ScriptModule
    metadata: dict[str, Any]
    path: Path
    sha256: str
    calibration_scores: np.ndarray      # sorted ascending

    @classmethod
    def load(cls, path: Path, verify: bool = True, threads: int = 0) -> ModelRuntime:
        """Load and check an artifact; every failure is one ArtifactError saying what is wrong."""
        if not path.is_file():
            raise ArtifactError(f"no model artifact at {path} (set VAE_MODEL_PATH or --model)")
        checksum = verify_checksum(path) if verify else sha256_of(path)
        if threads:
            torch.set_num_threads(threads)
        extra = {METADATA_FILE: ""}
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            metadata = json.loads(extra[METADATA_FILE] or "null")
        except (RuntimeError, ValueError) as error:
            raise ArtifactError(f"{path} is not a TorchScript VAE artifact: {str(error).splitlines()[0]}") from None
        check_metadata(metadata, module, path)
        scores = np.sort(np.asarray(metadata["calibration"]["scores"], dtype=np.float64))
        return cls(module.eval(), metadata, path, checksum, scores)

    # ---- shape and identity ---------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        shape = self.metadata["input"]
        return shape["channels"], shape["height"], shape["width"]

    @property
    def latent_dim(self) -> int:
        return int(self.metadata["latent_dim"])

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", self.path.stem))

    @property
    def score_kind(self) -> str:
        return str(self.metadata["calibration"]["score_kind"])

    @property
    def map_scale(self) -> float:
        """Anomaly-map value shown at full strength in heat maps, from calibration."""
        return float(self.metadata["calibration"].get("map_scale") or 1.0)

    # ---- model calls (tensors in, tensors out; run them off the event loop) -----------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            return self.module.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.module.decode(z)

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstructions (B, C, H, W) and reconstruction errors (B,)."""
        with torch.inference_mode():
            return self.module(x), self.module.reconstruction_error(x)

    def score(self, x: Tensor) -> tuple[Tensor]:
        with torch.inference_mode():
            return (self.module.score(x),)

    def score_with_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scores (B,) and per-pixel anomaly maps (B, H, W): from one model pass where the artifact
        exports `score_with_map`, else (artifacts exported before it) from two calls."""
        with torch.inference_mode():
            if self.fused_map:
                return self.module.score_with_map(x)
            return self.module.score(x), self.module.anomaly_map(x)

    @property
    def fused_map(self) -> bool:
        return hasattr(self.module, "score_with_map")

    def warm_up(self, rounds: int = 3) -> float:
        """Run every call the service makes a few times, so no request pays TorchScript's first-call
        cost (profiling, then optimising the graph: 20 to 50 ms per method here, far more on a busy
        machine, and enough to make the batcher think the model slow); returns seconds. `score` needs
        its own calls: `score_with_map` is a separate scripted method."""
        started = time.perf_counter()
        x = torch.rand(2, *self.input_shape, generator=torch.Generator().manual_seed(0))
        for _ in range(rounds):
            self.reconstruct(x)
            self.score(x)
            self.score_with_map(x)
            self.decode(self.encode(x)[0])
        return time.perf_counter() - started

    # ---- calibration ----------------------------------------------------------------------------
    def threshold(self, fpr: float) -> float:
        """The calibration score at false-positive rate fpr (conformal): `score > threshold` holds
        exactly when the p-value is <= fpr. Raises ValueError for an fpr below 1/(n+1), which no
        p-value can reach: the calibration set is too small to promise it."""
        n = len(self.calibration_scores)
        if fpr < self.min_fpr:
            # 1 / fpr overflows to infinity for subnormal rates (5e-324): say "more than" then
            needed = f"{math.ceil(1 / fpr) - 1:,}" if 1 / fpr < 1e18 else "10^18"
            raise ValueError(f"fpr = {fpr:g} needs at least {needed} calibration scores; "
                             f"this model has {n:,}, so the smallest fpr it supports is {self.min_fpr:.3g}")
        index = n - math.floor(fpr * (n + 1))
        return float(self.calibration_scores[max(index, 0)])

    @property
    def min_fpr(self) -> float:
        return 1 / (len(self.calibration_scores) + 1)

    def p_value(self, score: float) -> float:
        """(1 + #{calibration scores >= score}) / (n + 1), counted by bisection of a list: requests
        hold one score or a few, and for those NumPy's per-call cost is more than the count."""
        n = len(self._calibration_list)
        return (1 + n - bisect.bisect_left(self._calibration_list, score)) / (n + 1)

    @functools.cached_property
    def _calibration_list(self) -> list[float]:
        return self.calibration_scores.tolist()

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """`p_value` of each score."""
        return np.array([self.p_value(score) for score in np.asarray(scores, dtype=np.float64).ravel().tolist()],
                        dtype=np.float64).reshape(np.shape(scores))


def check_metadata(metadata: Any, module: torch.jit.ScriptModule, path: Path) -> None:
    """Refuse artifacts this service cannot serve, naming what is missing."""
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{path} carries no {METADATA_FILE}; was it written by `python -m training train`?")
    version = metadata.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ArtifactError(f"{path} has format version {version!r}; this service reads "
                            f"{sorted(SUPPORTED_FORMAT_VERSIONS)}")
    missing = [key for key in ("input", "latent_dim", "calibration") if key not in metadata]
    missing += [f"method {m}" for m in REQUIRED_METHODS if not hasattr(module, m)]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}")
    if not metadata["calibration"].get("scores"):
        raise ArtifactError(f"{path} has no calibration scores, so no threshold can be set")
