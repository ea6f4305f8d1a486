"""LoRA specialists on one diffusers base per replica through ``@serve.multiplexed``.

A teacher application with ``args: {model_dir: BASE, lora_root: DIR, max_adapters: N}`` serves
the base under its name and every adapter ``DIR/NAME`` (a directory holding one
``.safetensors`` file, or ``DIR/NAME.safetensors``) as the v2 model ``NAME``, loaded into the
replica on the first request that names it and kept in an LRU of ``N`` adapters per replica
(Serve's multiplexing: an evicted adapter leaves the transformer; the base weights are shared by
all of them). Any route naming the model (``/v2/models/NAME/infer``, its metadata, ``ready``)
loads it first, so the router discovers ``serve://APP#NAME`` like any teacher. HTTP clients may
send Serve's ``serve_multiplexed_model_id: NAME`` header so that Serve prefers a replica that
already holds the adapter.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from ray import serve

from services.teacher import lora
from services.teacher.ray_deployment import TeacherReplica

_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/|$)")


def adapter_path(root: Path, name: str) -> Path | None:
    """Where adapter ``name`` lives under ``root`` (None: no such adapter, or not a plain
    name: a model id never leaves the root)."""
    if "/" in name or name.startswith("."):
        return None
    for candidate in (root / name, root / f"{name}.safetensors"):
        if candidate.exists():
            return candidate
    return None


class LoadedAdapter:
    """One adapter held by Serve's multiplex LRU; eviction (``__del__``, called by Serve)
    stops serving it and removes its LoRA weights from the shared transformer."""

    def __init__(self, repository: Any, name: str) -> None:
        self.repository, self.name = repository, name

    def __del__(self) -> None:
        repo = self.repository
        repo.models.pop(self.name, None)  # new requests: 404 -> loaded again on demand
        for internal in repo._internal.pop(self.name, []):
            lora.remove(repo.backend, internal)
        repo._paths.pop(self.name, None)


class LoraReplica(TeacherReplica):
    """A diffusers teacher replica whose adapters come and go with Serve's multiplexing."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lora_root = Path(kwargs["lora_root"])
        api = self.api

        async def entry(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                found = _MODEL_PATH.search(scope.get("path", ""))
                if found and found.group(1) != self.repository.base_name:
                    await self.ensure(found.group(1))
            await api(scope, receive, send)

        self.serve_entry(entry)

    async def ensure(self, name: str) -> None:
        """Load (or touch in the LRU) adapter ``name`` when ``lora_root`` has it; an unknown
        name is left to the core's 404."""
        if adapter_path(self.lora_root, name) is not None:
            await self.adapter(name)

    async def load(self, name: str) -> LoadedAdapter:
        path = adapter_path(self.lora_root, name)
        if path is None:
            raise KeyError(f"no adapter {name!r} under {self.lora_root}")
        await asyncio.to_thread(self.repository.add_adapter_now, name, path)
        return LoadedAdapter(self.repository, name)


def lora_deployment(max_adapters: int) -> Any:
    """The deployment class with an LRU of ``max_adapters`` adapters per replica (the bound is
    fixed when ``@serve.multiplexed`` decorates the method, so the class is made per bound)."""

    @serve.multiplexed(max_num_models_per_replica=max_adapters)
    async def adapter(self: LoraReplica, model_id: str) -> LoadedAdapter:
        return await self.load(model_id)

    cls = type("LoraTeacher", (LoraReplica,), {"adapter": adapter})
    return serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})(
        serve.ingress()(cls)
    )
