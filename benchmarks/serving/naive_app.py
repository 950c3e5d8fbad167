"""The naive baseline: the FastAPI endpoint most people would write first around the artifact.

One raw PNG per request, decoded with Pillow inside the async handler, `module.score(x)` called
right there (blocking the event loop, no batching), and the response built the slow way: a dict
through `jsonable_encoder`, returned as FastAPI's default JSONResponse.

Run: BENCH_MODEL=path/to/model.pt uvicorn benchmarks.serving.naive_app:app --workers 1
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from PIL import Image

FPR = 0.01

if os.environ.get("BENCH_TORCH_THREADS"):       # --peer-torch-threads; torch's default otherwise
    torch.set_num_threads(int(os.environ["BENCH_TORCH_THREADS"]))
extra = {"metadata.json": ""}
module = torch.jit.load(os.environ["BENCH_MODEL"], map_location="cpu", _extra_files=extra)
module.eval()
metadata = json.loads(extra["metadata.json"])
calibration = np.sort(np.asarray(metadata["calibration"]["scores"], dtype=np.float64))
n = len(calibration)
threshold = float(calibration[max(n - math.floor(FPR * (n + 1)), 0)])

app = FastAPI()


@app.post("/anomaly-score")
async def anomaly_score(request: Request) -> JSONResponse:
    """Score one PNG body."""
    body = await request.body()
    image = Image.open(io.BytesIO(body)).convert("L")
    x = torch.tensor(np.asarray(image, dtype=np.float32) / 255.0).reshape(1, 1, *image.size[::-1])
    with torch.no_grad():
        scores = module.score(x).tolist()
    results = [{"score": s, "p_value": (1 + int((calibration >= s).sum())) / (n + 1), "is_anomaly": s > threshold}
               for s in scores]
    content = {"threshold": threshold, "fpr": FPR, "score_kind": metadata["calibration"]["score_kind"],
               "results": results}
    return JSONResponse(jsonable_encoder(content))
