"""Our service's /metrics histograms, scraped before and after a measured run and subtracted, so
the figures cover that run alone: where a request's time goes (queue, model, decode) and how
large the batches were."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# (metric family, label filter) for each histogram the report shows
HISTOGRAMS: dict[str, tuple[str, dict[str, str]]] = {
    "vae_http_request_seconds (/anomaly-score)": ("vae_http_request_seconds", {"endpoint": "/anomaly-score"}),
    "vae_queue_seconds (score)": ("vae_queue_seconds", {"operation": "score"}),
    "vae_model_seconds (score, per batch)": ("vae_model_seconds", {"operation": "score"}),
    "vae_codec_seconds (decode)": ("vae_codec_seconds", {"stage": "decode"}),
    "vae_batch_images (score)": ("vae_batch_images", {"operation": "score"}),
}


@dataclass
class Histogram:
    """Cumulative bucket counts by upper bound, with sum and count."""
    buckets: dict[float, float]
    total: float
    count: float

    def minus(self, earlier: Histogram) -> Histogram:
        return Histogram({le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
                         self.total - earlier.total, self.count - earlier.count)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding quantile q (what the histogram can tell)."""
        if not self.count:
            return math.nan
        for le in sorted(self.buckets):
            if self.buckets[le] >= q * self.count:
                return le
        return math.inf


Snapshot = dict[str, Histogram]


def parse(text: str) -> Snapshot:
    """The histograms of HISTOGRAMS from a Prometheus text exposition."""
    wanted = {family: (name, labels) for name, (family, labels) in HISTOGRAMS.items()}
    found: Snapshot = {}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        name, labels = wanted[family.name]
        histogram = Histogram({}, 0.0, 0.0)
        for sample in family.samples:
            if any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            if sample.name.endswith("_bucket"):
                histogram.buckets[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                histogram.total = sample.value
            elif sample.name.endswith("_count"):
                histogram.count = sample.value
        found[name] = histogram
    return found


def difference(after: Snapshot, before: Snapshot) -> Snapshot:
    empty = Histogram({}, 0.0, 0.0)
    return {name: histogram.minus(before.get(name, empty)) for name, histogram in after.items()}
