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
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common import routing
from common.codec import InferMessage
from services.router.registry import Registry, RegistryError, Teacher

MODEL_NAME = "opd-router"
MODEL_VERSION = "1"
OUTPUTS = ("v", "teacher", "v_anchor")

# Binary tensors decode as read-only views of the body; torch only reads them here (routing and
# merge write into fresh tensors), so wrapping them without a copy is safe.
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning
)


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
            raise InputError(f"input {name!r} must be FP32, got {msg.tensors[name].dtype}")
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
            raise InputError(f"input 'route' must be INT32, got {route.dtype}")
        route = route.reshape(-1)
        if len(route) != len(x):
            raise InputError(f"route has {len(route)} rows but x has {len(x)}")
    c = msg.tensors.get("c")
    if c is not None and (c.ndim == 0 or len(c) != len(x)):
        raise InputError(f"input 'c' must have {len(x)} rows, got shape {list(c.shape)}")
    return x, t, route, c


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
        raise InputError(
            f"the request asks for v_anchor from {name or 'the anchor'!r}, but the "
            f"registered anchors are: {have}"
        )
    return anchor


def _rows(arr: np.ndarray, idx: torch.Tensor, everything: bool) -> np.ndarray:
    # All rows (one teacher, or average): send the decoded view itself, no gather copy.
    return arr if everything else arr[idx.numpy()]


def call_parameters(prefix: str, rows: int, ans: TeacherAnswer | None) -> dict[str, Any]:
    """Per-call response parameters ``{prefix}.rows / .latency_ms / .queue_ms / .compute_ms /
    .batch_size / .version / .replica / .attempts`` (flat: OIP parameters are scalars)."""
    out: dict[str, Any] = {f"{prefix}.rows": rows}
    if ans is None:
        return out
    out.update(
        {
            f"{prefix}.latency_ms": round(ans.latency_ms, 4),
            f"{prefix}.version": ans.version,
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
    b, d = x.shape

    try:
        assignment = routing.assign(
            policy,
            torch.from_numpy(x),
            reg.centers,
            None if route is None else torch.from_numpy(route),
        )
    except routing.RoutingError as exc:
        raise InputError(str(exc)) from None
    rows = routing.rows_by_teacher(assignment, len(reg.teachers))

    # One request per teacher that has rows, plus the anchor on every row; all concurrently.
    called: list[tuple[str, int, int]] = []  # (name, index or -1 for the anchor, rows)
    calls = []
    for k, (teacher, idx) in enumerate(zip(reg.teachers, rows, strict=True)):
        n = int(idx.numel())
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
    routed = time.perf_counter()
    if len(calls) == 1:  # one teacher has every row: no tasks to schedule
        answers: list[TeacherAnswer] = [await calls[0]]
    else:
        results = await asyncio.gather(*calls, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        answers = list(results)  # type: ignore[arg-type]
    fanned = time.perf_counter()
    for (name, _, n), ans in zip(called, answers, strict=True):
        if ans.v.shape != (n, d):
            raise TeacherFault(
                f"teacher {name!r} answered v of shape {list(ans.v.shape)} for "
                f"{n} rows of dimension {d}"
            )

    by_index = {k: ans for (_, k, _), ans in zip(called, answers, strict=True) if k >= 0}
    if policy != "average" and len(by_index) == 1:
        v_np = next(iter(by_index.values())).v  # one teacher has every row, in order: no merge copy
    else:
        empty = torch.empty(0, d)
        v_np = routing.merge_answers(
            assignment,
            rows,
            [
                torch.from_numpy(by_index[k].v) if k in by_index else empty
                for k in range(len(reg.teachers))
            ],
            d,
        ).numpy()
    outputs: dict[str, np.ndarray] = {"v": v_np, "teacher": assignment.numpy().astype(np.int32)}
    if anchor is not None:
        outputs["v_anchor"] = answers[-1].v
    if msg.outputs:  # only what was asked (v_anchor is asked for by naming an anchor, too)
        keep = set(msg.outputs) | ({"v_anchor"} if anchor is not None else set())
        outputs = {k: a for k, a in outputs.items() if k in keep}

    params: dict[str, Any] = {"policy": policy, "teachers": ",".join(reg.names)}
    if anchor is not None:
        params["anchor"] = anchor.name
    rows_of = {name: n for name, _, n in called}
    for teacher in reg.teachers:
        if teacher.name not in rows_of:
            params.update(call_parameters(teacher.name, 0, None))
    queue = compute = 0.0
    for (name, _, n), ans in zip(called, answers, strict=True):
        params.update(call_parameters(name, n, ans))
        queue += ans.queue_ms or 0.0
        compute += ans.compute_ms or 0.0
    done = time.perf_counter()
    params.update(
        {
            "requests": len(calls),
            "teacher_bytes_sent": sum(a.sent for a in answers),
            "teacher_bytes_received": sum(a.received for a in answers),
            "queue_ms": round(queue, 4),  # sum over teacher calls of the teachers' own queue time
            "compute_ms": round(compute, 4),  # ... and of their forward time
            "fanout_ms": round((fanned - routed) * 1e3, 4),  # wall time of the concurrent calls
            "route_ms": round(
                (routed - received) * 1e3 + (done - fanned) * 1e3, 4
            ),  # router's own work
        }
    )
    return RouterResult(outputs, params)


class TeacherFault(Exception):
    """A teacher answered something unusable (HTTP 502)."""
