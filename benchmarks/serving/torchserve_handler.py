"""TorchServe custom handler (runs inside TorchServe's worker, in its own venv): decode each PNG
of the batch, score them in one call to the scripted module, answer each request with the same
JSON shape as our /anomaly-score."""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

FPR = 0.01


class AnomalyHandler:
    """One instance per worker process; `handle` gets a list of requests (a batch)."""

    def __init__(self) -> None:
        self.module: Any = None
        self.calibration = np.zeros(0)
        self.threshold = 0.0
        self.score_kind = ""

    def initialize(self, context: Any) -> None:
        # two workers share two cores: one torch thread each, as TorchServe's CPU tuning guide advises
        torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
        model_dir = context.system_properties["model_dir"]
        path = os.path.join(model_dir, context.manifest["model"]["serializedFile"])
        extra = {"metadata.json": ""}
        self.module = torch.jit.load(path, map_location="cpu", _extra_files=extra).eval()
        calibration = json.loads(extra["metadata.json"])["calibration"]
        self.calibration = np.sort(np.asarray(calibration["scores"], dtype=np.float64))
        n = len(self.calibration)
        self.threshold = float(self.calibration[max(n - math.floor(FPR * (n + 1)), 0)])
        self.score_kind = calibration["score_kind"]

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        images = [_decode(row.get("data") or row.get("body")) for row in data]
        with torch.inference_mode():
            scores = self.module.score(torch.from_numpy(np.stack(images))).numpy().astype(np.float64)
        n = len(self.calibration)
        p_values = (1 + n - np.searchsorted(self.calibration, scores, side="left")) / (n + 1)
        return [{"threshold": self.threshold, "fpr": FPR, "score_kind": self.score_kind,
                 "results": [{"score": float(s), "p_value": float(p), "is_anomaly": bool(s > self.threshold)}]}
                for s, p in zip(scores, p_values, strict=True)]


def _decode(body: bytes | bytearray) -> np.ndarray:
    image = Image.open(io.BytesIO(bytes(body))).convert("L")
    return (np.asarray(image, dtype=np.float32) / 255.0)[None]


_service = AnomalyHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, Any]] | None:
    """TorchServe's module-level entry point: initialise once, then score each batch."""
    if _service.module is None:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
