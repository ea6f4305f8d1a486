"""``opd latent`` / ``python -m student.latent.run``: the latent world end to end, in-process.

Pretrains what is missing in ``--models`` (base, LoRA teachers a and b), then runs the rows of
SPEC §5 at latent shapes (single teacher, the three methods with label routing, the naive
average) and prints the quality table; writes ``report.json``, ``samples.png`` and each trained
row's run (``runs/ROW/``: its report, steps log, checkpoint and ``student/``, a diffusers directory) to ``--out``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.cli import Command, UsageError
from common.settings import out_dir
from common.threads import THREADS_HELP, apply_threads, thread_budget

RUNS = ("single", "diffusionopd", "flowopd", "danceopd", "average")


class LatentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_LATENT_")
    models: Path = Field(Path("models/latent"), description="latent models directory")
    out: Path = Field(
        Path("runs/latent"), description="where report.json, samples.png and runs/ROW/ go"
    )
    runs: str = Field(",".join(RUNS), description=f"comma-separated rows to train: {RUNS}")
    steps: int = Field(300, ge=1, description="OPD optimizer steps per run")
    batch: int = Field(32, ge=1, description="rollouts per step (one prompt each)")
    rollout_steps: int = Field(8, ge=2, description="Euler steps of a rollout (N)")
    lr: float = Field(3e-4, gt=0, description="student Adam learning rate (full fine-tune)")
    seed: int = Field(123, description="run seed (prompts, rollout noise, DanceOPD indices)")
    guidance_scale: float | None = Field(
        None, description="classifier-free guidance in the teacher queries (none: off)"
    )
    backend: Literal["local", "http"] = Field(
        "local",
        description="local: teachers in this process; http: one teacher process (base + LoRA "
        "adapters) and a label router on loopback, started and stopped here",
    )
    cond_cache: bool = Field(
        False,
        description="http: one request per prompt family, its conditioning sent once under a "
        "cond_id (the teachers' cache), then states only",
    )
    stream_chunk: int = Field(
        12,
        ge=1,
        description="http: queried rollout states per request (per family with the cache); "
        "12 covers a whole 8-step rollout, fastest on 2 shared cores (docs/latent-world.md)",
    )
    progress: bool = Field(True, description="a progress bar per row")
    force: bool = Field(False, description="pretrain the models again")
    base_steps: int | None = Field(None, ge=1, description="pretraining steps of the base")
    teacher_steps: int | None = Field(None, ge=1, description="LoRA steps of each teacher")
    threads: int | None = Field(None, ge=1, description=THREADS_HELP)


def _row(title: str, teachers: str, rep: dict[str, Any]) -> dict[str, Any]:
    return {"run": title, "teachers": teachers, **rep}


def run_latent(s: LatentSettings, say=print) -> int:
    """Pretrain what is missing, train the rows, print and write the table."""
    runs = [r.strip() for r in s.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise UsageError(f"--runs: unknown row {bad[0]!r}; choose from {', '.join(RUNS)}")
    out_dir(s.out)
    from services.teacher.diffusers_backend import DiffusersLoadError  # imports diffusers
    from student.latent.pretrain import BASE_STEPS, TEACHER_STEPS, ensure_models
    from student.latent.teachers import LatentSetupError

    apply_threads(s.threads or thread_budget(76_368))  # the student's parameter count
    try:
        ensure_models(
            s.models,
            force=s.force,
            base_steps=s.base_steps or BASE_STEPS,
            teacher_steps=s.teacher_steps or TEACHER_STEPS,
            say=say,
        )
        if s.backend == "http":
            from student.latent.http import served_teachers

            with served_teachers(s.models) as url:
                say(f"teachers served behind the router at {url}")
                rows = latent_table(s, runs, say, router_url=url)
        else:
            rows = latent_table(s, runs, say)
    except (LatentSetupError, DiffusersLoadError) as exc:  # models or setup: nothing trained
        raise UsageError(str(exc)) from None
    (s.out / "report.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    say(format_table(rows))
    say(f"wrote {s.out / 'report.json'} and {s.out / 'samples.png'}")
    return 0


def latent_table(
    s: LatentSettings, runs: list[str], say=print, router_url: str | None = None
) -> list[dict[str, Any]]:
    """The reference rows (base, routed teachers) and the trained rows, in SPEC §5's order;
    with ``router_url`` the trained rows query the served teachers through that router."""
    import torch

    from student.latent.figures import plot_grid
    from student.latent.models import (
        declared_scheduler,
        load_student,
        load_teachers,
        sigma_grid,
    )
    from student.latent.rollout import student_field, teacher_field
    from student.latent.train import evaluate_field, recipe_config, train_latent
    from student.latent.world import TEACHER_FAMILIES, make_world, metrics_of
    from student.methods import METHODS

    world = make_world()
    teachers = load_teachers(s.models, list(TEACHER_FAMILIES))
    sched = declared_scheduler(s.models)

    def config(method: str, names: list[str], supervise: str = "router"):
        return recipe_config(s, method, names, supervise, steps=s.steps)

    ref = config("diffusionopd", ["a", "b"])
    sig_eval = sigma_grid(sched, ref.eval_steps)
    base = student_field(load_student(s.models))
    rows: list[dict[str, Any]] = []
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    empty = {"counts": {}, "timings_s": {}}

    def reference(title: str, families: list[int], names: str) -> None:
        samples, labels = evaluate_field(base, world, families, sig_eval, ref)
        rows.append(_row(title, names, {"metrics": metrics_of(world, samples, labels), **empty}))
        grids["base student"] = (samples, labels)  # the last: every family

    def trained(key: str, title: str, cfg, names: str) -> None:
        t0 = time.perf_counter()
        say(f"training {title} ({cfg.steps} steps, {s.backend})")
        client = None
        if router_url is not None:
            from student.latent.http import HttpLatentTeachers

            client = HttpLatentTeachers(
                router_url,
                cfg.teachers,
                world,
                cfg.supervise,
                cfg.guidance_scale,
                cond_cache=s.cond_cache,
                anchor=METHODS[cfg.method].uses_anchor,
                stream_chunk=s.stream_chunk,
            )
        try:  # each row is a run of its own: s.out/runs/KEY (report, steps, student/)
            student, run_dir = load_student(s.models), s.out / "runs" / key
            rep, task = train_latent(
                cfg, student, world, sched, run_dir, client, teachers, progress=s.progress
            )
        finally:
            if client is not None:
                client.close()
        row = latent_row(rep)
        say(f"  done in {time.perf_counter() - t0:.0f} s: {_brief(row['metrics'])}")
        grids[title] = task.samples
        rows.append(_row(title, names, row))

    reference("base student, target = a", [0, 1], "a")
    if "single" in runs:
        trained("single", "single teacher (a), dense", config("diffusionopd", ["a"]), "a")
    reference("base student, target = a ∪ b", [0, 1, 2, 3], "a,b")
    # the ceiling: each teacher sampling its own families (what label routing distils)
    parts = [
        evaluate_field(teacher_field(teachers, n, s.guidance_scale), world, f, sig_eval, ref)
        for n, f in TEACHER_FAMILIES.items()
    ]
    samples, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    rows.append(
        _row(
            "teachers a, b label-routed (ceiling)",
            "a,b",
            {"metrics": metrics_of(world, samples, labels), **empty},
        )
    )
    grids["teachers a, b label-routed"] = (samples, labels)
    titles = {
        "diffusionopd": ("DiffusionOPD dense (a, b)", "diffusionopd", "router"),
        "flowopd": ("Flow-OPD dense + anchor (a, b)", "flowopd", "router"),
        "danceopd": ("DanceOPD single query (a, b)", "danceopd", "router"),
        "average": ("naive average of a and b (dense)", "diffusionopd", "average"),
    }
    for key, (title, method, supervise) in titles.items():
        if key in runs:
            trained(key, title, config(method, ["a", "b"], supervise), "a,b")
    plot_grid(s.out / "samples.png", world, grids)
    return rows


def latent_row(report: dict[str, Any]) -> dict[str, Any]:
    """A table row of a trainer report: the world's metrics, the counts, the time segments
    (``query``: the exposed wait for the teachers), the saved student and the recipe."""
    t = report["timings_s"]
    return {
        "metrics": report["latent_metrics"],
        "counts": report["counts"],
        "timings_s": {**t, "query": t["query_exposed"]},
        "param_change_l2": report["param_change_l2"],
        "student_dir": report["student_dir"],
        "config": report["config"],
    }


def _brief(m: dict[str, float]) -> str:
    return (
        f"logp {m['target_logp']:.2f}, mass {m['family_mass']:.3f}, "
        f"effective modes {m['effective_modes']:.2f}"
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """The quality table (markdown), SPEC §5's columns at latent shapes."""
    head = (
        "| run | rollouts | teacher queries (states) | target logp/dim ↑ | family mass ↑ | "
        "proto RMSE ↓ | effective modes | sub-mode balance | wall s (rollout / query / update) |"
    )
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        m, c, t = r["metrics"], r["counts"], r["timings_s"]
        wall = (
            f"{t['wall']:.0f} ({t['rollout']:.0f} / {t['query']:.0f} / {t['update']:.0f})"
            if t
            else "-"
        )
        lines.append(
            f"| {r['run']} | {c.get('rollouts', 0):,} | {c.get('teacher_queries', 0):,} | "
            f"{m['target_logp']:.2f} | {m['family_mass']:.3f} | {m['proto_rmse']:.3f} | "
            f"{m['effective_modes']:.2f} | {m['submode_balance']:.2f} | {wall} |"
        )
    return "\n".join(lines)


COMMAND = Command(
    "the latent world (SD3 base + LoRA teachers): pretrain, OPD rows, quality table",
    LatentSettings,
    run_latent,
)


def main(argv: list[str] | None = None) -> int:
    from common.cli import main as opd_main

    return opd_main(["latent", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
