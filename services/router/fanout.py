"""The ``opd-router`` virtual model: validate, route, fan out to teachers concurrently, merge.

Transport-agnostic: it calls teachers through a :data:`TeacherCall` (HTTP through the pool in
the uvicorn router, Ray Serve handles in the Ray deployment), so both route identically, and
exactly like the in-process client, because the routing is :mod:`common.routing`'s.

Contract (``B`` states of dimension ``D``):
  inputs   ``x`` FP32 ``[B, D]``, ``t`` FP32 ``[B]`` (or ``[B, 1]``), optional ``route`` INT32
           ``[B]`` (teacher index per row, ``-1`` = the policy decides), optional ``c`` (rows
           forwarded to the teacher with the row).
  outputs  ``v`` FP32 ``[B, D]`` (supervised target), ``teacher`` INT32 ``[B]`` (index into the
           registry's teacher order, ``-1`` = average of all), ``v_anchor`` FP32 ``[B, D]``
           when the request names an anchor: output ``v_anchor`` listed in ``outputs``, or
           request parameter ``anchor`` = ``true`` (the only/first anchor) or an anchor's name.
  request parameters: ``policy`` (optional per-request override of the registry's policy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from common import routing
from common.codec import CodecError, InferMessage, datatype_of
from services.router.registry import Registry, RegistryError, Teacher

MODEL_NAME = "opd-router"
MODEL_VERSION = "1"
OUTPUTS = ("v", "teacher", "v_anchor")


class InputError(ValueError):
    """The caller's mistake (HTTP 400); the message says what to fix."""


@dataclass
class TeacherAnswer:
    """One teacher's answer to its rows: ``v [n, D]`` and what the call cost."""

    v: np.ndarray
    version: str
    latency_ms: float  # router-side round trip of the successful attempt
    queue_ms: float | None = None  # the teacher's own report
    compute_ms: float | None = None
    batch_size: int | None = None
    replica: str = ""
    attempts: int = 1
    sent: int = 0  # request bytes of the successful attempt
    received: int = 0  # response bytes
    digest: str = ""  # the answering checkpoint's, when the teacher reports it


#: (teacher, inputs {"x": [n, D], "t": [n], ...}, deadline as time.monotonic()) -> answer
TeacherCall = Callable[[Teacher, dict[str, np.ndarray], float], Awaitable[TeacherAnswer]]


@dataclass
class RouterResult:
    """The merged outputs and the response ``parameters`` (see :func:`call_parameters`)."""

    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]


