"""The run report (stable keys other tools read) and the samples figure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from common import ring
from common.checkpoint import atomic_write_bytes

METRIC_KEYS = ("avg_target_logp", "teacher_mode_mass", "effective_modes")
COUNT_KEYS = ("rollouts", "teacher_queries", "requests", "bytes_sent", "bytes_received")
TIMING_KEYS = (
    "wall",
    "rollout",
    "query_latency",
    "query_exposed",
    "teacher_compute",
    "update",
    "eval",
)


@dataclass
class RunTotals:
    """Counters and timings summed over a run; every key exists even when it stays 0."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    timings_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))

    def add(
        self, counts: dict[str, int] | None = None, timings: dict[str, float] | None = None
    ) -> None:
        for k, v in (counts or {}).items():
            self.counts[k] += int(v)
        for k, v in (timings or {}).items():
            self.timings_s[k] += float(v)


def build_report(
    *,
    method: str,
    teachers: list[str],
    supervise: str,
    backend: str,
    steps: int,
    seed: int,
    metrics: dict[str, float],
    totals: RunTotals,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report.json document; the keys named in the core issue are always present."""
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics missing {missing}")
    report = {
        "method": method,
        "teachers": teachers,
        "supervise": supervise,
        "backend": backend,
        "steps": steps,
        "seed": seed,
        "metrics": {k: float(metrics[k]) for k in METRIC_KEYS},
        "counts": {k: int(totals.counts.get(k, 0)) for k in COUNT_KEYS},
        "timings_s": {k: round(float(totals.timings_s.get(k, 0.0)), 6) for k in TIMING_KEYS},
    }
    report.update(extra or {})
    return report


def write_json(path: str | Path, doc: Any) -> None:
    """Pretty JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(doc, indent=2, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def plot_samples(
    path: str | Path, samples: torch.Tensor, target_modes: list[int], title: str
) -> None:
    """Scatter of student samples ``[n, 2]`` with all ring centers and the target ones marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers = ring.ring_centers()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    pts = samples.numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.35, color="tab:blue", label="student samples")
    ax.scatter(
        centers[:, 0],
        centers[:, 1],
        marker="o",
        s=60,
        facecolors="none",
        edgecolors="gray",
        label="ring modes",
    )
    tgt = centers[target_modes]
    ax.scatter(tgt[:, 0], tgt[:, 1], marker="*", s=220, color="tab:red", label="target modes")
    for k, (cx, cy) in enumerate(centers.tolist()):
        ax.annotate(
            str(k), (cx * 1.18, cy * 1.18), ha="center", va="center", fontsize=8, color="gray"
        )
    lim = ring.RADIUS + 2.0
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
