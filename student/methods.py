"""The three OPD methods as one data-driven table (SPEC §3), and their losses as pure functions."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def dense_plan(num_steps: int) -> list[int]:
    """Query every rollout state: indices ``0..N−1``."""
    return list(range(num_steps))


def dance_index(s: float, num_steps: int) -> int:
    """DanceOPD's query index ``min(N−1, max(1, floor(s·(N−1))))`` for ``s ∈ [0, 1]``."""
    return min(num_steps - 1, max(1, math.floor(s * (num_steps - 1))))


_BETA_5_2 = torch.distributions.Beta(torch.tensor(5.0), torch.tensor(2.0))


def single_plan(num_steps: int) -> list[int]:
    """One index per optimizer step, ``s ~ Beta(5, 2)``: leans to late, low-noise states."""
    return [dance_index(float(_BETA_5_2.sample()), num_steps)]


def flow_opd_weight(t: torch.Tensor) -> torch.Tensor:
    """Flow-OPD's time weight ``clamp(1.2 − t, 0.2, 1.2)``; ``t [M] -> [M]``."""
    return (1.2 - t).clamp(0.2, 1.2)


def gaussian_step_kl(
    v_student: torch.Tensor, v_teacher: torch.Tensor, dt: float, sigma: float
) -> torch.Tensor:
    """Closed-form KL between the Euler-step Gaussians ``N(x − dt·v, σ² I)`` of student and teacher.

    ``KL = ||μ_θ − μ_φ||² / (2σ²) = w(t)·||v_θ − v_φ||²`` with ``w = dt² / (2σ²)``.
    Inputs ``[M, *S]`` (the ring's ``[M, D]``, latents ``[M, C, H, W]``); returns ``[M]``.
    """
    return (dt**2 / (2 * sigma**2)) * (v_student - v_teacher).pow(2).flatten(1).sum(dim=1)


@dataclass(frozen=True)
class Method:
    """What distinguishes one OPD method from another; the trainer loop is shared."""

    name: str
    title: str
    sde_noise: float  # rollout noise scale (0 = ODE)
    plan: Callable[[int], list[int]]  # which rollout indices to query this step
    anchor_coef: float = 0.0  # weight of the pull toward the frozen base (0 = no anchor query)
    time_weight: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def uses_anchor(self) -> bool:
        return self.anchor_coef > 0

    def loss(
        self,
        v: torch.Tensor,
        t: torch.Tensor,
        v_teacher: torch.Tensor,
        v_anchor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over queried states of the per-state loss.

        ``mean_d`` is over every value of a state: ``[M, *S]`` states of any shape (the ring's
        ``[M, D]``; latents ``[M, C, H, W]``), ``flatten(1)`` being a no-op on ``[M, D]``.

        Args:
            v: student velocities ``[M, *S]`` (with grad); ``t``: their times ``[M]``.
            v_teacher: supervised targets ``[M, *S]``; ``v_anchor``: base velocities ``[M, *S]``.
        """
        per_state = (v - v_teacher).pow(2).flatten(1).mean(dim=1)
        if self.time_weight is not None:
            per_state = self.time_weight(t) * per_state
        if self.uses_anchor:
            if v_anchor is None:
                raise ValueError(f"{self.name} needs anchor velocities (v_anchor)")
            anchor = (v - v_anchor).pow(2).flatten(1).mean(dim=1)
            per_state = per_state + self.anchor_coef * anchor
        return per_state.mean()


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("diffusionopd", "DiffusionOPD dense", sde_noise=0.0, plan=dense_plan),
        Method(
            "flowopd",
            "Flow-OPD dense + anchor",
            sde_noise=0.05,
            plan=dense_plan,
            anchor_coef=0.02,
            time_weight=flow_opd_weight,
        ),
        Method("danceopd", "DanceOPD single query", sde_noise=0.0, plan=single_plan),
    )
}
