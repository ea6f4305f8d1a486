"""``opd demo``: the main job (``--world latent``: the latent world's, student/latent/demo.py). Cluster up, the SPEC §5 runs over HTTP, two tables, a report.

Starts teachers ``a``, ``b``, ``base`` and a router as local processes (plus a router holding
only teacher ``a`` for the single-teacher row), trains every row through the routers, prints
the quality and the cost tables, writes ``runs/demo/report.md`` with the figures, and stops
every process it started, also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common import ring
from common.cli import Command
from common.nets import VelocityNet
from common.procs import start_service
from common.settings import out_dir
from common.threads import THREADS_HELP, apply_threads, model_params, thread_budget
from services.cluster import computing_processes, router_cmd, start_cluster
from student.commands import TrainSettings, make_client
from student.evaluate import evaluate
from student.models import BASE_NAME, load_named, parse_names
from student.pretrain import ensure_models
from student.summary import (
    COST_HEAD,
    QUALITY_HEAD,
    cost_rows,
    md_table,
    plot_costs,
    quality_rows,
    text_table,
)
from student.trainer import TrainConfig, train

#: (label, run name, method, teachers, supervise)
DEMO_RUNS = (
    ("single teacher (a), dense", "single-a", "diffusionopd", "a", "router"),
    ("DiffusionOPD dense (a, b)", "diffusionopd", "diffusionopd", "a,b", "router"),
    ("Flow-OPD dense + anchor (a, b)", "flowopd", "flowopd", "a,b", "router"),
    ("DanceOPD single query (a, b)", "danceopd", "danceopd", "a,b", "router"),
    ("naive average of a and b (dense)", "average", "diffusionopd", "a,b", "average"),
)


class DemoSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_DEMO_")
    models: Path = Field(Path("models"), description="checkpoints (pretrained first when missing)")
    out: Path = Field(Path("runs/demo"), description="where runs, report.md and figures go")
    steps: int = Field(1500, ge=1, description="optimizer steps per run (shorten for a quick look)")
    seed: int = Field(123, description="run seed")
    stream_chunk: int = Field(12, ge=1, description="queried rollout steps per request")
    threads: int | None = Field(None, ge=1, description=THREADS_HELP + "; the trainer's")
    progress: bool = Field(True, description="progress bars")
    world: Literal["ring", "latent"] = Field(
        "ring",
        description="ring: the SPEC §5 demo; latent: the latent world (SD3 base + LoRA teachers "
        "in one process, label router, prompts by cond_id, guided queries) over HTTP, with "
        "--models models/latent, --out runs/demo-latent and 300 steps unless given",
    )
    guidance_scale: float | None = Field(
        2.0, description="latent world: classifier-free guidance of the teacher queries"
    )


def run_demo(s: DemoSettings) -> int:
    if s.world == "latent":
        return run_latent_world(s)
    # Like the services the cluster starts, the in-process trainer takes its share of cores.
    apply_threads(
        s.threads or thread_budget(model_params(VelocityNet()), share=computing_processes())
    )
    ensure_models(s.models)
    out_dir(s.out)
    print("starting the cluster: teachers a, b, base (anchor) and the router ...", flush=True)
    t0 = time.perf_counter()
    with start_cluster(s.models) as cluster:
        only_a = start_service(router_cmd({"a": cluster.services["a"].url}, {}))
        cluster.services["router-a"] = only_a
        print(
            f"cluster ready in {time.perf_counter() - t0:.1f} s: router {cluster.router_url}, "
            f"router (a only) {only_a.url}",
            flush=True,
        )
        runs: list[tuple[str, dict]] = []
        for label, name, method, teachers, supervise in DEMO_RUNS:
            url = only_a.url if teachers == "a" else cluster.router_url
            ts = TrainSettings(
                method=method,
                teachers=teachers,
                supervise=supervise,
                backend="http",
                router_url=url,
                steps=s.steps,
                seed=s.seed,
                models=s.models,
                out=s.out / name,
                stream_chunk=s.stream_chunk,
                checkpoint_every=0,
            )
            cfg = TrainConfig(
                method=method,
                teachers=parse_names(teachers),
                supervise=supervise,
                backend="http",
                steps=s.steps,
                seed=s.seed,
                checkpoint_every=0,
            )
            student, base_meta = load_named(s.models, BASE_NAME)
            with make_client(ts, cfg.teachers) as client:
                report = train(
                    cfg, student, client, ts.out, base_meta=base_meta, progress=s.progress
                )
            runs.append((label, report))
            m = report["metrics"]
            print(
                f"{label:<34} logp {m['avg_target_logp']:6.2f}  mass {m['teacher_mode_mass']:.2f}  "
                f"eff {m['effective_modes']:.2f}  wall {report['timings_s']['wall']:.1f} s",
                flush=True,
            )
    base, _ = load_named(s.models, BASE_NAME)
    base_rows = []
    for label, teachers in (
        ("base student, target = teacher a", ["a"]),
        ("base student, target = a ∪ b", ["a", "b"]),
    ):
        metrics, _ = evaluate(base, [ring.TEACHER_MODES[t] for t in teachers])
        base_rows.append(
            (label, {"metrics": metrics, "counts": {"rollouts": 0, "teacher_queries": 0}})
        )
    quality = quality_rows(base_rows[:1] + runs[:1] + base_rows[1:] + runs[1:])
    cost = cost_rows(runs)
    print("\nquality (SPEC §5)\n" + text_table(QUALITY_HEAD, quality))
    print("\ncost over HTTP\n" + text_table(COST_HEAD, cost))
    plot_costs(s.out / "costs.png", runs, f"Cost per method over HTTP ({s.steps} steps)")
    write_report(s, quality, cost, runs)
    print(f"\nreport: {s.out / 'report.md'}")
    return 0


def write_report(s: DemoSettings, quality: list, cost: list, runs: list[tuple[str, dict]]) -> None:
    names = [name for _, name, *_ in DEMO_RUNS]
    figures = "\n".join(
        f"| {label} | ![]({name}/samples.png) |"
        for (label, _), name in zip(runs, names, strict=True)
    )
    md = f"""# OPD demo: {s.steps} steps per run, seed {s.seed}, over HTTP

