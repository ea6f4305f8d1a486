"""``VelocityNet``: the velocity field ``v(x, t)`` used by students and teachers (SPEC §2)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, Field
from torch import nn


class NetConfig(BaseModel):
    """Architecture of a ``VelocityNet``; stored in every checkpoint's metadata.

    The default is the toy network: 18 → 128 → 128 → 128 → 2 with SiLU, 35,714 parameters.
    """

    data_dim: int = Field(2, ge=1, description="state dimension D")
    width: int = Field(128, ge=1, description="hidden width")
    depth: int = Field(3, ge=1, description="number of hidden layers")
    frequencies: int = Field(8, ge=0, description="time features f_j = 2^j π, j < frequencies")


class VelocityNet(nn.Module):
    """MLP velocity field on ``[x, sin(t·f), cos(t·f)]``.

    ``forward(x [B, D], t [B]) -> v [B, D]``.
    """

    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetConfig()
        c = self.config
        freqs = (2.0 ** torch.arange(c.frequencies, dtype=torch.float32)) * math.pi
        # A buffer (not a parameter): moves with .to(device) but is not trained or checkpointed.
        self.register_buffer("freqs", freqs, persistent=False)
        layers: list[nn.Module] = []
        in_dim = c.data_dim + 2 * c.frequencies
        for _ in range(c.depth):
            layers += [nn.Linear(in_dim, c.width), nn.SiLU()]
            in_dim = c.width
        layers.append(nn.Linear(in_dim, c.data_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity at states ``x [B, D]`` and times ``t [B]``; returns ``[B, D]``."""
        tf = t.reshape(-1, 1) * self.freqs  # [B, F]
        return self.mlp(torch.cat([x, tf.sin(), tf.cos()], dim=1))


def num_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
