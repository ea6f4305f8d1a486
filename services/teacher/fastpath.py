"""The teacher's infer call as a raw ASGI handler (see :mod:`common.asgi`).

:func:`infer_handler` answers ``POST /v2/models/{name}[/versions/{version}]/infer`` for the
uvicorn process and the Ray Serve ingress alike; there is no Starlette infer route. Its
refusals are the same as the other routes': ``{"error": ...}`` bodies counted by kind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from common.admission import ByteBudget, Overloaded, RequestTooLarge
from common.asgi import (
    BodyTimeout,
    ClientGone,
    ClientStalled,
    InferHandler,
    Receive,
    Scope,
    Send,
    body_chunks,
    drop_unread_body,
    headers_of,
    refuse,
    send_parts,
)
from services.teacher.protocol import (
    ProtocolError,
    check_declared_length,
    collect_body,
    encode_infer,
)

if TYPE_CHECKING:
    from services.teacher.app import TeacherCore

_HEADER_LENGTH = b"inference-header-content-length"


def infer_handler(
    core: TeacherCore, served: Callable[[str, str | None], Any], join: bool = False
) -> InferHandler:
    """The infer handler over ``core``; ``join``: send the response body as one ``bytes``
    (see :func:`common.asgi.send_parts`; the Ray Serve ingress needs it).

    ``served(name, version)`` returns the model snapshot a request runs on, raising the
    :class:`ProtocolError` (404 unknown model or version, 503 unloaded) the other routes raise.
    """

    async def infer(
        name: str, version: str | None, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Admission, the model snapshot, the bounded body, validation, the forward, the encoded
        answer; a :class:`ProtocolError` becomes its status and body. The bytes the request
        holds (body, decoded tensors, answer) count against ``core.admission`` until its answer
        is written or it ends otherwise."""
        budget = core.admission
        held = [0]  # bytes this request holds in the budget (a list: the helpers add to it)
        completed = False
        try:
            try:
                model = served(name, version)  # the snapshot it runs on, whatever loads meanwhile
                declared, header_length = headers_of(scope, b"content-length", _HEADER_LENGTH)
                check_declared_length(declared, core.max_body_bytes)
                if declared is not None:  # admitted before a byte of the body is read
                    budget.admit(int(declared))
                    held[0] += int(declared)
                chunks = body_chunks(receive, core.body_timeout_s)
                if declared is None:  # chunked upload: admitted as it arrives
                    chunks = _admitted(chunks, budget, held)
                body = await collect_body(chunks, core.max_body_bytes)
                # the model validates its own inputs (toy: x [B, D], t [B]; diffusers: latents,
                # conditioning or cond_id from the core's cache, guidance)
                req = model.parse(body, header_length, core.conds)
                if not np.may_share_memory(req.x, body):  # JSON: tensors are new arrays
                    budget.hold(req.x.nbytes + req.t.nbytes)
                    held[0] += req.x.nbytes + req.t.nbytes
            except ProtocolError as exc:
                core.metrics.error(exc.kind)
                await refuse(exc.status, exc.message, scope, receive, send)
                return
            except RequestTooLarge as exc:
                core.metrics.error("too_large")
                await refuse(413, str(exc), scope, receive, send)
                return
            except Overloaded as exc:
                core.metrics.overloaded.labels(core.metrics.model).inc()
                retry = {"Retry-After": str(exc.retry_after_s)}
                await refuse(503, str(exc), scope, receive, send, retry)
                return
            except BodyTimeout as exc:
                core.metrics.error("timeout")
                # close: the rest of a trickling body must not keep the connection busy
                await refuse(408, str(exc), scope, receive, send, {"Connection": "close"})
                return
            except ClientGone:
                return
            try:
                if req.extra is None:
                    res = await core.run(model, req.x, req.t)
                else:
                    res = await core.run(model, req.x, req.t, req.extra)
            except Exception as exc:  # a failed forward fails this request, not the service
                core.metrics.error("internal")
                message = f"forward failed: {type(exc).__name__}: {exc}"
                await refuse(500, message, scope, receive, send)
                return
            budget.hold(res.v.nbytes)  # the answer, until it is written
            held[0] += res.v.nbytes
            parts, headers = encode_infer(req, res, name)
            protocol, states = req.protocol, len(req.x)
            del body, req  # freed while the answer goes out (a slow reader holds only that)
            try:
                await send_parts(send, 200, parts, headers, join, core.send_timeout_s)
            except ClientStalled:
                core.metrics.error("client_stalled")
                return
            core.metrics.answered(protocol, states)
            completed = True
        finally:
            drop_unread_body(receive)  # what a refused body buffered before its refusal
            budget.release(held[0], completed)

    return infer


async def _admitted(
    chunks: AsyncIterator[bytes], budget: ByteBudget, held: list[int]
) -> AsyncIterator[bytes]:
    """``chunks`` of a body without ``Content-Length``, each admitted to ``budget`` as it
    arrives (``held[0]`` counts what was)."""
    async for chunk in chunks:
        budget.admit(len(chunk))
        held[0] += len(chunk)
        yield chunk
