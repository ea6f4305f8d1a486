"""Reproduce the SPEC §5 reference table: ``python -m student.reference``.

Runs every row (the base rows by evaluation, the others by full-length training), prints the
table with tolerances checked, and writes it as Markdown and JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import ring
from student.commands import local_client
from student.evaluate import evaluate
from student.models import BASE_NAME, load_named
from student.trainer import TrainConfig, train


@dataclass(frozen=True)
class Row:
    """One row of SPEC §5 and its reference numbers (logp, mass, effective modes)."""

    label: str
    teachers: tuple[str, ...]
    method: str | None  # None: evaluate the base student
    supervise: str = "router"
    ref: tuple[float, float, float] = (0.0, 0.0, 0.0)


ROWS = (
    Row("base student, target = teacher a", ("a",), None, ref=(-20.93, 0.27, 7.93)),
    Row("single teacher (a), dense", ("a",), "diffusionopd", ref=(-1.38, 1.00, 2.01)),
    Row("base student, target = a ∪ b", ("a", "b"), None, ref=(-14.82, 0.52, 7.94)),
    Row("DiffusionOPD dense (a, b)", ("a", "b"), "diffusionopd", ref=(-1.80, 1.00, 3.77)),
    Row("Flow-OPD dense + anchor (a, b)", ("a", "b"), "flowopd", ref=(-1.82, 1.00, 3.74)),
    Row("DanceOPD single query (a, b)", ("a", "b"), "danceopd", ref=(-1.75, 1.00, 3.86)),
    Row(
        "naive average of a and b (dense)",
        ("a", "b"),
        "diffusionopd",
        "average",
        ref=(-8.2, 1.00, 3.9),
    ),
)
#: SPEC §5 tolerances: logp ±0.2, mass ≥ 0.99, effective modes ±0.2 (base rows: mass ±0.05).
LOGP_TOL, EFF_TOL = 0.2, 0.2


def within(row: Row, m: dict) -> bool:
    logp, mass, eff = row.ref
    mass_ok = (
        m["teacher_mode_mass"] >= 0.99 if row.method else abs(m["teacher_mode_mass"] - mass) <= 0.05
    )
    # The average row's reference is given as "about"; its point is the gap, so allow ±0.5 there.
    logp_tol = 0.5 if row.supervise == "average" else LOGP_TOL
    return (
        abs(m["avg_target_logp"] - logp) <= logp_tol
        and mass_ok
        and abs(m["effective_modes"] - eff) <= EFF_TOL
    )


def run_row(row: Row, models: Path, out: Path, steps: int, seed: int) -> dict:
    if row.method is None:
        net, _ = load_named(models, BASE_NAME)
        t0 = time.perf_counter()
        metrics, _ = evaluate(net, [ring.TEACHER_MODES[n] for n in row.teachers])
        return {
            "metrics": metrics,
            "counts": {"rollouts": 0, "teacher_queries": 0},
            "timings_s": {
                "wall": 0.0,
                "rollout": 0.0,
                "query_exposed": 0.0,
                "update": 0.0,
                "eval": time.perf_counter() - t0,
            },
        }
    cfg = TrainConfig(
        method=row.method,
        teachers=list(row.teachers),
        supervise=row.supervise,
        steps=steps,
        seed=seed,
    )
    student, base_meta = load_named(models, BASE_NAME)
    name = f"{row.method}-{'-'.join(row.teachers)}-{row.supervise}"
    with local_client(
        models, list(row.teachers), row.supervise, anchor=row.method == "flowopd"
    ) as client:
        return train(cfg, student, client, out / name, base_meta=base_meta, progress=False)


def markdown(results: list[tuple[Row, dict]], title: str) -> str:
    lines = [
        f"## {title}",
        "",
        "| run | rollouts | teacher queries (states) | avg target logp (ref) | mass (ref) | "
        "effective modes (ref) | in tol | wall s | rollout s | query s | update s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :-: | ---: | ---: | ---: | ---: |",
    ]
    for row, rep in results:
        m, c, t = rep["metrics"], rep["counts"], rep["timings_s"]
        lines.append(
            f"| {row.label} | {c['rollouts']:,} | {c['teacher_queries']:,} | "
            f"{m['avg_target_logp']:.2f} ({row.ref[0]:.2f}) | {m['teacher_mode_mass']:.2f} ({row.ref[1]:.2f}) | "
            f"{m['effective_modes']:.2f} ({row.ref[2]:.2f}) | {'yes' if within(row, m) else '**no**'} | "
            f"{t['wall']:.1f} | {t['rollout']:.1f} | {t['query_exposed']:.1f} | {t['update']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--out", type=Path, default=Path("runs/reference"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", type=Path, help="also write the table here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for row in ROWS:
        rep = run_row(row, args.models, args.out, args.steps, args.seed)
        results.append((row, rep))
        m = rep["metrics"]
        print(
            f"{row.label:<36} logp {m['avg_target_logp']:7.2f}  mass {m['teacher_mode_mass']:.2f}  "
            f"eff {m['effective_modes']:.2f}  {'ok' if within(row, m) else 'OUT OF TOLERANCE'}",
            flush=True,
        )
    table = markdown(
        results,
        f"In-process (local backend), {args.steps} steps, seed {args.seed}, {args.threads} threads",
    )
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reference.json").write_text(
        json.dumps(
            [
                {"label": r.label, "ref": r.ref, "in_tolerance": within(r, rep["metrics"]), **rep}
                for r, rep in results
            ],
            indent=2,
            default=str,
        )
    )
    if args.markdown:
        args.markdown.write_text(table)
    return 0 if all(within(r, rep["metrics"]) for r, rep in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
