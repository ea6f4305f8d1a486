"""Admission control by bytes: what a service holds (request bodies, decoded tensors, answers not
yet sent) stays under a bound; beyond it requests are refused with 503 and a ``Retry-After``
computed from how fast the service is draining.

Requests range from kilobytes to tens of megabytes, so a bound on request *counts* (Triton's
``max_queue_size``, Ray Serve's ``max_queued_requests``) would either refuse small requests for
nothing or admit gigabytes of large ones. Both services (teacher and router) hold one
:class:`ByteBudget`; their infer paths call :meth:`ByteBudget.admit` before reading a body when
``Content-Length`` says its size, and :meth:`ByteBudget.release` when the answer is written.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

#: seconds of completed bytes the drain rate is averaged over
DRAIN_WINDOW_S = 5.0
#: ``Retry-After`` stays within these (whole seconds, as HTTP wants them)
MIN_RETRY_AFTER_S, MAX_RETRY_AFTER_S = 1, 30
#: a burst that held at least this many bytes gives its memory back once drained
TRIM_AFTER_BYTES = 16 << 20


class RequestTooLarge(Exception):
    """One request is larger than the whole bound: it can never be admitted (HTTP 413)."""


class Overloaded(Exception):
    """The bound is reached: try again after ``retry_after_s`` (HTTP 503 + ``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ByteBudget:
    """Bytes held by admitted requests, refused beyond ``limit``; the recent drain rate.

    ``flag`` names the setting in messages (``--max-queue-mb``). ``on_drained`` runs when the
    bytes held fall back to 0 after a burst of at least ``trim_after`` bytes, admitted or
    refused (a refused request's first bytes were read too; the services hand freed heap
    memory back to the kernel there). Single event loop: no locks.
    """

    def __init__(
        self,
        limit: int,
        flag: str = "--max-queue-mb",
        on_drained: Callable[[], None] | None = None,
        trim_after: int = TRIM_AFTER_BYTES,
    ) -> None:
        self.limit = limit
        self.flag = flag
        self.on_drained = on_drained
        self.trim_after = trim_after
        self.held = 0
        self.peak = 0  # since the last drain to 0
        self.refused = 0  # 503s
        self.too_large = 0  # 413s
        self._since_drain = 0  # bytes admitted or refused since on_drained last ran
        self._done: deque[tuple[float, int]] = deque()  # (monotonic time, bytes completed)
        self._done_bytes = 0

    @property
    def limit_mb(self) -> float:
        return self.limit / 2**20

    def admit(self, nbytes: int, body: int | None = None) -> None:
        """Hold ``nbytes`` more for a new request, or refuse it; ``body``: the request's own
        size when ``nbytes`` is an estimate of what serving it holds (messages name both).

        An empty service admits any request within the bound, so a request that fits is never
        starved by the ones ahead of it for long.

        Raises:
            RequestTooLarge: ``nbytes`` exceeds the bound itself.
            Overloaded: holding ``nbytes`` more would exceed the bound now.
        """
        if nbytes > self.limit:
            self.too_large += 1
            self._since_drain += min(nbytes, self.limit)
            what = f"{nbytes} bytes" if body is None else f"{body} bytes ({nbytes} held served)"
            raise RequestTooLarge(
                f"request of {what} exceeds this service's bound of {self.limit} bytes "
                f"({self.limit_mb:g} MiB, {self.flag}); send fewer states per request"
            )
        if self.held and self.held + nbytes > self.limit:
            self.refused += 1
            self._since_drain += nbytes
            wait = self.retry_after_s(nbytes)
            raise Overloaded(
                f"overloaded: {self.held} bytes held, {nbytes} more would exceed the bound of "
                f"{self.limit} bytes ({self.limit_mb:g} MiB, {self.flag}); retry after {wait} s",
                wait,
            )
        self.hold(nbytes)

    def hold(self, nbytes: int) -> None:
        """Hold ``nbytes`` more for a request already admitted (its answer): never refused."""
        self.held += nbytes
        self._since_drain += nbytes
        self.peak = max(self.peak, self.held)

    def release(self, nbytes: int, completed: bool = True) -> None:
        """Give back ``nbytes``; ``completed``: they were served (they count toward the drain
        rate), not refused or abandoned."""
        self.held = max(0, self.held - nbytes)
        if completed:
            now = time.monotonic()
            self._done.append((now, nbytes))
            self._done_bytes += nbytes
            self._forget(now)
        if self.held == 0:
            self.peak = 0
            burst, self._since_drain = self._since_drain, 0
            if burst >= self.trim_after and self.on_drained is not None:
                self.on_drained()

    def _forget(self, now: float) -> None:
        while self._done and now - self._done[0][0] > DRAIN_WINDOW_S:
            self._done_bytes -= self._done.popleft()[1]

    def drain_rate(self) -> float:
        """Bytes per second served over the last few seconds (0 when nothing was)."""
        now = time.monotonic()
        self._forget(now)
        if not self._done:
            return 0.0
        span = max(now - self._done[0][0], 1.0)  # a lone completion is not an infinite rate
        return self._done_bytes / span

    def retry_after_requests_s(self, excess: int) -> int:
        """:meth:`retry_after_s` for a bound on request counts: whole seconds until ``excess``
        more requests have completed at the recent rate."""
        now = time.monotonic()
        self._forget(now)
        if not self._done:
            return MIN_RETRY_AFTER_S
        rate = len(self._done) / max(now - self._done[0][0], 1.0)
        return max(MIN_RETRY_AFTER_S, min(MAX_RETRY_AFTER_S, math.ceil(excess / rate)))

    def retry_after_s(self, nbytes: int = 0) -> int:
        """Whole seconds until enough has drained for ``nbytes`` more to fit, at the recent
        drain rate (1 s when nothing has completed recently: the service just started or the
        queue is stuck behind one long forward; clients add jitter and back off further)."""
        excess = self.held + nbytes - self.limit
        rate = self.drain_rate()
        if excess <= 0 or rate <= 0:
            return MIN_RETRY_AFTER_S
        return max(MIN_RETRY_AFTER_S, min(MAX_RETRY_AFTER_S, math.ceil(excess / rate)))


def configured_budget(max_queue_mb: float | None, flag: str, env: str) -> tuple[ByteBudget, str]:
    """The budget a service runs with and a line saying how its bound was chosen: ``flag``'s
    value, else the environment variable ``env`` (a deployment that builds the service without
    its flags, e.g. Ray Serve, still honours it), else :func:`common.memory.default_queue_bytes`.
    Draining a burst hands freed heap memory back (:func:`common.memory.trim_soon`)."""
    from common.memory import default_queue_bytes, trim_soon

    how = f"{flag} {max_queue_mb:g}" if max_queue_mb is not None else ""
    if max_queue_mb is None:
        raw = os.environ.get(env, "").strip()
        if raw:
            max_queue_mb, how = float(raw), f"{env}={raw}"
    if max_queue_mb is not None:
        limit = int(max_queue_mb * 2**20)
    else:
        limit, how = default_queue_bytes()
    line = f"admission bound {limit / 2**20:.0f} MiB held in queue and in flight ({how})"
    return ByteBudget(limit, flag, on_drained=trim_soon), line


def body_timeout_field() -> Any:
    """The services' ``--body-timeout-s`` setting (one definition for teacher and router)."""
    from pydantic import Field

    return Field(
        30.0, gt=0, description="a request body must arrive within this (else 408, closed)"
    )


def send_timeout_field() -> Any:
    """The services' ``--send-timeout-s`` setting (one definition for teacher and router)."""
    from pydantic import Field

    return Field(
        30.0, gt=0, description="a client must take its answer within this (else disconnected)"
    )


def jittered(retry_after_s: float, spread: float = 0.5) -> float:
    """Seconds to wait on a ``Retry-After`` of ``retry_after_s``: never sooner than asked, up to
    ``spread`` later at random, so the clients a burst refused together do not return together."""
    return max(0.0, retry_after_s) * (1.0 + random.uniform(0.0, spread))


def retry_after_of(headers: dict[str, str]) -> float | None:
    """A response's ``Retry-After`` in seconds (lower-case header names), None when it has
    none or gives an HTTP date (our services send whole seconds)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
