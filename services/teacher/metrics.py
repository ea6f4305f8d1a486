"""Prometheus metrics of one teacher app, in its own registry (several apps per process in tests)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from common.httpapi import LATENCY_BUCKETS_S

_STATE_BUCKETS = (1, 16, 64, 128, 256, 512, 1024, 1536, 2048, 4096, 8192, 16384, 65536)
_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class TeacherMetrics:
    """Requests, states, errors by kind, and histograms of batch size, queue and compute time."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        r, m = self.registry, model
        self.requests = Counter(
            "opd_teacher_requests", "infer requests answered", ["model", "protocol"], registry=r
        )
        self.states = Counter("opd_teacher_states", "states answered", ["model"], registry=r)
        self.errors = Counter(
            "opd_teacher_errors",
            "refused or failed requests by kind",
            ["model", "kind"],
            registry=r,
        )
        self.batch_states = Histogram(
            "opd_teacher_batch_states",
            "states per forward pass",
            ["model"],
            buckets=_STATE_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "opd_teacher_batch_requests",
            "requests per forward pass",
            ["model"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "opd_teacher_queue_seconds",
            "accepted → forward start",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "opd_teacher_compute_seconds",
            "forward pass duration",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.version = Gauge(
            "opd_teacher_model_version",
            "served model version (0 = unloaded)",
            ["model"],
            registry=r,
        )
        self.loads = Counter(
            "opd_teacher_loads",
            "repository load calls by outcome",
            ["model", "outcome"],
            registry=r,
        )
        self.model = m

    def observe_batch(
        self, states: int, requests: int, compute_s: float, queue_s: list[float]
    ) -> None:
        """One forward pass (the batcher's observer)."""
        self.batch_states.labels(self.model).observe(states)
        self.batch_requests.labels(self.model).observe(requests)
        self.compute_seconds.labels(self.model).observe(compute_s)
        for q in queue_s:
            self.queue_seconds.labels(self.model).observe(q)

    def answered(self, protocol: str, states: int) -> None:
        self.requests.labels(self.model, protocol).inc()
        self.states.labels(self.model).inc(states)

    def error(self, kind: str) -> None:
        self.errors.labels(self.model, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
