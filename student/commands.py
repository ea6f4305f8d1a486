"""``opd pretrain``, ``opd train`` and ``opd eval``: settings and what each runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.checkpoint import read_model
from common.cli import Command, UsageError
from common.nets import VelocityNet
from common.settings import BaseUrl, out_dir
from common.threads import THREADS_HELP, apply_threads, model_params, thread_budget
from student.clients import LocalTeacherClient, TeacherClient, TeacherInfo, TeacherUnavailable
from student.evaluate import EVAL_SAMPLES, EVAL_SEED, EVAL_STEPS, evaluate
from student.models import BASE_NAME, load_named, parse_names
from student.pretrain import pretrain_all
from student.report import RunTotals, build_report, plot_samples, write_json
from student.state import check_not_shorter, read_state_meta
from student.students import SetupError
from student.trainer import TrainConfig, TrainingAborted, TrainingInterrupted, train


class PretrainSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_PRETRAIN_")
    out: Path = Field(
        Path("models"), description="directory for base/teacher-a/teacher-b checkpoints"
    )
    seed: int = Field(0, description="seed of the base model (teachers use seed+1, seed+2)")
    force: bool = Field(False, description="retrain and overwrite existing checkpoints")
    steps: int | None = Field(
        None, ge=1, description="override every model's step count (tests only)"
    )
    threads: int | None = Field(None, ge=1, description=THREADS_HELP)


def run_pretrain(s: PretrainSettings) -> int:
    out_dir(s.out)
    apply_threads(s.threads or thread_budget(model_params(VelocityNet())))  # what it trains
    pretrain_all(s.out, seed=s.seed, force=s.force, steps=s.steps)
    return 0


#: what ``--world latent`` changes where the flag is not given (its models, its recipe)
LATENT_MODELS = Path("models/latent")


class TrainSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_TRAIN_")
    world: Literal["ring", "latent"] = Field(
        "ring",
        description="ring: the toy VelocityNet on [B, 2]; latent: a diffusers SD3 student on "
        "[B, 4, 8, 8] latents with prompt conditioning and LoRA teachers (its own defaults for "
        "--models, --steps, --batch, --rollout-steps, --lr where not given)",
    )
    method: Literal["diffusionopd", "flowopd", "danceopd"] = Field(description="OPD method")
    teachers: str = Field("a,b", description="comma-separated teacher names, e.g. a,b")
    supervise: Literal["router", "average"] = Field(
        "router", description="routed teacher or mean of all"
    )
    steps: int = Field(1500, ge=1, description="optimizer steps")
    seed: int = Field(123, description="run seed (rollout noise, DanceOPD indices)")
    backend: Literal["local", "http"] = Field(
        "local", description="local: in-process teachers; http: through a router"
    )
    router_url: BaseUrl | None = Field(
        None, description="router base URL for --backend http (uvicorn or Ray Serve route)"
    )
    routing: Literal["router", "client"] = Field(
        "router",
        description="http: route through the router process, or in the trainer from the "
        "router's watched registry, calling teachers directly (no router hop)",
    )
    update_groups: Literal["ready", "request"] = Field(
        "ready",
        description="http: each update of a step takes every answer that is in (ready; with "
        "--routing client each teacher's rows come as soon as that teacher answers), or one "
        "request's answer at a time in submit order (request: bitwise-reproducible runs)",
    )
    stream_chunk: int = Field(
        12,
        ge=1,
        description="queried rollout steps per request (http); "
        "12 = one request per dense rollout, fastest on 2 shared cores",
    )
    max_in_flight: int = Field(8, ge=1, description="requests in flight at once (http)")
    spin_wait_ms: float = Field(
        0.0,
        ge=0,
        description="http: busy-wait this long for an answer before sleeping (0: sleep at "
        "once); a trainer that sleeps comes back to a cold core, a spinning one takes CPU from "
        "its own HTTP thread (docs/http-training.md)",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="per-attempt request timeout (http)")
    retries: int = Field(
        7,
        ge=0,
        description="retries of a failed request, with backoff 0.2 s doubling to 5 s (http); "
        "7 waits ~16 s: long enough for a teacher or router to restart",
    )
    checkpoint_every: int = Field(
        100, ge=0, description="save resumable state every N steps (0: never)"
    )
    resume: bool = Field(False, description="continue the run in --out from its checkpoint")
    trace_steps: int = Field(200, ge=0, description="steps recorded in trace.json")
    models: Path = Field(Path("models"), description="directory of pretrained checkpoints")
    out: Path = Field(description="run directory (report.json, student.safetensors, samples.png)")
    batch: int = Field(128, ge=1, description="rollout batch")
    rollout_steps: int = Field(12, ge=2, description="Euler steps per rollout (N)")
    lr: float = Field(8e-4, gt=0, description="Adam learning rate")
    guidance_scale: float | None = Field(
        None, description="latent: classifier-free guidance in the teachers' answers (none: off)"
    )
    prompts: Path | None = Field(
        None,
        description="latent: a prompt set (safetensors: encoder_hidden_states [4, L, E], "
        "pooled_projections [4, P], one prompt per family) in place of the world's own",
    )
    cond_cache: bool = Field(
        True,
        description="latent, http: each rollout batch's conditioning sent once under a cond_id "
        "(the teachers' cache), its later states without it",
    )
    threads: int | None = Field(None, ge=1, description=THREADS_HELP)
    progress: bool = Field(True, description="show a progress bar")


def local_client(models: Path, teachers: list[str], supervise: str, anchor: bool) -> TeacherClient:
    """In-process teachers from ``models``; ``anchor`` adds the frozen base as anchor."""
    loaded = []
    for name in teachers:
        net, meta = load_named(models, name)
        loaded.append((net, TeacherInfo.from_meta(meta, name=name)))
    anchor_pair = None
    if anchor:
        net, meta = load_named(models, BASE_NAME)
        anchor_pair = (net, TeacherInfo.from_meta(meta, name=BASE_NAME))
    return LocalTeacherClient(
        loaded, policy="nearest" if supervise == "router" else "average", anchor=anchor_pair
    )


def make_client(s: TrainSettings, teachers: list[str]) -> TeacherClient:
    """The teacher client the settings ask for."""
    anchor = s.method == "flowopd"
    if s.backend == "local":
        return local_client(s.models, teachers, s.supervise, anchor)
    if not s.router_url:
        raise UsageError("--backend http needs --router-url (e.g. http://127.0.0.1:8000)")
    from student.remote import HttpTeacherClient

    try:
        return HttpTeacherClient(
            s.router_url,
            teachers,
            anchor=anchor,
            policy="average" if s.supervise == "average" else None,
            stream_chunk=s.stream_chunk,
            max_in_flight=s.max_in_flight,
            timeout_s=s.request_timeout_s,
            retries=s.retries,
            spin_wait_s=s.spin_wait_ms / 1e3,
            routing=s.routing,
            update_groups=s.update_groups,
        )
    except (ValueError, TeacherUnavailable) as exc:
        raise UsageError(str(exc)) from None


def _finished(out: Path, checkpoint: dict) -> bool:
    """Whether the checkpoint in ``out`` (its metadata) is a leftover of a run that finished:
    a report covers its steps (a periodic or resumed-from checkpoint stays when the run ends; a
    new run clears the report as it starts)."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return report.get("steps", 0) >= checkpoint["step"]


