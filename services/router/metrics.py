"""Prometheus metrics of one router app, in its own registry (several apps per process in tests)."""

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


class RouterMetrics:
    """Requests by model and status, states, teacher calls, retries, ejections, queue state."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "opd_router_requests",
            "infer requests by model and HTTP status",
            ["model", "status"],
            registry=r,
        )
        self.states = Counter("opd_router_states", "states routed", registry=r)
        self.seconds = Histogram(
            "opd_router_request_seconds",
            "router receipt → response",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.teacher_seconds = Histogram(
            "opd_router_teacher_seconds",
            "one teacher call, router side",
            ["teacher"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.teacher_rows = Counter(
            "opd_router_teacher_rows", "rows sent per teacher", ["teacher"], registry=r
        )
        self.retries = Counter(
            "opd_router_retries",
            "teacher calls retried on another replica",
            ["teacher"],
            registry=r,
        )
        self.ejections = Counter(
            "opd_router_ejections", "replicas ejected", ["teacher", "replica"], registry=r
        )
        self.queue_full = Counter(
            "opd_router_queue_full", "requests refused with 503 (queue full)", registry=r
        )
        self.overloaded = Counter(
            "opd_router_overloaded",
            "requests refused with 503: the byte bound (--max-queue-mb) was reached",
            registry=r,
        )
        self.pending = Gauge(
            "opd_router_pending", "requests admitted (running + waiting)", registry=r
        )
        self.checkpoints = Gauge(
            "opd_router_teacher_checkpoints",
            "distinct checkpoint digests among a teacher's live replicas (> 1: mixed answers)",
            ["teacher"],
            registry=r,
        )
        self.live_replicas = Gauge(
            "opd_router_live_replicas", "live replicas per teacher", ["teacher"], registry=r
        )
        self.registry_changes = Counter(
            "opd_router_registry_changes", "registry API changes", ["op"], registry=r
        )

    def watch_admission(self, budget: object) -> None:
        """Export the admission budget (``common.admission.ByteBudget``): bytes held and the
        bound, read at scrape time."""
        if getattr(self, "_admission_watched", False):
            return
        self._admission_watched = True
        held = Gauge(
            "opd_router_queue_bytes", "bytes held by admitted requests", registry=self.registry
        )
        held.set_function(lambda: budget.held)  # type: ignore[attr-defined]
        bound = Gauge(
            "opd_router_queue_limit_bytes",
            "admission bound on those bytes (--max-queue-mb)",
            registry=self.registry,
        )
        bound.set_function(lambda: budget.limit)  # type: ignore[attr-defined]

    def render(self) -> bytes:
        return generate_latest(self.registry)
