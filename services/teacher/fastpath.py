"""The infer call as a raw ASGI handler in front of the FastAPI app.

Infer is the only hot route, and under load a third of the event loop's busy time went to the
FastAPI/Starlette middleware stack and router around it. :class:`InferFastPath` answers
``POST /v2/models/{name}[/versions/{version}]/infer`` itself (reading the body from ``receive``,
sending the response with ``send``) and hands every other request, and the lifespan, to the
FastAPI app. There is no Starlette infer route: this is the one implementation, for the uvicorn
process and the Ray Serve ingress alike. Its refusals are the same as the other routes':
``{"error": ...}`` bodies from :func:`common.httpapi.error_response`, counted by kind.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from common.httpapi import error_response
from services.teacher.protocol import (
    ProtocolError,
    check_declared_length,
    collect_body,
    encode_infer,
    parse_infer,
)

if TYPE_CHECKING:
    from services.teacher.app import TeacherCore
    from services.teacher.repository import LoadedModel

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: the infer paths, as Starlette would match ``{name}`` and ``{version}`` (no ``/`` inside)
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_HEADER_LENGTH = b"inference-header-content-length"


class ClientGone(Exception):
    """The client disconnected before its body arrived: there is no one to answer."""


def route_path(scope: Scope) -> str:
    """The path below the app's mount point (``root_path``, e.g. a Ray Serve route prefix),
    as Starlette's router sees it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive; :class:`ClientGone` on a disconnect."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


class InferFastPath:
    """ASGI app: infer POSTs are answered here, everything else goes to ``app`` (FastAPI).

    ``served(name, version)`` returns the model snapshot a request runs on, raising the
    :class:`ProtocolError` (404 unknown model or version, 503 unloaded) the other routes raise.
    Attributes not found here (``state``, ``routes``, ``add_exception_handler``, ...) are the
    FastAPI app's, so callers that configure the app keep working on this wrapper.
    """

    def __init__(
        self,
        app: ASGIApp,
        core: TeacherCore,
        served: Callable[[str, str | None], LoadedModel],
    ) -> None:
        self.app = app
        self.core = core
        self.served = served

    def __getattr__(self, name: str) -> Any:
        try:
            app = self.__dict__["app"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = INFER_PATH.fullmatch(route_path(scope))
            if match is not None:
                if scope["method"] != "POST":
                    await self._refuse(405, "Method Not Allowed", scope, receive, send, "POST")
                    return
                await self.infer(match[1], match[2], scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def infer(
        self, name: str, version: str | None, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Answer one infer request: the model snapshot, the bounded body, validation, the
        forward, the encoded response; a :class:`ProtocolError` becomes its status and body."""
        core = self.core
        try:
            model = self.served(name, version)  # the snapshot it runs on, whatever loads meanwhile
            declared = header_length = None
            for key, value in scope["headers"]:
                if key == b"content-length":
                    declared = value.decode("latin-1")
                elif key == _HEADER_LENGTH:
                    header_length = value.decode("latin-1")
            check_declared_length(declared, core.max_body_bytes)
            body = await collect_body(body_chunks(receive), core.max_body_bytes)
            req = parse_infer(body, header_length, model.data_dim)
        except ProtocolError as exc:
            core.metrics.error(exc.kind)
            await self._refuse(exc.status, exc.message, scope, receive, send)
            return
        except ClientGone:
            return
        try:
            res = await core.run(model, req.x, req.t)
        except Exception as exc:  # a failed forward fails this request, not the service
            core.metrics.error("internal")
            message = f"forward failed: {type(exc).__name__}: {exc}"
            await self._refuse(500, message, scope, receive, send)
            return
        content, headers = encode_infer(req, res, name)
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw.append((b"content-length", str(len(content)).encode("latin-1")))
        core.metrics.answered(req.protocol, len(req.x))
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": content})

    @staticmethod
    async def _refuse(
        status: int, message: str, scope: Scope, receive: Receive, send: Send, allow: str = ""
    ) -> None:
        response = error_response(status, message, {"Allow": allow} if allow else None)
        await response(scope, receive, send)
