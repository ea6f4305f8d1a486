"""``opd bench cost``: rollout vs query vs update cost per OPD method, on a live cluster.

Two modes:

* **toy** (``--state-dim 2``, no ``--teacher-width``): a short real ``opd train --backend http``
  run per method (``student.trainer.train``) against the cluster's router; the numbers are the
  run's ``report.json`` timings.
* **synthetic** (any other ``--state-dim`` or a ``--teacher-width``): the trainer evaluates on
  the 2-D ring world at the end, so it cannot run on D-dimensional states. This mode runs the
  trainer's step loop itself (same :data:`METHODS` query plans, ``rollout``, streaming
  ``HttpTeacherClient`` and losses; no evaluation, no checkpoints) with a student of that size,
  against synthetic teachers (``opd serve teacher --synthetic``) behind a router: teacher ``a``
  (policy ``average`` over one teacher = every row to ``a``, no mode centers needed) and anchor
  ``base`` for Flow-OPD.

Timings per optimizer step: ``rollout`` (student forward, streaming queries meanwhile),
``query_exposed`` (waiting for answers after the rollout: the part of query latency the rollout
did not hide), ``update`` (loss, backward, Adam), and ``query_latency`` (sum of request
latencies, mostly overlapped).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.cli import Command, UsageError
from common.nets import NetConfig, VelocityNet
from common.settings import BaseUrl, out_dir
from student.clients import TeacherUnavailable
from student.methods import METHODS

PARTS = ("rollout", "query_exposed", "update")


class BenchCostSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_BENCH_COST_")

    methods: str = Field(
        "diffusionopd,flowopd,danceopd", description="OPD methods, comma-separated"
    )
    steps: int = Field(20, ge=2, description="optimizer steps per method")
    batch: int = Field(128, ge=1, description="rollout batch (use fewer for large --state-dim)")
    rollout_steps: int = Field(12, ge=2, description="Euler steps per rollout")
    state_dim: int = Field(2, ge=1, le=1 << 20, description="floats per state (2: the toy world)")
    teacher_width: int | None = Field(
        None,
        ge=1,
        description="synthetic teachers' width "
        "(implies synthetic teachers; default 128 when D > 2)",
    )
    student_width: int = Field(128, ge=1, description="synthetic mode: the student's width")
    router_url: BaseUrl | None = Field(
        None, description="use this router instead of starting a cluster"
    )
    models: Path = Field(Path("models"), description="pretrained checkpoints (toy mode)")
    max_in_flight: int = Field(8, ge=1, description="requests in flight at once")
    threads: int = Field(1, ge=1, description="torch threads (trainer and started teachers)")
    out: Path = Field(
        Path("bench-cost"), description="directory for cost.json, cost.png (and toy runs/)"
    )
    world: Literal["ring", "latent"] = Field(
        "ring",
        description="latent: SD3 transformers at latent shapes over the public client, swept "
        "over --sides and --teacher-sizes (batch 16, N=8, 4 steps unless given)",
    )
    sides: str = Field("8,16,32", description="latent: latent sides (states [4, side, side])")
    teacher_sizes: str = Field(
        "2x2,8x4", description="latent: teacher sizes as BLOCKSxHEADS (heads of 16 dims)"
    )

    @property
    def synthetic(self) -> bool:
        return self.state_dim != 2 or self.teacher_width is not None


def start_synthetic_cluster(s: BenchCostSettings):
    """Synthetic teacher ``a`` and anchor ``base`` of ``s.state_dim`` floats, and a router."""
    from common.procs import start_service
    from services.cluster import PYTHON, Cluster, router_cmd

    body_mb = str(max(64, 4 * s.batch * (s.state_dim + 1) * 4 * s.rollout_steps // (1 << 20) + 16))
    cluster = Cluster()
    try:
        for name, seed in (("a", 1), ("base", 0)):
            cluster.services[name] = start_service(
                [
                    *PYTHON,
                    "serve",
                    "teacher",
                    "--synthetic",
                    "--name",
                    name,
                    "--seed",
                    str(seed),
                    "--state-dim",
                    str(s.state_dim),
                    "--width",
                    str(s.teacher_width or 128),
                    "--port",
                    "0",
                    "--threads",
                    str(s.threads),
                    "--max-body-mb",
                    body_mb,
                ]
            )
        cluster.services["router"] = start_service(
            router_cmd(
                {"a": cluster.services["a"].url},
                {"base": cluster.services["base"].url},
                policy="average",
                extra=["--max-body-mb", body_mb],
            )
        )
    except BaseException:
        cluster.stop(2)
        raise
    return cluster


def synthetic_run(s: BenchCostSettings, method_name: str, url: str) -> dict[str, Any]:
    """The trainer's step loop (plan → streamed rollout → update as answers arrive) at
    ``s.state_dim``.

    Step 0 warms connections and allocators and is not counted.
    """
    from student.remote import HttpTeacherClient
    from student.students import RingStudent
    from student.trainer import WAIT, streaming_hook, update_step

    method = METHODS[method_name]
    n, b, d = s.rollout_steps, s.batch, s.state_dim
    torch.manual_seed(0)
    student = VelocityNet(NetConfig(data_dim=d, width=s.student_width))
    task = RingStudent(student)  # the trainer's view of it: time grid, rollout, velocity
    grid = task.grid(n)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    client = HttpTeacherClient(url, ["a"], anchor=method.uses_anchor, max_in_flight=s.max_in_flight)
    sums = dict.fromkeys([*PARTS, "query_latency", "teacher_compute"], 0.0)
    counts = dict.fromkeys(["teacher_queries", "requests", "bytes_sent", "bytes_received"], 0)
    try:
        for step in range(s.steps + 1):
            t0 = time.perf_counter()
            plan = method.plan(n)
            on_state = streaming_hook(client, plan, b)
            states = task.rollout(task.noise(b), None, grid, method.sde_noise, on_state)
            t1 = time.perf_counter()
            _, cost, segments = update_step(task, opt, method, client, states, plan, grid)
            t3 = time.perf_counter()
            waited = sum(end - start for name, start, end in segments if name == WAIT)
            if step == 0:
                continue
            for k, v in (
                ("rollout", t1 - t0),
                ("query_exposed", waited),
                ("update", t3 - t1 - waited),
                ("query_latency", cost.latency_s),
                ("teacher_compute", cost.server_compute_s),
            ):
                sums[k] += v
            counts["teacher_queries"] += cost.states
            counts["requests"] += cost.requests
            counts["bytes_sent"] += cost.bytes_sent
            counts["bytes_received"] += cost.bytes_received
    finally:
        client.close()
    return {"steps": s.steps, "timings_s": sums, "counts": counts}


def toy_run(s: BenchCostSettings, method_name: str, url: str) -> dict[str, Any]:
    """A short real ``train()`` over HTTP; its report's timings and counts."""
    from student.models import load_named
    from student.remote import HttpTeacherClient
    from student.trainer import TrainConfig, train

    student, meta = load_named(s.models, "base")
    cfg = TrainConfig(
        method=method_name,
        teachers=["a", "b"],
        backend="http",
        steps=s.steps,
        batch=s.batch,
        rollout_steps=s.rollout_steps,
        eval_samples=512,
        trace_steps=0,
    )
    client = HttpTeacherClient(
        url, ["a", "b"], anchor=METHODS[method_name].uses_anchor, max_in_flight=s.max_in_flight
    )
    try:
        report = train(
            cfg, student, client, s.out / "runs" / method_name, base_meta=meta, progress=False
        )
    finally:
        client.close()
    return {"steps": s.steps, "timings_s": report["timings_s"], "counts": report["counts"]}


