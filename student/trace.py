"""Chrome trace-event files (open in Perfetto or chrome://tracing) of a training run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.checkpoint import atomic_write_bytes


class Tracer:
    """Collects complete ("X") spans; times are ``time.perf_counter()`` seconds.

    Only the first ``max_steps`` optimizer steps are kept so a long run's trace stays small.
    """

    def __init__(self, origin: float, max_steps: int = 200) -> None:
        self.origin = origin
        self.max_steps = max_steps
        self.events: list[dict[str, Any]] = []
        self._tids: dict[str, int] = {}

    def wants(self, step: int) -> bool:
        return step < self.max_steps

    def span(self, name: str, track: str, start: float, end: float, **args: Any) -> None:
        tid = self._tids.setdefault(track, len(self._tids) + 1)
        self.events.append(
            {
                "name": name,
                "cat": track,
                "ph": "X",
                "pid": 1,
                "tid": tid,
                "ts": round((start - self.origin) * 1e6, 1),
                "dur": round(max(end - start, 0.0) * 1e6, 1),
                "args": args,
            }
        )

    def write(self, path: str | Path) -> None:
        meta = [
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": track}}
            for track, tid in self._tids.items()
        ]
        meta.append({"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "opd trainer"}})
        atomic_write_bytes(
            path, json.dumps({"traceEvents": meta + self.events, "displayTimeUnit": "ms"}).encode()
        )
