"""Prometheus metrics, one registry per app (tests build many apps in one process).

They explain latency, seam by seam: time in the queue, batch sizes, model time, and the time spent
decoding inputs and encoding outputs, beside request counts and latency by endpoint and status.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from .batching import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


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
        self.in_flight = Gauge("vae_http_requests_in_flight", "HTTP requests being handled now", registry=r)
        self.reloads = Counter("vae_model_reloads", "model reloads by outcome", ["outcome"], registry=r)
        self.ready = Gauge("vae_model_ready", "1 when a model is loaded and answering", registry=r)
        self.model = Info("vae_model", "the artifact being served", registry=r)

    def observe_batch(self, operation: str, stats: BatchStats) -> None:
        self.batch_images.labels(operation).observe(stats.images)
        self.model_seconds.labels(operation).observe(stats.model_seconds)
        for waited in stats.queue_seconds:
            self.queue_seconds.labels(operation).observe(waited)
        self.images.labels(operation).inc(stats.images)

    def render(self) -> bytes:
        return generate_latest(self.registry)
