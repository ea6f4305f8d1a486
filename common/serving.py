"""Running an ASGI app as a service: a socket we bind ourselves (port 0 friendly), a clean exit
on SIGTERM, the ``OPD_URL=`` announcement launchers wait for, and uvloop when it is there.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable
from types import FrameType
from typing import Any, TypeVar

import uvicorn

from common.procs import announce_url
from common.settings import UsageError

T = TypeVar("T")


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose SIGTERM/SIGINT end in a clean exit (status 0).

    Plain uvicorn re-raises the captured signal after its graceful shutdown, so the process
    would die "killed by SIGTERM" (-15) even though it drained and stopped properly.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C skips the graceful wait
        self.should_exit = True


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0 = a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when the
    # listener says TCP; without it every small response waits ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot bind {host}:{port}: {exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve_app(app: Any, host: str, port: int, log_level: str = "warning") -> None:
    """Bind, serve ``app`` until SIGINT/SIGTERM (drained, exit 0), announcing the URL once up."""
    sock = bind_socket(host, port)
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, timeout_graceful_shutdown=10
    )
    server = GracefulServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        announce_url(url_of(sock))
    await task


def run_async(main: Awaitable[T]) -> T:
    """Run a coroutine to its result, on uvloop when installed: less event-loop CPU per request,
    and its transports write a body from the caller's buffer where asyncio's join (copy) it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]
