"""The byte budget behind every service's admission control, and the memory figures its default
comes from (the services themselves are tested in tests/services/test_overload.py)."""

from __future__ import annotations

import pytest

from common.admission import (
    MAX_RETRY_AFTER_S,
    ByteBudget,
    Overloaded,
    RequestTooLarge,
    configured_budget,
    jittered,
    retry_after_of,
)
from common.memory import (
    DEFAULT_QUEUE_MAX,
    DEFAULT_QUEUE_MIN,
    default_queue_bytes,
    rss_bytes,
    trim_heap,
)

MB = 1 << 20


def test_admits_within_the_bound_refuses_beyond_and_names_it() -> None:
    budget = ByteBudget(10 * MB)
    budget.admit(6 * MB)
    budget.admit(4 * MB)  # exactly full
    with pytest.raises(Overloaded) as busy:
        budget.admit(1)
    assert busy.value.retry_after_s >= 1 and "--max-queue-mb" in str(busy.value)
    with pytest.raises(RequestTooLarge, match=f"bound of {10 * MB} bytes"):
        budget.admit(10 * MB + 1)
    assert (budget.held, budget.refused, budget.too_large) == (10 * MB, 1, 1)
    budget.release(10 * MB)
    assert budget.held == 0


def test_an_idle_service_admits_any_request_within_the_bound() -> None:
    budget = ByteBudget(10 * MB)
    budget.admit(10 * MB)
    budget.release(10 * MB)
    budget.admit(9 * MB)  # nothing else held: never starved by smaller ones
    budget.hold(5 * MB)  # its answer: held past the bound, never refused
    assert budget.held == 14 * MB


def test_retry_after_is_the_excess_over_the_recent_drain_rate() -> None:
    budget = ByteBudget(100 * MB)
    assert budget.retry_after_s(MB) == 1  # nothing completed yet: the minimum
    budget.admit(10 * MB)
    budget.release(10 * MB)  # 10 MB completed within the last second: 10 MB/s at most
    budget.admit(100 * MB)
    wait = budget.retry_after_s(20 * MB)  # 20 MB over the bound
    assert 2 <= wait <= MAX_RETRY_AFTER_S
    budget.release(100 * MB, completed=False)
    assert budget.retry_after_requests_s(1000) == MAX_RETRY_AFTER_S


def test_a_drained_burst_calls_on_drained_once() -> None:
    calls: list[int] = []
    budget = ByteBudget(64 * MB, on_drained=lambda: calls.append(1), trim_after=8 * MB)
    budget.admit(MB)
    budget.release(MB)
    assert calls == []  # a small request is no burst
    budget.admit(6 * MB)
    with pytest.raises(Overloaded):
        budget.admit(60 * MB)  # refused bytes count toward the burst too
    budget.release(6 * MB)
    assert calls == [1]


def test_retry_after_parsing_and_jitter() -> None:
    assert retry_after_of({"retry-after": "3"}) == 3.0
    assert retry_after_of({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_of({}) is None
    waits = [jittered(2.0) for _ in range(200)]
    assert all(2.0 <= w <= 3.0 for w in waits) and len(set(waits)) > 1


def test_default_bound_comes_from_memory_and_the_flag_or_env_wins(monkeypatch) -> None:
    limit, how = default_queue_bytes()
    assert DEFAULT_QUEUE_MIN <= limit <= DEFAULT_QUEUE_MAX and "quarter" in how
    monkeypatch.setenv("OPD_TEST_MAX_QUEUE_MB", "3")
    budget, line = configured_budget(None, "--max-queue-mb", "OPD_TEST_MAX_QUEUE_MB")
    assert budget.limit == 3 * MB and "OPD_TEST_MAX_QUEUE_MB=3" in line
    budget, line = configured_budget(5.0, "--max-queue-mb", "OPD_TEST_MAX_QUEUE_MB")
    assert budget.limit == 5 * MB and "--max-queue-mb 5" in line


def test_rss_and_trim_work_here() -> None:
    assert rss_bytes() > 0
    assert trim_heap()  # glibc: malloc_trim is there
