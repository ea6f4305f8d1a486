"""The teacher as a Ray Serve deployment: the same OIP v2 API (FastAPI ingress), batched with
``@serve.batch`` by states, hot swap through the same repository routes or through
``user_config`` (``{"checkpoint": FILE}``, applied to every replica by ``serve deploy``).

Build it from a config (``deploy/serve_config.yaml``) with ``import_path:
services.teacher.ray_deployment:app_builder`` and ``args: {checkpoint: ..., ...}``; the
deployment is named after the served model, and each teacher is its own application whose
``route_prefix`` is its base URL (e.g. ``/teacher-a`` → ``http://HOST:8000/teacher-a/v2/...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from common.threads import model_params, replica_cpus, thread_budget
from services.teacher.app import TeacherCore, build_api
from services.teacher.batcher import ForwardResult, forward_executor
from services.teacher.metrics import TeacherMetrics
from services.teacher.repository import LoadedModel, ModelRepository
from services.teacher.settings import admin_token_from_env

#: upper bound of a batch until ``__init__`` sets the configured one
_DEFAULT_MAX_STATES = 16384


class TeacherArgs(BaseModel):
    """``args`` of a teacher application in a Serve config (paths relative to the cwd)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the deploy, not silently

    checkpoint: Path
    name: str | None = Field(None, description="served model name (default: file stem)")
    model_root: Path | None = Field(None, description="where load calls may read from")
    max_batch_states: int = Field(_DEFAULT_MAX_STATES, ge=1)
    max_delay_ms: float = Field(0.0, ge=0)
    max_body_mb: float = Field(64.0, gt=0)
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per replica (default: common.threads budget "
        "from the model size and the replica's num_cpus)",
    )
    device: str = "cpu"

    def served_name(self) -> str:
        return self.name or self.checkpoint.stem


def _states(items: list[tuple]) -> int:
    """Batch size of ``@serve.batch`` in states, not requests."""
    return sum(len(item[1]) for item in items)


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class TeacherDeployment:
    """One replica: a model repository, a state-batched forward, the shared OIP v2 routes."""

    def __init__(self, **kwargs: Any) -> None:
        from common.serving import keep_freed_memory

        keep_freed_memory()  # see there: forwards reuse activation memory, no page faults
        args = TeacherArgs(**kwargs)
        name = args.served_name()
        root = (args.model_root or args.checkpoint.parent).resolve()
        self.repository = ModelRepository(name, root, args.device)
        self.repository.load_now(args.checkpoint.resolve())
        threads = args.threads or thread_budget(
            model_params(self.repository.current.net), cpus=replica_cpus()
        )
        self.metrics = TeacherMetrics(name)
        self.metrics.version.labels(name).set(1)
        self.max_states = args.max_batch_states
        self._batched.set_max_batch_size(args.max_batch_states)
        self._batched.set_batch_wait_timeout_s(args.max_delay_ms / 1e3)
        # One forward thread per replica, so the replica's event loop keeps serving sockets.
        self._executor = forward_executor(threads)
        self.core = TeacherCore(
            self.repository,
            self._run,
            self.metrics,
            int(args.max_body_mb * 1024 * 1024),
            admin_token_from_env(),
        )

    def __serve_build_asgi_app__(self):
        return build_api(self.core, join=True)  # Serve pickles ASGI messages

    def reconfigure(self, user_config: dict) -> None:
        """``user_config: {checkpoint: FILE}`` (under the model root) swaps every replica."""
        checkpoint = (user_config or {}).get("checkpoint")
        if checkpoint:
            from services.teacher.repository import resolve_under

            path = resolve_under(self.repository.root, checkpoint)
            current = self.repository.current
            if current is None or current.checkpoint.resolve() != path:
                self.repository.load_now(path)
                self.metrics.version.labels(self.repository.name).set(
                    self.repository.current.version
                )

    async def _run(self, model: LoadedModel, x: np.ndarray, t: np.ndarray) -> ForwardResult:
        """``v [B, D]``: requests over ``max_states`` go in pieces (``@serve.batch`` refuses
        an item larger than its batch), then are put back together."""
        n, step = len(x), self.max_states
        if n <= step:
            return await self._batched((model, x, t, time.perf_counter()))
        now = time.perf_counter()
        parts = await asyncio.gather(
            *(
                self._batched((model, x[i : i + step], t[i : i + step], now))
                for i in range(0, n, step)
            )
        )
        return ForwardResult(
            np.concatenate([p.v for p in parts]),
            model.version,
            max(p.queue_s for p in parts),
            sum(p.compute_s for p in parts),
            max(p.batch_states for p in parts),
            max(p.batch_requests for p in parts),
        )

    @serve.batch(
        max_batch_size=_DEFAULT_MAX_STATES, batch_wait_timeout_s=0.0, batch_size_fn=_states
    )
    async def _batched(self, items: list[tuple]) -> list[ForwardResult]:
        """Items ``(model, x [B_i, D], t [B_i], enqueued)`` → one forward per model snapshot."""
        loop = asyncio.get_running_loop()
        results: list[ForwardResult | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item[0]), []).append(i)
        for idx in groups.values():
            model = items[idx[0]][0]
            x = np.concatenate([items[i][1] for i in idx]) if len(idx) > 1 else items[idx[0]][1]
            t = np.concatenate([items[i][2] for i in idx]) if len(idx) > 1 else items[idx[0]][2]
            start = time.perf_counter()
            v = await loop.run_in_executor(self._executor, model.forward, x, t)
            compute = time.perf_counter() - start
            queue_s, offset = [], 0
            for i in idx:
                b = len(items[i][1])
                queue_s.append(max(0.0, start - items[i][3]))
                results[i] = ForwardResult(
                    v[offset : offset + b], model.version, queue_s[-1], compute, len(x), len(idx)
                )
                offset += b
            self.metrics.observe_batch(len(x), len(idx), compute, queue_s)
        return results  # type: ignore[return-value]


def app_builder(args: dict[str, Any]) -> Application:
    """Serve-config entry point: ``args`` as :class:`TeacherArgs`; relative paths are made
    absolute here (where the config is applied), since replicas may run in another cwd."""
    parsed = TeacherArgs(**args)
    fixed = parsed.model_dump(exclude_none=True)
    fixed["checkpoint"] = str(parsed.checkpoint.resolve())
    if parsed.model_root is not None:
        fixed["model_root"] = str(parsed.model_root.resolve())
    return TeacherDeployment.options(name=parsed.served_name()).bind(**fixed)


@contextlib.contextmanager
def local_ray_teacher(checkpoint: Path, threads: int = 1, port: int = 0) -> Iterator[str]:
    """A throwaway local Ray instance serving one teacher; yields its base URL (bench, tests)."""
    import ray

    from services.teacher.ray_command import free_port

    port = port or free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        name = checkpoint.stem
        serve.run(
            app_builder({"checkpoint": str(checkpoint), "threads": threads}),
            name=name,
            route_prefix=f"/{name}",
        )
        yield f"http://127.0.0.1:{port}/{name}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
