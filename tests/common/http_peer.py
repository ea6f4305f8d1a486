"""A small real HTTP server for the client tests: ``python -m tests.common.http_peer``.

Plain uvicorn (its own HTTP/1.1 stack, not ours) with routes that exercise what a data-plane
client meets: fixed-length and chunked bodies, ``Connection: close``, slow answers, 5xx, and a
short keep-alive timeout so idle connections get closed by the server.
"""

from __future__ import annotations

import asyncio

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from common.procs import announce_url
from common.serving import GracefulServer, bind_socket, run_async, url_of

KEEPALIVE_S = 0.3


async def echo(request: Request) -> Response:
    body = await request.body()
    return Response(body, headers={"x-method": request.method, "x-len": str(len(body))})


async def chunked(request: Request) -> StreamingResponse:
    parts = int(request.query_params.get("parts", "3"))

    async def gen():
        for i in range(parts):
            yield f"part{i};".encode()

    return StreamingResponse(gen())


async def close(_: Request) -> Response:
    return Response(b"bye", headers={"connection": "close"})


async def slow(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params.get("s", "1")))
    return Response(b"late")


async def fail(_: Request) -> Response:
    return Response(b'{"error": "boom"}', status_code=500)


async def big(request: Request) -> Response:
    return Response(b"z" * int(request.query_params.get("n", "1000")))


app = Starlette(
    routes=[
        Route("/echo", echo, methods=["GET", "POST"]),
        Route("/chunked", chunked),
        Route("/close", close),
        Route("/slow", slow),
        Route("/fail", fail, methods=["POST"]),
        Route("/big", big),
    ]
)


async def main() -> None:
    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=KEEPALIVE_S)
    server = GracefulServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    announce_url(url_of(sock))
    await task


if __name__ == "__main__":
    run_async(main())
