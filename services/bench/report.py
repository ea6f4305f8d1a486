"""Writing a sweep: CSV (one row per point), JSON (points + context) and a PNG."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.bench.sweep import Point


def write_csv(path: Path, points: Sequence[Point]) -> None:
    rows = [p.row() for p in points]
    with path.open("w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_json(path: Path, points: Sequence[Point], context: dict[str, Any]) -> None:
    path.write_text(json.dumps({**context, "points": [p.row() for p in points]}, indent=2) + "\n")


def plot(path: Path, points: Sequence[Point], title: str) -> None:
    """Throughput vs p50 latency, one line per (encoding, states per request) over concurrency."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(12, 4.8))
    configs = sorted({(p.encoding, p.states_per_request) for p in points})
    for enc, states in configs:
        line = sorted(
            (
                p
                for p in points
                # a point that failed more requests than it answered measured no service
                if (p.encoding, p.states_per_request) == (enc, states)
                and p.requests_total > p.errors
            ),
            key=lambda p: p.concurrency,
        )
        if not line:
            continue
        x = [p.latency_p50_ms for p in line]
        style = "-o" if enc == "binary" else "--s"
        label = f"{enc}, {states:,} states/req"
        ax_s.plot(x, [p.states_s for p in line], style, label=label)
        ax_b.plot(x, [p.payload_mb_s for p in line], style, label=label)
        for p in line:
            ax_s.annotate(
                f"c{p.concurrency}",
                (p.latency_p50_ms, p.states_s),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
    for ax, ylabel in ((ax_s, "states/s"), (ax_b, "payload MB/s (both directions)")):
        ax.set_xscale("log")
        ax.set_xlabel("latency p50 (ms), points = concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if ax_s.get_legend_handles_labels()[1]:
        ax_s.legend(fontsize=8)
    else:  # every point failed: say so on the figure rather than draw empty axes silently
        ax_s.text(0.5, 0.5, "no point answered", ha="center", transform=ax_s.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
