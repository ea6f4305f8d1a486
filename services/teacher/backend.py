"""The teacher backend seam: what a model behind the teacher service must provide.

A backend turns states ``x [B, *S]``, times ``t [B]`` and named conditioning tensors into
velocities ``v [B, *S]``, and describes its inputs (for ``GET /v2/models/{name}``) and its time
convention (routers refuse to mix teachers whose conventions differ).

Our convention, shared by every backend: ``t`` in [0, 1], ``x_t = (1 - t) x_0 + t eps`` and
``v = eps - x_0``; a sampler steps ``x <- x - h v`` from ``t = 1`` to ``t = 0``. A backend whose
model speaks another convention (diffusers' ``timestep = 1000 t``) converts inside ``forward``.

Backends: ``toy`` (:class:`ToyBackend`, the ``VelocityNet`` of SPEC §2) and ``diffusers``
(:mod:`services.teacher.diffusers_backend`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from common.nets import VelocityNet

#: the toy's convention: the network takes our ``t`` itself
TOY_TIME_CONVENTION = "flow-t"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, advertised datatype and shape *without* the batch dim
    (``-1``: any size)."""

    name: str
    shape: tuple[int, ...]
    datatype: str = "FP32"

    def metadata(self) -> dict:
        """The OIP v2 metadata entry: the shape with a leading batch dim ``-1``."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.shape]}

    def describe(self) -> str:
        """``name [B, d1, ...]`` as error messages write it (``-1`` shown as ``*``)."""
        dims = ", ".join("*" if d < 0 else str(d) for d in self.shape)
        return f"{self.name} [B{', ' if dims else ''}{dims}]"

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a per-row shape ``shape`` fits this spec (``-1`` matches any size)."""
        return len(shape) == len(self.shape) and all(
            want < 0 or want == got for want, got in zip(self.shape, shape, strict=True)
        )


class Backend(Protocol):
    """What the teacher core needs from a model."""

    kind: str  # "toy" | "diffusers"
    time_convention: str  # equal strings = teachers whose velocities may be mixed

    def state_spec(self) -> TensorSpec:
        """``x`` (and ``v``): per-state shape ``S`` and the model's datatype."""
        ...

    def cond_specs(self) -> tuple[TensorSpec, ...]:
        """The conditioning inputs, named after the model's arguments (may be empty)."""
        ...

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``v [B, *S]`` at ``x [B, *S]``, ``t [B]`` with ``cond[name] [B, ...]``."""
        ...


class ToyBackend:
    """The toy world's ``VelocityNet``: ``x [B, D]``, ``t [B]``, no conditioning.

    The uvicorn and Ray paths run toy models through :class:`~services.teacher.repository.
    LoadedModel`'s chunked numpy fast path; this class is the same model seen through the seam
    (metadata, convention, and a reference forward).
    """

    kind = "toy"
    time_convention = TOY_TIME_CONVENTION

    def __init__(self, net: VelocityNet) -> None:
        self.net = net

    def state_spec(self) -> TensorSpec:
        return TensorSpec("x", (self.net.config.data_dim,))

    def cond_specs(self) -> tuple[TensorSpec, ...]:
        return ()

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        with torch.inference_mode():
            return self.net(x, t)
