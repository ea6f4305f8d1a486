"""The teacher's infer call as a raw ASGI handler (see :mod:`common.asgi`).

:func:`infer_handler` answers ``POST /v2/models/{name}[/versions/{version}]/infer`` for the
uvicorn process and the Ray Serve ingress alike; there is no Starlette infer route. Its
refusals are the same as the other routes': ``{"error": ...}`` bodies counted by kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from common.asgi import (
    ClientGone,
    InferHandler,
    Receive,
    Scope,
    Send,
    body_chunks,
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
        """The model snapshot, the bounded body, validation, the forward, the encoded answer;
        a :class:`ProtocolError` becomes its status and body."""
        try:
            model = served(name, version)  # the snapshot it runs on, whatever loads meanwhile
            declared, header_length = headers_of(scope, b"content-length", _HEADER_LENGTH)
            check_declared_length(declared, core.max_body_bytes)
            body = await collect_body(body_chunks(receive), core.max_body_bytes)
            # the model validates its own inputs (toy: x [B, D], t [B]; diffusers: latents,
            # conditioning or cond_id from the core's cache, guidance)
            req = model.parse(body, header_length, core.conds)
        except ProtocolError as exc:
            core.metrics.error(exc.kind)
            await refuse(exc.status, exc.message, scope, receive, send)
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
        parts, headers = encode_infer(req, res, name)
        core.metrics.answered(req.protocol, len(req.x))
        await send_parts(send, 200, parts, headers, join)

    return infer
