"""The OPD trainer: one loop, the same for every method, teacher backend and student.

The student is the ring's ``VelocityNet`` or a diffusers transformer on latents
(:mod:`student.students`): states ``[B, *S]``, its time grid, a prompt per rollout.
Each optimizer step: (1) plan which rollout states to query, draw the rollouts' prompts, (2)
roll out the student without grad, handing each queried state (with its rollouts' prompts) to
the teacher client as soon as it exists, (3) wait for the
teachers' answers, (4) regress the student toward them with one Adam step, (5) account, and
every ``checkpoint_every`` steps save everything a resumed run needs. Unreachable teachers,
SIGINT and SIGTERM also end the run with such a checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from tqdm import tqdm

from common.checkpoint import CheckpointError, CheckpointMeta, TeacherRef
from common.nets import VelocityNet
from common.threads import CpuWatch
from student.clients import QueryCost, TeacherClient, TeacherUnavailable
from student.evaluate import EVAL_SAMPLES, EVAL_SEED, EVAL_STEPS
from student.interrupt import Interrupt, SignalGuard
from student.methods import METHODS, Method
from student.report import RunTotals, build_report, write_json
from student.state import STATE_FILE, TrainState, check_not_shorter, load_state, save_state
from student.students import Prompts, RingStudent, StateHook, Student
from student.trace import Tracer

#: Settings a resumed run must share with the run it continues (``steps`` may grow).
RESUME_KEYS = (
    "world",
    "method",
    "teachers",
    "supervise",
    "seed",
    "batch",
    "rollout_steps",
    "lr",
    "guidance_scale",
)
#: names of the trainer's time segments after the rollout (also its trace spans)
WAIT, UPDATE = "wait for teachers", "update"
#: what a finished or stopped run leaves in its directory besides steps.jsonl and trace.json
#: (which a new run rewrites from its first step)
RUN_FILES = (STATE_FILE, "report.json", "student.safetensors", "samples.png")
#: run outputs that are directories (the latent student, a diffusers directory)
RUN_DIRS = ("student",)


class TrainConfig(BaseModel):
    """The recipe of one OPD run (SPEC §3 defaults; the latent world's in
    :func:`student.latent.train.latent_config`)."""

    world: Literal["ring", "latent"] = "ring"
    method: Literal["diffusionopd", "flowopd", "danceopd"]
    teachers: list[str]
    supervise: Literal["router", "average"] = "router"
    backend: str = "local"
    steps: int = Field(1500, ge=1)
    seed: int = 123
    batch: int = Field(128, ge=1)
    rollout_steps: int = Field(12, ge=2)
    lr: float = Field(8e-4, gt=0)
    guidance_scale: float | None = Field(None, description="CFG in the teachers' answers")
    eval_samples: int = Field(EVAL_SAMPLES, ge=1, description="latent: per prompt family")
    eval_steps: int = Field(EVAL_STEPS, ge=1)
    eval_seed: int = EVAL_SEED
    checkpoint_every: int = Field(0, ge=0, description="0 = only on failure")
    trace_steps: int = Field(200, ge=0, description="steps recorded in trace.json")


class TrainingAborted(RuntimeError):
    """The run stopped early (teachers unreachable); a checkpoint was written to resume from."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; a checkpoint was written to resume from.

    A ``KeyboardInterrupt``: callers that do not handle it (``opd demo``, ``opd bench cost``) stop
    as they did on Ctrl-C before, releasing what they hold, never with a traceback.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def _cat(answers, attr: str) -> torch.Tensor | None:
    parts = [getattr(a, attr) for a in answers]
    return None if any(p is None for p in parts) else torch.cat(parts)


