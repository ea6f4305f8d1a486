"""The conditioning cache: LRU by bytes."""

from __future__ import annotations

import numpy as np

from services.teacher.cond_cache import CondCache


def cond(rows: int, fill: float) -> dict[str, np.ndarray]:
    return {"e": np.full((rows, 250), fill, np.float32)}  # 1,000 bytes a row


def test_least_recently_used_ids_go_first_and_bytes_stay_bounded() -> None:
    cache = CondCache(max_bytes=3_000)
    body = cond(1, 1.0)
    kept = cache.put("a", body)
    body["e"][:] = 9  # the cache holds a copy, not a view of the request body
    assert kept["e"][0, 0] == 1 and cache.get("a")["e"][0, 0] == 1
    cache.put("b", cond(1, 2.0))
    cache.put("c", cond(1, 3.0))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", cond(1, 4.0))  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is not None
    assert cache.bytes <= 3_000 and len(cache) == 3 and cache.evictions == 1
    cache.put("a", cond(2, 5.0))  # replacing an id frees its old bytes first
    assert cache.get("a")["e"].shape == (2, 250) and cache.bytes <= 3_000
    big = cache.put("huge", cond(4, 6.0))  # larger than the cache: used once, not kept
    assert big["e"].shape == (4, 250) and cache.get("huge") is None
    assert cache.bytes <= 3_000
