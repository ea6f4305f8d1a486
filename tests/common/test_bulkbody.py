"""Large request bodies read whole (common/bulkbody.py), against a real uvicorn process."""

from __future__ import annotations

import hashlib
import socket
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest

from common.bulkbody import BULK_MIN_BYTES
from common.procs import start_service

MB = 1 << 20
MAX_BYTES, BUDGET = 8 * MB, 3 * MB


@pytest.fixture(scope="module")
def peer():
    svc = start_service(
        [sys.executable, "-m", "tests.common.bulk_peer", str(MAX_BYTES), str(BUDGET)]
    )
    yield svc.url
    svc.stop()


def _body(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + b"x" * (n % 256)


def _post(url: str, body: bytes, chunked: bool = False) -> dict:
    content = (body[i : i + 100_000] for i in range(0, len(body), 100_000)) if chunked else body
    r = httpx.post(f"{url}/body", content=content, timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["len"] == len(body) and doc["sha256"] == hashlib.sha256(body).hexdigest()
    return doc


def _reserved(url: str) -> int:
    return httpx.get(f"{url}/reserved", timeout=10).json()["reserved"]


def test_large_body_arrives_whole_as_one_bytearray(peer) -> None:
    doc = _post(peer, _body(2 * MB + 7))
    assert (doc["messages"], doc["types"]) == (1, ["bytearray"])
    assert doc["reserved"] == 0  # handed to the app: no longer counted


def test_small_over_limit_and_over_budget_bodies_take_uvicorns_path(peer) -> None:
    small = _post(peer, _body(BULK_MIN_BYTES - 1))
    assert small["types"] == ["bytes"]
    for n in (4 * MB, MAX_BYTES + 1):  # over the budget; over the limit (the app's to refuse)
        doc = _post(peer, _body(n))
        assert doc["messages"] > 1 and doc["types"] == ["bytes"]


def test_chunked_upload_is_read_correctly(peer) -> None:
    body = _body(MB)
    doc = _post(peer, body, chunked=True)
    assert doc["types"] == ["bytes"]


def test_expect_100_continue_still_answered(peer) -> None:
    body = _body(MB)
    with _connect(peer) as sock:
        sock.sendall(_head(len(body), b"Expect: 100-continue\r\n"))
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert b'"len": %d' % len(body) in _read_response(sock)


def test_keepalive_connection_serves_bulk_then_small(peer) -> None:
    big, small = _body(MB), b"hello"
    with _connect(peer) as sock:
        for body in (big, small, big):
            sock.sendall(_head(len(body)) + body)
            assert b'"len": %d' % len(body) in _read_response(sock)


def test_half_sent_body_reserves_then_frees_on_disconnect(peer) -> None:
    """A buffer is reserved while its body arrives, a second over the budget is not, and a
    client that goes away mid-body frees its reservation."""
    n = 2 * MB
    with _connect(peer) as a, _connect(peer) as b:
        a.sendall(_head(n) + _body(n)[: n // 2])
        assert _eventually(lambda: _reserved(peer) == n)
        b.sendall(_head(n) + _body(n)[: n // 2])  # 2 + 2 MB > 3 MB budget: uvicorn's path
        time.sleep(0.2)
        assert _reserved(peer) == n
    assert _eventually(lambda: _reserved(peer) == 0)
    assert _post(peer, _body(n))["messages"] == 1  # and the budget is free again


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def _head(n: int, extra: bytes = b"") -> bytes:
    return b"POST /body HTTP/1.1\r\nHost: peer\r\nContent-Length: %d\r\n%s\r\n" % (n, extra)


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return rest


def _eventually(check, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False
