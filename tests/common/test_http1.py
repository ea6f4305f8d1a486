"""The data-plane HTTP client against a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import socket
import sys

import numpy as np
import pytest

from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.http1 import Http1Client, HttpClientError
from common.procs import start_service
from tests.common.http_peer import KEEPALIVE_S


@pytest.fixture(scope="module")
def peer():
    svc = start_service([sys.executable, "-m", "tests.common.http_peer"])
    yield svc.url
    svc.stop()


LOOPS = ["asyncio", "uvloop"]


def run(coro, loop: str = "asyncio"):
    if loop == "uvloop":  # the services run on uvloop, whose buffered reads differ in detail
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


@pytest.mark.parametrize("loop", LOOPS)
def test_post_get_and_keepalive_reuse(peer, loop: str) -> None:
    async def go():
        client = Http1Client()
        body = bytes(range(256)) * 1000
        r = await client.post(f"{peer}/echo", body, {"content-type": "application/octet-stream"})
        assert (r.status, r.headers["x-method"], r.headers["x-len"]) == (
            200,
            "POST",
            str(len(body)),
        )
        assert bytes(r.content) == body and isinstance(r.content, bytearray)
        g = await client.get(f"{peer}/echo")
        assert (g.status, g.headers["x-method"], bytes(g.content)) == (200, "GET", b"")
        host = next(iter(client._hosts.values()))
        assert len(host.idle) == 1  # both exchanges went over one kept-alive connection
        await client.aclose()

    run(go(), loop)


def test_concurrent_requests_get_their_own_answers(peer) -> None:
    async def go():
        client = Http1Client(limit_per_host=4)
        bodies = [str(i).encode() * (i + 1) for i in range(32)]
        answers = await asyncio.gather(*(client.post(f"{peer}/echo", b) for b in bodies))
        assert [bytes(a.content) for a in answers] == bodies
        assert len(next(iter(client._hosts.values())).idle) <= 4  # the cap on connections held
        await client.aclose()

    run(go())


@pytest.mark.parametrize("loop", LOOPS)
def test_chunked_close_status_and_large(peer, loop: str) -> None:
    async def go():
        client = Http1Client()
        r = await client.get(f"{peer}/chunked?parts=4")
        assert "content-length" not in r.headers
        assert bytes(r.content) == b"part0;part1;part2;part3;"
        c = await client.get(f"{peer}/close")
        assert bytes(c.content) == b"bye"
        assert not next(iter(client._hosts.values())).idle  # 'Connection: close' is honoured
        f = await client.post(f"{peer}/fail", b"{}")
        assert f.status == 500 and b"boom" in f.content  # statuses are returned, not raised
        for n in (5_000_000, 20_000, 16_383):  # read directly into the body, or parsed
            big = await client.get(f"{peer}/big?n={n}")
            assert big.content == b"z" * n
        await client.aclose()

    run(go(), loop)


def test_server_closing_idle_connection_is_transparent(peer) -> None:
    async def go():
        client = Http1Client()
        assert (await client.get(f"{peer}/echo")).status == 200
        await asyncio.sleep(KEEPALIVE_S * 3)  # uvicorn closes the idle keep-alive connection
        assert (await client.post(f"{peer}/echo", b"again")).content == b"again"
        await client.aclose()

    run(go())


def test_timeout_limit_and_refused(peer) -> None:
    async def go():
        client = Http1Client(max_response_bytes=1000)
        with pytest.raises(TimeoutError):
            await client.get(f"{peer}/slow?s=2", timeout=0.2)
        assert (await client.get(f"{peer}/echo")).status == 200  # the client still works
        with pytest.raises(HttpClientError, match="exceeds the client's limit"):
            await client.get(f"{peer}/big?n=5000")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]  # closed again: nothing listens there
        with pytest.raises(HttpClientError, match="cannot connect"):
            await client.get(f"http://127.0.0.1:{free}/", timeout=2)
        with pytest.raises(ValueError, match="plain http"):
            await client.get("https://example.org/")
        await client.aclose()

    run(go())


def test_binary_infer_against_a_teacher(tiny_models) -> None:
    from tests.services.test_teacher import reference, start_teacher

    svc = start_teacher(tiny_models / "teacher-a.safetensors")
    try:
        x = np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32)
        t = np.linspace(0, 1, 300, dtype=np.float32)
        body, headers = encode_request({"x": x, "t": t}, outputs=["v"], binary=True)

        async def go():
            client = Http1Client()
            r = await client.post(f"{svc.url}/v2/models/teacher-a/infer", body, headers)
            await client.aclose()
            return r

        r = run(go())
        assert r.status == 200
        v = decode_response(r.content, r.headers.get(HEADER_LENGTH.lower())).tensors["v"]
        ref = reference(tiny_models / "teacher-a.safetensors", x, t)
        assert np.abs(v - ref).max() <= 1e-6
    finally:
        svc.stop()
