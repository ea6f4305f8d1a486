"""The OPD trainer: one loop, the same for every method and every teacher backend.

Each optimizer step: (1) plan which rollout states to query, (2) roll out the student without
grad, handing each queried state to the teacher client as soon as it exists, (3) wait for the
teachers' answers, (4) regress the student toward them with one Adam step, (5) account.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from tqdm import tqdm

from common.checkpoint import CheckpointMeta, TeacherRef, save_model
from common.nets import VelocityNet
from student.clients import TeacherClient
from student.evaluate import EVAL_SAMPLES, EVAL_SEED, EVAL_STEPS, evaluate
from student.methods import METHODS
from student.report import RunTotals, build_report, plot_samples, write_json
from student.rollout import rollout


class TrainConfig(BaseModel):
    """The recipe of one OPD run (SPEC §3 defaults)."""

    method: Literal["diffusionopd", "flowopd", "danceopd"]
    teachers: list[str]
    supervise: Literal["router", "average"] = "router"
    backend: str = "local"
    steps: int = Field(1500, ge=1)
    seed: int = 123
    batch: int = Field(128, ge=1)
    rollout_steps: int = Field(12, ge=2)
    lr: float = Field(8e-4, gt=0)
    eval_samples: int = Field(EVAL_SAMPLES, ge=1)
    eval_steps: int = Field(EVAL_STEPS, ge=1)
    eval_seed: int = EVAL_SEED


def _cat_answers(answers, attr: str) -> torch.Tensor | None:
    parts = [getattr(a, attr) for a in answers]
    return None if any(p is None for p in parts) else torch.cat(parts)


def train(cfg: TrainConfig, student: VelocityNet, client: TeacherClient, out: str | Path,
          base_meta: CheckpointMeta | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg.steps`` OPD steps on ``student`` supervised through ``client``; write the run.

    Writes ``out/report.json``, ``out/steps.jsonl``, ``out/student.safetensors``, ``out/samples.png``.
    Returns the report.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    method = METHODS[cfg.method]
    if method.uses_anchor and client.anchor is None:
        raise ValueError(f"{cfg.method} needs an anchor teacher (the frozen base) in the client")
    n, b, d = cfg.rollout_steps, cfg.batch, student.config.data_dim
    torch.manual_seed(cfg.seed)
    student.train().requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    params_before = torch.cat([p.detach().flatten() for p in student.parameters()]).clone()
    totals = RunTotals()
    versions_seen: dict[str, set[str]] = {}
    wall0 = time.perf_counter()

    steps_log = (out / "steps.jsonl").open("w")
    bar = tqdm(range(cfg.steps), desc=f"{cfg.method}/{cfg.backend}", disable=not progress,
               mininterval=0.5)
    try:
        for step in bar:
            t0 = time.perf_counter()
            # 1. plan: which rollout indices to query (DanceOPD draws its index before the rollout)
            plan = method.plan(n)
            wanted = set(plan)

            # 2. rollout without grad, streaming each queried state to the teachers right away
            def on_state(i: int, x_i: torch.Tensor, t_i: float, wanted: set[int] = wanted) -> None:
                if i in wanted:
                    client.submit(x_i, torch.full((b,), t_i))

            states, _ = rollout(student, torch.randn(b, d), n, method.sde_noise, on_state)
            t1 = time.perf_counter()

            # 3. wait for every answer (only this wait is exposed; the rest overlapped the rollout)
            answers, cost = client.collect()
            t2 = time.perf_counter()

            # 4. update: regress the student toward the teachers at the states it visited
            xs = states[plan].reshape(-1, d)
            ts = torch.cat([torch.full((b,), 1.0 - i / n) for i in plan])
            v_teacher = _cat_answers(answers, "v")
            v_anchor = _cat_answers(answers, "v_anchor") if method.uses_anchor else None
            loss = method.loss(student(xs, ts), ts, v_teacher, v_anchor)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t3 = time.perf_counter()
            loss_value = float(loss.detach())

            # 5. account
            timings = {"rollout": t1 - t0, "query_exposed": t2 - t1, "update": t3 - t2,
                       "query_latency": cost.latency_s, "teacher_compute": cost.server_compute_s}
            counts = {"rollouts": b, "teacher_queries": cost.states, "requests": cost.requests,
                      "bytes_sent": cost.bytes_sent, "bytes_received": cost.bytes_received}
            totals.add(counts, timings)
            for name, version in cost.versions.items():
                versions_seen.setdefault(name, set()).add(version)
            steps_log.write(json.dumps({
                "step": step, "loss": loss_value, "query_index": plan if len(plan) == 1 else None,
                **counts, "server_queue_s": round(cost.server_queue_s, 6),
                **{f"{k}_s": round(v, 6) for k, v in timings.items()},
                "versions": cost.versions,
            }) + "\n")
            if progress and (step % 10 == 0 or step == cfg.steps - 1):
                elapsed = time.perf_counter() - wall0
                bar.set_postfix(loss=f"{loss_value:.4f}",
                                states_s=f"{totals.counts['teacher_queries'] / elapsed:,.0f}",
                                wait=f"{totals.timings_s['query_exposed'] / elapsed:.0%}")
    finally:
        steps_log.close()
        bar.close()
    totals.timings_s["wall"] = time.perf_counter() - wall0

    # evaluation, checkpoint and report
    student.eval().requires_grad_(False)
    params_after = torch.cat([p.detach().flatten() for p in student.parameters()])
    t_eval = time.perf_counter()
    teacher_modes = [info.modes for info in client.teachers]
    metrics, samples = evaluate(student, teacher_modes, cfg.eval_samples, cfg.eval_steps, cfg.eval_seed)
    totals.timings_s["eval"] = time.perf_counter() - t_eval

    refs = [TeacherRef(name=i.name, digest=i.digest, version=",".join(sorted(versions_seen.get(i.name, {i.version}))))
            for i in [*client.teachers, *([client.anchor] if client.anchor else [])]]
    modes = sorted({m for ms in teacher_modes for m in ms})
    meta = save_model(out / "student.safetensors", student, CheckpointMeta(
        name=out.name, role="student", modes=modes,
        mode_centers=[], seed=cfg.seed, steps=cfg.steps, teachers=refs,
        training={"method": cfg.method, "supervise": cfg.supervise, "backend": cfg.backend,
                  "lr": cfg.lr, "batch": cfg.batch, "rollout_steps": cfg.rollout_steps,
                  "init": base_meta.digest if base_meta else None},
    ))
    report = build_report(
        method=cfg.method, teachers=[i.name for i in client.teachers], supervise=cfg.supervise,
        backend=cfg.backend, steps=cfg.steps, seed=cfg.seed, metrics=metrics, totals=totals,
        extra={"method_title": method.title, "student_digest": meta.digest,
               "teacher_refs": [r.model_dump() for r in refs],
               "param_change_l2": float((params_after - params_before).norm()),
               "config": cfg.model_dump()},
    )
    write_json(out / "report.json", report)
    plot_samples(out / "samples.png", samples, modes,
                 f"{method.title} ({'+'.join(report['teachers'])}, {cfg.supervise}, {cfg.steps} steps)")
    return report
