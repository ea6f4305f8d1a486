"""The router as a Ray Serve application that composes the teacher applications by handle.

Topology (``deploy/serve_config.yaml``): each teacher is its own application
(:mod:`services.teacher.ray_deployment`, OIP v2 over HTTP at its route prefix), and the router
application's one deployment reaches them through Serve handles: a registry endpoint
``serve://APP`` is the application ``APP`` (:mod:`services.router.serve_transport`). One copy
of each teacher's weights answers both the router and direct HTTP clients; replicas,
autoscaling and GPUs are set per teacher application. Config::

    import_path: services.router.ray_deployment:app_builder
    args: {policy: nearest, teachers: {a: {app: teacher-a}, b: {app: teacher-b}},
           anchors: {base: {app: base}}}

A teacher may also be any OIP v2 server by URL (``{endpoints: [http://host:port#model]}``).

The replica runs the uvicorn router itself (:func:`services.router.app.create_app`) with a pool
whose clients send ``serve://`` exchanges through handles, so routing, passthrough, retries,
ejection, health checks, metadata refresh and capability negotiation are the uvicorn router's. Registry changes at runtime, two ways:

- the admin API, as on the uvicorn router: ``PUT /v1/teachers/NAME`` with
  ``{"endpoints": ["serve://teacher-b"]}`` (or http URLs) and ``Authorization: Bearer
  $OPD_ADMIN_TOKEN``; it changes the replica that answers the call (run one router replica, or
  call each);
- Ray-native: the deployment's ``user_config: {teachers: {...}, anchors: {...}}`` (same shape as
  ``args``) redeployed: every router replica rebuilds its registry from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from services.router.app import RouterCore, create_app
from services.router.pool import Pool
from services.router.registry import (
    Registry,
    RegistryError,
    TeacherSpec,
    build_registry,
    spec_from_doc,
)
from services.router.serve_transport import ServeData, ServeHandles, ServeTransport
from services.router.settings import RouterSettings

log = logging.getLogger("opd.router.ray")
#: how long a router replica waits at start for its teacher applications to answer
START_WAIT_S = 120.0


class TeacherRef(BaseModel):
    """One registry entry of the Ray router: a Serve application or OIP v2 URLs."""

    model_config = ConfigDict(extra="forbid")

    app: str | None = Field(None, description="Serve application name (reached by handle)")
    model: str | None = Field(None, description="served model (default: the app's only one)")
    endpoints: list[str] | None = Field(None, description="OIP v2 base URLs instead of app")
    modes: list[int] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TeacherRef:
        if (self.app is None) == (self.endpoints is None):
            raise ValueError("give either app (a Serve application) or endpoints (URLs)")
        return self

    def doc(self) -> dict[str, Any]:
        """The registry API's document for this entry (``PUT /v1/teachers/NAME`` body)."""
        if self.app is not None:
            eps = [f"serve://{self.app}" + (f"#{self.model}" if self.model else "")]
        else:
            eps = list(self.endpoints or [])
        return {"endpoints": eps, **({"modes": self.modes} if self.modes else {})}