def check_out(s: TrainSettings) -> None:
    """Refuse, before any work, a run that would mix with the one in ``--out``: a new run over an
    unfinished one (a later --resume would splice the two), or a resume to fewer steps than are
    done (its report and its counts would disagree)."""
    checkpoint = read_state_meta(s.out)
    if checkpoint is None:
        return  # nothing to mix with (--resume says so itself when it finds no checkpoint)
    done, of = checkpoint["step"], checkpoint["config"]["steps"]
    if not s.resume and not _finished(s.out, checkpoint):
        raise UsageError(
            f"--out {s.out} holds a checkpoint of an earlier run (step {done} of {of}); "
            "add --resume to continue it, or use another --out"
        )
    if s.resume:  # checked again by train() for in-process callers; here before any work
        check_not_shorter(s.out, done, s.steps)


def run_fields(s: TrainSettings, teachers: list[str]) -> dict:
    """The :class:`TrainConfig` fields every world takes from the flags as given."""
    return {
        "method": s.method,
        "teachers": teachers,
        "supervise": s.supervise,
        "backend": s.backend,
        "seed": s.seed,
        "checkpoint_every": s.checkpoint_every,
        "trace_steps": s.trace_steps,
    }


def run_train(s: TrainSettings) -> int:
    try:
        teachers = parse_names(s.teachers)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if s.world == "latent":
        return run_train_latent(s, teachers)
    recipe = {k: getattr(s, k) for k in ("steps", "batch", "rollout_steps", "lr")}
    cfg = TrainConfig(**run_fields(s, teachers), **recipe)
    student, base_meta = load_named(s.models, BASE_NAME)
    # the student (and, in-process, the teachers) set the budget: the toy net takes one thread
    apply_threads(s.threads or thread_budget(model_params(student)))
    out_dir(s.out)  # a usage error now, not a traceback from the trainer
    check_out(s)
    return _run(s, cfg, student, make_client(s, teachers), base_meta)


def _run(s: TrainSettings, cfg: TrainConfig, student, client: TeacherClient, base_meta=None) -> int:
    """Train and say how it ended: 0 done, 1 teachers unreachable (checkpoint written), 128 +
    signal when interrupted (checkpoint written); a setup the teachers refuse is a usage error."""
    with client:
        try:
            report = train(
                cfg,
                student,
                client,
                s.out,
                base_meta=base_meta,
                progress=s.progress,
                resume=s.resume,
            )
        except SetupError as exc:
            raise UsageError(str(exc)) from None
        except TrainingAborted as exc:
            sys.stderr.write(f"opd train: {exc}\n")
            return 1
        except TrainingInterrupted as exc:
            sys.stderr.write(f"opd train: {exc}\n")
            return 128 + exc.signum  # what a shell reports for a process the signal ended
    print(
        json.dumps({"out": str(s.out), **report["metrics"], "wall_s": report["timings_s"]["wall"]})
    )
    return 0


