"""Prometheus metrics, one registry per app (tests build many apps in one process).

They explain latency, seam by seam: time in the queue, batch sizes, model time, and the time spent
decoding inputs and encoding outputs, beside request counts and latency by endpoint and status.
With several worker processes (service/workers.py) the values live in prometheus-client's shared
directory and /metrics adds up every process; the gauges say how (in flight: the sum; ready: the
minimum over the live workers).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from .batching import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# conformal p-values: on images like the calibration set each bucket holds its own width's share
# (1% under 0.01); traffic that drifts from it piles up near 0
P_VALUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
MODEL_LABELS = ("name", "sha256", "score_kind", "format_version")
MAX_CACHED_CHILDREN = 1024


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vae_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("vae_http_request_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("vae_images", "images processed, by operation", ["operation"], registry=r)
        self.anomalies = Counter("vae_anomalies_flagged", "images scored above their threshold", registry=r)
        self.p_values = Histogram("vae_anomaly_p_values", "conformal p-values of the images scored: about "
                                  "uniform on images like the calibration set", buckets=P_VALUE_BUCKETS, registry=r)
        self.batch_images = Histogram("vae_batch_images", "images per model batch", ["operation"],
                                      buckets=BATCH_BUCKETS, registry=r)
        self.queue_seconds = Histogram("vae_queue_seconds", "time a request waited for its batch to start",
                                       ["operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_seconds = Histogram("vae_model_seconds", "model time per batch", ["operation"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.codec_seconds = Histogram("vae_codec_seconds", "time decoding inputs and encoding outputs",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("vae_overload_rejections", "requests refused with 503 because the server was full",
                                registry=r)
        self.in_flight = Gauge("vae_http_requests_in_flight", "HTTP requests being handled now", registry=r,
                               multiprocess_mode="livesum")
        self.reloads = Counter("vae_model_reloads", "model reloads by outcome", ["outcome"], registry=r)
        self.log_records_dropped = Counter("vae_log_records_dropped",
                                           "log records dropped because the log stream did not keep up", registry=r)
        self.ready = Gauge("vae_model_ready", "1 when a model is loaded and answering", registry=r,
                           multiprocess_mode="livemin")
        # a gauge at 1 rather than an Info, which prometheus-client cannot share between processes
        self.model = Gauge("vae_model_info", "the artifact being served", MODEL_LABELS, registry=r,
                           multiprocess_mode="livemax")
        # labelled children looked up once: `labels()` costs more than the observation itself
        self.decode_seconds = self.codec_seconds.labels("decode")
        self.encode_seconds = self.codec_seconds.labels("encode")
        self._children: dict[tuple[str, ...], tuple[Any, ...]] = {}

    def serving(self, **labels: str) -> None:
        """Name the artifact served now. The previous one's labels are dropped; with several workers
        a reload replaces the process, whose gauges leave with it (clearing is not shared)."""
        if not shared():
            self.model.clear()
        self.model.labels(*(labels[name] for name in MODEL_LABELS)).set(1)

    def _cached(self, key: tuple[str, ...], make: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...]:
        children = self._children.get(key)
        if children is None:
            children = make()
            if len(self._children) < MAX_CACHED_CHILDREN:      # label values from clients (methods) are open-ended
                self._children[key] = children
        return children

    def request_done(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        count, latency = self._cached(("request", endpoint, method, str(status)), lambda: (
            self.requests.labels(endpoint, method, str(status)), self.latency.labels(endpoint)))
        count.inc()
        latency.observe(seconds)

    def observe_batch(self, operation: str, stats: BatchStats) -> None:
        batch_images, model_seconds, queue_seconds, images = self._cached(("batch", operation), lambda: (
            self.batch_images.labels(operation), self.model_seconds.labels(operation),
            self.queue_seconds.labels(operation), self.images.labels(operation)))
        batch_images.observe(stats.images)
        model_seconds.observe(stats.model_seconds)
        for waited in stats.queue_seconds:
            queue_seconds.observe(waited)
        images.inc(stats.images)

    def render(self) -> bytes:
        if shared():
            every_process = CollectorRegistry()
            multiprocess.MultiProcessCollector(every_process)
            return generate_latest(every_process)
        return generate_latest(self.registry)


def shared() -> bool:
    """Whether metric values live in prometheus-client's directory shared by the workers."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