class RegistryConfig(BaseModel):
    """The teachers and anchors (``args``, or a ``user_config`` that replaces them)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the deploy, not silently

    teachers: dict[str, TeacherRef]
    anchors: dict[str, TeacherRef] = Field(default_factory=dict)
    policy: str | None = None

    def specs(self) -> list[TeacherSpec]:
        out = []
        for role, group in (("teacher", self.teachers), ("anchor", self.anchors)):
            for name, ref in group.items():
                try:
                    out.append(spec_from_doc(name, ref.doc(), role))  # type: ignore[arg-type]
                except RegistryError as exc:
                    raise ValueError(f"{role}s.{name}: {exc}") from None
        return out


class RayRouterArgs(RegistryConfig):
    """``args`` of the router application."""

    policy: str = "nearest"
    deadline_s: float = Field(10.0, gt=0)
    max_inflight: int = Field(64, ge=1)
    max_queue: int = Field(256, ge=0)
    attempt_timeout_s: float = Field(5.0, gt=0)


def pickled_bodies(app: Any) -> Any:
    """``app`` with response bodies sent as ``bytes``: Serve pickles ASGI messages between the
    replica and its proxy, and a ``memoryview`` (the uvicorn router's zero-copy bodies) does
    not pickle."""

    async def entry(scope: dict, receive: Any, send: Any) -> None:
        async def send_bytes(message: dict) -> None:
            body = message.get("body")
            if isinstance(body, memoryview | bytearray):
                message = {**message, "body": bytes(body)}
            await send(message)

        await app(scope, receive, send_bytes)

    return entry


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class RayRouter:
    """The router replica: the uvicorn router (:func:`create_app`) whose pool reaches
    ``serve://`` endpoints through Serve handles."""

    async def __init__(self, **kwargs: Any) -> None:
        torch.set_num_threads(1)  # routing math only
        self.args = RayRouterArgs(**kwargs)
        self.settings = RouterSettings(
            policy=self.args.policy,
            deadline_s=self.args.deadline_s,
            max_inflight=self.args.max_inflight,
            max_queue=self.args.max_queue,
            attempt_timeout_s=self.args.attempt_timeout_s,
        )
        self.handles = ServeHandles()
        # Teacher applications may still be deploying: wait for them here, as `opd serve
        # router` waits for its teachers before it serves.
        registry = await self._build(self.args, START_WAIT_S)
        self.api = create_app(self.settings, registry=registry, make_pool=self._pool)
        self.core: RouterCore = self.api.state.core

    def __serve_build_asgi_app__(self):
        return pickled_bodies(self.api)

    def _pool(self, *args: Any, **kwargs: Any) -> Pool:
        """The uvicorn router's pool, with ``serve://`` exchanges sent through handles."""
        pool = Pool(*args, **kwargs)
        pool.data = ServeData(pool.data, self.handles)  # type: ignore[assignment]
        pool.client = self._client()
        return pool

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            mounts={"serve://": ServeTransport(self.handles)},
            timeout=httpx.Timeout(
                self.settings.attempt_timeout_s, connect=self.settings.connect_timeout_s
            ),
        )

    async def _build(self, config: RegistryConfig, wait_s: float) -> Registry:
        """The registry of ``config``, waiting up to ``wait_s`` for teachers that are not up
        yet (applications deploy in any order)."""
        deadline = time.monotonic() + wait_s
        policy = config.policy or self.args.policy
        async with self._client() as client:
            while True:
                try:
                    return await build_registry(
                        client, config.specs(), policy, self.settings.attempt_timeout_s
                    )
                except RegistryError as exc:
                    if time.monotonic() > deadline:
                        raise RegistryError(f"router registry: {exc}") from None
                    log.warning("router registry not ready yet: %s", exc)
                    await asyncio.sleep(1.0)

    async def reconfigure(self, user_config: dict) -> None:
        """Ray-native registry change: ``user_config: {teachers: {...}, anchors: {...}}``
        (as in ``args``) replaces the registry on every router replica; requests in flight
        finish on the registry they started with. Empty: keep ``args``' registry."""
        if not user_config:
            return
        reg = await self._build(RegistryConfig(**user_config), self.settings.attempt_timeout_s)
        self.core.set_registry(reg)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve-config entry point (``serve run``, KubeRay): ``args`` as :class:`RayRouterArgs`."""
    return build(args)


def build(args: dict[str, Any], options: dict[str, Any] | None = None) -> Application:
    """The router application; ``options``: its config ``deployments`` entry (``opd serve
    ray``). A bad key fails here, naming it."""
    parsed = RayRouterArgs(**args)
    parsed.specs()  # endpoint syntax checked at deploy time, not at the first request
    opts = dict(options or {})
    opts.pop("name", None)
    return RayRouter.options(**opts).bind(**parsed.model_dump(exclude_none=True))