def run_train_latent(s: TrainSettings, teachers: list[str]) -> int:
    """``opd train --world latent``: the same trainer on a diffusers student (the latent
    world's base, fully fine-tuned) with LoRA teachers in-process or behind ``--router-url``;
    pretrains the models that are missing in ``--models``."""
    from services.teacher.diffusers_backend import DiffusersLoadError  # imports diffusers
    from student.latent.models import declared_scheduler, load_student
    from student.latent.pretrain import ensure_models
    from student.latent.train import LatentStudent, latent_config
    from student.latent.world import make_world, target_families, with_prompts
    from student.methods import METHODS

    given = s.model_fields_set
    models = s.models if "models" in given else LATENT_MODELS
    # the latent recipe's defaults (latent_config) where a flag was not given
    recipe = {k: getattr(s, k) for k in ("steps", "batch", "rollout_steps", "lr") if k in given}
    cfg = latent_config(**run_fields(s, teachers), guidance_scale=s.guidance_scale, **recipe)
    out_dir(s.out)
    check_out(s.model_copy(update={"steps": cfg.steps}))
    world, anchor = make_world(), METHODS[cfg.method].uses_anchor
    try:
        target_families(teachers)  # a teacher the world has not: before loading anything
        if s.prompts is not None:
            world = with_prompts(world, s.prompts)
        ensure_models(models, say=lambda line: sys.stderr.write(line + "\n"))
        student = load_student(models)
        apply_threads(s.threads or thread_budget(model_params(student.transformer)))
        task = LatentStudent(student, world, declared_scheduler(models))
        if s.backend == "local":
            from student.latent.models import load_teachers
            from student.latent.teachers import LocalLatentTeachers

            client: TeacherClient = LocalLatentTeachers(
                load_teachers(models, teachers),
                teachers,
                world,
                cfg.supervise,
                cfg.guidance_scale,
                anchor=anchor,
            )
        else:
            if not s.router_url:
                raise UsageError("--backend http needs --router-url (e.g. http://127.0.0.1:8000)")
            from student.latent.http import HttpLatentTeachers

            client = HttpLatentTeachers(
                s.router_url,
                teachers,
                world,
                cfg.supervise,
                cfg.guidance_scale,
                timeout_s=s.request_timeout_s,
                cond_cache=s.cond_cache,
                anchor=anchor,
                retries=s.retries,
                max_in_flight=s.max_in_flight,
                stream_chunk=s.stream_chunk,
            )
    except (ValueError, DiffusersLoadError, TeacherUnavailable) as exc:  # LatentSetupError too
        raise UsageError(str(exc)) from None
    return _run(s, cfg, task, client)


class EvalSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_EVAL_")
    checkpoint: Path = Field(description="any VelocityNet checkpoint (base, teacher or student)")
    teachers: str = Field("a,b", description="teachers whose modes define the target")
    models: Path = Field(Path("models"), description="directory of the teachers' checkpoints")
    out: Path = Field(description="directory for report.json and samples.png")
    samples: int = Field(EVAL_SAMPLES, ge=1, description="samples to draw")
    eval_steps: int = Field(EVAL_STEPS, ge=1, description="Euler steps per sample")
    seed: int = Field(EVAL_SEED, description="sampling seed")
    threads: int | None = Field(None, ge=1, description=THREADS_HELP)


def run_eval(s: EvalSettings) -> int:
    try:
        names = parse_names(s.teachers)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    net, meta = read_model(s.checkpoint)
    apply_threads(s.threads or thread_budget(model_params(net)))
    modes = [load_named(s.models, n)[1].modes for n in names]
    out_dir(s.out)
    metrics, samples = evaluate(net, modes, s.samples, s.eval_steps, s.seed)
    report = build_report(
        method="eval",
        teachers=names,
        supervise="none",
        backend="none",
        steps=0,
        seed=s.seed,
        metrics=metrics,
        totals=RunTotals(),
        extra={
            "checkpoint": str(s.checkpoint),
            "checkpoint_digest": meta.digest,
            "checkpoint_role": meta.role,
        },
    )
    write_json(s.out / "report.json", report)
    plot_samples(
        s.out / "samples.png",
        samples,
        sorted({m for ms in modes for m in ms}),
        f"{s.checkpoint.name} vs target {'+'.join(names)}",
    )
    print(json.dumps({"out": str(s.out), **metrics}))
    return 0


PRETRAIN = Command("train the base student and teachers a, b", PretrainSettings, run_pretrain)
TRAIN = Command("run OPD against teachers", TrainSettings, run_train)
EVAL = Command("evaluate a checkpoint against the teachers' target", EvalSettings, run_eval)
