"""LitServe contender (runs in its own venv): a LitAPI that decodes the uploaded PNG, batches
requests, scores the batch with the scripted module and answers with our /anomaly-score's JSON.

LitServe reads a request body as JSON unless it is a form, so the PNG comes as a one-part
multipart upload (field `file`), LitServe's documented way to send a file.

Run: BENCH_MODEL=... BENCH_PORT=... python benchmarks/serving/litserve_app.py
"""

import io
import json
import math
import os

import litserve as ls
import numpy as np
import torch
from PIL import Image

FPR = 0.01


class AnomalyAPI(ls.LitAPI):
    """Scores PNG uploads in batches of up to BENCH_MAX_BATCH, waiting at most BENCH_BATCH_TIMEOUT s."""

    def setup(self, device: str) -> None:
        if os.environ.get("BENCH_TORCH_THREADS"):   # --peer-torch-threads; torch's default otherwise
            torch.set_num_threads(int(os.environ["BENCH_TORCH_THREADS"]))
        extra = {"metadata.json": ""}
        self.module = torch.jit.load(os.environ["BENCH_MODEL"], map_location="cpu", _extra_files=extra).eval()
        calibration = json.loads(extra["metadata.json"])["calibration"]
        self.calibration = np.sort(np.asarray(calibration["scores"], dtype=np.float64))
        n = len(self.calibration)
        self.threshold = float(self.calibration[max(n - math.floor(FPR * (n + 1)), 0)])
        self.score_kind = calibration["score_kind"]

    # LitServe builds its endpoint from these two signatures: an annotated `request` would become a
    # query parameter or JSON model, an annotated return a FastAPI response_model. Unannotated, they
    # take LitServe's default path (the form parsed for us, the dict encoded as JSON).
    def decode_request(self, request):
        image = Image.open(io.BytesIO(request["file"].file.read())).convert("L")
        return (np.asarray(image, dtype=np.float32) / 255.0)[None]

    def batch(self, inputs: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(inputs))

    def predict(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.module.score(x).numpy().astype(np.float64)

    def unbatch(self, output: np.ndarray) -> list[float]:
        return output.tolist()

    def encode_response(self, score):
        n = len(self.calibration)
        p_value = (1 + n - int(np.searchsorted(self.calibration, score, side="left"))) / (n + 1)
        return {"threshold": self.threshold, "fpr": FPR, "score_kind": self.score_kind,
                "results": [{"score": score, "p_value": p_value, "is_anomaly": score > self.threshold}]}


def main() -> None:
    api = AnomalyAPI(max_batch_size=int(os.environ.get("BENCH_MAX_BATCH", "64")),
                     batch_timeout=float(os.environ.get("BENCH_BATCH_TIMEOUT", "0.001")),
                     api_path="/anomaly-score")
    fast_queue = os.environ.get("BENCH_FAST_QUEUE", "0") == "1"
    server = ls.LitServer(api, accelerator="cpu", fast_queue=fast_queue)
    server.run(host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), generate_client_file=False,
               log_level="warning")


if __name__ == "__main__":
    main()
