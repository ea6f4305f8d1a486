"""Running an ASGI app as a service: a socket we bind ourselves (port 0 friendly), a clean exit
on SIGTERM, the ``OPD_URL=`` announcement launchers wait for, and uvloop when it is there.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable, Callable
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

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C skips the graceful wait
        self.should_exit = True
        if self.on_exit is not None and self._loop is not None:
            # e.g. answer long-poll requests now, so the graceful drain does not wait them out;
            # call_soon_threadsafe: this runs in a signal handler
            self._loop.call_soon_threadsafe(self.on_exit)


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


async def serve_app(
    app: Any,
    host: str,
    port: int,
    log_level: str = "warning",
    on_exit: Callable[[], None] | None = None,
) -> None:
    """Bind, serve ``app`` until SIGINT/SIGTERM (drained, exit 0), announcing the URL once up.
    ``on_exit`` runs on the event loop when the signal arrives, before the drain."""
    sock = bind_socket(host, port)
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, timeout_graceful_shutdown=10
    )
    server = GracefulServer(config, on_exit)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        announce_url(url_of(sock))
    await task


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    A forward's activations are a few MB each time (4,096 states x width 128 x 4 B = 2 MB a
    layer). With glibc's defaults a worker thread's arena returns them to the kernel after
    every forward and page-faults them in again on the next one: measured 220 minor faults per
    1,536-state request at 16 in flight, ~12% of the forward thread's CPU. Fixed thresholds
    (``mmap_threshold`` at most 32 MiB on 64-bit) keep them mapped. Returns False where the C
    library is not glibc (nothing changes there).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def run_async(main: Awaitable[T]) -> T:
    """Run a coroutine to its result, on uvloop when installed: less event-loop CPU per request,
    and its transports write a body from the caller's buffer where asyncio's join (copy) it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]
