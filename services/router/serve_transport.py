"""Teachers on Ray Serve reached by deployment handle, under the router's own HTTP clients.

A registry endpoint ``serve://APP[#MODEL]`` names the Serve application ``APP`` (a teacher
deployment of :mod:`services.teacher.ray_deployment`) in the router's Ray cluster. Instead of a
second implementation of the router for Ray, the uvicorn router's pool and discovery run
unchanged over two drop-in clients that send ``serve://`` exchanges to the application's
``http`` handle method (the teacher's own OIP v2 ASGI app, called in its replica) and every other
URL over HTTP as before:

- :class:`ServeData` stands in for :class:`~common.http1.Http1Client` (the pool's data path);
- :class:`ServeTransport` is an ``httpx`` transport (discovery, health checks, metadata reads).

So retries, ejection, health checks, digest tracking, passthrough and the registry API behave as
on the uvicorn router, and the bytes are the same OIP v2 documents; only the hop is a Serve
handle call (Serve picks the replica: ``num_replicas``, autoscaling, multi-node) instead of a
socket. A call that fails below HTTP (a replica that died or drains mid-call, an application
being redeployed) is tried again through the handle, with backoff, while the pool's attempt
timeout lasts (Serve routes it to a live or new replica) before the pool sees a failure.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from common.http1 import Http1Client, HttpClientError, Response

SCHEME = "serve"
PREFIX = f"{SCHEME}://"
#: handle attempts per exchange at least (the second goes to another or the restarted replica);
#: more while the attempt's timeout lasts, up to MAX_ATTEMPTS
ATTEMPTS = 2
MAX_ATTEMPTS = 8
#: first pause before another attempt (doubling up to MAX_PAUSE_S): Serve needs a moment to
#: drop a dead replica from its routing or to start the replacement
RETRY_PAUSE_S = 0.1
MAX_PAUSE_S = 1.0


def is_serve_url(url: str) -> bool:
    return url.startswith(PREFIX)


def split(url: str) -> tuple[str, str]:
    """``serve://APP/path?query`` -> (``APP``, ``/path?query``)."""
    rest = url[len(PREFIX) :]
    app, slash, path = rest.partition("/")
    return app, slash + path if slash else "/"


class ServeHandles:
    """Handles to Serve applications by name, made on first use (the application may be
    deployed after the router: a missing one is an unreachable endpoint until it exists)."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def get(self, app: str) -> Any:
        handle = self._handles.get(app)
        if handle is None:
            from ray import serve

            try:
                handle = serve.get_app_handle(app)
            except Exception as exc:  # Serve raises when no such application is running
                raise HttpClientError(
                    f"no Ray Serve application {app!r} ({type(exc).__name__}: {exc})"
                ) from None
            self._handles[app] = handle
        return handle

    async def exchange(
        self,
        method: str,
        url: str,
        body: bytes,
        headers: dict[str, str],
        timeout: float | None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request to the application's ``http`` method: (status, headers, content).

        Raises:
            HttpClientError: no such application, or every attempt failed below HTTP.
            asyncio.TimeoutError: no answer within ``timeout``.
        """
        app, path = split(url)
        deadline = None if timeout is None else time.monotonic() + timeout
        cause, pause = "", RETRY_PAUSE_S
        for attempt in range(MAX_ATTEMPTS):
            handle = self.get(app)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                call = handle.http.remote(method, path, body, headers)
                return await asyncio.wait_for(call, timeout=left)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                raise
            except Exception as exc:  # a dead or draining replica, the app being redeployed
                cause = f"{type(exc).__name__}: {exc}"
                self._handles.pop(app, None)  # a deleted and redeployed app needs a new handle
            # Serve replaces a dead replica or rolls a redeploy within seconds: try again while
            # the attempt's time lasts (at least ATTEMPTS times), backing off.
            if attempt + 1 >= ATTEMPTS and (
                deadline is None or time.monotonic() + pause >= deadline
            ):
                break
            await asyncio.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE_S)
        raise HttpClientError(f"Serve application {app!r}: {cause}")


class ServeData:
    """:class:`Http1Client` with ``serve://`` URLs answered through Serve handles."""

    def __init__(self, http: Http1Client, handles: ServeHandles) -> None:
        self.http, self.handles = http, handles

    async def post(
        self,
        url: str,
        body: bytes | bytearray | memoryview,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> Response:
        return await self.request("POST", url, body, headers, timeout, connect_timeout)

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | bytearray | memoryview = b"",
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> Response:
        if not is_serve_url(url):
            return await self.http.request(method, url, body, headers, timeout, connect_timeout)
        status, out, content = await self.handles.exchange(
            method, url, bytes(body), dict(headers or {}), timeout
        )
        return Response(status, {k.lower(): v for k, v in out.items()}, bytearray(content))

    async def aclose(self) -> None:
        await self.http.aclose()


class ServeTransport(httpx.AsyncBaseTransport):
    """``httpx`` transport for ``serve://`` URLs (mounted on the pool's ``httpx`` client)."""

    def __init__(self, handles: ServeHandles) -> None:
        self.handles = handles

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {}).get("read")
        try:
            status, headers, content = await self.handles.exchange(
                request.method,
                str(request.url),
                await request.aread(),
                dict(request.headers),
                timeout,
            )
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout("Serve handle call timed out", request=request) from None
        except HttpClientError as exc:
            raise httpx.ConnectError(str(exc), request=request) from None
        return httpx.Response(status, headers=headers, content=content, request=request)