def _validate(
    msg: InferMessage,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``x [B, D]``, ``t [B]``, ``route [B]`` or None, ``c`` or None; raises :class:`InputError`."""
    unknown = sorted(set(msg.tensors) - {"x", "t", "route", "c"})
    if unknown:
        raise InputError(
            f"unknown input(s) {unknown}; opd-router takes x [B, D], t [B] (FP32) "
            "and optionally route [B] (INT32, -1 = policy decides)"
        )
    for name in ("x", "t"):
        if name not in msg.tensors:
            raise InputError(f"missing input {name!r}; opd-router takes x [B, D] and t [B] (FP32)")
        if msg.tensors[name].dtype != np.float32:
            raise InputError(f"input {name!r} must be FP32, got {_datatype(msg.tensors[name])}")
    x, t = msg.tensors["x"], msg.tensors["t"]
    if x.ndim != 2 or x.shape[1] == 0:
        raise InputError(f"input 'x' must have shape [B, D], got {list(x.shape)}")
    if not (t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1)):
        raise InputError(f"input 't' must have shape [B] (or [B, 1]), got {list(t.shape)}")
    t = t.reshape(-1)
    if len(t) != len(x):
        raise InputError(f"x has {len(x)} rows but t has {len(t)}; send one time per state")
    if len(x) == 0:
        raise InputError("empty batch: x has 0 rows")
    route = msg.tensors.get("route")
    if route is not None:
        if route.dtype.kind not in "iu":
            raise InputError(f"input 'route' must be INT32, got {_datatype(route)}")
        route = route.reshape(-1)
        if len(route) != len(x):
            raise InputError(f"route has {len(route)} rows but x has {len(x)}")
    c = msg.tensors.get("c")
    if c is not None and (c.ndim == 0 or len(c) != len(x)):
        raise InputError(f"input 'c' must have {len(x)} rows, got shape {list(c.shape)}")
    return x, t, route, c


def _datatype(arr: np.ndarray) -> str:
    """``arr``'s v2 datatype name for an error message (numpy's name if it has none)."""
    try:
        return datatype_of(arr)
    except CodecError:
        return str(arr.dtype)


def _anchor_request(msg: InferMessage, reg: Registry) -> Teacher | None:
    """The anchor the request names (parameter ``anchor`` or output ``v_anchor``), else None."""
    param = msg.parameters.get("anchor")
    wanted = "v_anchor" in msg.outputs or (param is not None and param is not False)
    if not wanted:
        return None
    name = param if isinstance(param, str) else None
    anchor = reg.anchor(name)
    if anchor is None:
        have = ", ".join(a.name for a in reg.anchors) or "none"
        asked = f"v_anchor from anchor {name!r}" if name else "v_anchor"
        raise InputError(f"the request asks for {asked}, but the registered anchors are: {have}")
    return anchor


def _rows(arr: np.ndarray, idx: np.ndarray, everything: bool) -> np.ndarray:
    # All rows (one teacher, or average): send the decoded view itself, no gather copy.
    # np.take: several times faster than fancy indexing for a row gather.
    return arr if everything else np.take(arr, idx, axis=0)


def call_parameters(prefix: str, rows: int, ans: TeacherAnswer | None) -> dict[str, Any]:
    """Per-call response parameters ``{prefix}.rows / .latency_ms / .queue_ms / .compute_ms /
    .batch_size / .version / .digest / .replica / .attempts`` (flat: OIP parameters are
    scalars)."""
    out: dict[str, Any] = {f"{prefix}.rows": rows}
    if ans is None:
        return out
    out.update(
        {
            f"{prefix}.latency_ms": round(ans.latency_ms, 4),
            f"{prefix}.version": ans.version,
            f"{prefix}.digest": ans.digest,
            f"{prefix}.replica": ans.replica,
            f"{prefix}.attempts": ans.attempts,
        }
    )
    if ans.queue_ms is not None:
        out[f"{prefix}.queue_ms"] = ans.queue_ms
    if ans.compute_ms is not None:
        out[f"{prefix}.compute_ms"] = ans.compute_ms
    if ans.batch_size is not None:
        out[f"{prefix}.batch_size"] = ans.batch_size
    return out


@dataclass
class RouterPart:
    """One teacher's share of a request, answered (see :func:`route_parts`).

    ``rows`` int64 ``[k]``: the request rows this part answers, or ``None`` for every row in
    order; ``outputs`` hold those rows only (``v [k, D]``, ``teacher [k]``, ``v_anchor [k, D]``).
    """

    rows: np.ndarray | None
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    last: bool = True  # no part of the request comes after this one


@dataclass
class _Fanout:
    """A validated, routed request and its teacher calls (not yet awaited)."""

    x: np.ndarray  # [B, D]
    policy: str
    anchor: Teacher | None
    assignment: np.ndarray  # int64 [B] teacher index per row (AVERAGE_INDEX: all)
    rows: list[np.ndarray]  # per registered teacher, its row indices (int64)
    called: list[tuple[str, int, int]]  # per call: (name, teacher index or -1 = anchor, rows)
    calls: list[Awaitable[TeacherAnswer]]
    keep: set[str] | None  # the outputs to return (None: all)
    received: float
    routed: float


def _fan_out(
    msg: InferMessage, reg: Registry, call: TeacherCall, deadline: float, received: float
) -> _Fanout:
    """Validate ``msg``, route its rows and make (not await) one call per teacher with rows,
    plus the anchor's on every row."""
    x, t, route, c = _validate(msg)
    unknown = sorted(set(msg.outputs) - set(OUTPUTS))
    if unknown:
        raise InputError(f"unknown output(s) {unknown}; opd-router returns {', '.join(OUTPUTS)}")
    policy = msg.parameters.get("policy", reg.policy)
    if policy not in routing.POLICIES:
        raise InputError(f"unknown policy {policy!r}; choose one of {', '.join(routing.POLICIES)}")
    if not reg.teachers:
        raise RegistryError("no teachers are registered; add one with PUT /v1/teachers/{name}")
    try:
        reg.check(policy)
    except RegistryError as exc:
        raise InputError(str(exc)) from None
    anchor = _anchor_request(msg, reg)
    b = len(x)
    for teacher in (*reg.teachers, *((anchor,) if anchor else ())):
        if teacher.dim is not None and teacher.dim != x.shape[1]:
            raise InputError(
                f"input 'x' must be [B, {teacher.dim}]: teacher {teacher.name!r} takes states of "
                f"dimension {teacher.dim}; got [{b}, {x.shape[1]}]"
            )

    try:
        assignment = routing.assign_rows(
            policy, x, len(reg.teachers), lambda: reg.nearest_table, route
        )
    except routing.RoutingError as exc:
        raise InputError(str(exc)) from None
    rows = routing.split_rows(assignment, len(reg.teachers))

    called: list[tuple[str, int, int]] = []
    calls = []
    for k, (teacher, idx) in enumerate(zip(reg.teachers, rows, strict=True)):
        n = len(idx)
        if n == 0:
            continue
        inputs = {"x": _rows(x, idx, n == b), "t": _rows(t, idx, n == b)}
        if c is not None:
            inputs["c"] = _rows(c, idx, n == b)
        calls.append(call(teacher, inputs, deadline))
        called.append((teacher.name, k, n))
    if anchor is not None:
        inputs = {"x": x, "t": t} if c is None else {"x": x, "t": t, "c": c}
        calls.append(call(anchor, inputs, deadline))
        called.append((anchor.name, -1, b))
    # only what was asked (v_anchor is asked for by naming an anchor, too)
    keep = None
    if msg.outputs:
        keep = set(msg.outputs) | ({"v_anchor"} if anchor is not None else set())
    return _Fanout(
        x, policy, anchor, assignment, rows, called, calls, keep, received, time.perf_counter()
    )


