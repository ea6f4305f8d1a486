"""Tables and figures over several runs: quality (SPEC §5) and cost, as text and Markdown."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

QUALITY_HEAD = ("run", "rollouts", "teacher queries", "avg target logp", "mass", "eff. modes")
COST_HEAD = (
    "run",
    "rollouts",
    "queries",
    "requests",
    "MB sent",
    "MB recv",
    "rollout s",
    "exposed query s",
    "teacher compute s",
    "update s",
    "wall s",
)


def quality_rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple]:
    return [
        (
            label,
            f"{r['counts']['rollouts']:,}",
            f"{r['counts']['teacher_queries']:,}",
            f"{r['metrics']['avg_target_logp']:.2f}",
            f"{r['metrics']['teacher_mode_mass']:.2f}",
            f"{r['metrics']['effective_modes']:.2f}",
        )
        for label, r in runs
    ]


def cost_rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple]:
    out = []
    for label, r in runs:
        c, t = r["counts"], r["timings_s"]
        out.append(
            (
                label,
                f"{c['rollouts']:,}",
                f"{c['teacher_queries']:,}",
                f"{c['requests']:,}",
                f"{c['bytes_sent'] / 1e6:.1f}",
                f"{c['bytes_received'] / 1e6:.1f}",
                f"{t['rollout']:.1f}",
                f"{t['query_exposed']:.1f}",
                f"{t['teacher_compute']:.1f}",
                f"{t['update']:.1f}",
                f"{t['wall']:.1f}",
            )
        )
    return out


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width table for the terminal."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(
            str(x).ljust(w) if i == 0 else str(x).rjust(w)
            for i, (x, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def plot_costs(path: str | Path, runs: Sequence[tuple[str, dict[str, Any]]], title: str) -> None:
    """Per run, stacked bars of rollout, exposed query wait and update seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in runs]
    parts = [("rollout", "tab:blue"), ("query_exposed", "tab:orange"), ("update", "tab:green")]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(runs)), 4.2), dpi=110)
    bottom = [0.0] * len(runs)
    for key, color in parts:
        vals = [r["timings_s"][key] for _, r in runs]
        ax.bar(
            labels,
            vals,
            bottom=bottom,
            color=color,
            label={"query_exposed": "exposed query wait"}.get(key, key),
        )
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for i, (_, r) in enumerate(runs):
        ax.annotate(
            f"{r['counts']['teacher_queries'] / 1e6:.2f}M states",
            (i, bottom[i]),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set(ylabel="seconds", title=title)
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
