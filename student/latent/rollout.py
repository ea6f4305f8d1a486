"""Euler rollouts of a conditioned diffusers velocity field on the teachers' sigma grid.

The ring's rollout (``student/rollout.py``) steps on ``t_i = 1 − i/N`` with a fixed ``h``; here
the grid is the scheduler's (``sigma_0 = 1 > ... > sigma_N = 0``, with diffusers' shift), so the
step size varies: ``x ← x − (sigma_i − sigma_{i+1})·v(x, sigma_i)``, exactly
``FlowMatchEulerDiscreteScheduler.step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from student.latent.models import velocity
from student.latent.world import SHAPE, World

#: ``v [B, C, H, W] = field(x [B, C, H, W], t [B], cond)``: a student or a teacher (+ adapter)
VelocityField = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
#: called with ``(i, x_i [B, C, H, W], sigma_i)`` as soon as rollout state ``i`` exists
StateHook = Callable[[int, torch.Tensor, float], None]


@torch.no_grad()
def rollout(
    field: VelocityField,
    x: torch.Tensor,
    cond: dict[str, torch.Tensor],
    sigmas: Sequence[float],
    sde_noise: float = 0.0,
    on_state: StateHook | None = None,
    final: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate from ``x [B, C, H, W]`` (noise at ``sigmas[0]``) over ``N = len(sigmas) − 1``
    Euler steps with conditioning ``cond[name] [B, ...]``.

    ``sde_noise > 0`` adds ``sde_noise · sqrt(h_i) · N(0, I)`` after every step but the last
    (global torch RNG: a seeded run is reproducible). ``final=False`` skips the last update
    (OPD queries only the states before each update).
    Returns ``states [N, B, C, H, W]`` (the state before each update) and the final sample.
    """
    n = len(sigmas) - 1
    states = torch.empty((n, *x.shape), dtype=x.dtype)
    for i in range(n):
        states[i] = x
        if on_state is not None:
            on_state(i, states[i], sigmas[i])
        if not final and i == n - 1:
            break
        h = sigmas[i] - sigmas[i + 1]
        x = x - h * field(x, torch.full((len(x),), sigmas[i]), cond)
        if sde_noise > 0 and i < n - 1:
            x = x + sde_noise * math.sqrt(h) * torch.randn_like(x)
    return states, x


@torch.no_grad()
def sample(
    field: VelocityField,
    world: World,
    labels: torch.Tensor,
    sigmas: Sequence[float],
    seed: int,
    chunk: int = 512,
) -> torch.Tensor:
    """ODE samples ``[B, C, H, W]`` for prompts ``labels [B]`` from seeded noise (own generator)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), *SHAPE), generator=g)
    out = [
        rollout(field, noise[i : i + chunk], world.cond(labels[i : i + chunk]), sigmas)[1]
        for i in range(0, len(labels), chunk)
    ]
    return torch.cat(out)


def student_field(model) -> VelocityField:
    """The velocity field of a backend-wrapped student (with grad when enabled)."""
    return lambda x, t, cond: velocity(model, x, t, cond)


def teacher_field(
    teachers, adapter: str | None, guidance_scale: float | None = None
) -> VelocityField:
    """Teacher ``adapter`` (``None``: the base) of the in-process teacher backend, as served."""
    return lambda x, t, cond: teachers.forward(x, t, cond, adapter, guidance_scale)
