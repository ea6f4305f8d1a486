"""uvicorn's httptools protocol, reading a large request body whole into one buffer.

uvicorn hands a body to the app in messages of ~64 KB: it pauses reading once 64 KB are
buffered, until the app's ``receive()`` takes them (as a copy), and the app joins the messages
(another copy). For the 8 MB tensor body of 32 image-scale states that is ~130 pause / wake-up
round trips and four copies of the body. :class:`BulkBodyProtocol` reads a body whose
``Content-Length`` lies between :data:`BULK_MIN_BYTES` and the service's body limit without
pausing, into one ``bytearray`` allocated at that size, and hands it to the app as a single
``http.request`` message: one copy after the socket read, one wake-up. The ``bytearray`` is
writable, so numpy views of it can go to torch without a copy.

Everything else (small, chunked or ``Expect: 100-continue`` bodies, upgrades, pipelining,
disconnects, keep-alive) stays on uvicorn's own code path. The buffers preallocated at once are
bounded by a byte budget; a request over it also takes uvicorn's path, so a crowd of clients that
declare large bodies and send them slowly cannot make the process allocate without limit.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: below this a body is one or two of uvicorn's messages anyway
BULK_MIN_BYTES = 256 * 1024


class BulkBodyProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that reads a body of ``BULK_MIN_BYTES..max_bytes`` bytes (as the
    request's ``Content-Length`` declares) into one preallocated ``bytearray``.

    ``max_bytes``: the largest body read this way (the service's body limit; a larger one is the
    app's to refuse). ``budget``: bytes of such buffers allocated at once, over all connections
    of the process (they all run on its one event loop).
    """

    reserved = 0  # bytes of bulk buffers allocated and not yet handed to the app, process-wide

    def __init__(self, *args: Any, max_bytes: int, budget: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_bytes, self.budget = max_bytes, budget
        self._bulk: bytearray | None = None
        self._filled = 0

    # parser callbacks

    def on_headers_complete(self) -> None:
        self._release()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle.scope is not self.scope or self.expect_100_continue:
            return  # an upgrade (no cycle of its own), or the client waits for 100 Continue
        size = _content_length(self.headers)
        if size is None or not BULK_MIN_BYTES <= size <= self.max_bytes:
            return
        if BulkBodyProtocol.reserved + size > self.budget:
            return  # uvicorn's path: 64 KB at a time
        BulkBodyProtocol.reserved += size
        self._bulk, self._filled = bytearray(size), 0
        # read when the ASGI task first calls receive(), which happens after this returns
        cycle.receive = _whole_body_receive(cycle, self._bulk, cycle.receive)

    def on_body(self, body: bytes) -> None:
        bulk = self._bulk
        if bulk is None:
            super().on_body(body)
            return
        end = self._filled + len(body)
        bulk[self._filled : end] = body  # httptools stops at Content-Length: end <= len(bulk)
        self._filled = end

    def on_message_complete(self) -> None:
        self._release()  # the buffer is the app's now
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def _release(self) -> None:
        if self._bulk is not None:
            BulkBodyProtocol.reserved -= len(self._bulk)
            self._bulk = None


def _content_length(headers: list[tuple[bytes, bytes]] | None) -> int | None:
    """The declared ``Content-Length``, or None (absent, malformed, or chunked)."""
    length = None
    for name, value in headers or ():
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            if not value.isdigit():
                return None
            length = int(value)
    return length


def _whole_body_receive(
    cycle: Any, body: bytearray, then: Callable[[], Awaitable[dict]]
) -> Callable[[], Awaitable[dict]]:
    """An ASGI ``receive`` for ``cycle``: the whole ``body`` in one message once the parser has
    read it all, then uvicorn's own ``receive`` (which reports the disconnect)."""
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if delivered:
            return await then()
        if cycle.more_body and not cycle.disconnected:
            cycle.flow.resume_reading()  # paused only when this request was pipelined
            await cycle.message_event.wait()  # set on message complete or disconnect
        cycle.message_event.clear()  # so uvicorn's receive() waits for the disconnect
        if cycle.disconnected:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def bulk_protocol(max_bytes: int, budget: int | None = None) -> Callable[..., BulkBodyProtocol]:
    """A uvicorn ``Config(http=...)`` protocol factory reading bodies up to ``max_bytes`` whole;
    ``budget`` (default ``4 × max_bytes``) bounds the buffers allocated at once."""
    return functools.partial(
        BulkBodyProtocol,
        max_bytes=max_bytes,
        budget=budget if budget is not None else 4 * max_bytes,
    )
