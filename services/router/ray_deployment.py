"""The router as a Ray Serve application: the same HTTP API (``build_api``), teachers called
through deployment handles instead of HTTP.

One application holds the router deployment (the application's one FastAPI ingress) and one
child deployment per teacher and anchor (model composition: Serve passes the router their
handles). Each child is the teacher service's deployment class (repository, ``@serve.batch``
batching by states) without its HTTP ingress, plus a handle method
:meth:`HandleTeacher.infer_arrays`; Serve load-balances each handle over that child's replicas,
and replicas / autoscaling are set per child deployment in the config. Config (``deploy/serve_config.yaml``)::

    import_path: services.router.ray_deployment:app_builder
    args: {policy: nearest, teachers: {a: {checkpoint: models/teacher-a.safetensors}, ...},
           anchors: {base: {checkpoint: models/base.safetensors}}}

Differences from the uvicorn router: registry changes go through ``serve deploy`` (the registry
API answers GET; PUT/DELETE are refused with that hint), and passthrough infer is not offered.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve._private.http_util import ASGIAppReplicaWrapper
from ray.serve.handle import DeploymentHandle

from services.router.app import RouterCore, build_api
from services.router.fanout import InputError, TeacherAnswer
from services.router.metrics import RouterMetrics
from services.router.pool import TeacherUnavailable
from services.router.registry import (
    Endpoint,
    Registry,
    RegistryError,
    Replica,
    Teacher,
    TeacherSpec,
    text_of,
)
from services.router.settings import ADMIN_TOKEN_ENV, RouterSettings
from services.teacher.ray_deployment import TeacherArgs, TeacherDeployment


def _plain_teacher_class() -> type:
    """The teacher deployment's own class, without Serve's ASGI ingress wrapper around it: Serve
    allows one ingress per application, and here the router is that ingress."""
    wrapped = TeacherDeployment.func_or_class
    return next(
        c
        for c in wrapped.__mro__[1:]
        if c.__name__ == wrapped.__name__ and not issubclass(c, ASGIAppReplicaWrapper)
    )


class HandleTeacher(_plain_teacher_class()):  # type: ignore[misc]
    """The teacher replica (repository, ``@serve.batch`` forward) with a handle API."""

    async def infer_arrays(self, x: np.ndarray, t: np.ndarray) -> dict[str, Any]:
        """``v [B, D]`` for ``x [B, D]``, ``t [B]`` plus the server timing an HTTP answer carries."""
        model = self.repository.current
        if model is None:
            raise RuntimeError(f"model {self.repository.name!r} is unloaded")
        res = await self._run(model, x, t)
        return {
            "v": res.v,
            "version": str(res.version),
            "digest": res.digest,
            "queue_ms": res.queue_s * 1e3,
            "compute_ms": res.compute_s * 1e3,
            "batch_size": res.batch_states,
        }

    async def describe(self) -> dict[str, Any]:
        """The model-metadata ``parameters`` (version, digest, modes, mode centers)."""
        model = self.repository.current
        return model.parameters() if model is not None else {}


HandleTeacherDeployment = serve.deployment(
    HandleTeacher, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5}
)


class RayRouterArgs(BaseModel):
    """``args`` of the router application."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the deploy, not silently

    teachers: dict[str, dict[str, Any]] = Field(
        description="name -> teacher args (checkpoint, threads, ...)"
    )
    anchors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    policy: str = "nearest"
    deadline_s: float = Field(10.0, gt=0)
    max_inflight: int = Field(64, ge=1)
    max_queue: int = Field(256, ge=0)


