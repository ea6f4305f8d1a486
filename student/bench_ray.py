"""Benchmark: dense DiffusionOPD trained in-process, over the uvicorn services and over Ray Serve.

``python -m student.bench_ray [--steps 200] [--rounds 3]`` — one run on one machine: starts the
uvicorn topology (teachers a, b, base + router processes) and a local Ray instance with
``deploy/serve_config.yaml`` (teacher applications + the router composing them by handle), then
trains the same seed in alternating rounds (local, uvicorn, Ray) so that the machine's drift
hits each alike. Wall times are medians over rounds; ``/ local`` is the median of each round's
ratio to that round's in-process run. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from services.cluster import start_cluster
from services.teacher.ray_command import load_config, local_serve
from student.bench_backends import run
from student.summary import md_table, text_table

HEAD = ("backend", "wall s", "rollout s", "exposed query s", "update s", "requests", "/ local")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--out", type=Path, default=Path("runs/bench-ray"))
    p.add_argument("--config", type=Path, default=Path("deploy/serve_config.yaml"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--stream-chunk", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="trainer torch threads")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    variants = ("local", "uvicorn", "ray")
    reps: dict[str, list[dict]] = {v: [] for v in variants}
    # deploy/serve_config.yaml as shipped (run from the repository root: models/ paths)
    doc = load_config(a.config, 0)
    with start_cluster(a.models) as uvicorn, local_serve(doc) as ray_url:
        urls = {"local": None, "uvicorn": uvicorn.router_url, "ray": f"{ray_url}/router"}
        for r in range(a.rounds):
            for v in variants:
                backend = "local" if v == "local" else "http"
                reps[v].append(
                    run(
                        a.models,
                        a.out / f"{v}-r{r}",
                        "diffusionopd",
                        backend,
                        a.steps,
                        urls[v],
                        a.stream_chunk,
                    )
                )
                print(f"round {r} {v}: {reps[v][-1]['timings_s']['wall']:.2f} s", flush=True)
    rows, results = [], []
    for v in variants:
        med = {
            k: statistics.median(rep["timings_s"][k] for rep in reps[v])
            for k in reps[v][0]["timings_s"]
        }
        ratio = statistics.median(
            rep["timings_s"]["wall"] / loc["timings_s"]["wall"]
            for rep, loc in zip(reps[v], reps["local"], strict=True)
        )
        rows.append(
            (
                v,
                f"{med['wall']:.2f}",
                f"{med['rollout']:.2f}",
                f"{med['query_exposed']:.2f}",
                f"{med['update']:.2f}",
                f"{reps[v][0]['counts']['requests']:,}",
                f"{ratio:.2f}x",
            )
        )
        results.append(
            {
                "backend": v,
                "median_timings_s": med,
                "walls_s": [rep["timings_s"]["wall"] for rep in reps[v]],
                "ratio_to_local": ratio,
            }
        )
    print("\n" + text_table(HEAD, rows))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench.json").write_text(json.dumps(results, indent=2))
    if a.markdown:
        a.markdown.write_text(md_table(HEAD, rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
