"""What the OPD trainer needs of a student besides the method: its model, how its states are
drawn and rolled out, its prompts, and how a finished run is evaluated and saved.

The trainer (``student/trainer.py``) is one loop for every student: it plans, draws prompts,
rolls out, streams the planned states to the teachers, regresses and checkpoints through this
interface only. Two students implement it:

- :class:`RingStudent`: the toy world's ``VelocityNet``, states ``[B, 2]``, times
  ``t_i = 1 − i/N``, no conditioning (SPEC §2–§5);
- :class:`student.latent.train.LatentStudent`: a diffusers transformer, latents
  ``[B, C, H, W]``, the teachers' declared sigma grid, a prompt (conditioning and family
  label) per rollout (docs/latent-world.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from common.checkpoint import CheckpointMeta, TeacherRef, save_model
from common.nets import VelocityNet
from student.evaluate import evaluate
from student.report import plot_samples
from student.rollout import rollout, rollout_times

if TYPE_CHECKING:
    from student.clients import TeacherClient
    from student.trainer import TrainConfig

#: called with ``(i, x_i [B, *S], t_i)`` as soon as rollout state ``i`` exists
StateHook = Callable[[int, torch.Tensor, float], None]


class SetupError(ValueError):
    """A run that cannot start (its student, prompts and teachers do not fit): said before
    step 1, never as a failed step later."""


@dataclass(frozen=True)
class Prompts:
    """The prompts of ``B`` rollouts: what each is conditioned on and which task it is.

    ``labels [B]`` int64: each rollout's prompt family (label routing sends its states to that
    family's teacher); ``cond[name] [B, ...]``: the conditioning tensors, named as the models'
    forward names them.
    """

    labels: torch.Tensor
    cond: dict[str, torch.Tensor]

    def rows(self, rollouts: torch.Tensor) -> Prompts:
        """The prompts of rollouts ``rollouts [M]`` (indices into ``B``, repeats allowed)."""
        return Prompts(self.labels[rollouts], {k: c[rollouts] for k, c in self.cond.items()})


class Student(ABC):
    """A student the trainer can train: ``model`` is what Adam updates and checkpoints hold."""

    #: the world the student lives in ("ring" | "latent"): a resumed run must be in the same
    world: str
    model: nn.Module

    @abstractmethod
    def grid(self, num_steps: int) -> list[float]:
        """The ``num_steps + 1`` times ``t_0 = 1 > ... > t_N = 0`` of a rollout: state ``i`` is
        queried at ``t_i``. It must be the teachers' grid (checked by :meth:`check`)."""

    @abstractmethod
    def noise(self, b: int) -> torch.Tensor:
        """Starting noise ``[B, *S]`` from the global torch RNG."""

    def prompts(self, b: int, cfg: TrainConfig) -> Prompts | None:
        """The prompts of one step's ``b`` rollouts (global RNG), or None: unconditioned."""
        return None

    @abstractmethod
    def rollout(
        self,
        x: torch.Tensor,
        prompts: Prompts | None,
        grid: Sequence[float],
        sde_noise: float,
        on_state: StateHook,
    ) -> torch.Tensor:
        """The states ``[N, B, *S]`` before each Euler update of a rollout from ``x [B, *S]``
        (no grad; the last update is skipped: OPD queries only the states before updates)."""

    @abstractmethod
    def velocity(self, x: torch.Tensor, t: torch.Tensor, prompts: Prompts | None) -> torch.Tensor:
        """The student's ``v [M, *S]`` at ``x [M, *S]``, ``t [M]``, each row conditioned on its
        row of ``prompts`` (with grad)."""

    def check(self, cfg: TrainConfig, client: TeacherClient) -> None:  # noqa: B027 - optional
        """Raise :class:`SetupError` if the student, its prompts and ``client``'s teachers do
        not fit (shape, conditioning, time grid, labels)."""

    @abstractmethod
    def finish(
        self,
        cfg: TrainConfig,
        client: TeacherClient,
        out: Path,
        refs: list[TeacherRef],
        base_meta: CheckpointMeta | None,
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Evaluate the trained student, save it and its samples figure in ``out``; return the
        report's metrics (``avg_target_logp``, ``teacher_mode_mass``, ``effective_modes`` and
        any more) and extra report keys."""


class RingStudent(Student):
    """The toy world's ``VelocityNet`` (``[B, 2]``, unconditioned, ``t_i = 1 − i/N``)."""

    world = "ring"

    def __init__(self, net: VelocityNet) -> None:
        self.model = net

    def grid(self, num_steps: int) -> list[float]:
        return [*rollout_times(num_steps), 0.0]

    def noise(self, b: int) -> torch.Tensor:
        return torch.randn(b, self.model.config.data_dim)

    def rollout(self, x, prompts, grid, sde_noise, on_state) -> torch.Tensor:
        # the ring's own rollout: a fixed h = 1/N, exactly as before the grid was general
        return rollout(self.model, x, len(grid) - 1, sde_noise, on_state, final=False)[0]

    def velocity(self, x, t, prompts) -> torch.Tensor:
        return self.model(x, t)

    def finish(self, cfg, client, out, refs, base_meta):
        net = self.model
        teacher_modes = [info.modes for info in client.teachers]
        metrics, samples = evaluate(
            net, teacher_modes, cfg.eval_samples, cfg.eval_steps, cfg.eval_seed
        )
        modes = sorted({m for ms in teacher_modes for m in ms})
        meta = save_model(
            out / "student.safetensors",
            net,
            CheckpointMeta(
                name=out.name,
                role="student",
                modes=modes,
                seed=cfg.seed,
                steps=cfg.steps,
                teachers=refs,
                training=training_meta(cfg, base_meta),
            ),
        )
        plot_samples(
            out / "samples.png",
            samples,
            modes,
            f"{cfg_title(cfg)} ({'+'.join(i.name for i in client.teachers)}, {cfg.supervise}, "
            f"{cfg.steps} steps)",
        )
        return metrics, {"student_digest": meta.digest}


def training_meta(cfg: TrainConfig, base_meta: CheckpointMeta | None) -> dict[str, Any]:
    """The recipe a saved student records (``training`` in its checkpoint metadata)."""
    return {
        "method": cfg.method,
        "supervise": cfg.supervise,
        "backend": cfg.backend,
        "lr": cfg.lr,
        "batch": cfg.batch,
        "rollout_steps": cfg.rollout_steps,
        "init": base_meta.digest if base_meta else None,
    }


def cfg_title(cfg: TrainConfig) -> str:
    from student.methods import METHODS

    return METHODS[cfg.method].title
