"""OPD at latent shapes: a diffusers transformer as the trainer's student.

There is one OPD loop, ``student/trainer.py``'s: :class:`LatentStudent` is what it needs of a
diffusers student (latents ``[B, C, H, W]``, the teachers' declared sigma grid with diffusers'
shift, a prompt per rollout drawn from the families the teachers serve, the world's evaluation),
so the latent world gets the ring's streaming HTTP client path, checkpoints, ``--resume``,
signals, steps log and trace unchanged. What the methods are comes from ``student/methods.py``,
routing from ``common/routing.py``.

Each step: draw ``B`` prompts (families the teachers serve), roll out the student from noise on
the sigma grid without grad (SDE noise for Flow-OPD), stream the planned states with their
rollouts' prompts to the teachers (routed by label or averaged), one Adam step on the method's
loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from services.teacher.diffusers_backend import DiffusersBackend
from student.clients import TeacherClient
from student.latent.rollout import rollout, sample, student_field
from student.latent.teachers import (
    LatentSetupError,
    LocalLatentTeachers,
    TeacherContract,
    family_routes,
)
from student.latent.world import SHAPE, World, eval_labels, metrics_of, target_families
from student.methods import METHODS
from student.students import Prompts, Student
from student.trainer import TrainConfig, train

#: the latent recipe's defaults (sized for 2 CPU cores: a minute or so per run)
LATENT_DEFAULTS: dict[str, Any] = {
    "teachers": ["a", "b"],
    "steps": 300,
    "batch": 32,
    "rollout_steps": 8,
    "lr": 3e-4,
    "eval_samples": 128,  # per prompt family
    "eval_steps": 16,
    "eval_seed": 2024,
}


def latent_config(method: str, **fields: Any) -> TrainConfig:
    """A latent-world :class:`TrainConfig`: :data:`LATENT_DEFAULTS` under ``fields``."""
    return TrainConfig(world="latent", method=method, **(LATENT_DEFAULTS | fields))


def recipe_config(
    s: Any, method: str, teachers: list[str], supervise: str, **more: Any
) -> TrainConfig:
    """A run of ``method`` with the recipe flags (batch, rollout steps, lr, seed, guidance) of a
    command's settings ``s``; ``more`` sets the rest (steps, evaluation)."""
    recipe = ("batch", "rollout_steps", "lr", "seed", "guidance_scale")
    return latent_config(
        method,
        teachers=teachers,
        supervise=supervise,
        **{k: getattr(s, k) for k in recipe},
        **more,
    )


def check_setup(
    cfg: TrainConfig, student: DiffusersBackend, teachers: TeacherContract, world: World
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
    s, t = student.state_spec(), teachers.state
    if not t.fits(SHAPE) or student.check_state(SHAPE):
        raise LatentSetupError(
            f"the student's state {s.describe()} at {list(SHAPE)} does not fit the teachers' "
            f"{t.describe()}"
        )
    prompt = world.cond(torch.tensor(families[:1]))
    for who, specs in (("student takes", student.cond_specs()), ("teachers take", teachers.conds)):
        for spec in specs:
            got = prompt.get(spec.name)
            if got is None or not spec.fits(tuple(got.shape[1:])):
                have = "none" if got is None else list(got.shape[1:])
                raise LatentSetupError(
                    f"the prompt set's {spec.name} is {have} per prompt; the {who} "
                    f"{spec.describe()}"
                )
    return families


class LatentStudent(Student):
    """A diffusers transformer (``backend``, trained in place: full fine-tune) in the latent
    world ``data``; ``sched``: the scheduler config the teachers declare (its sigmas, shift
    included, are the rollout grid)."""

    world = "latent"

    def __init__(self, backend: DiffusersBackend, data: World, sched: dict[str, Any]) -> None:
        self.backend, self.data, self.sched = backend, data, sched
        self.model = backend.transformer
        self.field = student_field(backend)
        #: the last evaluation's ``(samples [n, C, H, W], labels [n])``, for callers' figures
        self.samples: tuple[torch.Tensor, torch.Tensor] | None = None

    def grid(self, num_steps: int) -> list[float]:
        from student.latent.models import sigma_grid

        return sigma_grid(self.sched, num_steps)

    def noise(self, b: int) -> torch.Tensor:
        return torch.randn(b, *SHAPE)

    def prompts(self, b: int, cfg: TrainConfig) -> Prompts:
        fams = torch.tensor(target_families(cfg.teachers))
        labels = fams[torch.randint(0, len(fams), (b,))]
        return Prompts(labels, self.data.cond(labels))

    def rollout(self, x, prompts, grid, sde_noise, on_state) -> torch.Tensor:
        return rollout(self.field, x, prompts.cond, grid, sde_noise, on_state, final=False)[0]

    def velocity(self, x, t, prompts) -> torch.Tensor:
        return self.backend.velocity(x, t, prompts.cond)

    def check(self, cfg: TrainConfig, client: TeacherClient) -> None:
        contract = getattr(client, "contract", None)
        if contract is None:
            raise LatentSetupError(f"{type(client).__name__} does not serve latent teachers")
        check_setup(cfg, self.backend, contract(), self.data)

    def evaluate(self, cfg: TrainConfig) -> dict[str, float]:
        """The world's metrics on ``eval_samples`` prompts of each target family (sets
        :attr:`samples`)."""
        self.samples = evaluate_field(
            self.field, self.data, target_families(cfg.teachers), self.grid(cfg.eval_steps), cfg
        )
        return metrics_of(self.data, *self.samples)

    def finish(self, cfg, client, out, refs, base_meta):
        from student.latent.figures import plot_grid
        from student.latent.models import save_base

        m = self.evaluate(cfg)
        # a diffusers directory like the base's: `opd serve teacher --model-dir` serves it
        saved = save_base(self.model, out / "student")
        plot_grid(out / "samples.png", self.data, {f"student ({cfg.method})": self.samples})
        metrics = {
            "avg_target_logp": m["target_logp"],
            "teacher_mode_mass": m["family_mass"],
            "effective_modes": m["effective_modes"],
        }
        return metrics, {"latent_metrics": m, "student_dir": str(saved)}


def evaluate_field(
    field_, world: World, families: Sequence[int], sigmas_eval: list[float], cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``eval_samples`` ODE samples of ``field_`` for each family's prompts (the evaluation's
    own seed): ``(samples [n, C, H, W], labels [n])``."""
    labels = eval_labels(families, cfg.eval_samples)
    return sample(field_, world, labels, sigmas_eval, cfg.eval_seed), labels


def train_latent(
    cfg: TrainConfig,
    student: DiffusersBackend,
    world: World,
    sched: dict[str, Any],
    out: Path,
    client: TeacherClient | None = None,
    teachers: DiffusersBackend | None = None,
    progress: bool = False,
    resume: bool = False,
) -> tuple[dict[str, Any], LatentStudent]:
    """Run ``cfg`` on ``student`` (trained in place) through ``client``, or in-process
    ``teachers`` when no client is given; the run is written to ``out`` as the trainer writes
    every run. Returns the report and the :class:`LatentStudent` (its last samples)."""
    if client is None:
        if teachers is None:
            raise ValueError("give a client or the in-process teachers")
        client = LocalLatentTeachers(
            teachers,
            cfg.teachers,
            world,
            cfg.supervise,
            cfg.guidance_scale,
            anchor=METHODS[cfg.method].uses_anchor,
        )
    task = LatentStudent(student, world, sched)
    report = train(cfg, task, client, out, progress=progress, resume=resume)
    return report, task
