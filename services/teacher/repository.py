"""The model repository: one served model, loaded beside the old one and swapped atomically.

A request takes a :class:`LoadedModel` snapshot when it is accepted and keeps it until it is
answered, so a swap never changes the weights under a request in flight ("in-flight requests
finish on the model they started with"); the old model is freed once the last one is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.checkpoint import CheckpointError, CheckpointMeta, read_model
from common.nets import VelocityNet
from services.teacher.backend import TensorSpec, ToyBackend


class RepositoryError(Exception):
    """A repository call that cannot be done; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


#: Rows per CPU forward chunk. A toy teacher's forward runs at ~530k states/s up to 4,096 rows
#: and slows past it (470k at 8,192, 277k at 16,384, 1 thread) once the activations of a chunk
#: no longer fit in the L2 cache, so merged batches run as cache-sized chunks.
DEFAULT_CHUNK_STATES = 4096

#: Requests share a CPU forward only while the merged input stays within this many floats (4 MB).
#: Merging saves a forward's fixed cost (~0.1 ms for a toy teacher) but copies the rows; at
#: image-scale states (65,536 floats each) the copy costs more than the forward it saves.
MERGE_FLOATS = 1 << 20


@dataclass(frozen=True)
class LoadedModel:
    """An immutable snapshot of the served model: weights, metadata, version, source file.

    ``chunk_states``: CPU forwards run in row chunks of at most this many states (0: unchunked).
    """

    net: VelocityNet
    meta: CheckpointMeta
    version: int
    checkpoint: Path
    device: str
    chunk_states: int = DEFAULT_CHUNK_STATES

    @property
    def data_dim(self) -> int:
        return self.meta.arch.data_dim

    @property
    def digest(self) -> str:
        return self.meta.digest

    def parse(self, body: bytearray, header_length: str | None, cache: Any = None) -> Any:
        """Validate an infer body for this model (``x [B, D]``, ``t [B]``; no cond cache)."""
        from services.teacher.protocol import parse_infer

        return parse_infer(body, header_length, self.data_dim)

    def metadata(self, name: str) -> dict[str, Any]:
        """``GET /v2/models/{name}``: the toy's inputs through the backend seam's specs."""
        state = ToyBackend(self.net).state_spec()
        return {
            "name": name,
            "versions": [str(self.version)],
            "platform": "pytorch",
            "inputs": [state.metadata(), TensorSpec("t", ()).metadata()],
            "outputs": [TensorSpec("v", state.shape).metadata()],
            "parameters": self.parameters(),
        }

    def forward(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """``v [B, D]`` (float32) at states ``x [B, D]`` and times ``t [B]``; blocking, any thread."""
        return self.forward_parts([x], [t])[0]

    def forward_parts(self, xs: list[np.ndarray], ts: list[np.ndarray]) -> list[np.ndarray]:
        """``v [B_i, D]`` for each part ``xs[i] [B_i, D]``, ``ts[i] [B_i]``, run as few forwards.

        Small parts share a forward (a chunk spanning parts copies just its rows); on the CPU a
        chunk holds at most ``chunk_states`` rows and spans parts only while its input stays
        within :data:`MERGE_FLOATS`. A part that fits one chunk goes to torch without a copy
        and gets the forward's output (or a view of it) back, so nothing is stacked or split by
        copying. Each ``v`` equals one forward of its part alone to float rounding. Blocking,
        any thread.
        """
        cpu = self.device == "cpu"
        limit = self.chunk_states if cpu and self.chunk_states > 0 else sum(len(x) for x in xs)
        pieces: list[list[np.ndarray]] = [[] for _ in xs]
        with torch.inference_mode():
            for owners, x, t in row_chunks(xs, ts, limit, MERGE_FLOATS if cpu else None):
                v, start = self._run(x, t), 0
                for part, rows in owners:
                    pieces[part].append(v[start : start + rows])
                    start += rows
        return [p[0] if len(p) == 1 else np.concatenate(p) for p in pieces]

    def _run(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """One forward of ``x``, ``t`` (inside ``inference_mode``)."""
        xt = torch.from_numpy(x)
        tt = torch.from_numpy(t)
        if self.device != "cpu":
            xt, tt = xt.to(self.device, non_blocking=True), tt.to(self.device, non_blocking=True)
            return self.net(xt, tt).cpu().numpy()
        return self.net(xt, tt).numpy()

    def parameters(self) -> dict[str, Any]:
        """Model-metadata ``parameters``: what routers and trainers need to know about it."""
        return {
            "version": str(self.version),
            "digest": self.meta.digest,
            "checkpoint": self.checkpoint.name,
            "teacher": self.meta.name,
            "role": self.meta.role,
            "modes": list(self.meta.modes),
            "mode_centers": [list(c) for c in self.meta.mode_centers],
            "data_dim": self.data_dim,
            "backend": ToyBackend.kind,
            "time_convention": ToyBackend.time_convention,
            **(
                {
                    "synthetic": True,
                    "width": self.meta.arch.width,
                    "depth": self.meta.arch.depth,
                    "seed": self.meta.seed,
                }
                if self.meta.training.get("synthetic")
                else {}
            ),
        }


def row_chunks(
    xs: list[np.ndarray], ts: list[np.ndarray], limit: int, merge_floats: int | None = None
) -> Iterator[tuple[list[tuple[int, int]], np.ndarray, np.ndarray]]:
    """``(owners, x rows, t rows)`` chunks of at most ``limit`` rows covering the parts ``xs``
    (and ``ts``) stacked, in order; ``owners`` lists ``(part index, rows)`` of the chunk's rows.

    A chunk spans several parts only while its ``x`` holds at most ``merge_floats`` floats
    (``None``: no bound). A chunk within one part is a view of it.
    """
    limit = max(limit, 1)
    i, off = 0, 0  # current part, offset in it
    while i < len(xs):
        owners: list[tuple[int, int]] = []
        xp, tp, need, floats = [], [], limit, 0
        while i < len(xs) and need > 0:
            take = min(need, len(xs[i]) - off)
            size = take * int(np.prod(xs[i].shape[1:]))
            if owners and merge_floats is not None and floats + size > merge_floats:
                break
            owners.append((i, take))
            xp.append(xs[i][off : off + take])
            tp.append(ts[i][off : off + take])
            need, floats, off = need - take, floats + size, off + take
            if off == len(xs[i]):
                i, off = i + 1, 0
        if len(xp) == 1:
            yield owners, xp[0], tp[0]
        else:
            yield owners, np.concatenate(xp), np.concatenate(tp)


def resolve_under(root: Path, name: str | Path) -> Path:
    """``name`` (relative to ``root``, or absolute) as a path inside ``root``.

    Raises:
        RepositoryError(400): the path leaves ``root`` (``..``, absolute elsewhere, symlinks).
    """
    root = root.resolve()
    path = (root / name).resolve()  # an absolute ``name`` replaces root, then gets checked
    if not path.is_relative_to(root):
        raise RepositoryError(
            f"checkpoint {str(name)!r} is outside the model root {root}; "
            f"give a file name relative to the model root",
            400,
        )
    return path


class ModelRepository:
    """Holds the served model and swaps it on load; versions count successful loads from 1."""

    def __init__(
        self,
        name: str,
        root: Path,
        device: str = "cpu",
        chunk_states: int = DEFAULT_CHUNK_STATES,
    ) -> None:
        self.name = name
        self.root = root.resolve()
        self.device = device
        self.chunk_states = chunk_states
        self.current: LoadedModel | None = None
        self.last_checkpoint: Path | None = None
        self.last_error: str | None = None
        self._version = 0
        self._lock = asyncio.Lock()  # one load at a time; created lazily per event loop below

    def load_now(self, path: Path) -> LoadedModel:
        """Read ``path`` and make it the served model (blocking; used at start-up)."""
        try:
            net, meta = read_model(path, device=self.device)
        except CheckpointError as exc:
            self.last_error = str(exc)
            raise RepositoryError(str(exc), 400) from exc
        model = self.install(net, meta, Path(path))
        self.last_checkpoint = Path(path)
        return model

    def install(self, net: VelocityNet, meta: CheckpointMeta, source: Path) -> LoadedModel:
        """Serve ``net`` (already loaded; e.g. a synthetic teacher) from now on."""
        if self.current is not None and meta.arch.data_dim != self.current.data_dim:
            # Clients are built for one state dimension; a silent change would break them.
            raise RepositoryError(
                f"{source.name} has state dimension {meta.arch.data_dim}, the "
                f"served model has {self.current.data_dim}; refusing to swap",
                400,
            )
        self._version += 1
        model = LoadedModel(
            net.to(self.device), meta, self._version, source, self.device, self.chunk_states
        )
        self.current = model  # the swap: one reference assignment, atomic for readers
        self.last_error = None
        return model

    async def load(self, checkpoint: str | None) -> LoadedModel:
        """Load ``checkpoint`` (under the model root; ``None`` = reload the last one) beside the
        serving model, off the event loop, then swap. A failure leaves the old model serving."""
        if checkpoint is None:
            if self.last_checkpoint is None:
                raise RepositoryError(
                    "no checkpoint given and none loaded before; send "
                    '{"parameters": {"checkpoint": "FILE"}}',
                    400,
                )
            path = self.last_checkpoint
        else:
            path = resolve_under(self.root, checkpoint)
        if not path.is_file():
            raise RepositoryError(
                f"checkpoint {str(checkpoint)!r} not found under {self.root}", 400
            )
        async with self._lock:
            try:
                return await asyncio.to_thread(self.load_now, path)
            except RepositoryError as exc:
                self.last_error = str(exc)
                raise

    def unload(self) -> None:
        """Stop serving; requests already accepted still finish on their snapshot."""
        self.current = None

    # -- the interface the routes use (shared with DiffusersRepository) ------------------------
    def names(self) -> list[str]:
        return [self.name]

    def get(self, name: str) -> LoadedModel | None:
        """The serving snapshot of ``name`` (``None``: unloaded); KeyError when unknown."""
        if name != self.name:
            raise KeyError(name)
        return self.current

    def ready(self) -> bool:
        return self.current is not None

    def kept(self, name: str) -> str:
        """What a failed load left serving, for its error message."""
        current = self.current
        return f"; still serving version {current.version}" if current else ""

    async def load_named(
        self, name: str, params: dict[str, Any]
    ) -> tuple[LoadedModel, dict[str, Any]]:
        """The load route: ``{"checkpoint": FILE}`` (``None``: the last one), and its answer."""
        checkpoint = params.get("checkpoint")
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise RepositoryError("parameters.checkpoint must be a file name string", 400)
        before = self.current
        model = await self.load(checkpoint)
        answer: dict[str, Any] = {
            "name": name,
            "version": str(model.version),
            "digest": model.meta.digest,
            "checkpoint": model.checkpoint.name,
            "role": model.meta.role,
            "modes": list(model.meta.modes),
        }
        if before is not None and (before.meta.role, before.meta.modes) != (
            model.meta.role,
            model.meta.modes,
        ):
            # Legal (a checkpoint is the operator's choice), but rarely meant: say so.
            answer["warning"] = (
                f"version {before.version} was a {before.meta.role} of modes "
                f"{list(before.meta.modes)}; version {model.version} is a {model.meta.role} of "
                f"modes {list(model.meta.modes)}. Routers re-read the mode centers on its next "
                "answer."
            )
        return model, answer

    async def unload_named(self, name: str) -> None:
        self.unload()

    def index(self) -> list[dict[str, Any]]:
        """``POST /v2/repository/index`` entries."""
        m = self.current
        entry: dict[str, Any] = {
            "name": self.name,
            "version": str(m.version) if m else "",
            "state": "READY" if m else "UNAVAILABLE",
            # required by the repository extension's index schema: "" when there is none
            "reason": "" if m else self.last_error or "unloaded",
        }
        return [entry]
