"""``opd serve teacher``: one teacher as a uvicorn process on a socket it binds itself.

Binding the socket here (not in uvicorn) makes ``--port 0`` work: the kernel picks the port, we
read it back, and announce the URL (``OPD_URL=...``) once uvicorn has started serving on it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from types import FrameType

import uvicorn

from common.cli import Command, UsageError
from common.procs import announce_url
from services.teacher.app import create_app
from services.teacher.repository import RepositoryError
from services.teacher.settings import TeacherSettings


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


async def serve(settings: TeacherSettings) -> None:
    """Load the checkpoint, bind, serve until SIGINT/SIGTERM (uvicorn handles both cleanly)."""
    try:
        app = create_app(settings)
    except RepositoryError as exc:
        raise UsageError(str(exc)) from None
    sock = bind_socket(settings.host, settings.port)
    config = uvicorn.Config(
        app, log_level=settings.log_level, access_log=False, timeout_graceful_shutdown=10
    )
    server = GracefulServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        announce_url(url_of(sock))
    await task


def run_teacher(settings: TeacherSettings) -> int:
    asyncio.run(serve(settings))
    return 0


TEACHER = Command(
    "serve one teacher checkpoint over OIP v2 (uvicorn)", TeacherSettings, run_teacher
)