def train(
    cfg: TrainConfig,
    student: VelocityNet | Student,
    client: TeacherClient,
    out: str | Path,
    base_meta: CheckpointMeta | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``cfg.steps`` OPD steps on ``student`` supervised through ``client``; write the run.

    Writes ``out/report.json``, ``steps.jsonl``, ``trace.json``, the student (the ring's
    ``student.safetensors``, the latent world's ``student/`` diffusers directory),
    ``samples.png`` (and ``checkpoint.safetensors`` every ``checkpoint_every`` steps).

    Without ``resume`` the run replaces whatever run ``out`` held (an earlier run's checkpoint
    left there would otherwise be what a later ``resume=True`` continues, spliced onto this one).

    Raises:
        SetupError: the student, its prompts and the teachers do not fit (before any work).
        TrainingAborted: the teachers stayed unreachable; the state at the last completed step
            was saved, and ``resume=True`` continues from it.
        TrainingInterrupted: SIGINT or SIGTERM; the same, at the step the signal came in (a
            step cut short is replayed on resume).
    """
    task = student if isinstance(student, Student) else RingStudent(student)
    if task.world != cfg.world:
        raise ValueError(f"a {task.world} student for a {cfg.world} run")
    task.check(cfg, client)
    with SignalGuard() as guard:
        return _train(cfg, task, client, Path(out), base_meta, progress, resume, guard)


def _train(
    cfg: TrainConfig,
    task: Student,
    client: TeacherClient,
    out: Path,
    base_meta: CheckpointMeta | None,
    progress: bool,
    resume: bool,
    guard: SignalGuard,
) -> dict[str, Any]:
    """:func:`train`, with SIGINT and SIGTERM raising :class:`Interrupt` where ``guard`` lets them."""
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    method = METHODS[cfg.method]
    if method.uses_anchor and client.anchor is None:
        raise ValueError(f"{cfg.method} needs an anchor teacher (the frozen base) in the client")
    n, b, student = cfg.rollout_steps, cfg.batch, task.model
    grid = task.grid(n)
    torch.manual_seed(cfg.seed)
    student.train().requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    params_before = torch.cat([p.detach().flatten() for p in student.parameters()]).clone()
    totals = RunTotals()
    versions_seen: dict[str, set[str]] = {}
    digests_seen: dict[str, set[str]] = {}  # a version counts loads per process; this says which
    start_step = 0
    if resume:
        state = load_state(out, student, opt)
        now, default = cfg.model_dump(), TrainConfig.model_fields
        # a key the checkpoint lacks was written before it existed: it had the default then
        mismatch = [k for k in RESUME_KEYS if state.config.get(k, default[k].default) != now[k]]
        if mismatch:
            raise CheckpointError(
                f"--resume: the run in {out} differs in {', '.join(mismatch)}; "
                "resume with the same settings or pick a new --out"
            )
        check_not_shorter(out, state.step, cfg.steps)
        start_step, versions_seen = state.step, {k: set(v) for k, v in state.versions_seen.items()}
        digests_seen = {k: set(v) for k, v in state.digests_seen.items()}
        totals.add(state.totals["counts"], state.totals["timings_s"])
        params_before = state.params_init
    wall0 = time.perf_counter() - totals.timings_s["wall"]
    tracer = Tracer(origin=time.perf_counter(), max_steps=cfg.trace_steps)
    if resume:  # keep the earlier part's trace; this part's steps (if any) follow it
        tracer.continue_from(out / "trace.json", before_step=start_step)

    def checkpoint(step: int, rng: torch.Tensor | None = None) -> Path:
        totals.timings_s["wall"] = time.perf_counter() - wall0
        return save_state(
            out,
            TrainState(
                step,
                {"counts": totals.counts, "timings_s": totals.timings_s},
                {k: sorted(v) for k, v in versions_seen.items()},
                cfg.model_dump(),
                params_before,
                {k: sorted(v) for k, v in digests_seen.items()},
            ),
            student,
            opt,
            rng,
        )

    # Where a resumed run would start if a signal stopped this one now: the steps whose update
    # is in the student, and the RNG state the next step starts with.
    resume_at = (start_step, torch.get_rng_state())

    def interrupted(sig: Interrupt) -> TrainingInterrupted:
        if not steps_log.closed:  # its lines must reach the disk with the checkpoint
            steps_log.flush()
        path = checkpoint(*resume_at)
        return TrainingInterrupted(
            sig.signum,
            f"interrupted after {resume_at[0]} of {cfg.steps} steps; state saved to {path}; "
            "rerun with --resume to continue",
        )

    # A signal during the Adam update or the step's accounting would leave a state that is
    # neither this step's start nor its end: hold signals from the update until the step is in.
    opt.register_step_pre_hook(guard.hold)
    steps_log = _open_steps_log(out / "steps.jsonl", keep=start_step)
    # In a log file (not a terminal) every refresh is a new line: refresh rarely there.
    bar = tqdm(
        range(start_step, cfg.steps),
        desc=f"{cfg.method}/{cfg.backend}",
        disable=not progress,
        mininterval=0.5 if sys.stderr.isatty() else 15.0,
        initial=start_step,
        total=cfg.steps,
    )
    cpu = CpuWatch(torch.get_num_threads())
    try:
        guard.release()  # signals stop the run from here on (and one that came during setup)
        for step in bar:
            t0 = time.perf_counter()
            rng_at_step = torch.get_rng_state()  # a failure checkpoint replays this step
            resume_at = (step, rng_at_step)  # so does an interrupt, until the update is in
            # 1. plan: which rollout indices to query (DanceOPD draws its index before the
            # rollout); the rollouts' prompts (the latent world: a prompt family each)
            plan = method.plan(n)
            prompts = task.prompts(b, cfg)
            marks: list[float] = []

            # 2. rollout without grad, streaming each queried state to the teachers right away
            on_state = streaming_hook(client, plan, b, marks, prompts)
            states = task.rollout(task.noise(b), prompts, grid, method.sde_noise, on_state)
            t1 = time.perf_counter()

            # 3+4. wait for the answers request by request and regress the student toward each
            # group as it arrives: one group's forward and backward overlap the teachers' work on
            # the next; gradients accumulate, one Adam step at the end (same as one big batch)
            try:
                loss_value, cost, segments = update_step(
                    task, opt, method, client, states, plan, grid, prompts
                )
            except TeacherUnavailable as exc:
                path = checkpoint(step, rng_at_step)
                raise TrainingAborted(
                    f"{exc}\nstopped after {step} of {cfg.steps} steps; state saved "
                    f"to {path}; rerun with --resume to continue"
                ) from exc
            t3 = time.perf_counter()
            waited = sum(e - s for name, s, e in segments if name == WAIT)

            # 5. account
            timings = {
                "rollout": t1 - t0,
                "query_exposed": waited,
                "update": t3 - t1 - waited,
                "query_latency": cost.latency_s,
                "teacher_compute": cost.server_compute_s,
            }
            counts = {
                "rollouts": b,
                "teacher_queries": cost.states,
                "requests": cost.requests,
                "bytes_sent": cost.bytes_sent,
                "bytes_received": cost.bytes_received,
            }
            totals.add(counts, timings)
            for name, version in cost.versions.items():
                versions_seen.setdefault(name, set()).add(version)
            for name, digest in cost.digests.items():
                _note_digest(digests_seen.setdefault(name, set()), name, digest, step, bar.write)
            steps_log.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": loss_value,
                        "query_index": plan[0] if len(plan) == 1 else None,
                        **counts,
                        **{f"{k}_s": round(v, 6) for k, v in timings.items()},
                        "server_queue_s": round(cost.server_queue_s, 6),
                        "transport_s": round(cost.transport_s, 6),
                        "versions": cost.versions,
                        "digests": cost.digests,
                    }
                )
                + "\n"
            )
            resume_at = (step + 1, torch.get_rng_state())
            if tracer.wants(step):
                _trace_step(tracer, step, t0, marks, t1, segments, cost)
            if (
                cfg.checkpoint_every
                and (step + 1) % cfg.checkpoint_every == 0
                and step + 1 < cfg.steps
            ):
                steps_log.flush()
                checkpoint(step + 1)
            if step % 10 == 0 and (warning := cpu.update()):
                bar.write(f"step {step}: {warning}")
            if progress and (step % 10 == 0 or step == cfg.steps - 1):
                elapsed = time.perf_counter() - wall0
                # refresh=False: the bar shows it at its own next refresh (mininterval), with
                # the step count current; a forced refresh here printed a line per 10 steps in
                # a log, and showed the count as of the last refresh (0% for the first 15 s)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    states_s=f"{totals.counts['teacher_queries'] / elapsed:,.0f}",
                    wait=f"{totals.timings_s['query_exposed'] / elapsed:.0%}",
                    threads=cpu.threads,
                    cpu_wait=f"{cpu.wait_fraction:.0%}",
                    refresh=False,
                )
            guard.release()  # a signal held while the step committed stops the run here
        guard.hold()  # until the files below are written
    except Interrupt as sig:
        raise interrupted(sig) from None
    finally:
        guard.hold()  # (when leaving with another error)
        steps_log.close()
        bar.close()
        tracer.write(out / "trace.json")
    totals.timings_s["wall"] = time.perf_counter() - wall0
    try:  # an interrupt during evaluation leaves a checkpoint after the last step
        guard.release()
        seen = (versions_seen, digests_seen)
        return _finish(cfg, task, client, out, totals, seen, params_before, base_meta, cpu.totals())
    except Interrupt as sig:
        raise interrupted(sig) from None


def _note_digest(seen: set[str], name: str, digest: str, step: int, say) -> None:
    """Add ``digest`` to teacher ``name``'s ``seen`` checkpoints; a new one after the first is
    said (``say``: a line that keeps the progress bar intact): other weights supervise from here."""
    if digest in seen:
        return
    if seen:
        say(
            f"step {step}: teacher {name!r} answered from checkpoint {digest} "
            f"(earlier steps: {', '.join(sorted(seen))})"
        )
    seen.add(digest)


def _open_steps_log(path: Path, keep: int):
    """Open steps.jsonl for appending, keeping only the first ``keep`` lines (a resumed run's)."""
    lines = path.read_text().splitlines(keepends=True)[:keep] if keep and path.exists() else []
    path.write_text("".join(lines))
    return path.open("a")


def streaming_hook(
    client: TeacherClient,
    plan: list[int],
    b: int,
    marks: list[float] | None = None,
    prompts: Prompts | None = None,
) -> StateHook:
    """The rollout hook that hands each queried state (``[B, *S]``, index in ``plan``, with
    the rollouts' ``prompts`` when they have any) to ``client`` as soon as it exists, flagging
    the step's last one; appends each state's time to ``marks`` when given (for the trace)."""
    wanted, last = set(plan), plan[-1]
    more = {} if prompts is None else {"prompts": prompts}

    def on_state(i: int, x_i: torch.Tensor, t_i: float) -> None:
        if marks is not None:
            marks.append(time.perf_counter())
        if i in wanted:
            client.submit(x_i, torch.full((b,), t_i), last=i == last, **more)

    return on_state


def update_step(
    task: Student,
    opt: torch.optim.Adam,
    method: Method,
    client: TeacherClient,
    states: torch.Tensor,
    plan: list[int],
    grid: list[float],
    prompts: Prompts | None = None,
) -> tuple[float, QueryCost, list[tuple[str, float, float]]]:
    """One Adam step toward the teachers' answers, taking them group by group as they arrive.

    ``states [N, B, *S]`` are the rollout's states, ``plan`` the queried indices (in submit
    order), ``grid`` the rollout's times (state ``i`` at ``grid[i]``), ``prompts`` the
    rollouts' prompts (row ``r`` of the queried states is rollout ``r mod B``). A group is the next states in submit order, or the rows it names (a teacher's
    share of a request, or several answers merged). Each group's loss is its share of the mean over all queried states, so
    the accumulated gradient is the one-batch gradient. Returns the loss, the query cost and the
    trainer's time segments ``(WAIT | UPDATE, start, end)``.
    """
    b = states.shape[1]
    xs = states[plan].reshape(-1, *states.shape[2:])  # [len(plan)·B, *S], plan-major
    ts = torch.cat([torch.full((b,), grid[i]) for i in plan])
    total, row, loss_sum = xs.shape[0], 0, 0.0
    cost = QueryCost()
    segments: list[tuple[str, float, float]] = []
    opt.zero_grad(set_to_none=True)
    mark = time.perf_counter()
    for answers, part_cost in client.collect_parts():  # blocks until the next group is in
        got = time.perf_counter()
        segments.append((WAIT, mark, got))
        cost.add(part_cost)
        k = sum(a.v.shape[0] for a in answers)
        if answers[0].rows is not None:  # rows named out of submit order (see Answer.rows)
            idx = answers[0].rows
            x, t = xs[idx], ts[idx]
        else:
            idx = None
            x, t = xs[row : row + k], ts[row : row + k]
        p = None
        if prompts is not None:
            p = prompts.rows((torch.arange(row, row + k) if idx is None else idx) % b)
        v_anchor = _cat(answers, "v_anchor") if method.uses_anchor else None
        loss = method.loss(task.velocity(x, t, p), t, _cat(answers, "v"), v_anchor)
        if k != total:  # a group's share of the mean (a single group needs no rescaling)
            loss = loss * (k / total)
        loss.backward()
        loss_sum += float(loss.detach())
        row += k
        mark = time.perf_counter()
        segments.append((UPDATE, got, mark))
    if row != total:
        raise RuntimeError(f"the teachers answered {row} of {total} queried states")
    opt.step()
    segments.append((UPDATE, mark, time.perf_counter()))
    return loss_sum, cost, segments


def _trace_step(
    tracer: Tracer,
    step: int,
    t0: float,
    marks: list[float],
    t1: float,
    segments: list[tuple[str, float, float]],
    cost: QueryCost,
) -> None:
    bounds = [*marks, t1]
    for i in range(len(marks)):
        tracer.span(f"rollout {i}", "trainer", bounds[i], bounds[i + 1], step=step)
    for name, start, end in segments:
        tracer.span(name, "trainer", start, end, step=step)
    for k, s in enumerate(cost.spans):
        track = f"request {k}"
        tracer.span(
            f"request ({s.states} states)",
            track,
            s.start,
            s.end,
            step=step,
            queue_ms=round(s.server_queue_s * 1e3, 3),
            compute_ms=round(s.server_compute_s * 1e3, 3),
        )
        if s.server_compute_s:  # the server does not say when; drawn ending with the request
            tracer.span("server compute", track, s.end - s.server_compute_s, s.end, step=step)


def _finish(
    cfg: TrainConfig,
    task: Student,
    client: TeacherClient,
    out: Path,
    totals: RunTotals,
    seen: tuple[dict[str, set[str]], dict[str, set[str]]],
    params_before: torch.Tensor,
    base_meta: CheckpointMeta | None,
    cpu: dict[str, float],
) -> dict[str, Any]:
    """Evaluate and save the student (its world's way), write report.json; ``cpu``: the
    trainer's torch threads and CPU run / run-queue wait seconds over the steps."""
    student = task.model
    student.eval().requires_grad_(False)
    params_after = torch.cat([p.detach().flatten() for p in student.parameters()])
    refs = [
        TeacherRef(
            name=i.name,
            version=",".join(sorted(seen[0].get(i.name, {i.version}))),
            # every checkpoint that answered: more than one when it was swapped mid-run
            digest=",".join(sorted(seen[1].get(i.name) or {i.digest})),
        )
        for i in [*client.teachers, *([client.anchor] if client.anchor else [])]
    ]
    t_eval = time.perf_counter()
    metrics, extra = task.finish(cfg, client, out, refs, base_meta)
    totals.timings_s["eval"] = time.perf_counter() - t_eval
    report = build_report(
        method=cfg.method,
        teachers=[i.name for i in client.teachers],
        supervise=cfg.supervise,
        backend=cfg.backend,
        steps=cfg.steps,
        seed=cfg.seed,
        metrics=metrics,
        totals=totals,
        extra={
            "method_title": METHODS[cfg.method].title,
            **extra,
            "teacher_refs": [r.model_dump() for r in refs],
            "param_change_l2": float((params_after - params_before).norm()),
            "cpu": cpu,
            "config": cfg.model_dump(),
        },
    )
    write_json(out / "report.json", report)
    return report
