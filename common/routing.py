"""Routing policies as pure functions: which teacher supervises each state, and how answers merge.

Shared by the in-process teacher client and the router service, so both route identically.
Shapes: ``B`` states of dimension ``D``; ``K`` teachers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

Policy = Literal["nearest", "label", "average"]
POLICIES: tuple[str, ...] = ("nearest", "label", "average")
#: ``teacher`` index reported for rows supervised by the mean of all teachers.
AVERAGE_INDEX = -1


class RoutingError(ValueError):
    """A routing request that cannot be honoured; the message says why."""


def route_nearest(x: torch.Tensor, teacher_centers: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Each state goes to the teacher whose nearest own mode center is closest.

    Args:
        x: states, ``[B, D]``.
        teacher_centers: per teacher its mode centers ``[M_k, D]`` (``None`` if it has none).
    Returns:
        ``[B]`` int64 teacher indices; ties go to the lower index.
    Raises:
        RoutingError: a teacher has no mode centers, or their dimension differs from ``x``'s.
    """
    for k, centers in enumerate(teacher_centers):
        if centers is None or centers.numel() == 0:
            raise RoutingError(
                f"policy 'nearest' needs mode centers for every teacher; teacher {k} has none "
                "(use policy 'label' or 'average', or register the teacher with modes)"
            )
        if centers.shape[-1] != x.shape[1]:
            raise RoutingError(
                f"teacher {k} mode centers have dimension {centers.shape[-1]}, states have {x.shape[1]}"
            )
    if len(teacher_centers) == 1:  # one teacher owns every state: no distances needed
        return torch.from_numpy(np.zeros(x.shape[0], dtype=np.int64))
    # numpy: with M a handful of centers this is microseconds of work, and a torch call costs
    # several times a numpy call's overhead on the router's hot path.
    per_teacher = [
        c.numpy().astype(np.float32, copy=False) for c in teacher_centers if c is not None
    ]
    all_centers = np.concatenate(per_teacher)  # [M, D], M = all teachers' centers
    owners = np.repeat(np.arange(len(per_teacher)), [len(c) for c in per_teacher])  # [M] teacher
    xs = x.numpy().astype(np.float32, copy=False)
    # ||x − c||² = ||x||² − 2 x·c + ||c||², and ||x||² is the same for every center of a row:
    # the argmin needs only ||c||² − 2 x·c, one [B, M] matrix product.
    # Over all teachers' centers in teacher order: argmin picks the first minimum, so ties go to
    # the lower teacher index, as a per-teacher min would.
    nearest = ((all_centers * all_centers).sum(axis=1) - 2.0 * (xs @ all_centers.T)).argmin(axis=1)
    return torch.from_numpy(owners[nearest])


def route_label(
    route: torch.Tensor | None, num_teachers: int, fallback: torch.Tensor | None = None
) -> torch.Tensor:
    """Use the caller's labels; ``-1`` rows take ``fallback`` (e.g. the nearest assignment).

    Args:
        route: ``[B]`` integer labels in ``[-1, num_teachers)``.
        fallback: ``[B]`` assignment for rows labelled ``-1``.
    Returns:
        ``[B]`` int64 teacher indices.
    """
    if route is None:
        raise RoutingError(
            "policy 'label' needs the 'route' input (INT32 [B], teacher index per row)"
        )
    route = route.long().reshape(-1)
    bad = (route < -1) | (route >= num_teachers)
    if bool(bad.any()):
        raise RoutingError(
            f"route labels must lie in [-1, {num_teachers - 1}]; got {int(route[bad][0])}"
        )
    unset = route == -1
    if bool(unset.any()):
        if fallback is None:
            raise RoutingError("route has -1 rows but no policy can decide them")
        route = torch.where(unset, fallback.long(), route)
    return route


def assign(
    policy: str,
    x: torch.Tensor,
    teacher_centers: Sequence[torch.Tensor | None],
    route: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher index per state, ``[B]`` int64, or all ``AVERAGE_INDEX`` for the average policy.

    With ``route`` given, rows labelled ``>= 0`` go to that teacher under every policy but
    ``average``; ``-1`` rows are left to the policy.
    """
    k = len(teacher_centers)
    if k == 0:
        raise RoutingError("no teachers are registered")
    if policy == "average":
        return torch.full((x.shape[0],), AVERAGE_INDEX, dtype=torch.long)
    if policy == "nearest":
        nearest = route_nearest(x, teacher_centers)
        return nearest if route is None else route_label(route, k, fallback=nearest)
    if policy == "label":
        return route_label(route, k)
    raise RoutingError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")


def rows_by_teacher(assignment: torch.Tensor, num_teachers: int) -> list[torch.Tensor]:
    """Row indices per teacher (``[n_k]`` int64 each); every teacher gets all rows for average."""
    # numpy for the bookkeeping: a torch call costs several times a numpy call's overhead, and
    # this runs once per request on the router's (or the in-client router's) hot path.
    a = assignment.numpy()
    b = len(a)
    if num_teachers == 1:  # its rows are all rows, whether routed to it (0) or averaged (-1)
        return [torch.from_numpy(np.arange(b))]
    first, last = (int(a.min()), int(a.max())) if b else (0, 0)
    if first == last:  # every row to one teacher (or all averaged): no index search
        everything = torch.from_numpy(np.arange(b))
        if first == AVERAGE_INDEX:
            return [everything] * num_teachers
        empty = everything[:0]
        return [everything if k == first else empty for k in range(num_teachers)]
    # One stable sort groups the rows by teacher, in row order within each group.
    order = np.argsort(a, kind="stable")
    bounds = np.cumsum(np.bincount(a, minlength=num_teachers)[:num_teachers])[:-1]
    return [torch.from_numpy(part) for part in np.split(order, bounds)]


def merge_answers(
    assignment: torch.Tensor,
    rows: Sequence[torch.Tensor],
    answers: Sequence[torch.Tensor],
    dim: int,
) -> torch.Tensor:
    """Scatter each teacher's answer ``[n_k, D]`` back to its rows; average mode takes the mean.

    Returns:
        ``[B, D]`` supervised targets.
    """
    a = assignment.numpy()
    b = len(a)
    if b and a[0] == AVERAGE_INDEX and (a == AVERAGE_INDEX).all():
        return torch.stack(list(answers), dim=0).mean(dim=0)
    out = np.empty((b, dim), dtype=np.float32)
    for idx, ans in zip(rows, answers, strict=True):
        if len(idx):
            out[idx.numpy()] = ans.numpy()
    return torch.from_numpy(out)
