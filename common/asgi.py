"""Raw ASGI for the hot route: infer answered in front of a FastAPI app, no middleware on it.

Under load a third of a service's event-loop time went to the FastAPI/Starlette middleware stack
and router around ``POST .../infer``. :class:`InferFastPath` matches
``/v2/models/{name}[/versions/{version}]/infer`` itself and hands those requests to a handler
that reads the body from ``receive`` and answers with ``send``; every other request, and the
lifespan, goes to the FastAPI app. Both services (teacher and router) and their Ray Serve
ingresses use it, each with its own handler.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from common.httpapi import error_response

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: (model name, version or None, scope, receive, send): answers one infer POST
InferHandler = Callable[[str, str | None, Scope, Receive, Send], Awaitable[None]]

#: the infer paths, as Starlette would match ``{name}`` and ``{version}`` (no ``/`` inside)
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class ClientGone(Exception):
    """The client disconnected before its body arrived: there is no one to answer."""


class BodyTimeout(Exception):
    """The request body did not arrive within its read deadline (a client trickling it in)."""


class ClientStalled(Exception):
    """The client did not read its answer within the send deadline; its connection is closed."""


#: the longest one ASGI body message of an answer is: a client that stops reading holds at most
#: about this much in the server's write buffer while the send deadline runs
SEND_CHUNK_BYTES = 1 << 20


def route_path(scope: Scope) -> str:
    """The path below the app's mount point (``root_path``, e.g. a Ray Serve route prefix),
    as Starlette's router sees it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def headers_of(scope: Scope, *names: bytes) -> list[str | None]:
    """The values of the request headers ``names`` (lower-case bytes), ``None`` where absent."""
    found: dict[bytes, str] = {}
    for key, value in scope["headers"]:
        if key in names:
            found[key] = value.decode("latin-1")
    return [found.get(n) for n in names]


async def body_chunks(receive: Receive, timeout_s: float | None = None) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive; :class:`ClientGone` on a disconnect,
    :class:`BodyTimeout` once the whole body has taken longer than ``timeout_s`` (a body
    trickling in must not hold its bytes and a request slot forever)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if deadline is None:
            message = await receive()
        else:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout(f"request body not received within {timeout_s:g} s") from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def send_parts(
    send: Send,
    status: int,
    parts: list,
    headers: dict[str, str],
    join: bool = False,
    timeout_s: float | None = None,
) -> None:
    """One complete response whose body is ``parts`` (bytes-like, in order), with
    ``content-length``. Each part goes out as its own ASGI body message, so uvicorn writes a
    tensor's bytes from the array itself; ``join=True`` sends one ``bytes`` body instead, for
    servers that serialise ASGI messages (Ray Serve's replica → proxy hop pickles them, and
    a ``memoryview`` does not pickle).

    ``timeout_s``: the whole answer must be taken by the client within it. Parts go out in
    pieces of at most :data:`SEND_CHUNK_BYTES` (the server waits for its write buffer to drain
    before each), so a client that stops reading stalls the send instead of the server
    buffering the whole answer; past the deadline the connection is aborted and
    :class:`ClientStalled` raised (the caller's bytes are then released).
    """
    if join and len(parts) > 1:
        parts = [b"".join(parts)]
    size = sum(memoryview(p).nbytes for p in parts)
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", str(size).encode("latin-1")))
    if timeout_s is None or join:
        await send({"type": "http.response.start", "status": status, "headers": raw})
        last = len(parts) - 1
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
        return
    deadline = time.monotonic() + timeout_s
    pieces = [p for part in parts for p in _pieces(part)]
    messages = [{"type": "http.response.start", "status": status, "headers": raw}]
    last = len(pieces) - 1
    messages += [
        {"type": "http.response.body", "body": p, "more_body": i < last}
        for i, p in enumerate(pieces)
    ]
    for message in messages:
        try:
            await asyncio.wait_for(send(message), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            abort_connection(send)
            raise ClientStalled(f"answer not taken by the client within {timeout_s:g} s") from None


def _pieces(part: Any) -> list:
    """``part`` as views of at most :data:`SEND_CHUNK_BYTES` (itself when it is that small)."""
    view = memoryview(part)
    if view.nbytes <= SEND_CHUNK_BYTES or not view.c_contiguous:
        return [part]
    view = view.cast("B")
    return [view[i : i + SEND_CHUNK_BYTES] for i in range(0, view.nbytes, SEND_CHUNK_BYTES)]


def drop_unread_body(receive: Receive) -> None:
    """Free what a refused request's body already buffered in the server.

    Refused before its body is read (503, 413), a request has had its first bytes buffered by
    uvicorn anyway (up to one 256 KiB socket read past its 64 KiB high-water mark), and uvicorn
    keeps that buffer until the connection's next request: a flood of 512 refused 768 KiB
    requests held 130 MiB that way. The rest of the body is discarded as it arrives. A no-op
    where the server does not expose its request cycle (``receive`` is uvicorn's bound method).
    """
    cycle = getattr(receive, "__self__", None)
    if isinstance(getattr(cycle, "body", None), bytearray):
        cycle.body = bytearray()  # type: ignore[union-attr]


def abort_connection(send: Send) -> bool:
    """Drop the connection ``send`` writes to at once, its unsent bytes with it.

    ASGI has no call for it; uvicorn's ``send`` is a bound method of its request cycle, which
    holds the transport. A plain close would wait for the client to read what is buffered, which
    a stalled client never does. Returns False where the server does not expose its transport
    (then the caller's exception ends the response and the server closes the connection).
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if abort is None:
        return False
    abort()
    return True


async def refuse(
    status: int,
    message: str,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: dict[str, str] | None = None,
) -> None:
    """An ``{"error": message}`` answer with ``status``, as the FastAPI routes give."""
    await error_response(status, message, headers)(scope, receive, send)


class InferFastPath:
    """ASGI app: infer POSTs go to ``handler``, everything else to ``app`` (FastAPI).

    Attributes not found here (``state``, ``routes``, ``add_exception_handler``, ...) are the
    FastAPI app's, so callers that configure the app keep working on this wrapper.
    """

    def __init__(self, app: ASGIApp, handler: InferHandler) -> None:
        self.app = app
        self.handler = handler

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
                    await refuse(405, "Method Not Allowed", scope, receive, send, {"Allow": "POST"})
                    return
                await self.handler(match[1], match[2], scope, receive, send)
                return
        await self.app(scope, receive, send)