Teachers `a`, `b` and `base` (Flow-OPD's anchor) served as uvicorn processes behind the router;
the trainer streams states in requests of {s.stream_chunk} rollout steps.

## Quality (compare SPEC §5)

{md_table(QUALITY_HEAD, quality)}

## Cost

{md_table(COST_HEAD, cost)}

![cost per method](costs.png)

## Samples

| run | samples |
| --- | --- |
{figures}
"""
    (s.out / "report.md").write_text(md)
    (s.out / "summary.json").write_text(
        json.dumps({label: r for label, r in runs}, indent=2, default=str)
    )


def run_latent_world(s: DemoSettings) -> int:
    """``--world latent``: :mod:`student.latent.demo` with this command's flags (the ring's
    defaults for models, out and steps replaced by the latent world's unless given)."""
    from student.latent.demo import run_latent_demo
    from student.latent.run import LatentSettings

    given = s.model_fields_set
    ls = LatentSettings(
        models=s.models if "models" in given else Path("models/latent"),
        out=s.out if "out" in given else Path("runs/demo-latent"),
        steps=s.steps if "steps" in given else LatentSettings().steps,
        seed=s.seed,
        guidance_scale=s.guidance_scale,
        threads=s.threads,
        stream_chunk=s.stream_chunk,
        progress=s.progress,
    )
    return run_latent_demo(ls)


DEMO = Command(
    "cluster up, every SPEC §5 run over HTTP, tables and report, cluster down",
    DemoSettings,
    run_demo,
)
