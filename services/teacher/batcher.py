"""Dynamic batching by states: concurrent requests share one forward pass.

Requests queue on the event loop; one collector task takes what is queued (waiting at most
``max_delay`` for more) up to ``max_states`` states, runs the forward on a single worker thread
so the event loop keeps reading and writing sockets meanwhile, and splits the output back. While
one forward runs, the next batch forms in the queue, so under load batches grow by themselves
even with ``max_delay = 0`` (Triton's dynamic-batcher semantics).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class ForwardResult:
    """One request's answer: ``v [B, D]`` and how it was computed."""

    v: np.ndarray
    version: int
    queue_s: float  # accepted → its forward started
    compute_s: float  # duration of the batch it ran in (one or more forwards, see forward_parts)
    batch_states: int  # states in that batch
    batch_requests: int  # requests in that batch
    digest: str = ""  # sha256 of the weights that answered: a version number is per process


@dataclass
class _Item:
    model: Any  # LoadedModel, or a DiffusersModel snapshot (then ``extra`` is set)
    x: np.ndarray  # [B, *S]
    t: np.ndarray  # [B] float32
    future: asyncio.Future
    enqueued: float
    extra: Any = None  # conditioned.Conditioned: conditioning rows and guidance
    key: Any = None  # items share a forward only when their model and key agree
    nbytes: int = 0

    @property
    def states(self) -> int:
        return len(self.x)


#: called once per forward: (batch states, batch requests, compute seconds, [queue seconds])
BatchObserver = Callable[[int, int, float, list[float]], None]


def _run_group(model: Any, items: list[_Item]) -> tuple[list[np.ndarray], float, float]:
    """Forward of one model's items as one batch (worker thread): each item's ``v``, the start
    time and the seconds it took."""
    start = time.perf_counter()
    if items[0].extra is not None:  # conditioned: one forward over the group's rows
        vs = model.forward_conditioned(
            [i.x for i in items], [i.t for i in items], [i.extra for i in items]
        )
        return vs, start, time.perf_counter() - start
    # No concatenation of the whole batch: the model runs cache-sized row chunks of the parts.
    vs = model.forward_parts([i.x for i in items], [i.t for i in items])
    return vs, start, time.perf_counter() - start


def forward_executor(threads: int | None = None) -> ThreadPoolExecutor:
    """One worker thread for forwards: one at a time (torch parallelises inside), in order.

    The thread sets its own torch thread count (``threads``, default: the caller's current one):
    OpenMP settings are per thread, so a fresh thread would otherwise use every core and, on a
    busy machine, stall in OpenMP barriers (a 0.3 ms forward measured at 6-27 ms).
    """
    n = threads or torch.get_num_threads()
    return ThreadPoolExecutor(
        1, thread_name_prefix="teacher-forward", initializer=torch.set_num_threads, initargs=(n,)
    )


class Batcher:
    """Merges concurrent requests into forwards of at most ``max_states`` states and
    ``max_bytes`` bytes of inputs (states plus conditioning).

    Requests share a forward only when their model snapshot (hence adapter) and merge key
    (state shape, conditioning shapes, guidance) agree. A single request larger than either
    bound runs alone (it is never split or refused).
    """

    def __init__(
        self,
        max_states: int,
        max_delay_s: float,
        observer: BatchObserver | None = None,
        max_bytes: int | None = None,
    ):
        self.max_states = max_states
        self.max_bytes = max_bytes
        self.max_delay_s = max_delay_s
        self.observer = observer
        self._executor = forward_executor()
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._carry: _Item | None = None

    async def submit(
        self, model: Any, x: np.ndarray, t: np.ndarray, extra: Any = None
    ) -> ForwardResult:
        """Queue ``x [B, *S]``, ``t [B]`` (and a conditioned model's ``extra``) for ``model``
        and wait for its ``v [B, *S]``."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="batcher")
        assert self._queue is not None
        fut = asyncio.get_running_loop().create_future()
        item = _Item(model, x, t, fut, time.perf_counter())
        if extra is not None:
            item.extra, item.key = extra, extra.key(x)
            item.nbytes = x.nbytes + extra.nbytes()
        else:
            item.nbytes = x.nbytes
        self._queue.put_nowait(item)
        return await fut

    async def close(self) -> None:
        """Stop the collector and the worker thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _next_batch(self) -> list[_Item]:
        assert self._queue is not None
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, states, nbytes = [first], first.states, first.nbytes
        limit_bytes = self.max_bytes if self.max_bytes is not None else float("inf")
        deadline = time.perf_counter() + self.max_delay_s
        while states < self.max_states and nbytes < limit_bytes:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if states + item.states > self.max_states or nbytes + item.nbytes > limit_bytes:
                self._carry = item  # first in line for the next batch
                break
            batch.append(item)
            states += item.states
            nbytes += item.nbytes
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [i for i in await self._next_batch() if not i.future.done()]  # drop cancelled
            # Normally one group; more when a swap happened while these were queued, or (for
            # conditioned models) per adapter and per shape / guidance.
            groups: dict[tuple, list[_Item]] = {}
            for item in batch:
                groups.setdefault((id(item.model), item.key), []).append(item)
            for items in groups.values():
                await self._execute(loop, items)

    async def _execute(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        model = items[0].model
        try:
            vs, start, compute_s = await loop.run_in_executor(
                self._executor, _run_group, model, items
            )
        except Exception as exc:  # a failed forward fails its requests, not the service
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        states = sum(i.states for i in items)
        queue_s = []
        for item, v in zip(items, vs, strict=True):
            q = max(0.0, start - item.enqueued)
            queue_s.append(q)
            if not item.future.done():
                item.future.set_result(
                    ForwardResult(
                        v,
                        model.version,
                        q,
                        compute_s,
                        states,
                        len(items),
                        model.digest,
                    )
                )
        if self.observer is not None:
            self.observer(states, len(items), compute_s, queue_s)
