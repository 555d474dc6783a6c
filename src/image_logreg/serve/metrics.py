"""Prometheus metrics, as Triton and TorchServe expose them: requests, latency, images."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Milliseconds for a health check or one image, up to seconds for a large upload.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """One registry per server, so two servers in one process (as in tests) keep apart."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "image_logreg_requests", "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "image_logreg_request_duration_seconds", "Time from request to response, by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.images = Counter(
            "image_logreg_images_predicted", "Images predicted, by model", ["model"], registry=self.registry,
        )
        self._series: dict[tuple, tuple] = {}
        self._images: dict[str, object] = {}

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        # Clients choose the method: any word outside HTTP's own would otherwise add a series for good.
        method = method if method in METHODS else "other"
        key = (endpoint, method, status)
        series = self._series.get(key)
        if series is None:  # looking labels up costs more than the counting itself: once per kind of request
            series = self._series[key] = (self.requests.labels(endpoint, method, str(status)), self.latency.labels(endpoint))
        series[0].inc()
        series[1].observe(seconds)

    def predicted(self, model: str, n: int) -> None:
        counter = self._images.get(model)
        if counter is None:  # served models only, so a handful of series
            counter = self._images[model] = self.images.labels(model)
        counter.inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