def summarise(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """Per-step milliseconds and the exposed share of the step."""
    t, c, steps = run["timings_s"], run["counts"], run["steps"]
    row = {"method": name, "steps": steps}
    for k in (*PARTS, "query_latency", "teacher_compute"):
        row[f"{k}_ms"] = 1e3 * float(t.get(k, 0.0)) / steps
    step_ms = sum(row[f"{k}_ms"] for k in PARTS)
    row["step_ms"] = step_ms
    row["exposed_share"] = row["query_exposed_ms"] / step_ms if step_ms else 0.0
    row["states_per_step"] = c.get("teacher_queries", 0) / steps
    row["mb_per_step"] = (c.get("bytes_sent", 0) + c.get("bytes_received", 0)) / steps / 1e6
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | rollout ms | exposed query ms | update ms | step ms | exposed share "
        "| query latency ms (overlapped) | states/step | MB/step |\n| --- |" + " ---: |" * 8
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['rollout_ms']:.1f} | {r['query_exposed_ms']:.1f} | "
            f"{r['update_ms']:.1f} | {r['step_ms']:.1f} | {r['exposed_share']:.0%} | "
            f"{r['query_latency_ms']:.1f} | {r['states_per_step']:,.0f} | "
            f"{r['mb_per_step']:.3f} |"
        )
    return "\n".join(lines)


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Stacked bars per method: rollout, exposed query, update (ms per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.7 * len(rows)))
    left = [0.0] * len(rows)
    names = [r["method"] for r in rows]
    for part, color in zip(PARTS, ("#4c72b0", "#dd8452", "#55a868"), strict=True):
        vals = [r[f"{part}_ms"] for r in rows]
        ax.barh(names, vals, left=left, color=color, label=part.replace("_", " "))
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_xlabel("ms per optimizer step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench_cost(s: BenchCostSettings) -> int:
    torch.set_num_threads(s.threads)
    methods = [m.strip() for m in s.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if s.world == "latent":
        return run_latent_cost(s, methods)
    out_dir(s.out)  # before the runs, not after them
    cluster = None
    if s.router_url is None:
        if s.synthetic:
            cluster = start_synthetic_cluster(s)
        else:
            from services.cluster import start_cluster
            from student.pretrain import ensure_models

            ensure_models(s.models)
            cluster = start_cluster(s.models)
    url = s.router_url or cluster.router_url
    rows = []
    try:
        for m in methods:
            run = (synthetic_run if s.synthetic else toy_run)(s, m, url)
            rows.append(summarise(m, run))
            print(f"{m}: done ({rows[-1]['step_ms']:.1f} ms/step)", file=sys.stderr)
    except TeacherUnavailable as exc:  # the router or its teachers went away: not a bug
        sys.stderr.write(f"opd bench cost: {exc}\n")
        return 1
    except ValueError as exc:  # the router serves other teachers, a checkpoint is missing, ...
        raise UsageError(str(exc)) from None
    finally:
        if cluster is not None:
            cluster.stop()
    mode = (
        f"synthetic D={s.state_dim}, teacher width {s.teacher_width or 128}, student width "
        f"{s.student_width}"
        if s.synthetic
        else "toy D=2, pretrained teachers a, b, base"
    )
    title = f"{mode}; batch {s.batch}, N={s.rollout_steps}, {s.steps} steps"
    (s.out / "cost.json").write_text(
        json.dumps({"mode": mode, "settings": s.model_dump(mode="json"), "rows": rows}, indent=2)
        + "\n"
    )
    plot(s.out / "cost.png", rows, title)
    print(f"# {title}\n{table(rows)}\nwrote {s.out}/cost.json, cost.png")
    return 0


def run_latent_cost(s: BenchCostSettings, methods: list[str]) -> int:
    """``--world latent``: :mod:`student.latent.bench_scale`'s sweep; ``cost.json`` holds the
    rows and DanceOPD's saving per point."""
    import tempfile

    from student.latent.bench_scale import savings, sweep, tables

    try:
        sides = [int(v) for v in s.sides.split(",") if v.strip()]
        sizes = [tuple(int(p) for p in v.split("x")) for v in s.teacher_sizes.split(",") if v]
    except ValueError:
        raise UsageError("--sides: integers; --teacher-sizes: BLOCKSxHEADS, e.g. 2x2,8x4") from None
    if not sides or any(v < 2 or v % 2 for v in sides) or any(len(z) != 2 for z in sizes):
        raise UsageError("--sides: even integers >= 2; --teacher-sizes: BLOCKSxHEADS, e.g. 2x2")
    given = s.model_fields_set
    batch = s.batch if "batch" in given else 16
    n = s.rollout_steps if "rollout_steps" in given else 8
    steps = s.steps if "steps" in given else 4
    out_dir(s.out)
    points = [(side, b, h) for side in sides for b, h in sizes]
    with tempfile.TemporaryDirectory(prefix="opd-bench-latent-") as work:
        try:
            rows = sweep(points, methods, batch, n, steps, s.threads, Path(work),
                         lambda m: print(m, file=sys.stderr))  # fmt: skip
        except TeacherUnavailable as exc:
            sys.stderr.write(f"opd bench cost: {exc}\n")
            return 1
    saved = savings(rows)
    title = f"latent world shapes; batch {batch}, N={n}, {steps} steps per point"
    (s.out / "cost.json").write_text(
        json.dumps({"mode": title, "rows": rows, "savings": saved}, indent=2) + "\n"
    )
    print(f"# {title}\n{tables(rows, saved)}\nwrote {s.out}/cost.json")
    return 0


COST = Command("rollout vs query vs update cost per OPD method", BenchCostSettings, run_bench_cost)
