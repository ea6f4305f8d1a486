"""The teacher as a Ray Serve deployment: the same OIP v2 API (``@serve.ingress``: the shared
core's ASGI app), batched with ``@serve.batch`` by states, and a handle method
:meth:`TeacherDeployment.http` through which the Ray router (another application) sends the same
OIP v2 requests by deployment handle: one copy of the weights answers both.

Swaps: ``user_config: {checkpoint: FILE}`` (toy) or ``{adapters: {NAME: DIR}}`` (diffusers)
reaches every replica (:meth:`TeacherDeployment.reconfigure`; requests in flight keep the model
snapshot they started on); the repository routes (``POST /v2/repository/models/NAME/load``)
reach the one replica that answers the call.
Only Serve's public API is used (``@serve.deployment``, ``@serve.ingress``, ``@serve.batch``,
``reconfigure``/``user_config``).

A diffusers teacher (``args: {model_dir: DIR, adapters: {teacher-a: PATH}, dtype: bf16}``)
serves its base and adapters as v2 models on each replica, with the conditioning cache and
guidance of the shared core; ``@serve.batch`` merges its requests only when model snapshot and
shapes agree, as the uvicorn batcher does.

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
from typing import Any, Literal

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from common.threads import model_params, replica_cpus, thread_budget
from services.teacher.app import TeacherCore, build_api, load_diffusers
from services.teacher.batcher import ForwardResult, forward_executor
from services.teacher.cond_cache import CondCache
from services.teacher.metrics import TeacherMetrics
from services.teacher.repository import ModelRepository
from services.teacher.settings import admin_token_from_env

#: upper bound of a batch until ``__init__`` sets the configured one
_DEFAULT_MAX_STATES = 16384


class TeacherArgs(BaseModel):
    """``args`` of a teacher application in a Serve config (paths relative to the cwd)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the deploy, not silently

    kind: Literal["toy", "diffusers"] | None = Field(
        None, description="teacher kind (default: toy for checkpoint, diffusers for model_dir)"
    )
    checkpoint: Path | None = None
    model_dir: Path | None = Field(None, description="diffusers transformer directory instead")
    adapters: dict[str, Path] = Field(
        default_factory=dict, description="model_dir: LoRA adapters, served name -> path"
    )
    lora_root: Path | None = Field(
        None,
        description="model_dir: LoRA adapters loaded on demand, model id NAME -> "
        "lora_root/NAME (@serve.multiplexed, LRU bounded by max_adapters per replica)",
    )
    max_adapters: int = Field(3, ge=1, description="lora_root: adapters kept per replica")
    dtype: str = Field("fp32", pattern="^(fp32|bf16|fp16)$")
    cond_cache_mb: float = Field(256.0, ge=0, description="conditioning kept by cond_id (MiB)")
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

    @model_validator(mode="after")
    def _one_source(self) -> TeacherArgs:
        if (self.checkpoint is None) == (self.model_dir is None):
            raise ValueError("give either checkpoint or model_dir (exactly one)")
        if self.lora_root is not None and self.model_dir is None:
            raise ValueError("lora_root needs model_dir (LoRA adapters on a diffusers base)")
        wants = "toy" if self.checkpoint is not None else "diffusers"
        if self.kind is not None and self.kind != wants:
            key = "checkpoint" if self.kind == "diffusers" else "model_dir"
            raise ValueError(f"kind {self.kind!r} does not take {key!r}; give the other source")
        return self

    def check_files(self, where: str = "args") -> None:
        """Fail the deploy (naming the key) when a file it names does not exist here."""
        paths = {
            "checkpoint": self.checkpoint,
            "model_dir": self.model_dir,
            "lora_root": self.lora_root,
        }
        paths.update({f"adapters.{k}": v for k, v in self.adapters.items()})
        for key, path in paths.items():
            if path is not None and not path.exists():
                raise ValueError(f"{where}.{key}: {path} does not exist")

    def served_name(self) -> str:
        if self.name:
            return self.name
        if self.model_dir is not None:
            return self.model_dir.resolve().name
        assert self.checkpoint is not None
        return self.checkpoint.stem

    def source(self) -> Path:
        path = self.checkpoint if self.checkpoint is not None else self.model_dir
        assert path is not None
        return path


def _states(items: list[tuple]) -> int:
    """Batch size of ``@serve.batch`` in states, not requests."""
    return sum(len(item[1]) for item in items)