def _checked(f: _Fanout, i: int, ans: TeacherAnswer) -> TeacherAnswer:
    """``ans`` for call ``i`` if its ``v`` has the shape asked for, else :class:`TeacherFault`."""
    name, _, n = f.called[i]
    if ans.v.shape != (n, f.x.shape[1]):
        raise TeacherFault(
            f"teacher {name!r} answered v of shape {list(ans.v.shape)} for "
            f"{n} rows of dimension {f.x.shape[1]}"
        )
    return ans


def _costs(calls: list[tuple[str, int, TeacherAnswer]], idle: list[str]) -> dict[str, Any]:
    """Response parameters for the calls ``(name, rows, answer)`` and teachers without rows."""
    params: dict[str, Any] = {}
    for name in idle:
        params.update(call_parameters(name, 0, None))
    for name, n, ans in calls:
        params.update(call_parameters(name, n, ans))
    params.update(
        {
            "requests": len(calls),
            "teacher_bytes_sent": sum(a.sent for _, _, a in calls),
            "teacher_bytes_received": sum(a.received for _, _, a in calls),
            # sums over the calls of the teachers' own queue and forward time
            "queue_ms": round(sum(a.queue_ms or 0.0 for _, _, a in calls), 4),
            "compute_ms": round(sum(a.compute_ms or 0.0 for _, _, a in calls), 4),
        }
    )
    return params


def _head(f: _Fanout, reg: Registry, with_anchor: bool) -> dict[str, Any]:
    """The parameters every answer starts with: policy, teacher order, and the anchor's name."""
    params: dict[str, Any] = {"policy": f.policy, "teachers": ",".join(reg.names)}
    if with_anchor and f.anchor is not None:
        params["anchor"] = f.anchor.name
    return params


def _kept(f: _Fanout, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return outputs if f.keep is None else {k: a for k, a in outputs.items() if k in f.keep}


def _idle(f: _Fanout, reg: Registry) -> list[str]:
    """The registered teachers that got no rows."""
    busy = {name for name, _, _ in f.called}
    return [t.name for t in reg.teachers if t.name not in busy]


async def _gather(calls: list[Awaitable[TeacherAnswer]]) -> list[TeacherAnswer]:
    if len(calls) == 1:  # one teacher has every row: no tasks to schedule
        return [await calls[0]]
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]


def _merged(f: _Fanout, reg: Registry, answers: list[TeacherAnswer]) -> RouterResult:
    """Every call answered: the merged outputs and the request's parameters."""
    fanned = time.perf_counter()
    answers = [_checked(f, i, a) for i, a in enumerate(answers)]
    d = f.x.shape[1]
    by_index = {k: ans for (_, k, _), ans in zip(f.called, answers, strict=True) if k >= 0}
    empty = np.empty((0, d), dtype=np.float32)
    answered = [by_index[k].v if k in by_index else empty for k in range(len(reg.teachers))]
    # one teacher with every row: merge_rows hands its answer back, no copy
    v_np = routing.merge_rows(f.assignment, f.rows, answered, d)
    outputs: dict[str, np.ndarray] = {"v": v_np, "teacher": f.assignment.astype(np.int32)}
    if f.anchor is not None:
        outputs["v_anchor"] = answers[-1].v
    params = _head(f, reg, with_anchor=True)
    calls = [(name, n, ans) for (name, _, n), ans in zip(f.called, answers, strict=True)]
    params.update(_costs(calls, _idle(f, reg)))
    done = time.perf_counter()
    params["fanout_ms"] = round((fanned - f.routed) * 1e3, 4)  # wall time of the calls
    params["route_ms"] = round(((f.routed - f.received) + (done - fanned)) * 1e3, 4)  # own work
    return RouterResult(_kept(f, outputs), params)


