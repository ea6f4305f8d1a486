"""``opd demo --world latent``: the latent world's demo, every row over HTTP.

Pretrains what is missing (SD3 base, LoRA teachers a, b), serves them as the project deploys
them (one ``opd serve teacher`` process holding the base once with both adapters, a label
router, the base as Flow-OPD's anchor), trains the single-teacher row, the three methods and
the naive average through the router with prompt conditioning sent once per family under a
``cond_id`` and guided teacher queries, then measures each method's bytes per step without the
conditioning cache (a few steps each). Prints the quality and cost tables and writes
``report.md``, ``report.json`` and ``samples.png`` (sample grids: prototypes, base, teachers,
every trained row). Reuses ``opd latent``'s pieces (:mod:`student.latent.run`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.cli import UsageError
from common.settings import out_dir
from student.latent.run import RUNS, LatentSettings, format_table, latent_table

#: steps of the no-cache probe per method: bytes per step do not depend on the step
PROBE_STEPS = 3
COST_HEAD = (
    "| run | wall s | rollout s | query s | update s | requests | states queried | "
    "MB sent / step: no cache → cond_id | MB received / step |"
)


def run_latent_demo(s: LatentSettings, say=print) -> int:
    """The demo for settings ``s`` (backend http and the cache are forced here)."""
    from services.teacher.diffusers_backend import DiffusersLoadError  # imports diffusers
    from student.latent.http import served_teachers
    from student.latent.pretrain import BASE_STEPS, TEACHER_STEPS, ensure_models
    from student.latent.teachers import LatentSetupError

    s = s.model_copy(update={"backend": "http", "cond_cache": True})
    runs = [r.strip() for r in s.runs.split(",") if r.strip()]
    if bad := [r for r in runs if r not in RUNS]:
        raise UsageError(f"--runs: unknown row {bad[0]!r}; choose from {', '.join(RUNS)}")
    out_dir(s.out)
    try:
        ensure_models(
            s.models,
            force=s.force,
            base_steps=s.base_steps or BASE_STEPS,
            teacher_steps=s.teacher_steps or TEACHER_STEPS,
            say=say,
        )
        with served_teachers(s.models) as url:
            say(f"teachers a, b (LoRA) and base served in one process behind the router {url}")
            rows = latent_table(s, runs, say, router_url=url)
            probes = probe_uncached(s, url, runs, say)
    except (LatentSetupError, DiffusersLoadError) as exc:  # models or setup: nothing trained
        raise UsageError(str(exc)) from None
    cost = cost_lines(rows, probes, s.steps)
    (s.out / "report.json").write_text(
        json.dumps({"rows": rows, "uncached_bytes_per_step": probes}, indent=2) + "\n"
    )
    quality = format_table(rows)
    write_report(s, quality, cost)
    say("\nquality\n" + quality)
    say("\ncost over HTTP\n" + cost)
    say(f"\nreport: {s.out / 'report.md'} (samples: {s.out / 'samples.png'})")
    return 0


#: row key → (title as latent_table writes it, method, supervise)
ROWS = {
    "single": ("single teacher (a), dense", "diffusionopd", "router"),
    "diffusionopd": ("DiffusionOPD dense (a, b)", "diffusionopd", "router"),
    "flowopd": ("Flow-OPD dense + anchor (a, b)", "flowopd", "router"),
    "danceopd": ("DanceOPD single query (a, b)", "danceopd", "router"),
    "average": ("naive average of a and b (dense)", "diffusionopd", "average"),
}


def probe_uncached(
    s: LatentSettings, url: str, runs: list[str], say=print
) -> dict[str, dict[str, float]]:
    """Bytes per step of each row's method with every row's prompt in every request (no
    ``cond_id``), over :data:`PROBE_STEPS` steps: title → ``{sent, received}`` per step."""
    from student.latent.http import HttpLatentTeachers
    from student.latent.models import declared_scheduler, load_student
    from student.latent.train import recipe_config, train_latent
    from student.latent.world import make_world
    from student.methods import METHODS

    world, sched = make_world(), declared_scheduler(s.models)
    out: dict[str, dict[str, float]] = {}
    for key in runs:
        title, method, supervise = ROWS[key]
        names = ["a"] if key == "single" else ["a", "b"]
        cfg = recipe_config(
            s, method, names, supervise, steps=PROBE_STEPS, eval_samples=1, eval_steps=2
        )
        client = HttpLatentTeachers(
            url,
            names,
            world,
            supervise,
            s.guidance_scale,
            anchor=METHODS[method].uses_anchor,
            stream_chunk=s.stream_chunk,
        )
        try:
            train_latent(cfg, load_student(s.models), world, sched, s.out / "probe" / key, client)
        finally:
            client.close()
        out[title] = {
            "sent": client.bytes_sent / PROBE_STEPS,
            "received": client.bytes_received / PROBE_STEPS,
        }
        say(f"  {title}: {out[title]['sent'] / 1e6:.3f} MB sent per step without the cache")
    return out


def cost_lines(rows: list[dict[str, Any]], probes: dict[str, dict], steps: int) -> str:
    """The cost table (markdown): rollout vs query vs update seconds, requests, bytes per step
    with and without the conditioning cache."""
    lines = [COST_HEAD, "|" + " --- |" * 9]
    for r in rows:
        t, c = r["timings_s"], r["counts"]
        if not t:  # the reference rows train nothing
            continue
        probe = probes.get(r["run"], {})
        no_cache = f"{probe['sent'] / 1e6:.3f}" if probe else "-"
        lines.append(
            f"| {r['run']} | {t['wall']:.0f} | {t['rollout']:.1f} | {t['query']:.1f} | "
            f"{t['update']:.1f} | {c.get('requests', 0):,} | {c.get('teacher_queries', 0):,} | "
            f"{no_cache} → {c.get('bytes_sent', 0) / steps / 1e6:.3f} | "
            f"{c.get('bytes_received', 0) / steps / 1e6:.3f} |"
        )
    return "\n".join(lines)


def write_report(s: LatentSettings, quality: str, cost: str) -> None:
    guided = f"guidance scale {s.guidance_scale:g}" if s.guidance_scale else "unguided"
    md = f"""# OPD demo, latent world: {s.steps} steps per row, seed {s.seed}, over HTTP

One `opd serve teacher` process holds the tiny SD3 base once with LoRA adapters `a`, `b`; a
label router routes each state to the teacher of its prompt's family (the base is Flow-OPD's
anchor). The student (a full fine-tune of the base) sends each step's queried states through
the public client (`student/client.py`): one request per prompt family, the family's prompt
embedding once under a `cond_id`, teacher queries {guided}. {s.batch} rollouts of
{s.rollout_steps} steps per optimizer step. Details: docs/latent-world.md.

## Quality

{quality}

## Cost

Seconds per row (rollout / teacher query / update); bytes per step with every row's prompt in
every request (measured over {PROBE_STEPS} steps) and with the conditioning cache (`cond_id`,
the whole run).

{cost}

## Samples

Channel 0 of 3 samples per family per row; first row: the prototypes.

![samples](samples.png)
"""
    (Path(s.out) / "report.md").write_text(md)
