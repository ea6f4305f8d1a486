"""The ``opd-router`` virtual model: validate, route, fan out to teachers concurrently, merge.

Transport-agnostic: it calls teachers through a :data:`TeacherCall` (HTTP through the pool in
the uvicorn router, Ray Serve handles in the Ray deployment), so both route identically, and
exactly like the in-process client, because the routing is :mod:`common.routing`'s.

Contract (``B`` states ``x [B, *S]``: the toy world's ``[B, D]``, latents ``[B, C, H, W]``):
  inputs   ``x`` ``[B, *S]`` FP32 (or FP16 / BF16: passed to the teachers as sent),
           ``t`` FP32 ``[B]`` (or ``[B, 1]``), optional ``route`` INT32 ``[B]`` (teacher index
           per row, ``-1`` = the policy decides), and any conditioning the teachers declare
           (``encoder_hidden_states [B, L, E]``, ``pooled_projections [B, P]``, the toy
           teachers' ``c``...): each teacher gets its rows of it; a 1-row input is sent as is
           to every teacher (the teacher broadcasts it).
  outputs  ``v`` ``[B, *S]`` in the teachers' answer dtype (supervised target), ``teacher``
           INT32 ``[B]`` (index into the registry's teacher order, ``-1`` = average of all),
           ``v_anchor`` ``[B, *S]`` when the request names an anchor: output ``v_anchor``
           listed in ``outputs``, or request parameter ``anchor`` = ``true`` (the only/first
           anchor) or an anchor's name.
  request parameters: ``policy`` (optional per-request override of the registry's policy),
           ``anchor``; every other parameter (``cond_id``, ``guidance_scale``, ...) goes to each
           teacher call unchanged, but for a ``cond_id`` sent to a teacher that gets only some
           of the rows: it names those rows there (:func:`split_cond_id`).
"""

from __future__ import annotations

import asyncio
import hashlib
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
    """The caller's mistake (HTTP ``status``, 400); the message says what to fix."""

    status = 400


class UndeclaredInput(InputError):
    """An input some teacher's model metadata does not list (HTTP 422)."""

    status = 422


#: Request parameters the router itself reads; every other one is passed to the teachers.
ROUTER_PARAMETERS = frozenset({"policy", "anchor", "binary_data_output"})
#: Inputs the router reads itself (the rest is conditioning, split by rows with x).
ROUTER_INPUTS = ("x", "t", "route")
#: Datatypes of x passed through to the teachers (FP32: the toy world's)
STATE_DATATYPES = ("FP32", "FP16", "BF16")


@dataclass
class TeacherAnswer:
    """One teacher's answer to its rows: ``v [n, *S]`` and what the call cost."""

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


#: (teacher, inputs {"x": [n, *S], "t": [n], conditioning...}, deadline as time.monotonic()
#: [, parameters to pass on]) -> answer. The parameters argument is given only when the request
#: has some for the teachers (cond_id, guidance_scale, ...): a call without it is the toy path.
TeacherCall = Callable[..., Awaitable[TeacherAnswer]]


@dataclass
class RouterResult:
    """The merged outputs and the response ``parameters`` (see :func:`call_parameters`)."""

    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]


def _validate(
    msg: InferMessage,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray] | None]:
    """``x [B, *S]``, ``t [B]``, ``route [B]`` or None, the conditioning inputs (each with
    ``B`` rows or 1) or None; raises :class:`InputError`."""
    tensors = msg.tensors
    for name in ("x", "t"):
        if name not in tensors:
            raise InputError(f"missing input {name!r}; opd-router takes x [B, *S] and t [B] (FP32)")
    x, t = tensors["x"], tensors["t"]
    if x.dtype != np.float32 and _datatype(x) not in STATE_DATATYPES:
        raise InputError(f"input 'x' must be FP32, got {_datatype(x)} (FP16 and BF16 pass too)")
    if t.dtype != np.float32:
        raise InputError(f"input 't' must be FP32, got {_datatype(t)}")
    if x.ndim < 2 or 0 in x.shape[1:]:
        raise InputError(
            f"input 'x' must have shape [B, D] or [B, *S] (e.g. [B, C, H, W]), got {list(x.shape)}"
        )
    if not (t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1)):
        raise InputError(f"input 't' must have shape [B] (or [B, 1]), got {list(t.shape)}")
    t = t.reshape(-1)
    b = len(x)
    if len(t) != b:
        raise InputError(f"x has {b} rows but t has {len(t)}; send one time per state")
    if b == 0:
        raise InputError("empty batch: x has 0 rows")
    route = tensors.get("route")
    if route is not None:
        if route.dtype.kind not in "iu":
            raise InputError(f"input 'route' must be INT32, got {_datatype(route)}")
        route = route.reshape(-1)
        if len(route) != b:
            raise InputError(f"route has {len(route)} rows but x has {b}")
    extras = None
    if len(tensors) > 2 + (route is not None):  # the toy path (x, t[, route]) skips this
        extras = {k: a for k, a in tensors.items() if k not in ROUTER_INPUTS}
        for name, arr in extras.items():
            if arr.ndim == 0 or (len(arr) != b and len(arr) != 1):
                raise InputError(
                    f"input {name!r} must have {b} rows (one per state, or 1 for all), "
                    f"got shape {list(arr.shape)}"
                )
    return x, t, route, extras


