"""The latent world's in-process teachers: LoRA adapters on one base, routed by prompt label.

Routing uses the router service's own functions (``common/routing.py``), so a state goes to the
same teacher in-process as over HTTP: ``label`` sends each row to the teacher of its prompt's
family, ``average`` gives every row the mean of all teachers. The anchor (Flow-OPD's frozen
base) is the base model itself, adapter ``None``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.routing import assign_rows, merge_rows, split_rows
from services.teacher.backend import TensorSpec
from services.teacher.diffusers_backend import DiffusersBackend
from student.clients import Answer, QueryCost, TeacherClient, TeacherInfo
from student.latent.world import TEACHER_FAMILIES, World
from student.students import Prompts, SetupError

#: the anchor's name: the frozen base the adapters are fine-tunes of (the served model's name)
ANCHOR = "base"


class LatentSetupError(SetupError):
    """A latent OPD run that cannot start (a label no teacher serves, ...): said before step 1."""


@dataclass(frozen=True)
class TeacherContract:
    """What the teachers take, as the setup checks compare it with the student and prompts:
    their time convention (equal strings: the same scheduler grid), the state ``x`` (per-state
    shape, ``-1`` = any) and their conditioning inputs."""

    time_convention: str | None
    state: TensorSpec
    conds: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, backend: DiffusersBackend) -> TeacherContract:
        return cls(backend.time_convention, backend.state_spec(), backend.cond_specs())


def family_routes(teachers: Sequence[str], families: Sequence[int]) -> dict[int, int]:
    """Teacher index (in ``teachers``) of each prompt family in ``families``.

    Raises:
        LatentSetupError: a family no named teacher serves.
    """
    routes = {f: k for k, name in enumerate(teachers) for f in TEACHER_FAMILIES.get(name, ())}
    missing = [f for f in families if f not in routes]
    if missing:
        raise LatentSetupError(
            f"prompt family {missing[0]} has no teacher among {', '.join(teachers)} "
            f"(their families: "
            f"{', '.join(f'{t}={list(TEACHER_FAMILIES.get(t, ()))}' for t in teachers)})"
        )
    return routes


@dataclass
class LatentQuery:
    """What the teachers answered for ``M`` states."""

    v: torch.Tensor  # [M, C, H, W] the supervised target
    teacher: torch.Tensor  # [M] int64: the teacher index of each row (-1: averaged)
    v_anchor: torch.Tensor | None = None  # [M, C, H, W] the base's velocity, when asked


def teacher_infos(names: Sequence[str], digests: dict[str, str]) -> list[TeacherInfo]:
    """The trainer's view of latent teachers ``names``: their families stand for the ring's
    modes (what the report lists as each teacher's target)."""
    return [TeacherInfo(n, digests.get(n, ""), "1", list(TEACHER_FAMILIES[n])) for n in names]


class LocalLatentTeachers(TeacherClient):
    """Teachers ``names`` (adapters of ``backend``) answering label-routed latent queries;
    ``anchor``: also the base's velocity (Flow-OPD). The trainer's in-process client: a step's
    submitted states are answered together, one batched forward per teacher."""

    def __init__(
        self,
        backend: DiffusersBackend,
        names: Sequence[str],
        world: World,
        supervise: str = "router",
        guidance_scale: float | None = None,
        anchor: bool = False,
    ) -> None:
        self.backend, self.names, self.world = backend, list(names), world
        self.policy = {"router": "label", "average": "average"}[supervise]
        self.guidance_scale = guidance_scale
        self.routes = family_routes(
            self.names, [f for n in self.names for f in TEACHER_FAMILIES[n]]
        )
        self.teachers = teacher_infos(self.names, backend.adapter_digests)
        self.anchor = TeacherInfo(ANCHOR, backend.digest) if anchor else None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def contract(self) -> TeacherContract:
        return TeacherContract.of(self.backend)

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

    def submit(
        self, x: torch.Tensor, t: torch.Tensor, last: bool = False, prompts: Prompts | None = None
    ) -> None:
        if prompts is None:
            raise ValueError("latent teachers answer prompted states: give each state's prompts")
        self._pending.append((x, t, prompts.labels))

    def collect_parts(self) -> Iterator[tuple[list[Answer], QueryCost]]:
        """All of one step's states in one group (one forward per teacher, and the anchor's)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        x, t, labels = (torch.cat(part) for part in zip(*pending, strict=True))
        start = time.perf_counter()
        q = self.query(x, t, labels, anchor=self.anchor is not None)
        elapsed = time.perf_counter() - start
        infos = self.teachers + ([self.anchor] if self.anchor else [])
        cost = QueryCost(
            states=len(x),
            latency_s=elapsed,
            server_compute_s=elapsed,
            versions={i.name: i.version for i in infos},
            digests={i.name: i.digest for i in infos},
        )
        yield [Answer(q.v, q.teacher.to(torch.int32), q.v_anchor)], cost
