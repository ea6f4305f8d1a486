"""The router's HTTP API (FastAPI): OIP v2 health/metadata, the ``opd-router`` virtual model,
passthrough infer to registered teachers, the registry API ``/v1/teachers`` and ``/metrics``.

:func:`build_api` takes a :class:`RouterCore` whose ``call`` reaches teachers; :func:`create_app`
wires it to the HTTP :class:`~services.router.pool.Pool`. The Ray Serve deployment reuses
:func:`build_api` with a ``call`` over deployment handles.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.admission import ByteBudget, Overloaded, RequestTooLarge, configured_budget
from common.asgi import (
    BodyTimeout,
    ClientGone,
    ClientStalled,
    InferFastPath,
    Receive,
    Scope,
    Send,
    body_chunks,
    drop_unread_body,
    headers_of,
    send_parts,
)
from common.codec import HEADER_LENGTH, CodecError, decode_request, response_parts, wants_binary
from common.httpapi import bare_app, error_response
from common.openapi import document, index_ready_only, oip_paths, responses, serve_openapi
from services.router import fanout
from services.router.fanout import InputError, TeacherAnswer, TeacherFault
from services.router.metrics import RouterMetrics
from services.router.negotiate import passthrough_encoder
from services.router.pool import Pool, TeacherRejected, TeacherUnavailable, infer
from services.router.registry import (
    Registry,
    RegistryError,
    Replica,
    Teacher,
    TeacherSpec,
    TeacherUnreachable,
    build_registry,
    build_teacher,
    merge_specs,
    parse_flag,
    read_registry_file,
    refreshed,
    spec_from_doc,
)
from services.router.registry import discover as discover_endpoint
from services.router.settings import ADMIN_TOKEN_ENV, RouterSettings

log = logging.getLogger("opd.router")
_HEADER_LENGTH = HEADER_LENGTH.lower().encode()
SERVER_NAME = "opd-router"
SERVER_VERSION = "0.1.0"
ADMIN_BODY_LIMIT = 64 * 1024
RETRY_AFTER_S = "1"  # a teacher call that failed without saying when to come back
#: the variable that sets the byte bound where the flag cannot be given (Ray Serve)
MAX_QUEUE_ENV = "OPD_ROUTER_MAX_QUEUE_MB"
#: bytes a routed request holds per byte of its body while it is served: the body, its rows
#: split per teacher and the bodies sent to them (measured: a 64 MiB bound counted as bodies
#: alone let the router's RSS grow by 250 MiB in a flood); passthrough: body and answer
ROUTED_HOLD, PASSTHROUGH_HOLD = 3, 2
MAX_WATCH_S = 60.0  # longest a registry watch (GET /v1/teachers?after=N) is held open

#: (teacher, inputs, deadline) -> answer; HTTP pool or Ray handles
TeacherCall = fanout.TeacherCall
#: passthrough: (teacher, raw body, headers, deadline) -> (status, body, headers)
Passthrough = Callable[
    [Teacher, bytes, dict[str, str], float], Awaitable[tuple[int, bytes, dict[str, str]]]
]
#: discovery for the registry API: spec -> teacher
Discover = Callable[[TeacherSpec], Awaitable[Teacher]]


@dataclass
class RouterCore:
    """What the routes need: the current registry snapshot and how to reach teachers."""

    registry: Registry
    call: TeacherCall
    passthrough: Passthrough | None
    discover: Discover
    settings: RouterSettings
    admin_token: str | None
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    pending: int = 0
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    generation: int = 0  # bumped by every registry change; watchers wait for it to move
    _inflight: asyncio.Semaphore | None = None
    _admin: asyncio.Lock | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: bytes held by admitted requests (bodies, answers); None: from the settings at build_api
    admission: ByteBudget | None = None
    admission_line: str = ""

    def set_registry(self, reg: Registry) -> None:
        self.registry = (
            reg  # one reference assignment: requests already holding the old one keep it
        )
        for t in reg.all():
            self.metrics.live_replicas.labels(t.name).set(sum(r.live for r in t.replicas))
        self.generation += 1
        self.wake_watchers()

    def wake_watchers(self) -> None:
        """Answer every waiting registry watch now (a change, or the server shutting down)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def watch(self, after: int, wait_s: float) -> None:
        """Wait up to ``wait_s`` while the registry is still at generation ``after``."""
        if after != self.generation or wait_s <= 0:
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), min(wait_s, MAX_WATCH_S))


