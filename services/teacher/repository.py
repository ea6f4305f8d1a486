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


class RepositoryError(Exception):
    """A repository call that cannot be done; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


#: Rows per CPU forward chunk. A toy teacher's forward runs at ~530k states/s up to 4,096 rows
#: and slows past it (470k at 8,192, 277k at 16,384, 1 thread) once the activations of a chunk
#: no longer fit in the L2 cache, so merged batches run as cache-sized chunks.
DEFAULT_CHUNK_STATES = 4096


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

    def forward(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """``v [B, D]`` (float32) at states ``x [B, D]`` and times ``t [B]``; blocking, any thread."""
        return self.forward_parts([x], [t])

    def forward_parts(self, xs: list[np.ndarray], ts: list[np.ndarray]) -> np.ndarray:
        """``v`` of the rows of ``xs`` stacked (``ts`` alike), without stacking them first.

        On the CPU the rows run in chunks of at most ``chunk_states`` (a chunk inside one part is
        a view of it; one spanning parts copies just its rows), each written into one output
        array; a lone part that fits one chunk goes to torch without a copy. The result equals
        one forward of the stacked rows to float rounding. Blocking, any thread.
        """
        total = sum(len(x) for x in xs)
        limit = self.chunk_states if self.device == "cpu" and self.chunk_states > 0 else total
        with torch.inference_mode():
            if len(xs) == 1 and total <= limit:
                return self._run(xs[0], ts[0])
            out: np.ndarray | None = None
            for start, x, t in row_chunks(xs, ts, limit):
                v = self._run(x, t)
                if out is None:
                    out = np.empty((total, *v.shape[1:]), v.dtype)
                out[start : start + len(v)] = v
        assert out is not None
        return out

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
    xs: list[np.ndarray], ts: list[np.ndarray], limit: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(first row, x rows, t rows)`` chunks of at most ``limit`` rows covering the parts
    ``xs`` (and ``ts``) stacked, in order. A chunk within one part is a view of it."""
    limit = max(limit, 1)
    pos, i, off = 0, 0, 0  # rows yielded, current part, offset in it
    while i < len(xs):
        xp, tp, need = [], [], limit
        while i < len(xs) and need > 0:
            take = min(need, len(xs[i]) - off)
            xp.append(xs[i][off : off + take])
            tp.append(ts[i][off : off + take])
            need -= take
            off += take
            if off == len(xs[i]):
                i, off = i + 1, 0
        if len(xp) == 1:
            yield pos, xp[0], tp[0]
        else:
            yield pos, np.concatenate(xp), np.concatenate(tp)
        pos += limit - need


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

    def index(self) -> list[dict[str, Any]]:
        """``POST /v2/repository/index`` entries."""
        m = self.current
        entry: dict[str, Any] = {
            "name": self.name,
            "version": str(m.version) if m else "",
            "state": "READY" if m else "UNAVAILABLE",
        }
        if m is None:
            entry["reason"] = self.last_error or "unloaded"
        return [entry]
