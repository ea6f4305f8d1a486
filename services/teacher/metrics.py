"""Prometheus metrics of one teacher app, in its own registry (several apps per process in tests)."""

from __future__ import annotations

from typing import Any

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
        self.overloaded = Counter(
            "opd_teacher_overloaded",
            "infer requests refused with 503 + Retry-After: the admission bound was reached",
            ["model"],
            registry=r,
        )
        self.model = m
        # The hot path's series, looked up once: ``labels()`` takes a lock and builds a key on
        # every call (a few microseconds each, several per request).
        self._requests = {p: self.requests.labels(m, p) for p in ("binary", "json")}
        self._states = self.states.labels(m)
        self._batch_states = self.batch_states.labels(m)
        self._batch_requests = self.batch_requests.labels(m)
        self._queue_seconds = self.queue_seconds.labels(m)
        self._compute_seconds = self.compute_seconds.labels(m)

    def observe_batch(
        self, states: int, requests: int, compute_s: float, queue_s: list[float]
    ) -> None:
        """One forward pass (the batcher's observer)."""
        self._batch_states.observe(states)
        self._batch_requests.observe(requests)
        self._compute_seconds.observe(compute_s)
        for q in queue_s:
            self._queue_seconds.observe(q)

    def answered(self, protocol: str, states: int) -> None:
        """One infer request answered (``protocol``: ``binary`` or ``json``) with ``states``."""
        child = self._requests.get(protocol) or self.requests.labels(self.model, protocol)
        child.inc()
        self._states.inc(states)

    def error(self, kind: str) -> None:
        self.errors.labels(self.model, kind).inc()

    def watch_cond_cache(self, cache: Any) -> None:
        """Export the conditioning cache (``cond_cache.CondCache``): bytes and ids held, and
        lookups that found (hits) or missed their ``cond_id``, read at scrape time."""
        for field, help_text in (
            ("bytes", "bytes of conditioning held by cond_id"),
            ("hits", "cond_id lookups that found their conditioning"),
            ("misses", "cond_id lookups answered 422 (unknown id)"),
            ("evictions", "cond_ids dropped to stay within --cond-cache-mb"),
        ):
            gauge = Gauge(f"opd_teacher_cond_cache_{field}", help_text, registry=self.registry)
            gauge.set_function(lambda f=field: getattr(cache, f))
        entries = Gauge("opd_teacher_cond_cache_ids", "cond_ids held", registry=self.registry)
        entries.set_function(lambda: len(cache))

    def watch_admission(self, budget: Any) -> None:
        """Export the admission budget (``common.admission.ByteBudget``): bytes held and the
        bound, read at scrape time; :attr:`overloaded` counts the 503s it caused."""
        if getattr(self, "_admission_watched", False):
            return  # one app per metrics object; a second build_api must not register twice
        self._admission_watched = True
        held = Gauge(
            "opd_teacher_queue_bytes",
            "bytes held by infer requests in queue and in flight (bodies, tensors, answers)",
            registry=self.registry,
        )
        held.set_function(lambda: budget.held)
        bound = Gauge(
            "opd_teacher_queue_limit_bytes",
            "admission bound on those bytes (--max-queue-mb)",
            registry=self.registry,
        )
        bound.set_function(lambda: budget.limit)

    def render(self) -> bytes:
        return generate_latest(self.registry)
