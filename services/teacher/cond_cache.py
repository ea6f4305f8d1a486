"""The conditioning cache: prompt embeddings sent once under a ``cond_id``, reused by id.

At SD3 scale a prompt's conditioning (333 x 4096 values) outweighs a latent state (16 x 64 x 64);
a trainer asking about 12 states of one prompt would otherwise send it 12 times. The cache lives
in the teacher core (uvicorn and Ray alike), holds copies of the tensors as they came on the
wire, and is bounded in bytes: least recently used ids are dropped first. A client whose id was
dropped gets a 422 that says to resend the tensors with it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class CondCache:
    """``cond_id`` -> ``{input name: array [B or 1, ...]}``, LRU, at most ``max_bytes`` held."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[str, tuple[dict[str, np.ndarray], int]] = OrderedDict()
        self._lock = threading.Lock()  # the Ray ingress may call from several threads

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, cond_id: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Store copies of ``tensors`` under ``cond_id`` (replacing what it held) and return
        them. An entry larger than the whole cache is used for this request but not kept."""
        copies = {k: np.array(v, copy=True) for k, v in tensors.items()}  # not views of a body
        size = sum(a.nbytes for a in copies.values())
        with self._lock:
            old = self._entries.pop(cond_id, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_bytes:
                return copies
            while self._entries and self.bytes + size > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
                self.evictions += 1
            self._entries[cond_id] = (copies, size)
            self.bytes += size
        return copies

    def get(self, cond_id: str) -> dict[str, np.ndarray] | None:
        """The tensors stored under ``cond_id`` (now most recently used), or ``None``."""
        with self._lock:
            entry = self._entries.get(cond_id)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(cond_id)
            self.hits += 1
            return entry[0]
