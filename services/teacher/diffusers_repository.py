"""Served models of a diffusers teacher process: the base and its LoRA adapters, each a v2 model.

One process holds the base transformer once (:class:`~services.teacher.diffusers_backend.
DiffusersBackend`) and serves it under its own name plus one model per LoRA adapter
(``teacher-a``, ``teacher-b``, ...), each with its own version and digest. A request takes a
:class:`DiffusersModel` snapshot when accepted; a batch groups rows by snapshot, so each group
runs under its adapter (selected under the backend's lock).

Loading an adapter (``POST /v2/repository/models/{name}/load`` with
``{"parameters": {"adapter": "PATH"}}``, PATH under the model root) installs it under a fresh
internal name beside the serving one, then swaps the snapshot: requests in flight finish on the
adapter they started with. A failed load (missing file, pickle, modules or ranks that do not fit
the base) changes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.names import PLAIN_NAME_RULE, is_plain_name
from services.teacher import lora
from services.teacher.backend import TensorSpec
from services.teacher.cond_cache import CondCache
from services.teacher.conditioned import Conditioned, parse_conditioned
from services.teacher.diffusers_backend import DiffusersBackend, DiffusersLoadError
from services.teacher.protocol import InferRequest, ProtocolError
from services.teacher.repository import RepositoryError, resolve_under
from services.teacher.tensors import to_torch, to_wire, wire_datatype

#: superseded internal adapters kept per name: requests in flight during a swap still find theirs
KEEP_OLD_ADAPTERS = 1


@dataclass(frozen=True)
class DiffusersModel:
    """An immutable snapshot of one served model: the base (``adapter`` None) or a LoRA on it."""

    name: str
    backend: DiffusersBackend
    adapter: str | None  # the internal peft adapter name
    version: int
    digest: str
    source: Path  # the model directory or the adapter file
    base_name: str

    def parse(
        self, body: bytearray, header_length: str | None, cache: CondCache | None
    ) -> InferRequest:
        """Validate an infer body for this model (see :mod:`services.teacher.conditioned`)."""
        b = self.backend
        req = parse_conditioned(
            body, header_length, b.state_spec(), b.cond_specs(), b.check_state, cache
        )
        if req.extra.guidance_scale is not None:  # the server's uncond rows must fit the cond's
            for name, u in b.uncond.items():
                got = req.extra.cond[name].shape[1:]
                if tuple(u.shape[1:]) != got:
                    raise ProtocolError(
                        400,
                        "input",
                        f"guidance_scale needs {name} of shape [B, "
                        f"{', '.join(map(str, u.shape[1:]))}] (the server's unconditional "
                        f"embedding), got [B, {', '.join(map(str, got))}]",
                    )
        return req

    def metadata(self, name: str) -> dict[str, Any]:
        """``GET /v2/models/{name}``: inputs ``x``, ``t`` and the conditioning, output ``v``."""
        state = self.backend.state_spec()
        return {
            "name": name,
            "versions": [str(self.version)],
            "platform": "pytorch",
            "inputs": [
                state.metadata(),
                TensorSpec("t", ()).metadata(),
                *(s.metadata() for s in self.backend.cond_specs()),
            ],
            "outputs": [TensorSpec("v", state.shape, state.datatype).metadata()],
            "parameters": self.parameters(),
        }

    def parameters(self) -> dict[str, Any]:
        b = self.backend
        return {
            "version": str(self.version),
            "digest": self.digest,
            "backend": "diffusers",
            "time_convention": b.time_convention,
            "family": b.family,
            "dtype": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
                b.dtype
            ],
            "checkpoint": self.source.name,
            "teacher": self.name,
            "role": "base" if self.adapter is None else "teacher",
            "base": self.base_name,
            "base_digest": b.digest,
            "adapter": self.adapter is not None,
            "modes": [],
            "mode_centers": [],
            "cond_rows": "B or 1",
            "uncond": "server file" if b.uncond else "zeros",
        }

    def forward_conditioned(
        self, xs: list[np.ndarray], ts: list[np.ndarray], extras: list[Conditioned]
    ) -> list[np.ndarray]:
        """``v`` for each request ``xs[i] [B_i, *S]`` (in its own wire datatype), all in one
        forward: the batcher only groups requests whose :meth:`Conditioned.key` agree.
        Blocking, any thread."""
        b = self.backend
        with torch.inference_mode():
            parts = [to_torch(x) for x in xs]
            x = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(b.device, b.dtype)
            t = torch.from_numpy(np.concatenate(ts) if len(ts) > 1 else ts[0]).to(b.device)
            cond: dict[str, torch.Tensor] = {}
            for spec in b.cond_specs():
                rows = []
                for xi, e in zip(xs, extras, strict=True):
                    c = to_torch(e.cond[spec.name])
                    rows.append(c.expand(len(xi), *c.shape[1:]) if len(c) != len(xi) else c)
                joined = rows[0] if len(rows) == 1 else torch.cat(rows)
                dtype = torch.float32 if spec.name == "guidance" else b.dtype
                cond[spec.name] = joined.to(b.device, dtype)
            v = b.forward(x, t, cond, self.adapter, extras[0].guidance_scale)
            out, start = [], 0
            for xi in xs:
                out.append(to_wire(v[start : start + len(xi)], wire_datatype(xi)))
                start += len(xi)
        return out


class DiffusersRepository:
    """The base model and its adapters, by served name; versions count loads per name."""

    def __init__(self, base_name: str, backend: DiffusersBackend, root: Path) -> None:
        self.base_name = base_name
        self.backend = backend
        self.root = root.resolve()
        self.models: dict[str, DiffusersModel | None] = {}
        self.last_error: dict[str, str] = {}
        self._versions: dict[str, int] = {}
        self._paths: dict[str, Path] = {}
        self._internal: dict[str, list[str]] = {}  # name -> installed peft adapters, newest last
        self._lock = asyncio.Lock()  # one load at a time
        self._seq = 0
        self._serve(base_name, None, backend.digest, backend.source)

    # -- what the routes ask ---------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str) -> DiffusersModel | None:
        """The serving snapshot of ``name`` (``None``: unloaded); KeyError when unknown."""
        return self.models[name]

    def ready(self) -> bool:
        return any(m is not None for m in self.models.values())

    def index(self) -> list[dict[str, Any]]:
        out = []
        for name, m in self.models.items():
            entry: dict[str, Any] = {
                "name": name,
                "version": str(m.version) if m else "",
                "state": "READY" if m else "UNAVAILABLE",
                # required by the repository extension's index schema: "" when there is none
                "reason": "" if m else self.last_error.get(name) or "unloaded",
            }
            out.append(entry)
        return out

    # -- loading -------------------------------------------------------------------------------
    def _serve(self, name: str, adapter: str | None, digest: str, source: Path) -> DiffusersModel:
        version = self._versions.get(name, 0) + 1
        self._versions[name] = version
        model = DiffusersModel(name, self.backend, adapter, version, digest, source, self.base_name)
        self.models[name] = model  # the swap: one reference assignment
        self.last_error.pop(name, None)
        return model

    def add_adapter_now(self, name: str, path: Path) -> DiffusersModel:
        """Install the LoRA at ``path`` and serve it as ``name`` (blocking).

        Raises:
            RepositoryError(400): bad name, unreadable or pickle file, or it does not fit.
        """
        if name == self.base_name:
            raise RepositoryError(
                f"{name!r} is the base model's name; serve adapters under other names", 400
            )
        if not is_plain_name(name):
            raise RepositoryError(f"adapter name must be {PLAIN_NAME_RULE}; got {name!r}", 400)
        try:
            sd, meta, file_sha = lora.read_adapter(path)
            # peft module keys cannot hold '.', served names may: number them instead
            self._seq += 1
            internal = f"opd_adapter_{self._seq}"
            lora.install(self.backend, internal, sd, meta)
        except DiffusersLoadError as exc:
            self.last_error[name] = str(exc)
            raise RepositoryError(str(exc), 400) from None
        digest = lora.adapter_digest(self.backend.digest, file_sha)
        model = self._serve(name, internal, digest, lora.adapter_file(path))
        self._paths[name] = Path(path)
        installed = self._internal.setdefault(name, [])
        installed.append(internal)
        self._drop_old(name)
        return model

    def _drop_old(self, name: str, keep: int = KEEP_OLD_ADAPTERS) -> None:
        """Delete superseded adapters of ``name`` but the ``keep`` newest besides the serving."""
        installed = self._internal.get(name, [])
        serving = self.models.get(name)
        current = serving.adapter if serving is not None else None
        old = [a for a in installed if a != current]
        for internal in old[: max(0, len(old) - keep)]:
            lora.remove(self.backend, internal)
            installed.remove(internal)

    async def load_named(
        self, name: str, params: dict[str, Any]
    ) -> tuple[DiffusersModel, dict[str, Any]]:
        """The load route: ``{"adapter": PATH}`` (under the model root) serves or replaces
        adapter ``name``; no adapter reloads the last one (or re-serves an unloaded base)."""
        adapter = params.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise RepositoryError("parameters.adapter must be a path string", 400)
        async with self._lock:
            if name == self.base_name:
                if adapter is not None:
                    raise RepositoryError(
                        f"{name!r} is the base model; load adapters under another name", 400
                    )
                model = self.models[name] or self._serve(
                    name, None, self.backend.digest, self.backend.source
                )
            else:
                if adapter is None:
                    path = self._paths.get(name)
                    if path is None:
                        raise RepositoryError(
                            f"no adapter given for {name!r} and none loaded before; send "
                            '{"parameters": {"adapter": "PATH"}} (PATH under the model root '
                            f"{self.root})",
                            400,
                        )
                else:
                    path = resolve_under(self.root, adapter)
                    if not path.exists():
                        raise RepositoryError(f"adapter {adapter!r} not found under {self.root}")
                model = await asyncio.to_thread(self.add_adapter_now, name, path)
        answer = {
            "name": name,
            "version": str(model.version),
            "digest": model.digest,
            "checkpoint": model.source.name,
            "role": "base" if model.adapter is None else "teacher",
            "modes": [],
        }
        return model, answer

    def kept(self, name: str) -> str:
        """What a failed load of ``name`` left serving, for its error message."""
        current = self.models.get(name)
        return f"; still serving version {current.version}" if current else ""

    async def unload_named(self, name: str) -> None:
        """Stop serving ``name``; accepted requests still finish on their snapshot."""
        async with self._lock:
            self.models[name] = None
            await asyncio.to_thread(self._drop_old, name)
