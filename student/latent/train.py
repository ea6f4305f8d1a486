"""OPD at latent shapes, in-process: the SPEC §3 loop on a diffusers student and LoRA teachers.

A compact loop of its own rather than a branch in ``student/trainer.py``: that trainer is built
around the ring's ``VelocityNet``, its streaming HTTP client, checkpoints, resume and ring
evaluation, none of which takes conditioning or a sigma grid yet (issue 18 item 2 over HTTP).
What the methods are is not duplicated: query plans, SDE noise, time weight, anchor and the loss
come from ``student/methods.py`` unchanged, routing from ``common/routing.py``.

Each step: draw ``B`` prompts from the prompt set (families the teachers serve), roll out the
student from noise on the teachers' sigma grid without grad (SDE noise for Flow-OPD), query the
planned states (each row with its own prompt; routed by label or averaged), one Adam step on the
method's loss.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from services.teacher.diffusers_backend import DiffusersBackend
from student.latent.rollout import rollout, sample, student_field
from student.latent.teachers import LatentSetupError, LocalLatentTeachers, family_routes
from student.latent.world import SHAPE, World, eval_labels, metrics_of, target_families
from student.methods import METHODS


@dataclass
class LatentConfig:
    """One latent OPD run (defaults sized for 2 CPU cores: a minute or so per run)."""

    method: str
    teachers: list[str] = field(default_factory=lambda: ["a", "b"])
    supervise: str = "router"  # "router" (label routing) | "average"
    steps: int = 300
    batch: int = 32
    rollout_steps: int = 8
    lr: float = 3e-4
    seed: int = 123
    guidance_scale: float | None = None  # classifier-free guidance in the teacher query
    eval_per_family: int = 128
    eval_steps: int = 16
    eval_seed: int = 2024

    @classmethod
    def of(cls, s: Any, method: str, teachers: list[str], supervise: str, **more: Any):
        """A run of ``method`` with the recipe flags (batch, rollout steps, lr, seed, guidance)
        of a command's settings ``s``; ``more`` sets the rest (steps, evaluation)."""
        recipe = ("batch", "rollout_steps", "lr", "seed", "guidance_scale")
        return cls(
            method=method,
            teachers=teachers,
            supervise=supervise,
            **{k: getattr(s, k) for k in recipe},
            **more,
        )


def check_setup(
    cfg: LatentConfig, student: DiffusersBackend, teachers: DiffusersBackend, world: World
) -> list[int]:
    """Refuse before step 1 what would fail later; returns the prompt families.

    Raises:
        LatentSetupError: unknown method, a family no teacher serves, a student whose time
            convention (scheduler grid) or state shape differs from the teachers', prompt
            embeddings that do not fit the models' conditioning inputs.
    """
    if cfg.method not in METHODS:
        raise LatentSetupError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    try:
        families = target_families(cfg.teachers)
    except ValueError as exc:
        raise LatentSetupError(str(exc)) from None
    family_routes(cfg.teachers, families)
    if student.time_convention != teachers.time_convention:
        raise LatentSetupError(
            f"the student's time convention {student.time_convention} differs from the "
            f"teachers' {teachers.time_convention}: their scheduler grids differ"
        )
    s, t = student.state_spec(), teachers.state_spec()
    if s.shape != t.shape or student.check_state(SHAPE) or teachers.check_state(SHAPE):
        raise LatentSetupError(
            f"student state {s.describe()} does not fit the teachers' {t.describe()} at {SHAPE}"
        )
    prompt = world.cond(torch.tensor(families[:1]))
    for who, model in (("student", student), ("teachers", teachers)):
        for spec in model.cond_specs():
            got = prompt.get(spec.name)
            if got is None or not spec.fits(tuple(got.shape[1:])):
                have = "none" if got is None else list(got.shape[1:])
                raise LatentSetupError(
                    f"the prompt set's {spec.name} is {have} per prompt; the {who} take "
                    f"{spec.describe()}"
                )
    return families


def evaluate(
    field_, world: World, families: list[int], sigmas_eval: list[float], cfg: LatentConfig
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """The world's evaluation of ``field_`` on ``eval_per_family`` prompts of each family:
    ``(metrics, samples [n, C, H, W], labels [n])``."""
    labels = eval_labels(families, cfg.eval_per_family)
    samples = sample(field_, world, labels, sigmas_eval, cfg.eval_seed)
    return metrics_of(world, samples, labels), samples, labels


def train_latent(
    cfg: LatentConfig,
    student: DiffusersBackend,
    teachers: DiffusersBackend,
    world: World,
    sigmas: list[float],
    sigmas_eval: list[float],
    log=None,
    client=None,
) -> dict[str, Any]:
    """Run ``cfg.steps`` OPD steps on ``student`` (trained in place); return a report with the
    metrics, counts and timings (rollout / query / update seconds).

    ``teachers`` is the in-process teacher backend (the setup checks read its convention and
    shape); ``client`` answers the queries instead of it when given (e.g.
    :class:`student.latent.http.HttpLatentTeachers`, the same teachers served).
    """
    families = check_setup(cfg, student, teachers, world)
    method = METHODS[cfg.method]
    if client is None:
        client = LocalLatentTeachers(
            teachers, cfg.teachers, world, cfg.supervise, cfg.guidance_scale
        )
    n, b = len(sigmas) - 1, cfg.batch
    fams = torch.tensor(families)
    torch.manual_seed(cfg.seed)
    model = student.transformer.train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    f_student = student_field(student)
    timings = {"rollout": 0.0, "query": 0.0, "update": 0.0}
    queries, losses = 0, []
    wall0 = time.perf_counter()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        plan = method.plan(n)
        labels = fams[torch.randint(0, len(fams), (b,))]
        cond = world.cond(labels)
        states, _ = rollout(
            f_student, torch.randn(b, *SHAPE), cond, sigmas, method.sde_noise, final=False
        )
        t1 = time.perf_counter()
        xs = states[plan].reshape(-1, *SHAPE)  # [len(plan)·B, C, H, W], plan-major
        ts = torch.cat([torch.full((b,), sigmas[i]) for i in plan])
        rows = labels.repeat(len(plan))
        answer = client.query(xs, ts, rows, anchor=method.uses_anchor)
        t2 = time.perf_counter()
        row_cond = {k: c.repeat(len(plan), *([1] * (c.ndim - 1))) for k, c in cond.items()}
        loss = method.loss(f_student(xs, ts, row_cond), ts, answer.v, answer.v_anchor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t3 = time.perf_counter()
        for k, dt in zip(timings, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            timings[k] += dt
        queries += len(xs)
        losses.append(float(loss.detach()))
        if log is not None and (step % 50 == 0 or step == cfg.steps - 1):
            log(f"  {cfg.method}/{cfg.supervise} step {step}: loss {losses[-1]:.4f}")
    model.eval().requires_grad_(False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    timings["wall"] = time.perf_counter() - wall0
    t_eval = time.perf_counter()
    metrics, samples, labels = evaluate(f_student, world, families, sigmas_eval, cfg)
    timings["eval"] = time.perf_counter() - t_eval
    return {
        "samples": samples,  # [n, C, H, W], not JSON: the caller draws and drops them
        "labels": labels,
        "config": asdict(cfg),
        "metrics": metrics,
        "counts": {"rollouts": cfg.steps * b, "teacher_queries": queries},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "param_change_l2": float((after - before).norm()),
    }