async def route_and_call(
    msg: InferMessage,
    reg: Registry,
    call: TeacherCall,
    deadline: float,
    received: float | None = None,
) -> RouterResult:
    """Answer one ``opd-router`` infer request against registry snapshot ``reg``.

    Args:
        received: ``time.perf_counter()`` when the request arrived (for ``server_ms``).
    Raises:
        InputError: bad inputs, outputs, policy or anchor (400).
        TeacherUnavailable / TeacherRejected: from ``call`` (503 / the teacher's 4xx).
    """
    received = time.perf_counter() if received is None else received
    f = _fan_out(msg, reg, call, deadline, received)
    return _merged(f, reg, await _gather(f.calls))


async def route_parts(
    msg: InferMessage,
    reg: Registry,
    call: TeacherCall,
    deadline: float,
    received: float | None = None,
) -> AsyncIterator[RouterPart]:
    """:func:`route_and_call`, answered teacher by teacher: one :class:`RouterPart` per teacher
    with rows, each as soon as that teacher (and the anchor, which every row needs) has
    answered, so a caller can use the first teacher's rows while the others still compute.

    The ``average`` policy (every row needs every teacher) and a request that one teacher
    answers entirely give one part with ``rows=None``, exactly :func:`route_and_call`'s answer.
    Each part's parameters hold its own calls' costs (``requests``, bytes, queue and compute);
    the last part also the anchor's, the teachers without rows, ``route_ms`` and ``fanout_ms``
    (the whole request's), so summing over parts gives the request's totals. A teacher whose
    call fails raises as in :func:`route_and_call`, but only after the other teachers' parts are
    out (they stay valid: a retry needs only the failed teacher's rows); an anchor that fails
    raises at once.
    """
    received = time.perf_counter() if received is None else received
    f = _fan_out(msg, reg, call, deadline, received)
    teachers = [i for i, (_, k, _) in enumerate(f.called) if k >= 0]
    if f.policy == "average" or len(teachers) == 1:
        result = _merged(f, reg, await _gather(f.calls))
        yield RouterPart(None, result.outputs, result.parameters)
        return

    tasks = [asyncio.ensure_future(c) for c in f.calls]
    anchor = tasks[-1] if f.anchor is not None else None
    waiting, left = set(tasks), list(teachers)
    failed: BaseException | None = None
    try:
        while left:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is anchor:
                    task.result()  # every row needs the anchor: nothing more can be answered
                elif task.exception() is not None:
                    # the other teachers' rows are still worth having: the caller asks again
                    # only for this teacher's
                    failed = failed or task.exception()
                    left.remove(tasks.index(task))
            if anchor is not None and not anchor.done():
                continue
            v_anchor = None if anchor is None else _checked(f, len(tasks) - 1, anchor.result()).v
            for i in [i for i in left if tasks[i].done()]:
                left.remove(i)
                name, k, n = f.called[i]
                ans = _checked(f, i, tasks[i].result())
                idx = f.rows[k]
                outputs = {"v": ans.v, "teacher": np.full(n, k, dtype=np.int32)}
                calls = [(name, n, ans)]
                if v_anchor is not None:
                    outputs["v_anchor"] = np.take(v_anchor, idx, axis=0)
                final = not left and failed is None  # it carries the request-wide costs
                params = _head(f, reg, with_anchor=final)
                if final:
                    if f.anchor is not None:
                        calls.append((f.anchor.name, len(f.x), anchor.result()))  # type: ignore[union-attr]
                    now = time.perf_counter()
                    params["fanout_ms"] = round((now - f.routed) * 1e3, 4)
                    params["route_ms"] = round((f.routed - f.received) * 1e3, 4)
                params.update(_costs(calls, _idle(f, reg) if final else []))
                yield RouterPart(idx, _kept(f, outputs), params, last=final)
        if failed is not None:
            raise failed
    finally:
        for task in waiting:
            task.cancel()
        if waiting:
            await asyncio.gather(*waiting, return_exceptions=True)


class TeacherFault(Exception):
    """A teacher answered something unusable (HTTP 502)."""
