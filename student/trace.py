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

    def continue_from(self, path: str | Path, before_step: int) -> None:
        """Start from the events of the steps before ``before_step`` in ``path`` (the trace of
        the run this one resumes), on the same tracks, and draw this part's events after them.

        Steps from ``before_step`` on are dropped: the resumed run replays them. A trace that is
        missing (a killed run writes none) or unreadable is left out: it is only diagnostics, and
        a resume must not fail over it.
        """
        try:
            earlier = json.loads(Path(path).read_text())["traceEvents"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        for e in earlier:
            if e.get("ph") == "M" and e.get("name") == "thread_name":
                self._tids[e["args"]["name"]] = e["tid"]
        kept = [
            e
            for e in earlier
            if e.get("ph") == "X" and e.get("args", {}).get("step", 0) < before_step
        ]
        self.events = kept + self.events
        # Trace times are microseconds from ``origin``: moving the origin back by the earlier
        # part's length puts this part's events after its last one, not on top of its first.
        self.origin -= max((e["ts"] + e["dur"] for e in kept), default=0.0) / 1e6

    def span(self, name: str, track: str, start: float, end: float, **args: Any) -> None:
        # a new track gets the next free id (ids continue those of a trace this one continues)
        tid = self._tids.setdefault(track, max(self._tids.values(), default=0) + 1)
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