def _fits(declared: tuple[int, ...], got: tuple[int, ...]) -> bool:
    """``got`` has ``declared``'s rank and size wherever ``declared`` is not ``-1``."""
    return len(declared) == len(got) and all(
        d in (-1, g) for d, g in zip(declared, got, strict=True)
    )


def _shape_text(shape: tuple[int, ...]) -> str:
    return ", ".join("*" if d == -1 else str(d) for d in shape)


def _check_teacher(teacher: Teacher, x: np.ndarray, extras: dict[str, np.ndarray] | None) -> None:
    """Refuse what ``teacher`` (per its model metadata, read at registration) cannot take:
    states of another shape (400), an input it does not list (422), conditioning rows of
    another shape (400)."""
    shape, declared = x.shape[1:], teacher.state_shape
    if declared is not None and declared != shape and not _fits(declared, shape):
        b = len(x)
        if len(declared) == 1 and len(shape) == 1:  # the toy world's [B, D]
            raise InputError(
                f"input 'x' must be [B, {declared[0]}]: teacher {teacher.name!r} takes states of "
                f"dimension {declared[0]}; got [{b}, {shape[0]}]"
            )
        raise InputError(
            f"input 'x' must be [B, {_shape_text(declared)}]: teacher {teacher.name!r} takes "
            f"states of shape [{_shape_text(declared)}]; got {list(x.shape)}"
        )
    if not extras or teacher.accepts is None:
        return
    for name, arr in extras.items():
        if name not in teacher.accepts:
            takes = ", ".join(sorted(teacher.accepts)) or "no conditioning"
            raise UndeclaredInput(
                f"input {name!r} is not an input of {teacher.role} {teacher.name!r} (its model "
                f"metadata lists x, t and {takes}); send only the inputs its metadata lists"
            )
        rows = teacher.row_shapes.get(name)
        if rows is not None and not _fits(rows, arr.shape[1:]):
            raise InputError(
                f"input {name!r} must be [B, {_shape_text(rows)}] for {teacher.role} "
                f"{teacher.name!r}; got {list(arr.shape)}"
            )


#: the longest cond_id a teacher keeps (services/teacher/conditioned.py's MAX_COND_ID)
MAX_COND_ID = 256


def split_cond_id(cond_id: str, teacher: str, idx: np.ndarray) -> str:
    """The ``cond_id`` a teacher that gets only rows ``idx`` (int64 ``[n]``) of a request is
    sent: the caller's id, the teacher's name and a digest of the row indices.

    The caller's id names the whole request's conditioning; a teacher given some of the rows
    keeps only those under the id it is sent. Passed on unchanged, one id would name different
    rows at different teachers, and teachers in one process (LoRA specialists on one base
    share its conditioning cache) would overwrite each other's: the next request by id would
    get another teacher's prompts, silently. Qualified, each teacher's id names exactly what it
    holds; the same labels (same rows) give the same ids step after step, and other rows give
    an id the teacher does not know: its 4xx says to resend, and the caller does.
    """
    rows = hashlib.blake2b(idx.astype(np.int64, copy=False).tobytes(), digest_size=6).hexdigest()
    qualified = f"{cond_id}@{teacher}:{rows}"
    if len(qualified) > MAX_COND_ID:  # keep within what a teacher accepts
        short = hashlib.blake2b(cond_id.encode(), digest_size=16).hexdigest()
        qualified = f"{short}@{teacher}:{rows}"
    return qualified


