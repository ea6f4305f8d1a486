"""The latent world's in-process teachers: LoRA adapters on one base, routed by prompt label.

Routing uses the router service's own functions (``common/routing.py``), so a state goes to the
same teacher in-process as over HTTP: ``label`` sends each row to the teacher of its prompt's
family, ``average`` gives every row the mean of all teachers. The anchor (Flow-OPD's frozen
base) is the base model itself, adapter ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.routing import assign_rows, merge_rows, split_rows
from services.teacher.diffusers_backend import DiffusersBackend
from student.latent.world import TEACHER_FAMILIES, World


class LatentSetupError(ValueError):
    """A latent OPD run that cannot start (a label no teacher serves, ...): said before step 1."""


def family_routes(teachers: Sequence[str], families: Sequence[int]) -> dict[int, int]:
    """Teacher index (in ``teachers``) of each prompt family in ``families``.

    Raises:
        LatentSetupError: a family no named teacher serves.
    """
    routes = {f: k for k, name in enumerate(teachers) for f in TEACHER_FAMILIES[name]}
    missing = [f for f in families if f not in routes]
    if missing:
        raise LatentSetupError(
            f"prompt family {missing[0]} has no teacher among {', '.join(teachers)} "
            f"(their families: {', '.join(f'{t}={list(TEACHER_FAMILIES[t])}' for t in teachers)})"
        )
    return routes


@dataclass
class LatentQuery:
    """What the teachers answered for ``M`` states."""

    v: torch.Tensor  # [M, C, H, W] the supervised target
    teacher: torch.Tensor  # [M] int64: the teacher index of each row (-1: averaged)
    v_anchor: torch.Tensor | None = None  # [M, C, H, W] the base's velocity, when asked


class LocalLatentTeachers:
    """Teachers ``names`` (adapters of ``backend``) answering label-routed latent queries."""

    def __init__(
        self,
        backend: DiffusersBackend,
        names: Sequence[str],
        world: World,
        supervise: str = "router",
        guidance_scale: float | None = None,
    ) -> None:
        self.backend, self.names, self.world = backend, list(names), world
        self.policy = {"router": "label", "average": "average"}[supervise]
        self.guidance_scale = guidance_scale
        self.routes = family_routes(
            self.names, [f for n in self.names for f in TEACHER_FAMILIES[n]]
        )

    def route(self, labels: torch.Tensor) -> np.ndarray:
        """Teacher index per row of prompt families ``labels [M]`` (``-1`` rows: averaged)."""
        route = np.array([self.routes[int(f)] for f in labels], dtype=np.int64)
        x_stub = np.empty((len(labels), 1), dtype=np.float32)  # label routing reads no values
        return assign_rows(self.policy, x_stub, len(self.names), lambda: None, route)

    def query(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, anchor: bool = False
    ) -> LatentQuery:
        """Supervised velocities at states ``x [M, C, H, W]``, times ``t [M]``, prompts
        ``labels [M]`` (their conditioning is the world's), plus the base's when ``anchor``."""
        owner = self.route(labels)
        rows = split_rows(owner, len(self.names))
        cond = self.world.cond(labels)
        answers = []
        for name, idx in zip(self.names, rows, strict=True):
            if len(idx) == 0:
                answers.append(np.empty((0, *x.shape[1:]), dtype=np.float32))
                continue
            i = torch.from_numpy(idx)
            part = {k: c[i] for k, c in cond.items()}
            v = self.backend.forward(x[i], t[i], part, name, self.guidance_scale)
            answers.append(v.numpy())
        v = torch.from_numpy(merge_rows(owner, rows, answers, tuple(x.shape[1:])))
        v_anchor = None
        if anchor:
            v_anchor = self.backend.forward(x, t, cond, None, self.guidance_scale).clone()
        return LatentQuery(v, torch.from_numpy(owner), v_anchor)
