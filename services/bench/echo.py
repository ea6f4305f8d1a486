"""The physical limit of the payload: a raw TCP request/echo over loopback.

One connection, like one HTTP request/response: the client sends ``size`` bytes, the server
reads all of them, then sends them back. No framing, no parsing, preallocated buffers and
``recv_into`` (no per-call allocation), so what is left is the kernel's copy cost and the
loopback stack. Rates count both directions, matching the sweep's ``payload_mb_s``.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass


@dataclass
class EchoResult:
    """``size`` bytes each way per round trip, ``round_trips`` of them in ``seconds``."""

    size: int
    round_trips: int
    seconds: float

    @property
    def mb_s(self) -> float:
        """MB/s (1e6 B) counting both directions."""
        return 2 * self.size * self.round_trips / self.seconds / 1e6


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _serve(listener: socket.socket, size: int) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(size))
    with conn:
        while _recv_exact(conn, buf):
            conn.sendall(buf)


def echo_rate(size: int, seconds: float = 1.0, max_round_trips: int = 100_000) -> EchoResult:
    """Round trips of ``size`` bytes over loopback for about ``seconds`` (after one warm-up)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    server = threading.Thread(target=_serve, args=(listener, size), daemon=True, name="echo")
    server.start()  # socket calls release the GIL, so a thread is as good as a process here
    client = socket.create_connection(listener.getsockname())
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = memoryview(bytearray(b"\x5a" * size))
    back = memoryview(bytearray(size))
    try:
        client.sendall(out)
        _recv_exact(client, back)  # warm-up: connection, socket buffers
        n, start = 0, time.perf_counter()
        while n < max_round_trips and time.perf_counter() - start < seconds:
            client.sendall(out)
            _recv_exact(client, back)
            n += 1
        return EchoResult(size, n, time.perf_counter() - start)
    finally:
        client.close()
        server.join(5)
        listener.close()