@dataclass
class PartsResponse:
    """A 200 infer answer written as its parts (JSON header, then each binary tensor from its
    own array): no join copy, and none of a Starlette response's header handling."""

    parts: list
    headers: dict[str, str]
    join: bool = False  # one bytes body, for Ray Serve (see common.asgi.send_parts)
    status_code: int = 200
    timeout_s: float | None = None  # the client must take it within this (ClientStalled)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_parts(
            send, self.status_code, self.parts, self.headers, self.join, self.timeout_s
        )


class BodyTooLarge(Exception):
    """A request body over the router's limit (413)."""


async def read_body(
    receive: Receive, declared: str | None, limit: int, timeout_s: float | None = None
) -> bytes:
    """The request body, refusing (:class:`BodyTooLarge`) more than ``limit`` bytes, before
    reading when ``Content-Length`` says so and while reading otherwise; :class:`BodyTimeout`
    when it has not arrived within ``timeout_s``."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, total = [], 0
    async for chunk in body_chunks(receive, timeout_s):
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def router_metadata(reg: Registry) -> dict[str, Any]:
    """``GET /v2/models/opd-router``: the virtual model's contract and current registry.

    ``x`` is ``[B, *S]`` (the teachers' state shape; FP16 / BF16 pass through as sent); the
    conditioning inputs are the teachers' own, listed with the shape they declare."""
    first = reg.teachers[0] if reg.teachers else None
    shape = list(first.state_shape) if first and first.state_shape else [-1]
    inputs: list[dict[str, Any]] = [
        {"name": "x", "datatype": "FP32", "shape": [-1, *shape]},
        {"name": "t", "datatype": "FP32", "shape": [-1]},
        {"name": "route", "datatype": "INT32", "shape": [-1], "optional": True},
    ]
    if first is not None:
        inputs += [
            {**spec.describe(), "optional": True}
            for spec in first.inputs
            if spec.name not in ("x", "t")
        ]
    return {
        "name": fanout.MODEL_NAME,
        "versions": [fanout.MODEL_VERSION],
        "platform": "opd-router",
        "inputs": inputs,
        "outputs": [
            {"name": "v", "datatype": "FP32", "shape": [-1, *shape]},
            {"name": "teacher", "datatype": "INT32", "shape": [-1]},
            {"name": "v_anchor", "datatype": "FP32", "shape": [-1, *shape]},
        ],
        "parameters": {
            "policy": reg.policy,
            "teachers": ",".join(reg.names),
            "anchors": ",".join(a.name for a in reg.anchors),
            "time_convention": next(
                (t.time_convention for t in reg.all() if t.time_convention), None
            ),
        },
    }


def build_api(core: RouterCore, join: bool = False) -> InferFastPath:
    """The app over ``core`` (same routes for the uvicorn and the Ray Serve router): infer is
    answered by raw ASGI (:class:`~common.asgi.InferFastPath`), everything else by FastAPI.
    ``join``: infer answers go out as one ``bytes`` body (the Ray Serve ingress needs it)."""
    m, s = core.metrics, core.settings
    max_body = int(s.max_body_mb * 1024 * 1024)
    if core.admission is None:
        core.admission, core.admission_line = configured_budget(
            s.max_queue_mb, "--max-queue-mb", MAX_QUEUE_ENV
        )
    budget = core.admission
    m.watch_admission(budget)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        core._inflight = asyncio.Semaphore(s.max_inflight)
        core._admin = asyncio.Lock()
        for start in core.on_start:
            await start()
        core.set_registry(core.registry)
        yield
        for close in core.on_close:
            with suppress(Exception):
                await close()

    app = bare_app(SERVER_NAME, SERVER_VERSION, lifespan)
    app.state.core = core

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # 422 as before, with the protocol's {"error"} body (FastAPI's own is {"detail"})
        return error_response(422, f"invalid request: {exc.errors()}")

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        down = [t.name for t in core.registry.all() if not any(r.live for r in t.replicas)]
        ok = bool(core.registry.teachers) and not down
        body: dict[str, Any] = {"ready": ok}
        if down:
            body["down"] = down
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {
            "name": SERVER_NAME,
            "version": SERVER_VERSION,
            "extensions": ["binary_tensor_data"],
        }

    def teacher_or_404(name: str) -> Teacher:
        teacher = core.registry.get(name)
        if teacher is None:
            known = ", ".join([fanout.MODEL_NAME, *(t.name for t in core.registry.all())])
            raise StarletteHTTPException(404, f"unknown model {name!r}; this router serves {known}")
        return teacher

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str) -> dict:
        if name == fanout.MODEL_NAME:
            return router_metadata(core.registry)
        t = teacher_or_404(name)
        return {
            "name": name,
            "versions": [t.version] if t.version else [],
            "platform": "opd-teacher",
            "parameters": {
                "version": t.version,
                "digest": t.digest,
                "modes": t.modes,
                "mode_centers": None if t.centers is None else t.centers.tolist(),
                "role": t.role,
                "replicas": len(t.replicas),
                "backend": t.backend,
                "time_convention": t.time_convention,
            },
            **({"inputs": [spec.describe() for spec in t.inputs]} if t.inputs else {}),
        }

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> JSONResponse:
        if name == fanout.MODEL_NAME:
            return await ready()
        ok = any(r.live for r in teacher_or_404(name).replicas)
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        try:  # {"ready": true}: only the models ready for inferencing (the extension's filter)
            body = await read_body(
                request.receive, request.headers.get("content-length"), ADMIN_BODY_LIMIT
            )
            ready_only = index_ready_only(body)
        except BodyTooLarge as exc:
            return error_response(413, str(exc))
        except ValueError as exc:
            return error_response(400, str(exc))
        entries = [
            {
                "name": fanout.MODEL_NAME,
                "version": fanout.MODEL_VERSION,
                "state": "READY",
                "reason": "",
            }
        ]
        for t in core.registry.all():
            down = [f"{r.endpoint.url}: {r.cause}" for r in t.replicas if not r.live]
            up = len(down) < len(t.replicas)
            entries.append(
                {
                    "name": t.name,
                    "version": t.version or "",
                    "state": "READY" if up else "UNAVAILABLE",
                    # the repository extension requires a reason: "" when there is none
                    "reason": "" if up else "no live replica: " + "; ".join(down),
                }
            )
        return JSONResponse([e for e in entries if e["state"] == "READY" or not ready_only])

    async def infer(
        name: str, version: str | None, scope: Scope, receive: Receive, send: Send
    ) -> None:
        # Raw ASGI (common.asgi.InferFastPath): no middleware stack on the hot path.
        received = time.perf_counter()
        held = [0]  # bytes this request holds in the admission budget
        completed = False
        try:
            try:
                resp = await answer(name, scope, receive, received, held)
            except ClientGone:
                return
            if isinstance(resp, PartsResponse):  # the answer, until it is written
                size = sum(memoryview(p).nbytes for p in resp.parts)
                budget.hold(size)
                held[0] += size
            try:
                await resp(scope, receive, send)
                completed = resp.status_code == 200
            except ClientStalled:
                pass  # a client that does not read its answer: dropped, its bytes released
            finally:
                m.requests.labels(name, str(resp.status_code)).inc()
                m.seconds.labels(name).observe(time.perf_counter() - received)
        finally:
            drop_unread_body(receive)  # what a refused body buffered before its refusal
            budget.release(held[0], completed)

    async def answer(
        name: str, scope: Scope, receive: Receive, received: float, held: list[int]
    ) -> Response | PartsResponse:
        """The response to one infer request (errors as their ``{"error"}`` responses); the
        bytes its body holds in the admission budget are added to ``held[0]``."""
        reg = core.registry  # the snapshot this request is served from, whatever changes meanwhile
        if name != fanout.MODEL_NAME and reg.get(name) is None:
            known = ", ".join([fanout.MODEL_NAME, *(t.name for t in reg.all())])
            return error_response(404, f"unknown model {name!r}; this router serves {known}")
        if core.pending >= s.max_inflight + s.max_queue:
            m.queue_full.inc()
            excess = core.pending + 1 - s.max_inflight - s.max_queue
            return error_response(
                503,
                f"router queue is full ({core.pending} requests admitted); retry later",
                {"Retry-After": str(budget.retry_after_requests_s(excess))},
            )
        declared = headers_of(scope, b"content-length")[0]
        try:
            if declared is not None and declared.isdigit():  # before a byte of it is read
                size = int(declared) * (
                    ROUTED_HOLD if name == fanout.MODEL_NAME else PASSTHROUGH_HOLD
                )
                budget.admit(size, int(declared))
                held[0] += size
        except RequestTooLarge as exc:
            return error_response(413, str(exc))
        except Overloaded as exc:
            m.overloaded.inc()
            return error_response(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
        core.pending += 1
        m.pending.set(core.pending)
        try:
            assert core._inflight is not None
            async with core._inflight:
                deadline = time.monotonic() + s.deadline_s
                declared, header_length, content_type = headers_of(
                    scope, b"content-length", _HEADER_LENGTH, b"content-type"
                )
                body = await read_body(receive, declared, max_body, s.body_timeout_s)
                if not held[0]:  # no Content-Length: admitted once its size is known
                    budget.admit(len(body))
                    held[0] += len(body)
                if name == fanout.MODEL_NAME:
                    return await _virtual(reg, body, header_length, deadline, received)
                return await _passthrough(reg, name, body, content_type, header_length, deadline)
        except (BodyTooLarge, RequestTooLarge) as exc:
            return error_response(413, str(exc))
        except Overloaded as exc:
            m.overloaded.inc()
            return error_response(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
        except BodyTimeout as exc:  # close: the rest of a trickling body must not hold on
            return error_response(408, str(exc), {"Connection": "close"})
        except CodecError as exc:
            return error_response(400, str(exc))
        except InputError as exc:  # 400, or 422 for an input a teacher does not declare
            return error_response(exc.status, str(exc))
        except TeacherRejected as exc:
            return error_response(exc.status, str(exc))
        except TeacherUnavailable as exc:  # the teachers' own Retry-After when they were busy
            retry = str(exc.retry_after_s) if exc.retry_after_s else RETRY_AFTER_S
            return error_response(503, str(exc), {"Retry-After": retry})
        except RegistryError as exc:
            return error_response(503, str(exc), {"Retry-After": RETRY_AFTER_S})
        except TeacherFault as exc:
            return error_response(502, str(exc))
        except ClientGone:
            raise
        except Exception as exc:  # a bug answers this request with 500; the router keeps serving
            log.exception("infer failed")
            return error_response(500, f"router error: {type(exc).__name__}: {exc}")
        finally:
            core.pending -= 1
            m.pending.set(core.pending)

    async def _virtual(
        reg: Registry, body: bytes, header_length: str | None, deadline: float, received: float
    ) -> PartsResponse:
        if not body:
            raise InputError(
                "empty body; send an OIP v2 infer document with inputs x [B, D] and t [B]"
            )
        msg = decode_request(body, header_length)
        result = await fanout.route_and_call(msg, reg, core.call, deadline, received)
        params = result.parameters
        params["server_ms"] = round((time.perf_counter() - received) * 1e3, 4)
        binary = {k for k in result.outputs if wants_binary(msg, k)}
        parts, headers = response_parts(
            result.outputs,
            fanout.MODEL_NAME,
            fanout.MODEL_VERSION,
            binary=binary,
            request_id=msg.id,
            parameters=params,
        )
        m.states.inc(len(result.outputs.get("teacher", result.outputs.get("v", ()))))
        return PartsResponse(parts, headers, join, timeout_s=s.send_timeout_s)

    async def _passthrough(
        reg: Registry,
        name: str,
        body: bytes,
        content_type: str | None,
        header_length: str | None,
        deadline: float,
    ) -> Response:
        if core.passthrough is None:
            return error_response(501, "passthrough is not available in this deployment")
        teacher = reg.get(name)
        if teacher is None:  # deleted between the check and now
            return error_response(404, f"unknown model {name!r}")
        headers = {"Content-Type": content_type or "application/json"}
        if header_length is not None:
            headers[HEADER_LENGTH] = header_length
        status, content, out_headers = await core.passthrough(teacher, body, headers, deadline)
        return Response(content, status_code=status, headers=out_headers)

    # ---------------------------------------------------------------- registry API

    def check_admin(request: Request) -> None:
        if core.admin_token is None:
            raise StarletteHTTPException(
                403,
                "registry changes are disabled: start the router with "
                f"{ADMIN_TOKEN_ENV} set to enable them",
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise StarletteHTTPException(
                401,
                "registry changes need 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode(), core.admin_token.encode()):
            raise StarletteHTTPException(403, "wrong admin token")

    @app.get("/v1/teachers")
    async def list_teachers(after: int | None = None, wait_s: float = 0.0) -> dict:
        """The registry and its generation. With ``after=N`` (a generation the caller has) and
        ``wait_s``, a long-poll watch: the answer comes when the registry changes from N, or
        after ``wait_s`` (at most 60 s) unchanged. In-client routers watch it this way."""
        if after is not None:
            await core.watch(after, wait_s)
        return {"generation": core.generation, **core.registry.describe()}

    @app.get("/v1/teachers/{name}")
    async def get_teacher(name: str) -> dict:
        teacher = core.registry.get(name)
        if teacher is None:
            known = ", ".join(t.name for t in core.registry.all()) or "none"
            raise StarletteHTTPException(
                404, f"no teacher named {name!r}; registered teachers and anchors: {known}"
            )
        return teacher.describe()

    @app.put("/v1/teachers/{name}")
    async def put_teacher(name: str, request: Request) -> JSONResponse:
        check_admin(request)
        try:
            raw = await read_body(
                request.receive, request.headers.get("content-length"), ADMIN_BODY_LIMIT
            )
        except BodyTooLarge as exc:
            return error_response(413, str(exc))
        try:
            doc = json.loads(raw or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return error_response(
                400,
                f"body is not valid JSON ({exc}); send "
                '{"endpoints": ["http://host:port[#MODEL]", ...], "modes": [...]}',
            )
        current = core.registry.get(name)
        try:
            spec = spec_from_doc(name, doc, current.role if current else "teacher")
            # Discover outside the lock: a slow endpoint must not block other registry reads.
            teacher = await core.discover(spec)
            assert core._admin is not None
            async with core._admin:
                core.set_registry(core.registry.with_teacher(teacher))
        except RegistryError as exc:
            return error_response(422, f"registry unchanged: {exc}")
        m.registry_changes.labels("put").inc()
        reg = core.registry
        index = reg.names.index(name) if name in reg.names else None
        answer = {"index": index, **teacher.describe()}
        if warnings := swap_warnings(reg, current, teacher):
            # Accepted (a deliberate experiment may want either), but usually a wrong URL.
            answer["warnings"] = warnings
            log.warning("PUT /v1/teachers/%s: %s", name, "; ".join(warnings))
        return JSONResponse(answer, status_code=200 if current else 201)

    @app.delete("/v1/teachers/{name}")
    async def delete_teacher(name: str, request: Request) -> JSONResponse:
        check_admin(request)
        assert core._admin is not None
        async with core._admin:
            try:
                core.set_registry(core.registry.without(name))
            except KeyError:
                raise StarletteHTTPException(404, f"no teacher named {name!r}") from None
        m.registry_changes.labels("delete").inc()
        return JSONResponse({"deleted": name, "teachers": core.registry.names})

    @app.get("/metrics")
    async def prometheus() -> Response:
        for t in core.registry.all():
            m.live_replicas.labels(t.name).set(sum(r.live for r in t.replicas))
            m.checkpoints.labels(t.name).set(len(t.live_digests))
        return Response(m.render(), media_type=m.content_type)

    serve_openapi(app, router_openapi())
    return InferFastPath(app, infer)


def router_openapi() -> dict[str, Any]:
    """The router's OpenAPI document (``GET /openapi.json``; :mod:`common.openapi`): the OIP v2
    routes (infer also 501 / 502: passthrough unavailable, a teacher's undecodable answer; a
    500 only for a router bug, answered and named) and the registry API."""
    paths = oip_paths(versions=False, load_errors=None, infer_errors=(500, 501, 502))
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    obj = {"application/json": {"schema": {"$ref": "#/components/schemas/object"}}}
    admin = [{"bearer": []}]
    paths["/v1/teachers"] = {
        "get": {
            "summary": "The registry; with after=N and wait_s, a long-poll watch",
            "parameters": [
                {"name": "after", "in": "query", "required": False, "schema": {"type": "integer"}},
                {"name": "wait_s", "in": "query", "required": False, "schema": {"type": "number"}},
            ],
            "responses": responses(obj, 422),
        }
    }
    put = responses(obj, 400, 401, 403, 413, 422)
    put["201"] = {"description": "Created (a new teacher)", "content": obj}
    paths["/v1/teachers/{name}"] = {
        "get": {"summary": "One teacher", "parameters": [name], "responses": responses(obj, 404)},
        "put": {
            "summary": "Register or replace a teacher's endpoints (admin: Bearer token)",
            "security": admin,
            "parameters": [name],
            "requestBody": {"required": False, "content": obj},
            "responses": put,
        },
        "delete": {
            "summary": "Take a teacher out of routing (admin: Bearer token)",
            "security": admin,
            "parameters": [name],
            "responses": responses(obj, 401, 403, 404),
        },
    }
    return document(SERVER_NAME, SERVER_VERSION, paths)


# -------------------------------------------------------------------- uvicorn router


def holder(reg: Registry, name: str, replica: Replica) -> Teacher | None:
    """Teacher ``name`` of ``reg`` if ``replica`` is still one of its replicas (a registry
    change may have replaced it while a refresh of it was under way), else None."""
    teacher = reg.get(name)
    return teacher if teacher is not None and any(r is replica for r in teacher.replicas) else None


def swap_warnings(reg: Registry, old: Teacher | None, new: Teacher) -> list[str]:
    """What a registry change did that is legal but rarely meant: ``new`` serves the checkpoint
    another registered teacher serves, routes by other modes than ``old`` did, or means
    another thing by ``t``."""
    out = [
        f"{new.name!r} now serves the same checkpoint as {t.name!r} ({new.digest})"
        for t in reg.all()
        if t.name != new.name and new.digest and t.digest == new.digest
    ]
    if old is not None and old.modes != new.modes:
        out.append(f"{new.name!r} routes by modes {new.modes} now, {old.modes} before")
    if old is not None and old.time_convention != new.time_convention:
        # allowed only because no other teacher holds the old one: the caller's t changes meaning
        out.append(
            f"{new.name!r} uses time convention {new.time_convention!r} now, "
            f"{old.time_convention!r} before"
        )
    return out


def specs_from_settings(s: RouterSettings) -> tuple[list[TeacherSpec], str]:
    """Teacher specs from the registry file, then flags/env (which override by name); policy."""
    file_specs, file_policy = read_registry_file(s.registry) if s.registry else ([], None)
    flag_specs = [parse_flag(f, "teacher") for f in s.teacher] + [
        parse_flag(f, "anchor") for f in s.anchor
    ]
    # Flags override the file by name, but two flags naming one teacher is a typo (a=URL1
    # --teacher a=URL2 would silently drop URL1; replicas are written a=URL1,URL2).
    seen: dict[str, str] = {}
    for sp in flag_specs:
        if sp.name in seen:
            raise RegistryError(
                f"{sp.name!r} is given twice (--{seen[sp.name]} and --{sp.role}); a name "
                f"stands for one teacher: list its replicas as {sp.name}=URL1,URL2"
            )
        seen[sp.name] = sp.role
    specs = merge_specs(file_specs, flag_specs)
    if not any(sp.role == "teacher" for sp in specs):
        raise RegistryError(
            "no teachers given: use --teacher NAME=URL (repeatable), "
            "OPD_ROUTER_TEACHER or a --registry file"
        )
    return specs, s.policy or file_policy or "nearest"


def create_app(
    settings: RouterSettings,
    registry: Registry | None = None,
    admin_token: str | None = None,
    make_pool: Callable[..., Pool] = Pool,
) -> InferFastPath:
    """The uvicorn router: HTTP pool to teachers, background health checks.

    Without ``registry`` the teachers in ``settings`` are discovered at start-up (the app's
    lifespan); ``admin_token`` defaults to the ``OPD_ADMIN_TOKEN`` environment variable.
    ``make_pool`` (``Pool``'s signature) lets the Ray Serve router reach ``serve://``
    endpoints through deployment handles (services/router/serve_transport.py).
    """
    m = RouterMetrics()
    pool = make_pool(
        settings.connect_timeout_s,
        settings.attempt_timeout_s,
        settings.max_connections,
        on_retry=lambda t, _: m.retries.labels(t).inc(),
        on_eject=lambda t, r: m.ejections.labels(t, r).inc(),
    )
    refreshing: dict[int, asyncio.Task] = {}  # replica id -> its metadata refresh
    # teacher -> the condition last logged for it: the periodic re-read must not repeat a warning
    logged: dict[str, tuple] = {}

    def warn_once(name: str, condition: tuple, msg: str, *args: object) -> None:
        if logged.get(name) != condition:
            logged[name] = condition
            log.warning(msg, *args)

    def on_version(teacher: Teacher, replica: Replica) -> None:
        # Off the request path, one refresh per replica at a time: the answer is served as is.
        if id(replica) not in refreshing:
            task = asyncio.create_task(refresh(teacher.name, replica))
            refreshing[id(replica)] = task
            task.add_done_callback(lambda _: refreshing.pop(id(replica), None))

    async def refresh(name: str, replica: Replica) -> None:
        """Read ``replica``'s metadata again (it answered with a version or digest the registry
        does not know, or the periodic re-read is due) and, once the teacher's live replicas
        agree on a new digest, publish its new digest and mode centers (watchers see a new
        generation). An unreachable replica is ejected."""
        try:
            found = await discover_endpoint(
                pool.client, replica.endpoint, settings.attempt_timeout_s
            )
        except TeacherUnreachable as exc:
            # Down while no request went its way: out of rotation (and readiness) now, not at
            # the next request; the health checks admit it again when it is back.
            if (teacher := holder(core.registry, name, replica)) is not None:
                pool.eject(teacher, replica, f"metadata re-read failed: {exc}")
            return
        except RegistryError as exc:
            log.warning(
                "teacher %s replica %s: metadata refresh failed: %s", name, replica.endpoint, exc
            )
            return
        assert core._admin is not None
        async with core._admin:
            reg = core.registry
            if (teacher := holder(reg, name, replica)) is None:
                return  # swapped or deleted through the registry API meanwhile
            new = refreshed(teacher, replica, found)
            if new is None:
                warn_once(
                    name,
                    ("mixed", *teacher.live_digests),
                    "teacher %s: replicas serve different checkpoints (%s): a rolling swap?",
                    name,
                    ", ".join(f"{r.endpoint.url}: {r.digest}" for r in teacher.replicas),
                )
                return
            if new is not teacher:
                try:
                    core.set_registry(reg.with_teacher(new))
                except RegistryError as exc:
                    warn_once(
                        name,
                        ("unroutable", new.digest),
                        "teacher %s: new checkpoint not routable, kept: %s",
                        name,
                        exc,
                    )
                    return
                logged.pop(name, None)
                m.registry_changes.labels("refresh").inc()
                log.warning("teacher %s now serves digest %s", name, new.digest)

    pool.on_version = on_version

    async def call(
        teacher: Teacher,
        inputs: dict[str, np.ndarray],
        deadline: float,
        parameters: dict[str, Any] | None = None,
    ) -> TeacherAnswer:
        ans = await infer(pool, teacher, inputs, deadline, parameters)
        m.teacher_seconds.labels(teacher.name).observe(ans.latency_ms / 1e3)
        m.teacher_rows.labels(teacher.name).inc(len(ans.v))
        return ans

    async def passthrough(teacher: Teacher, body: bytes, headers: dict[str, str], deadline: float):
        # a binary request to a replica without the binary extension goes as JSON
        declared = {s.name: s.datatype for s in teacher.inputs}
        encode = passthrough_encoder(body, headers, declared)
        reply = await pool.post(teacher, body, headers, deadline, encode=encode)
        return reply.status, memoryview(reply.content), reply.headers

    async def discover(spec: TeacherSpec) -> Teacher:
        return await build_teacher(pool.client, spec, settings.attempt_timeout_s)

    token = (
        admin_token
        if admin_token is not None
        else (os.environ.get(ADMIN_TOKEN_ENV, "").strip() or None)
    )
    core = RouterCore(registry or Registry(), call, passthrough, discover, settings, token, m)
    health: list[asyncio.Task] = []

    async def start() -> None:
        if registry is None:
            specs, policy = specs_from_settings(settings)
            core.registry = await build_registry(
                pool.client, specs, policy, settings.attempt_timeout_s
            )
        health.append(
            asyncio.create_task(pool.health_loop(lambda: core.registry, settings.health_interval_s))
        )
        if settings.metadata_refresh_s > 0:
            health.append(asyncio.create_task(metadata_loop(settings.metadata_refresh_s)))

    async def metadata_loop(interval_s: float) -> None:
        # Answers that pass through this router reveal a new version at once; this catches the
        # rest: an idle router, and in-client routers whose answers it never sees.
        while True:
            await asyncio.sleep(interval_s)
            for teacher in core.registry.all():
                for replica in teacher.replicas:
                    if replica.live:
                        on_version(teacher, replica)

    async def close() -> None:
        for task in health:
            task.cancel()
        await pool.aclose()

    core.on_start.append(start)
    core.on_close.append(close)
    return build_api(core)
