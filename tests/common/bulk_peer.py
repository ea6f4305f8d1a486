"""A real uvicorn server on :class:`common.bulkbody.BulkBodyProtocol` for its tests:
``python -m tests.common.bulk_peer MAX_BYTES BUDGET``.

``POST /body`` answers how the app received the body: ``{"messages", "types", "len", "sha256",
"reserved"}`` (``reserved`` once the body was received); ``GET /reserved`` answers the bytes of bulk buffers allocated at the moment.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys

import uvicorn

from common.bulkbody import BulkBodyProtocol, bulk_protocol
from common.procs import announce_url
from common.serving import GracefulServer, bind_socket, run_async, url_of


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    doc: dict = {}
    if scope["method"] == "POST":
        digest, size, types, more = hashlib.sha256(), 0, [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            types.append(type(body).__name__)
            digest.update(body)
            size += len(body)
            more = message.get("more_body", False)
        doc.update(messages=len(types), types=sorted(set(types)), len=size)
        doc["sha256"] = digest.hexdigest()
    doc["reserved"] = BulkBodyProtocol.reserved  # after the body was received
    payload = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def main(max_bytes: int, budget: int) -> None:
    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(app, log_level="warning", http=bulk_protocol(max_bytes, budget))
    server = GracefulServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    announce_url(url_of(sock))
    await task


if __name__ == "__main__":
    run_async(main(int(sys.argv[1]), int(sys.argv[2])))
