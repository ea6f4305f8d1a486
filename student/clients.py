"""How the trainer talks to teachers: a small client interface and its in-process implementation.

The trainer calls :meth:`TeacherClient.submit` for each queried rollout state as soon as it
exists, then takes the answers group by group from :meth:`TeacherClient.collect_parts`. A remote
client sends on submit (streaming; one group per request) and hands each group over as soon as
its request is answered, so the trainer's update of one group overlaps the teachers' work on the
next; the in-process client answers all of one step's states as one group, with one batched
forward per teacher.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from common import routing
from common.checkpoint import CheckpointMeta
from common.nets import VelocityNet


@dataclass
class TeacherInfo:
    """A teacher as the trainer sees it: name, digest, served version and its mode centers."""

    name: str
    digest: str
    version: str = "1"
    modes: list[int] = field(default_factory=list)
    centers: torch.Tensor | None = None  # [M, D]

    @classmethod
    def from_meta(cls, meta: CheckpointMeta, name: str | None = None, version: str = "1"):
        centers = (
            torch.tensor(meta.mode_centers, dtype=torch.float32) if meta.mode_centers else None
        )
        return cls(name or meta.name, meta.digest, version, list(meta.modes), centers)


@dataclass
class Answer:
    """Teachers' answer for one submitted batch of states, or for some rows of a step.

    ``v [B, D]`` supervised target; ``teacher [B]`` index of the teacher that answered each row
    (``-1`` = mean of all); ``v_anchor [B, D]`` the anchor's velocity when one is configured.
    ``rows`` int64 ``[B]``: which of the step's submitted states (counted in submit order) these
    are, when a client hands answers over out of that order (teacher by teacher, or several
    requests' answers merged); ``None``: the next ones in submit order.
    """

    v: torch.Tensor
    teacher: torch.Tensor
    v_anchor: torch.Tensor | None = None
    rows: torch.Tensor | None = None


@dataclass
class RequestSpan:
    """One request as the client saw it (``perf_counter`` seconds) and as the server reported it."""

    start: float
    end: float
    states: int
    server_queue_s: float = 0.0
    server_compute_s: float = 0.0
    server_total_s: float = 0.0  # the answering service's own wall time for the request


@dataclass
class QueryCost:
    """What the answers of one :meth:`TeacherClient.collect` cost. Zero where it does not apply."""

    states: int = 0
    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    latency_s: float = 0.0  # sum over requests of submit → answer
    server_queue_s: float = 0.0  # as the servers report it
    server_compute_s: float = 0.0  # teacher forward time (in-process: the forward itself)
    transport_s: float = 0.0  # latency minus the server's own time: wire + (de)serialisation
    versions: dict[str, str] = field(default_factory=dict)
    #: the checkpoint digest each teacher answered from: a version counts loads per server
    #: process, so only the digest says which weights supervised the step
    digests: dict[str, str] = field(default_factory=dict)
    spans: list[RequestSpan] = field(default_factory=list)

    def add(self, other: QueryCost) -> None:
        """Fold ``other`` (a later group of the same step) into this cost."""
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.versions.update(other.versions)
        self.digests.update(other.digests)
        self.spans.extend(other.spans)


#: the :class:`QueryCost` fields that add up over the groups of a step
_SUMMED = (
    "states",
    "requests",
    "bytes_sent",
    "bytes_received",
    "latency_s",
    "server_queue_s",
    "server_compute_s",
    "transport_s",
)


def in_submit_order(answers: list[Answer]) -> Answer:
    """One :class:`Answer` for all the rows of ``answers`` (a step's groups), in submit order."""
    total = sum(a.v.shape[0] for a in answers)
    rows, row = [], 0
    for a in answers:
        k = a.v.shape[0]
        rows.append(a.rows if a.rows is not None else torch.arange(row, row + k))
        row += k
    order = torch.cat(rows)
    if not torch.equal(torch.sort(order).values, torch.arange(total)):
        raise RuntimeError(f"the answers do not cover the {total} submitted states exactly once")

    def gather(parts: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype)
        out[order] = torch.cat(parts)
        return out

    va = [a.v_anchor for a in answers]
    return Answer(
        gather([a.v for a in answers]),
        gather([a.teacher for a in answers]),
        None if any(v is None for v in va) else gather(va),  # type: ignore[arg-type]
    )


class TeacherUnavailable(RuntimeError):
    """The teachers could not be reached within the retry budget; the message names the endpoint."""


class TeacherClient(ABC):
    """The trainer's only view of the teachers."""

    teachers: list[TeacherInfo]
    anchor: TeacherInfo | None

    @abstractmethod
    def submit(self, x: torch.Tensor, t: torch.Tensor, last: bool = False) -> None:
        """Queue states ``x [B, D]`` at times ``t [B]`` for supervision (may send right away).

        ``last``: no more states come this step, so nothing buffered should wait for more.
        """

    @abstractmethod
    def collect_parts(self) -> Iterator[tuple[list[Answer], QueryCost]]:
        """Every submitted batch's answer, in submit order, in groups as they become ready.

        Each item is one group of answers and what that group cost: consecutive answers (a
        remote client: one request's), or one :class:`Answer` with ``rows`` (a remote client:
        whatever answers are in, routed in-process each teacher's rows as soon as that teacher
        answered); iterating blocks only until the next group is there. Raises :class:`TeacherUnavailable`
        where a group cannot be had; by then nothing submitted is still running.
        """

    def collect(self) -> tuple[list[Answer], QueryCost]:
        """Block until every submitted batch is answered; answers come in submit order (one per
        batch; where groups named their rows, one :class:`Answer` for all the states)."""
        answers: list[Answer] = []
        cost = QueryCost()
        for part, part_cost in self.collect_parts():
            answers += part
            cost.add(part_cost)
        if any(a.rows is not None for a in answers):
            answers = [in_submit_order(answers)]
        return answers, cost

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, threads, pools."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalTeacherClient(TeacherClient):
    """In-process teachers: no network, the correctness and speed reference.

    All states submitted for one step are routed together and each teacher runs one batched
    forward over its own rows.
    """

    def __init__(
        self,
        teachers: list[tuple[VelocityNet, TeacherInfo]],
        policy: str = "nearest",
        anchor: tuple[VelocityNet, TeacherInfo] | None = None,
    ) -> None:
        if policy not in routing.POLICIES:
            raise routing.RoutingError(f"unknown policy {policy!r}")
        self._nets = [net for net, _ in teachers]
        self.teachers = [info for _, info in teachers]
        self._anchor_net = anchor[0] if anchor else None
        self.anchor = anchor[1] if anchor else None
        self.policy = policy
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def submit(self, x: torch.Tensor, t: torch.Tensor, last: bool = False) -> None:
        self._pending.append((x, t))

    def collect_parts(self) -> Iterator[tuple[list[Answer], QueryCost]]:
        """All of one step's states in one group: routed together, one forward per teacher."""
        if self._pending:
            yield self._answer_all()

    @torch.no_grad()
    def _answer_all(self) -> tuple[list[Answer], QueryCost]:
        pending, self._pending = self._pending, []
        sizes = [x.shape[0] for x, _ in pending]
        x = torch.cat([p[0] for p in pending])
        t = torch.cat([p[1] for p in pending])
        start = time.perf_counter()
        assignment = routing.assign(self.policy, x, [i.centers for i in self.teachers])
        rows = routing.rows_by_teacher(assignment, len(self._nets))
        outs = [
            net(x[idx], t[idx]) if idx.numel() else x[:0]
            for net, idx in zip(self._nets, rows, strict=True)
        ]
        v = routing.merge_answers(assignment, rows, outs, x.shape[1])
        v_anchor = self._anchor_net(x, t) if self._anchor_net is not None else None
        elapsed = time.perf_counter() - start
        answers = [
            Answer(v_k, a_k.to(torch.int32), None if v_anchor is None else va_k)
            for v_k, a_k, va_k in zip(
                v.split(sizes),
                assignment.split(sizes),
                v_anchor.split(sizes) if v_anchor is not None else [None] * len(sizes),
                strict=True,
            )
        ]
        infos = self.teachers + ([self.anchor] if self.anchor else [])
        cost = QueryCost(
            states=x.shape[0],
            latency_s=elapsed,
            server_compute_s=elapsed,
            versions={i.name: i.version for i in infos},
            digests={i.name: i.digest for i in infos},
        )
        return answers, cost
