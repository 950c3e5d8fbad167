"""A flood far larger than the server takes: the excess gets fast 503s with Retry-After, every
request let in gets its own correct answer, and nothing else goes wrong."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import serve

CLIENTS = 64
REQUESTS = 256
IMAGES = 16


@pytest.mark.parametrize("limits", [
    {"max_requests_in_flight": 4},                                   # refused at the door
    {"max_queued_images": IMAGES, "max_queue_wait_s": 0.05},         # refused at the model's queue
], ids=["in-flight", "queue"])
def test_a_flood_gets_503s_with_retry_after_and_correct_200s(digits_artifact: Path, digit_images: np.ndarray,
                                                            limits: dict, record_property) -> None:  # noqa: ANN001
    batches = [np.roll(digit_images, -i, axis=0)[:IMAGES] for i in range(8)]
    bodies = [{"images": [image.tolist() for image in batch]} for batch in batches]
    with serve(model_path=digits_artifact, **limits) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            expected = [scores_of(http.post("/anomaly-score", json=body)) for body in bodies]
        start = threading.Barrier(CLIENTS)
        local = threading.local()
        clients: list[httpx.Client] = []

        def one(i: int) -> tuple[int, httpx.Response]:
            if not hasattr(local, "http"):
                local.http = httpx.Client(base_url=url, timeout=60)
                clients.append(local.http)
                start.wait(30)                      # every client fires at once
            return i, local.http.post("/anomaly-score", json=bodies[i % len(bodies)])

        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(one, range(REQUESTS)))
        for http in clients:
            http.close()
    statuses = Counter(response.status_code for _, response in answers)
    record_property("statuses", dict(statuses))
    print(f"\n{limits}: {dict(statuses)}")
    assert set(statuses) <= {200, 503}, statuses
    for i, response in answers:
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 1 and "retry" in response.json()["detail"]
        else:
            np.testing.assert_allclose(scores_of(response), expected[i % len(bodies)], rtol=1e-5)
    if "max_requests_in_flight" in limits:          # 64 clients at once against 4 places: certain
        assert statuses[503] > 0
    assert statuses[200] > 0


def scores_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([r["score"] for r in response.json()["results"]])
