"""``opd serve router``: the router as a uvicorn process (``--port 0`` friendly, announces its URL).

Teachers are contacted before the port is bound, so a bad registry (unreachable teacher,
replicas with different digests, ``nearest`` without mode centers) ends the command with a
clear message and exit status 2 instead of a half-started server.
"""

from __future__ import annotations

import asyncio

import httpx
import torch
import uvicorn

from common.cli import Command, UsageError
from common.procs import announce_url
from services.router.app import create_app, specs_from_settings
from services.router.registry import RegistryError, build_registry
from services.router.settings import RouterSettings
from services.teacher.command import GracefulServer, bind_socket, url_of


async def serve(settings: RouterSettings) -> None:
    """Discover the teachers, bind, serve until SIGINT/SIGTERM."""
    torch.set_num_threads(settings.threads)
    try:
        specs, policy = specs_from_settings(settings)
        async with httpx.AsyncClient() as client:
            registry = await build_registry(client, specs, policy, settings.attempt_timeout_s)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    app = create_app(settings, registry)
    sock = bind_socket(settings.host, settings.port)
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False,
                            timeout_graceful_shutdown=10)
    server = GracefulServer(config)  # SIGTERM → drain → exit 0
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        announce_url(url_of(sock))
    await task


def run_router(settings: RouterSettings) -> int:
    try:  # uvloop (shipped with uvicorn[standard]) cuts the event loop's per-request I/O cost
        import uvloop
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
    return 0


ROUTER = Command("route states to teachers over OIP v2 (registry, policies, fan-out)", RouterSettings,
                 run_router)
