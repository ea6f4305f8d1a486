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

The replica runs the uvicorn router's code: :func:`services.router.app.build_api` over the same
:class:`~services.router.pool.Pool`, discovery and registry, so routing, passthrough, retries,
ejection and health checks are the uvicorn router's. Registry changes at runtime, two ways:

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
import os
import time
from typing import Any

import httpx
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from services.router.app import RouterCore, build_api
from services.router.fanout import TeacherAnswer
from services.router.metrics import RouterMetrics
from services.router.pool import Pool, infer
from services.router.registry import (
    Registry,
    RegistryError,
    Replica,
    Teacher,
    TeacherSpec,
    build_registry,
    build_teacher,
    spec_from_doc,
)
from services.router.serve_transport import ServeData, ServeHandles, ServeTransport
from services.router.settings import ADMIN_TOKEN_ENV, RouterSettings

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


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class RayRouter:
    """The router replica: the uvicorn router's API and pool, teachers reached by handle."""

    def __init__(self, **kwargs: Any) -> None:
        torch.set_num_threads(1)  # routing math only
        args = RayRouterArgs(**kwargs)
        self.args = args
        settings = RouterSettings(
            policy=args.policy,
            deadline_s=args.deadline_s,
            max_inflight=args.max_inflight,
            max_queue=args.max_queue,
            attempt_timeout_s=args.attempt_timeout_s,
        )
        self.settings = settings
        m = RouterMetrics()
        pool = Pool(
            settings.connect_timeout_s,
            settings.attempt_timeout_s,
            settings.max_connections,
            on_retry=lambda t, _: m.retries.labels(t).inc(),
            on_eject=lambda t, r: m.ejections.labels(t, r).inc(),
        )
        handles = ServeHandles()
        # serve:// through handles, anything else over HTTP as before (see serve_transport)
        pool.data = ServeData(pool.data, handles)  # type: ignore[assignment]
        pool.client = httpx.AsyncClient(
            mounts={"serve://": ServeTransport(handles)},
            timeout=httpx.Timeout(settings.attempt_timeout_s, connect=settings.connect_timeout_s),
        )
        self.pool = pool
        self._refreshing: set[str] = set()
        pool.on_version = self._on_version

        async def call(
            teacher: Teacher,
            inputs: dict[str, np.ndarray],
            deadline: float,
            parameters: dict[str, Any] | None = None,
        ) -> TeacherAnswer:
            ans = await infer(pool, teacher, inputs, deadline, parameters)
            m.teacher_seconds.labels(teacher.name).observe(ans.latency_ms / 1e3)
            m.teacher_rows.labels(teacher.name).inc(len(ans.v))
            return ans

        async def passthrough(teacher: Teacher, body: bytes, headers: dict[str, str], deadline):
            reply = await pool.post(teacher, body, headers, deadline)
            return reply.status, bytes(reply.content), reply.headers  # Serve pickles: no views

        async def discover(spec: TeacherSpec) -> Teacher:
            return await build_teacher(pool.client, spec, settings.attempt_timeout_s)

        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip() or None
        self.core = RouterCore(Registry(), call, passthrough, discover, settings, token, m)
        self._tasks: list[asyncio.Task] = []
        self.core.on_start.append(self._start)
        self.core.on_close.append(self._close)
        self.api = build_api(self.core, join=True)  # join: Serve pickles ASGI messages

    def __serve_build_asgi_app__(self):
        return self.api

    async def _build(self, config: RegistryConfig, wait_s: float) -> Registry:
        """The registry of ``config``, waiting up to ``wait_s`` for teachers that are not up
        yet (applications deploy in any order)."""
        deadline = time.monotonic() + wait_s
        policy = config.policy or self.args.policy
        while True:
            try:
                return await build_registry(
                    self.pool.client, config.specs(), policy, self.settings.attempt_timeout_s
                )
            except RegistryError as exc:
                if time.monotonic() > deadline:
                    raise RegistryError(f"router registry: {exc}") from None
                log.warning("router registry not ready yet: %s", exc)
                await asyncio.sleep(1.0)

    async def _start(self) -> None:
        if not self.core.registry.all():  # reconfigure may have built it already
            self.core.set_registry(await self._build(self.args, START_WAIT_S))
        self._tasks.append(
            asyncio.create_task(
                self.pool.health_loop(lambda: self.core.registry, self.settings.health_interval_s)
            )
        )

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pool.aclose()

    async def reconfigure(self, user_config: dict) -> None:
        """Ray-native registry change: ``user_config: {teachers: {...}, anchors: {...}}``
        (as in ``args``) replaces the registry on every router replica; requests in flight
        finish on the registry they started with. Empty: keep ``args``' registry."""
        if not user_config:
            return
        config = RegistryConfig(**user_config)
        reg = await self._build(config, self.settings.attempt_timeout_s)
        self.core.set_registry(reg)

    def _on_version(self, teacher: Teacher, replica: Replica) -> None:
        # A teacher answered from another checkpoint (a user_config swap, a load call): read
        # its metadata again off the request path and publish the new digest.
        if teacher.name not in self._refreshing:
            self._refreshing.add(teacher.name)
            task = asyncio.create_task(self._refresh(teacher))
            task.add_done_callback(lambda _: self._refreshing.discard(teacher.name))

    async def _refresh(self, teacher: Teacher) -> None:
        spec = TeacherSpec(
            teacher.name,
            tuple(r.endpoint for r in teacher.replicas),
            teacher.role,
            tuple(teacher.modes) if teacher.pinned and teacher.modes else None,
        )
        try:
            new = await build_teacher(self.pool.client, spec, self.settings.attempt_timeout_s)
            if (cur := self.core.registry.get(teacher.name)) is not None and cur is teacher:
                self.core.set_registry(self.core.registry.with_teacher(new))
        except RegistryError as exc:
            log.warning("teacher %s: metadata refresh failed: %s", teacher.name, exc)


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
