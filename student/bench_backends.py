"""Benchmark: each OPD method over HTTP (router + teacher processes) vs the in-process backend.

``python -m student.bench_backends [--steps 300]`` — one run, same machine, same seed; prints
wall time and its rollout / exposed query / update split per method and backend, and how much
of the query latency streaming hid behind the rollout. Variants run in alternating rounds; the
times are medians over rounds and ``http / local`` is the median over rounds of each round's
ratio to its own in-process run. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from services.cluster import start_cluster
from student.commands import TrainSettings, make_client
from student.models import BASE_NAME, load_named
from student.summary import md_table, text_table
from student.trainer import TrainConfig, train

METHODS = ("diffusionopd", "flowopd", "danceopd")
HEAD = (
    "method",
    "backend",
    "wall s",
    "rollout s",
    "exposed query s",
    "update s",
    "query latency s",
    "hidden %",
    "requests",
    "http / local",
)


def run(
    models: Path,
    out: Path,
    method: str,
    backend: str,
    steps: int,
    router_url: str | None,
    stream_chunk: int,
    routing: str = "router",
    spin_wait_ms: float = 0.0,
    update_groups: str = "ready",
) -> dict:
    s = TrainSettings(
        routing=routing,
        spin_wait_ms=spin_wait_ms,
        update_groups=update_groups,
        method=method,
        backend=backend,
        router_url=router_url,
        steps=steps,
        models=models,
        out=out,
        stream_chunk=stream_chunk,
        checkpoint_every=0,
    )
    cfg = TrainConfig(
        method=method,
        teachers=["a", "b"],
        backend=backend,
        steps=steps,
        checkpoint_every=0,
        eval_samples=1000,
    )
    student, meta = load_named(models, BASE_NAME)
    with make_client(s, cfg.teachers) as client:
        return train(cfg, student, client, out, base_meta=meta, progress=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--out", type=Path, default=Path("runs/bench-backends"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--stream-chunk", type=int, nargs="+", default=[12, 6, 1])
    p.add_argument("--threads", type=int, default=1, help="trainer torch threads (both backends)")
    p.add_argument(
        "--rounds", type=int, default=3, help="alternating repetitions; medians are reported"
    )
    p.add_argument(
        "--spin-wait-ms",
        type=float,
        default=50.0,
        help="the spin-wait variant's busy-wait before sleeping",
    )
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument(
        "--pin",
        action="store_true",
        help="trainer on CPU 0, the router and teachers on the other CPUs (Linux): the serving "
        "processes no longer share the trainer's core, as teachers on their own machines would not",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, results = [], []
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin:
        if len(cpus) < 2:
            p.error("--pin needs at least two CPUs")
        os.sched_setaffinity(0, cpus[1:])  # inherited by the services started next
    with start_cluster(args.models) as cluster:
        if args.pin:
            os.sched_setaffinity(0, cpus[:1])
            print(f"# trainer on CPU {cpus[0]}, services on CPUs {cpus[1:]}", flush=True)
        for method in args.methods:
            chunks = (
                args.stream_chunk[:1] if method == "danceopd" else args.stream_chunk
            )  # 1 query/step
            # (label, backend, stream chunk, routing, spin-wait ms, update groups): the router
            # hop and in-client routing (no router hop) at each chunk size, and at the first
            # also in-client with one update per request instead of per answers ready (the
            # default) and with the trainer spinning on its answers instead of sleeping
            c0, spin = chunks[0], args.spin_wait_ms
            plan = [
                ("local", "local", 1, "router", 0.0, "ready"),
                *((f"http, chunk {c}", "http", c, "router", 0.0, "ready") for c in chunks),
                *(
                    (f"http in-client, chunk {c}", "http", c, "client", 0.0, "ready")
                    for c in chunks
                ),
                (f"http in-client, chunk {c0}, per request", "http", c0, "client", 0.0, "request"),
                (f"http in-client, chunk {c0}, spin-wait", "http", c0, "client", spin, "ready"),
            ]
            variants = [label for label, *_ in plan]
            reps: dict[str, list[dict]] = {v: [] for v in variants}
            # Rounds alternate the variants so that the machine's drift (±30% between minutes on
            # this VM) hits every variant alike; each figure is the median over rounds.
            for r in range(args.rounds):
                for v, backend, chunk, routing, spin_ms, groups in plan:
                    name = v.replace(", ", "-").replace(" ", "-")
                    reps[v].append(
                        run(
                            args.models,
                            args.out / f"{method}-{name}-r{r}",
                            method,
                            backend,
                            args.steps,
                            cluster.router_url if backend == "http" else None,
                            chunk,
                            routing,
                            spin_ms,
                            groups,
                        )
                    )
            med = {
                v: {
                    k: statistics.median(rep["timings_s"][k] for rep in reps[v])
                    for k in reps[v][0]["timings_s"]
                }
                for v in variants
            }
            # Each round's variants ran back to back: their ratio to that round's local run is
            # what drift disturbs least; the column is the median of those ratios.
            ratio = {
                v: statistics.median(
                    rep["timings_s"]["wall"] / loc["timings_s"]["wall"]
                    for rep, loc in zip(reps[v], reps["local"], strict=True)
                )
                for v in variants
            }
            for v in variants:
                t, counts = med[v], reps[v][0]["counts"]
                hidden = (
                    max(0.0, 1 - t["query_exposed"] / t["query_latency"])
                    if v != "local" and t["query_latency"]
                    else 0.0
                )
                rows.append(
                    (
                        method,
                        v,
                        f"{t['wall']:.2f}",
                        f"{t['rollout']:.2f}",
                        f"{t['query_exposed']:.2f}",
                        f"{t['update']:.2f}",
                        f"{t['query_latency']:.2f}",
                        f"{100 * hidden:.0f}" if v != "local" else "-",
                        f"{counts['requests']:,}",
                        f"{ratio[v]:.2f}x",
                    )
                )
                results.append(
                    {
                        "method": method,
                        "variant": v,
                        "median_timings_s": t,
                        "counts": counts,
                        "walls_s": [rep["timings_s"]["wall"] for rep in reps[v]],
                        "ratio_to_local": ratio[v],
                    }
                )
            print(text_table(HEAD, rows[-len(variants) :]), flush=True)
    print("\n" + text_table(HEAD, rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    if args.markdown:
        args.markdown.write_text(md_table(HEAD, rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
