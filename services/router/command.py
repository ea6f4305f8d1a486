"""``opd serve router``: the router as a uvicorn process (``--port 0`` friendly, announces its URL).

Teachers are contacted before the port is bound, so a bad registry (unreachable teacher,
replicas with different digests, ``nearest`` without mode centers) ends the command with a
clear message and exit status 2 instead of a half-started server.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import torch

from common.cli import Command, UsageError
from common.serving import run_async, serve_app
from services.router.app import create_app, specs_from_settings
from services.router.registry import Registry, RegistryError, TeacherUnreachable, build_registry
from services.router.settings import RouterSettings


async def discover(specs, policy: str, settings: RouterSettings) -> Registry:
    """Build the registry, retrying while a teacher is unreachable (it may still be starting,
    e.g. in a compose cluster) up to ``startup_timeout_s``; other refusals end at once."""
    deadline = time.monotonic() + settings.startup_timeout_s
    delay = 0.2
    async with httpx.AsyncClient() as client:
        while True:
            try:
                return await build_registry(client, specs, policy, settings.attempt_timeout_s)
            except TeacherUnreachable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                sys.stderr.write(f"opd serve router: {exc}; retrying in {delay:.1f} s\n")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def serve(settings: RouterSettings) -> None:
    """Discover the teachers, bind, serve until SIGINT/SIGTERM."""
    torch.set_num_threads(settings.threads)
    try:
        specs, policy = specs_from_settings(settings)
        registry = await discover(specs, policy, settings)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    app = create_app(settings, registry)
    # Said at start: what the router admits before it answers 503 (README 'Overload').
    print(f"opd serve router: {app.state.core.admission_line}", file=sys.stderr, flush=True)
    await serve_app(
        app, settings.host, settings.port, settings.log_level, app.state.core.wake_watchers
    )


def run_router(settings: RouterSettings) -> int:
    run_async(serve(settings))
    return 0


ROUTER = Command(
    "route states to teachers over OIP v2 (registry, policies, fan-out)", RouterSettings, run_router
)
