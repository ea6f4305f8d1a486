"""One flood: N concurrent infer requests of one body against a v2 endpoint, each sent once, with
the server's RSS and readiness sampled meanwhile and its RSS some seconds after.

What ``opd bench overload`` runs against a teacher and a router (:mod:`services.bench.overload`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.admission import retry_after_of
from common.http1 import Http1Client
from common.memory import rss_bytes

#: how often RSS and readiness are sampled during a flood (s)
SAMPLE_S = 0.05


@dataclass
class FloodResult:
    """What one flood saw: answers by status (``reset`` / ``timeout`` for failures below HTTP),
    the ``Retry-After`` values, latencies of the accepted requests, the server's RSS before,
    at its peak and ``after_s`` after, and the readiness statuses seen meanwhile."""

    target: str
    requests: int
    body_bytes: int
    statuses: Counter = field(default_factory=Counter)
    retry_after: Counter = field(default_factory=Counter)
    latency_ok_s: list[float] = field(default_factory=list)
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    after_s: float = 10.0
    ready: Counter = field(default_factory=Counter)
    wall_s: float = 0.0

    def percentile_ms(self, q: float) -> float | None:
        if not self.latency_ok_s:
            return None
        return float(np.percentile(self.latency_ok_s, q) * 1e3)

    def summary(self) -> dict[str, Any]:
        """The figures as JSON-ready values (MiB, ms)."""
        mib = 2**20
        return {
            "target": self.target,
            "requests": self.requests,
            "body_bytes": self.body_bytes,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
            "retry_after_s": {str(k): v for k, v in sorted(self.retry_after.items())},
            "p50_ms": self.percentile_ms(50),
            "p99_ms": self.percentile_ms(99),
            "rss_before_mib": round(self.rss_before / mib, 1),
            "rss_peak_mib": round(self.rss_peak / mib, 1),
            "rss_after_mib": round(self.rss_after / mib, 1),
            "after_s": self.after_s,
            "ready": {str(k): v for k, v in sorted(self.ready.items(), key=str)},
            "wall_s": round(self.wall_s, 2),
        }


async def flood(
    url: str,
    body: bytes,
    headers: dict[str, str],
    requests: int,
    pid: int,
    ready_url: str,
    timeout_s: float = 120.0,
    after_s: float = 10.0,
    target: str = "",
) -> FloodResult:
    """Send ``body`` to ``url`` ``requests`` times at once (each once, no retries), sampling the
    RSS of process ``pid`` and ``ready_url`` until the last answer, then RSS ``after_s`` later.

    Bounded: every request has ``timeout_s``; a connection never exceeds one request.
    """
    res = FloodResult(target, requests, len(body), after_s=after_s)
    res.rss_before = res.rss_peak = rss_bytes(pid)
    client = Http1Client(limit_per_host=requests, keepalive_s=5.0)
    probe = Http1Client(limit_per_host=1)
    done = asyncio.Event()

    async def one() -> None:
        start = time.perf_counter()
        try:
            r = await client.post(url, body, headers, timeout=timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            res.statuses["timeout"] += 1
            return
        except (ConnectionError, OSError):
            res.statuses["reset"] += 1
            return
        res.statuses[r.status] += 1
        if r.status == 200:
            res.latency_ok_s.append(time.perf_counter() - start)
        elif (wait := retry_after_of(r.headers)) is not None:
            res.retry_after[int(wait)] += 1

    async def sample() -> None:
        while not done.is_set():
            res.rss_peak = max(res.rss_peak, rss_bytes(pid))
            try:
                r = await probe.get(ready_url, timeout=5.0)
                res.ready[r.status] += 1
            except (asyncio.TimeoutError, TimeoutError, ConnectionError, OSError):
                res.ready["failed"] += 1
            await asyncio.sleep(SAMPLE_S)

    start = time.perf_counter()
    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(one() for _ in range(requests)))
    finally:
        res.wall_s = time.perf_counter() - start
        done.set()
        await sampler
        await client.aclose()
    # RSS after: sampled through the wait too (the peak may come as the last answers go out)
    end = time.monotonic() + after_s
    while time.monotonic() < end:
        res.rss_peak = max(res.rss_peak, rss_bytes(pid))
        await asyncio.sleep(0.25)
    res.rss_after = rss_bytes(pid)
    await probe.aclose()
    return res