def _passed_on(msg: InferMessage) -> dict[str, Any] | None:
    """The request parameters the teachers get (all but the router's own), or None."""
    params = msg.parameters
    if not params:
        return None
    return {k: v for k, v in params.items() if k not in ROUTER_PARAMETERS} or None


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
    order; ``outputs`` hold those rows only (``v [k, *S]``, ``teacher [k]``,
    ``v_anchor [k, *S]``).
    """

    rows: np.ndarray | None
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    last: bool = True  # no part of the request comes after this one


@dataclass
class _Fanout:
    """A validated, routed request and its teacher calls (not yet awaited)."""

    b: int  # B: rows of the request
    shape: tuple[int, ...]  # S: the shape of one state (x is [B, *S])
    policy: str
    anchor: Teacher | None
    assignment: np.ndarray  # int64 [B] teacher index per row (AVERAGE_INDEX: all)
    rows: list[np.ndarray]  # per registered teacher, its row indices (int64)
    called: list[tuple[str, int, int]]  # per call: (name, teacher index or -1 = anchor, rows)
    calls: list[Awaitable[TeacherAnswer]]
    keep: set[str] | None  # the outputs to return (None: all)
    received: float
    routed: float


def _inputs(
    x: np.ndarray,
    t: np.ndarray,
    extras: dict[str, np.ndarray] | None,
    idx: np.ndarray,
    everything: bool,
) -> dict[str, np.ndarray]:
    """One teacher's inputs: its rows of ``x``, ``t`` and each conditioning input; a 1-row
    conditioning input goes as is (the teacher broadcasts it to every row)."""
    inputs = {"x": _rows(x, idx, everything), "t": _rows(t, idx, everything)}
    if extras:
        for name, arr in extras.items():
            inputs[name] = _rows(arr, idx, everything or len(arr) == 1)
    return inputs


def _fan_out(
    msg: InferMessage, reg: Registry, call: TeacherCall, deadline: float, received: float
) -> _Fanout:
    """Validate ``msg``, route its rows and make (not await) one call per teacher with rows,
    plus the anchor's on every row."""
    x, t, route, extras = _validate(msg)
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
        _check_teacher(teacher, x, extras)
    params = _passed_on(msg)
    # the toy path calls without parameters (call signature of TeacherCall)
    extra_args = () if params is None else (params,)

    try:
        assignment = routing.assign_rows(
            policy, x, len(reg.teachers), lambda: reg.nearest_table, route
        )
    except routing.RoutingError as exc:
        raise InputError(str(exc)) from None
    rows = routing.split_rows(assignment, len(reg.teachers))

    called: list[tuple[str, int, int]] = []
    calls = []
    cond_id = params.get("cond_id") if params is not None else None
    for k, (teacher, idx) in enumerate(zip(reg.teachers, rows, strict=True)):
        n = len(idx)
        if n == 0:
            continue
        args = extra_args
        if n < b and params is not None and isinstance(cond_id, str):
            # some rows only: an id that names those rows (see split_cond_id)
            args = ({**params, "cond_id": split_cond_id(cond_id, teacher.name, idx)},)
        calls.append(call(teacher, _inputs(x, t, extras, idx, n == b), deadline, *args))
        called.append((teacher.name, k, n))
    if anchor is not None:
        inputs = {"x": x, "t": t} if not extras else {"x": x, "t": t, **extras}
        calls.append(call(anchor, inputs, deadline, *extra_args))
        called.append((anchor.name, -1, b))
    # only what was asked (v_anchor is asked for by naming an anchor, too)
    keep = None
    if msg.outputs:
        keep = set(msg.outputs) | ({"v_anchor"} if anchor is not None else set())
    return _Fanout(
        b,
        x.shape[1:],
        policy,
        anchor,
        assignment,
        rows,
        called,
        calls,
        keep,
        received,
        time.perf_counter(),
    )


def _checked(f: _Fanout, i: int, ans: TeacherAnswer) -> TeacherAnswer:
    """``ans`` for call ``i`` if its ``v`` has the shape asked for, else :class:`TeacherFault`."""
    name, _, n = f.called[i]
    v = ans.v
    if len(v) != n or v.shape[1:] != f.shape:
        what = f"dimension {f.shape[0]}" if len(f.shape) == 1 else f"shape {list(f.shape)}"
        raise TeacherFault(
            f"teacher {name!r} answered v of shape {list(v.shape)} for {n} rows of {what}"
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
    by_index = {k: ans for (_, k, _), ans in zip(f.called, answers, strict=True) if k >= 0}
    empty = np.empty((0, *f.shape), dtype=np.float32)
    answered = [by_index[k].v if k in by_index else empty for k in range(len(reg.teachers))]
    # one teacher with every row: merge_rows hands its answer back, no copy
    v_np = routing.merge_rows(f.assignment, f.rows, answered, f.shape)
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
                        calls.append((f.anchor.name, f.b, anchor.result()))  # type: ignore[union-attr]
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
