"""Routing policies as pure functions: which teacher supervises each state, and how answers merge.

Shared by the in-process teacher client and the router service, so both route identically.
Shapes: ``B`` states ``x [B, *S]`` (the toy world's ``[B, D]``; latents ``[B, C, H, W]``), of
``D = prod(S)`` values each; ``K`` teachers. Splitting and merging work on rows of any shape;
only ``nearest`` looks at the values, as vectors of dimension ``D``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from common.codec import bf16_to_float32, float32_to_bf16, is_bf16

Policy = Literal["nearest", "label", "average"]
POLICIES: tuple[str, ...] = ("nearest", "label", "average")
#: ``teacher`` index reported for rows supervised by the mean of all teachers.
AVERAGE_INDEX = -1


class RoutingError(ValueError):
    """A routing request that cannot be honoured; the message says why."""


@dataclass(frozen=True)
class NearestTable:
    """Every teacher's mode centers laid out once for :func:`nearest_owner` (a registry
    snapshot keeps one: its centers never change).

    ``weights`` float32 ``[M, D]`` holds ``−2 c`` for the ``M`` centers of all teachers in
    teacher order and ``sq`` float32 ``[M, 1]`` their ``||c||²``; ``spans`` gives each teacher's
    ``[start, end)`` rows. Teachers whose centers differ in dimension get ``weights=None``: no
    state can be routed then, and :func:`nearest_owner` says which teacher does not fit.
    """

    weights: np.ndarray | None
    sq: np.ndarray | None
    spans: tuple[tuple[int, int], ...]
    dims: tuple[int, ...]  # per teacher its centers' dimension


def nearest_table(teacher_centers: Sequence[torch.Tensor | np.ndarray | None]) -> NearestTable:
    """Lay out ``teacher_centers`` (per teacher ``[M_k, D]``) for :func:`nearest_owner`.

    Raises:
        RoutingError: a teacher has no mode centers.
    """
    per_teacher = []
    for k, centers in enumerate(teacher_centers):
        if centers is None or len(centers) == 0:
            raise RoutingError(
                f"policy 'nearest' needs mode centers for every teacher; teacher {k} has none "
                "(use policy 'label' or 'average', or register the teacher with modes)"
            )
        c = centers.numpy() if isinstance(centers, torch.Tensor) else np.asarray(centers)
        per_teacher.append(c.astype(np.float32, copy=False).reshape(len(c), -1))
    dims = tuple(int(c.shape[1]) for c in per_teacher)
    ends = np.cumsum([len(c) for c in per_teacher]).tolist()
    spans = tuple(zip([0, *ends[:-1]], ends, strict=True))
    if len(set(dims)) > 1:
        return NearestTable(None, None, spans, dims)
    centers = np.concatenate(per_teacher)  # [M, D]
    weights = np.ascontiguousarray(-2.0 * centers, dtype=np.float32)
    sq = (centers * centers).sum(axis=1, keepdims=True, dtype=np.float32)
    return NearestTable(weights, sq, spans, dims)


def nearest_owner(x: np.ndarray, table: NearestTable) -> np.ndarray:
    """Each state goes to the teacher whose nearest own mode center is closest.

    Args:
        x: states ``[B, D]`` or ``[B, *S]`` (compared as vectors of ``D = prod(S)`` values).
    Returns:
        ``[B]`` int64 teacher indices; ties go to the lower index.
    Raises:
        RoutingError: the centers' dimension differs from ``x``'s.
    """
    if x.ndim != 2 or x.dtype != np.float32:
        # latents [B, C, H, W] (a view when contiguous); FP16 / BF16 states routed in float32
        x = _float32(x.reshape(len(x), -1))
    d = x.shape[1]
    for k, dim in enumerate(table.dims):
        if dim != d:
            raise RoutingError(
                f"teacher {k} mode centers have dimension {dim}, states have {d} values each; "
                "states without mode centers of their size need label or average routing"
            )
    owner = np.zeros(len(x), dtype=np.int64)
    if len(table.spans) == 1:  # one teacher owns every state: no distances needed
        return owner
    assert table.weights is not None and table.sq is not None  # equal dims, checked above
    # ||x − c||² = ||x||² − 2 c·x + ||c||², and ||x||² is the same for every center of a state:
    # comparing ||c||² − 2 c·x is enough. [M, B], so each center's scores are one contiguous row
    # and the minimum over a teacher's centers is a few elementwise minimums, not a reduction
    # along a short axis (several times slower in numpy).
    scores = table.weights @ x.T + table.sq
    best = None
    for k, (lo, hi) in enumerate(table.spans):
        dist = scores[lo] if hi - lo == 1 else scores[lo:hi].min(axis=0)
        if best is None:
            best = dist
            continue
        closer = dist < best  # strict: a tie stays with the lower teacher index
        owner[closer] = k
        best = np.minimum(best, dist)
    return owner


def label_owner(
    route: np.ndarray | None, num_teachers: int, fallback: np.ndarray | None = None
) -> np.ndarray:
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
    route = np.asarray(route).astype(np.int64, copy=False).reshape(-1)
    bad = (route < -1) | (route >= num_teachers)
    if bad.any():
        raise RoutingError(
            f"route labels must lie in [-1, {num_teachers - 1}]; got {int(route[bad][0])}"
        )
    unset = route == -1
    if unset.any():
        if fallback is None:
            raise RoutingError("route has -1 rows but no policy can decide them")
        route = np.where(unset, fallback, route)
    return route


def assign_rows(
    policy: str,
    x: np.ndarray,
    num_teachers: int,
    nearest: Callable[[], NearestTable],
    route: np.ndarray | None = None,
) -> np.ndarray:
    """Teacher index per state, int64 ``[B]``, or all ``AVERAGE_INDEX`` for the average policy.

    ``nearest`` gives the centers' table (only asked for by the nearest policy). With ``route``
    given, rows labelled ``>= 0`` go to that teacher under every policy but ``average``;
    ``-1`` rows are left to the policy.
    """
    if num_teachers == 0:
        raise RoutingError("no teachers are registered")
    if policy == "average":
        return np.full(len(x), AVERAGE_INDEX, dtype=np.int64)
    if policy == "nearest":
        owner = nearest_owner(x, nearest())
        return owner if route is None else label_owner(route, num_teachers, fallback=owner)
    if policy == "label":
        return label_owner(route, num_teachers)
    raise RoutingError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")


def split_rows(assignment: np.ndarray, num_teachers: int) -> list[np.ndarray]:
    """Row indices per teacher (int64 ``[n_k]`` each); every teacher gets all rows for average."""
    b = len(assignment)
    if num_teachers == 1:  # its rows are all rows, whether routed to it (0) or averaged (-1)
        return [np.arange(b)]
    first, last = (int(assignment.min()), int(assignment.max())) if b else (0, 0)
    if first == last:  # every row to one teacher (or all averaged): no index search
        everything = np.arange(b)
        if first == AVERAGE_INDEX:
            return [everything] * num_teachers
        return [everything if k == first else everything[:0] for k in range(num_teachers)]
    if num_teachers <= 8:  # a compare and a nonzero per teacher beat a sort for a few teachers
        return [np.flatnonzero(assignment == k) for k in range(num_teachers)]
    # One stable sort groups the rows by teacher, in row order within each group.
    order = np.argsort(assignment, kind="stable")
    bounds = np.cumsum(np.bincount(assignment, minlength=num_teachers)[:num_teachers])[:-1]
    return np.split(order, bounds)


def _kind(arr: np.ndarray) -> str:
    """What ``arr`` holds, for telling answers of different types apart (BF16 is a tagged
    ``uint16``, equal to a plain one for numpy)."""
    return "BF16" if is_bf16(arr) else arr.dtype.str


def _float32(arr: np.ndarray) -> np.ndarray:
    return bf16_to_float32(arr) if is_bf16(arr) else arr.astype(np.float32, copy=False)


def merge_rows(
    assignment: np.ndarray,
    rows: Sequence[np.ndarray],
    answers: Sequence[np.ndarray],
    dim: int | Sequence[int],
) -> np.ndarray:
    """Put each teacher's answer ``[n_k, *S]`` back at its rows; average mode takes the mean.

    Args:
        dim: ``D`` or the row shape ``S`` (only used when no teacher has rows).
    Returns:
        ``[B, *S]`` supervised targets in the answers' type: float32 for the toy teachers; FP16
        and BF16 answers stay so (a mean is taken in float32 and rounded back). Answers of
        different types are merged in float32.
    """
    b = len(assignment)
    if b and assignment[0] == AVERAGE_INDEX and (assignment == AVERAGE_INDEX).all():
        kinds = {_kind(a) for a in answers}
        if kinds == {np.dtype(np.float32).str}:  # the toy world's path
            return np.mean(np.stack(answers), axis=0, dtype=np.float32)
        mean = np.mean(np.stack([_float32(a) for a in answers]), axis=0, dtype=np.float32)
        if len(kinds) > 1:
            return mean
        return float32_to_bf16(mean) if is_bf16(answers[0]) else mean.astype(answers[0].dtype)
    filled = [(idx, ans) for idx, ans in zip(rows, answers, strict=True) if len(idx)]
    if len(filled) == 1 and len(filled[0][0]) == b:
        return np.ascontiguousarray(filled[0][1])
    if not filled:
        shape = (dim,) if isinstance(dim, int) else tuple(dim)
        return np.empty((b, *shape), dtype=np.float32)
    # One gather instead of a scatter per teacher: where each row's answer sits among the
    # concatenated answers (the inverse of the concatenated row order).
    order = np.concatenate([idx for idx, _ in filled])
    where = np.empty(b, dtype=np.int64)
    where[order] = np.arange(b)
    first = filled[0][1]
    if any(_kind(ans) != _kind(first) for _, ans in filled[1:]):
        stacked = np.concatenate([_float32(ans) for _, ans in filled])
    else:
        stacked = np.concatenate([ans for _, ans in filled])
        if stacked.dtype.metadata != first.dtype.metadata:
            stacked = stacked.view(first.dtype)  # concatenate drops BF16's tag: put it back
    return np.take(stacked, where, axis=0)


# The torch faces of the functions above, for the in-process teacher client (CPU tensors).


def route_nearest(x: torch.Tensor, teacher_centers: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """:func:`nearest_owner` for torch: ``x [B, D]`` → ``[B]`` int64 teacher indices.

    Raises:
        RoutingError: a teacher has no mode centers, or their dimension differs from ``x``'s.
    """
    table = nearest_table(teacher_centers)
    return torch.from_numpy(nearest_owner(x.detach().numpy().astype(np.float32, copy=False), table))


def assign(
    policy: str,
    x: torch.Tensor,
    teacher_centers: Sequence[torch.Tensor | None],
    route: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`assign_rows` for torch: teacher index per state, ``[B]`` int64."""
    return torch.from_numpy(
        assign_rows(
            policy,
            x.detach().numpy().astype(np.float32, copy=False),
            len(teacher_centers),
            lambda: nearest_table(teacher_centers),
            None if route is None else route.numpy(),
        )
    )


def rows_by_teacher(assignment: torch.Tensor, num_teachers: int) -> list[torch.Tensor]:
    """:func:`split_rows` for torch."""
    return [torch.from_numpy(r) for r in split_rows(assignment.numpy(), num_teachers)]


def merge_answers(
    assignment: torch.Tensor,
    rows: Sequence[torch.Tensor],
    answers: Sequence[torch.Tensor],
    dim: int,
) -> torch.Tensor:
    """:func:`merge_rows` for torch: ``[B, D]`` supervised targets."""
    return torch.from_numpy(
        merge_rows(
            assignment.numpy(),
            [r.numpy() for r in rows],
            [a.detach().numpy() for a in answers],
            dim,
        )
    )