class TeacherReplica:
    """One replica: a model repository, a state-batched forward, the shared OIP v2 routes."""

    def __init__(self, **kwargs: Any) -> None:
        from common.serving import keep_freed_memory

        keep_freed_memory()  # see there: forwards reuse activation memory, no page faults
        args = TeacherArgs(**kwargs)
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(
                    f"args.device: {args.device!r} but this replica sees no GPU; give the "
                    "deployment ray_actor_options.num_gpus on a node that has one"
                )
        name = args.served_name()
        root = (args.model_root or args.source().resolve().parent).resolve()
        if args.model_dir is not None:
            self.repository: Any = load_diffusers(
                args.model_dir, name, root, args.adapters, args.dtype, args.device
            )
            net = self.repository.backend.transformer
        else:
            assert args.checkpoint is not None
            self.repository = ModelRepository(name, root, args.device)
            self.repository.load_now(args.checkpoint.resolve())
            net = self.repository.current.net
        threads = args.threads or thread_budget(model_params(net), cpus=replica_cpus())
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
            conds=CondCache(int(args.cond_cache_mb * 1024 * 1024)),
        )

        self.api = build_api(self.core, join=True)  # join: Serve pickles ASGI messages
        self.serve_entry(self.api)

    def serve_entry(self, app: Any) -> None:
        """Serve ``app`` over HTTP and to handle calls (the Ray router): the same ASGI app,
        called in-process for a handle call (no socket)."""
        self.entry = app
        self._local = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://replica"
        )

    def __serve_build_asgi_app__(self):
        return self.entry

    async def http(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """One OIP v2 request by deployment handle, answered by the replica's own HTTP app
        (every route, every teacher kind): ``(status, headers, body)``."""
        resp = await self._local.request(method, path, content=body, headers=headers)
        return resp.status_code, dict(resp.headers), resp.content

    async def reconfigure(self, user_config: dict) -> None:
        """``user_config`` (Serve applies it to every replica, in place when only it changed):
        ``{checkpoint: FILE}`` for a toy teacher, ``{adapters: {NAME: DIR}}`` for a diffusers
        one (paths under the model root). Requests in flight finish on the snapshot they hold;
        a bad file fails the update and the replica keeps serving what it had."""
        config = dict(user_config or {})
        unknown = set(config) - {"checkpoint", "adapters"}
        if unknown:
            raise ValueError(f"user_config: unknown keys {sorted(unknown)}")
        if isinstance(self.repository, ModelRepository):
            if "adapters" in config:
                raise ValueError("user_config.adapters: this teacher serves a checkpoint")
            if config.get("checkpoint"):
                await asyncio.to_thread(self._swap_checkpoint, str(config["checkpoint"]))
            return
        if "checkpoint" in config:
            raise ValueError("user_config.checkpoint: a diffusers teacher takes adapters")
        for name, path in (config.get("adapters") or {}).items():
            if self.repository._paths.get(name) != self._under_root(path):
                await self.repository.load_named(name, {"adapter": str(path)})

    def _under_root(self, path: str) -> Path:
        from services.teacher.repository import resolve_under

        return resolve_under(self.repository.root, path)

    def _swap_checkpoint(self, checkpoint: str) -> None:
        path = self._under_root(checkpoint)
        current = self.repository.current
        if current is None or current.checkpoint.resolve() != path:
            self.repository.load_now(path)
            self.metrics.version.labels(self.repository.name).set(self.repository.current.version)

    async def _run(
        self, model: Any, x: np.ndarray, t: np.ndarray, extra: Any = None
    ) -> ForwardResult:
        """``v [B, *S]``: requests over ``max_states`` go in pieces (``@serve.batch`` refuses
        an item larger than its batch), then are put back together. ``extra``: a conditioned
        model's conditioning and guidance (``conditioned.Conditioned``)."""
        n, step = len(x), self.max_states
        if n <= step:
            return await self._batched((model, x, t, time.perf_counter(), extra))
        now = time.perf_counter()
        parts = await asyncio.gather(
            *(
                self._batched(
                    (model, x[i : i + step], t[i : i + step], now, _rows(extra, i, step, n))
                )
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
        """Items ``(model, x [B_i, *S], t [B_i], enqueued, extra)`` → one forward per model
        snapshot (and, for conditioned models, per merge key: shapes and guidance)."""
        loop = asyncio.get_running_loop()
        results: list[ForwardResult | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            extra = item[4]
            key = None if extra is None else extra.key(item[1])
            groups.setdefault((id(item[0]), key), []).append(i)
        for idx in groups.values():
            model = items[idx[0]][0]
            start = time.perf_counter()
            if items[idx[0]][4] is not None:
                xs = [items[i][1] for i in idx]
                vs = await loop.run_in_executor(
                    self._executor,
                    model.forward_conditioned,
                    xs,
                    [items[i][2] for i in idx],
                    [items[i][4] for i in idx],
                )
                v = vs[0] if len(vs) == 1 else np.concatenate(vs)
                x = v  # only its length is used below
            else:
                x = np.concatenate([items[i][1] for i in idx]) if len(idx) > 1 else items[idx[0]][1]
                t = np.concatenate([items[i][2] for i in idx]) if len(idx) > 1 else items[idx[0]][2]
                v = await loop.run_in_executor(self._executor, model.forward, x, t)
            compute = time.perf_counter() - start
            queue_s, offset = [], 0
            for i in idx:
                b = len(items[i][1])
                queue_s.append(max(0.0, start - items[i][3]))
                results[i] = ForwardResult(
                    v[offset : offset + b],
                    model.version,
                    queue_s[-1],
                    compute,
                    len(x),
                    len(idx),
                    model.digest,
                )
                offset += b
            self.metrics.observe_batch(len(x), len(idx), compute, queue_s)
        return results  # type: ignore[return-value]


#: the teacher deployment: public ``@serve.ingress`` over the shared core's app (late-bound,
#: ``__serve_build_asgi_app__``) plus the handle method ``http``
TeacherDeployment = serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})(
    serve.ingress()(TeacherReplica)
)


def _rows(extra: Any, start: int, step: int, n: int) -> Any:
    """The part of a conditioned request's ``extra`` for rows ``start:start+step`` of ``n``
    (one-row conditioning is shared by every piece)."""
    if extra is None:
        return None
    from services.teacher.conditioned import Conditioned

    cond = {k: v if len(v) == 1 else v[start : start + step] for k, v in extra.cond.items()}
    return Conditioned(cond, extra.guidance_scale)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve-config entry point (``serve run``, KubeRay): ``args`` as :class:`TeacherArgs`."""
    return build(args)


def build(args: dict[str, Any], options: dict[str, Any] | None = None) -> Application:
    """The teacher application; ``options``: the config's ``deployments`` entry for it
    (replicas, autoscaling, ``ray_actor_options``, ``user_config``), applied here when the
    deploy goes through ``opd serve ray``. Relative paths are made absolute here (where the
    config is applied), since replicas may run in another cwd.

    Raises:
        ValueError: a bad key or value, a missing file, or GPUs asked of a cluster without
            any; the message names the key.
    """
    parsed = TeacherArgs(**args)
    parsed.check_files()
    opts = dict(options or {})
    opts.pop("name", None)
    check_gpus(opts)
    fixed = parsed.model_dump(exclude_none=True)
    if parsed.checkpoint is not None:
        fixed["checkpoint"] = str(parsed.checkpoint.resolve())
    if parsed.model_dir is not None:
        fixed["model_dir"] = str(parsed.model_dir.resolve())
    fixed["adapters"] = {k: str(v.resolve()) for k, v in parsed.adapters.items()}
    if parsed.model_root is not None:
        fixed["model_root"] = str(parsed.model_root.resolve())
    if parsed.lora_root is not None:
        from services.teacher.ray_lora import lora_deployment

        fixed["lora_root"] = str(parsed.lora_root.resolve())
        deployment = lora_deployment(parsed.max_adapters)
    else:
        deployment = TeacherDeployment
    return deployment.options(name=parsed.served_name(), **opts).bind(**fixed)


def check_gpus(options: dict[str, Any], where: str = "deployments") -> None:
    """A replica asking for GPUs on a cluster that has none would wait unscheduled forever:
    refuse it now, naming the key."""
    gpus = (options.get("ray_actor_options") or {}).get("num_gpus") or 0
    if gpus > 0:
        import ray

        have = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        if have < gpus:
            raise ValueError(
                f"{where}.ray_actor_options.num_gpus: {gpus} GPU(s) per replica asked, but the "
                f"Ray cluster has {have:g}; remove num_gpus (and args.device: cuda) or add GPU nodes"
            )


@contextlib.contextmanager
def local_ray_teacher(checkpoint: Path, threads: int = 1, port: int = 0) -> Iterator[str]:
    """A throwaway local Ray instance serving one teacher; yields its base URL (bench, tests)."""
    import ray

    from services.teacher.ray_command import free_port

    port = port or free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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