def _teacher(name: str, role: str, params: dict[str, Any]) -> Teacher:
    centers = params.get("mode_centers")
    replica = Replica(
        Endpoint(f"ray://{name}", name), str(params.get("version")), params.get("digest")
    )
    return Teacher(
        name,
        [replica],
        role,
        params.get("digest"),
        list(params.get("modes") or []),  # type: ignore[arg-type]
        torch.tensor(centers, dtype=torch.float32) if centers else None,
        backend=text_of(params, "backend"),
        time_convention=text_of(params, "time_convention"),
    )


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class RayRouter:
    """The router replica: :func:`build_api` over handles to the teacher deployments."""

    def __init__(
        self,
        handles: dict[str, tuple[str, DeploymentHandle]],
        policy: str,
        deadline_s: float,
        max_inflight: int,
        max_queue: int,
    ) -> None:
        import os

        torch.set_num_threads(1)
        self.handles = {name: h for name, (_, h) in handles.items()}
        roles = {name: role for name, (role, _) in handles.items()}
        settings = RouterSettings(
            policy=policy, deadline_s=deadline_s, max_inflight=max_inflight, max_queue=max_queue
        )

        async def call(
            teacher: Teacher,
            inputs: dict[str, np.ndarray],
            deadline: float,
            parameters: dict[str, Any] | None = None,
        ) -> TeacherAnswer:
            conditioning = sorted(set(inputs) - {"x", "t", "c"})  # toy teachers ignore c
            if conditioning or parameters:
                # the handle teachers here are the toy ones: x and t only
                raise InputError(
                    "the Ray Serve router's teachers take x and t only; send conditioning "
                    f"({', '.join(conditioning)}) and parameters "
                    f"({', '.join(sorted(parameters or {}))}) through the uvicorn router"
                )
            start = time.perf_counter()
            try:
                out = await asyncio.wait_for(
                    self.handles[teacher.name].infer_arrays.remote(inputs["x"], inputs["t"]),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            except asyncio.TimeoutError:
                raise TeacherUnavailable(teacher.name, ["deadline exceeded"]) from None
            except Exception as exc:  # Ray wraps replica errors; the cause is what matters
                raise TeacherUnavailable(teacher.name, [f"{type(exc).__name__}: {exc}"]) from None
            return TeacherAnswer(
                out["v"],
                out["version"],
                (time.perf_counter() - start) * 1e3,
                out["queue_ms"],
                out["compute_ms"],
                out["batch_size"],
                f"ray://{teacher.name}",
                digest=out.get("digest", ""),
            )

        async def discover(spec: TeacherSpec) -> Teacher:
            raise RegistryError(
                "the Ray Serve router's registry comes from its Serve config; "
                "change it with `serve deploy` (or use the uvicorn router)"
            )

        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip() or None
        self.core = RouterCore(
            Registry(policy=policy), call, None, discover, settings, token, RouterMetrics()
        )

        async def build_registry() -> None:
            params = await asyncio.gather(*(h.describe.remote() for h in self.handles.values()))
            teachers = [_teacher(n, roles[n], p) for n, p in zip(self.handles, params, strict=True)]
            reg = Registry(
                tuple(t for t in teachers if t.role == "teacher"),
                tuple(t for t in teachers if t.role == "anchor"),
                policy,
            )
            reg.check()
            self.core.registry = reg

        self.core.on_start.append(build_registry)

    def __serve_build_asgi_app__(self):
        return build_api(self.core, join=True)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve-config entry point: the router plus one child deployment per teacher/anchor."""
    parsed = RayRouterArgs(**args)
    handles: dict[str, tuple[str, Application]] = {}
    for role, group in (("teacher", parsed.teachers), ("anchor", parsed.anchors)):
        for name, targs in group.items():
            t = TeacherArgs(**targs)
            fixed = t.model_dump(exclude_none=True)
            fixed["checkpoint"] = str(t.checkpoint.resolve())
            if t.model_root is not None:
                fixed["model_root"] = str(t.model_root.resolve())
            fixed["name"] = (
                name  # the child deployment and its served model carry the registry name
            )
            handles[name] = (
                role,
                HandleTeacherDeployment.options(name=f"teacher-{name}").bind(**fixed),
            )
    return RayRouter.bind(
        handles, parsed.policy, parsed.deadline_s, parsed.max_inflight, parsed.max_queue
    )
