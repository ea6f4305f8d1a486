"""Euler rollouts of a velocity field from noise (``t = 1``) to data (``t = 0``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

#: Called with ``(i, x_i [B, D], t_i)`` as soon as rollout state ``i`` exists.
StateHook = Callable[[int, torch.Tensor, float], None]


def rollout_times(num_steps: int) -> list[float]:
    """``t_i = 1 − i/N`` for ``i = 0..N−1``: the time of the state before each Euler update."""
    return [1.0 - i / num_steps for i in range(num_steps)]


@torch.no_grad()
def rollout(
    net: nn.Module,
    x: torch.Tensor,
    num_steps: int,
    sde_noise: float = 0.0,
    on_state: StateHook | None = None,
    final: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate ``x ← x − h·v(x, t)`` from ``t = 1`` in ``num_steps`` Euler steps.

    Args:
        net: velocity field ``v(x [B, D], t [B]) -> [B, D]``.
        x: starting noise, ``[B, D]``.
        sde_noise: if > 0, add ``sde_noise · sqrt(h) · N(0, I)`` after every step but the last
            (drawn from the global torch RNG, so a seeded run is reproducible).
        on_state: called with each recorded state as soon as it exists (for streaming).
        final: take the last Euler update. OPD training queries only the states before each
            update, so it passes False and saves one student forward per rollout; the states,
            and the RNG draws, are the same either way.
    Returns:
        ``states [N, B, D]`` (the state before each update) and the final sample ``[B, D]``
        (with ``final=False``: the last recorded state, ``states[N-1]``).
    """
    h = 1.0 / num_steps
    states = torch.empty((num_steps, *x.shape), dtype=x.dtype)
    for i, t in enumerate(rollout_times(num_steps)):
        states[i] = x
        if on_state is not None:
            on_state(i, states[i], t)
        if not final and i == num_steps - 1:
            break
        x = x - h * net(x, torch.full((x.shape[0],), t, dtype=x.dtype))
        if sde_noise > 0 and i < num_steps - 1:
            x = x + sde_noise * math.sqrt(h) * torch.randn_like(x)
    return states, x


@torch.no_grad()
def sample(
    net: nn.Module, n: int, num_steps: int, generator: torch.Generator | None = None, dim: int = 2
) -> torch.Tensor:
    """``n`` ODE samples with ``num_steps`` Euler steps from ``N(0, I)`` noise; ``[n, dim]``."""
    x = torch.randn(n, dim, generator=generator)
    return rollout(net, x, num_steps)[1]
