"""The trainer's client for served teachers: OIP v2 over HTTP, binary tensors, routed by the
router process or (``routing="client"``) in this process from the router's registry.

States are sent as soon as the rollout produces them (every ``stream_chunk`` queried rollout
steps make one request), several requests are in flight at once, and :meth:`collect_parts`
hands each request's answer to the trainer as soon as it is in, while later ones are still in
flight; routed in this process, each teacher's rows of a request come as soon as that teacher
has answered, so the trainer regresses on them while the other teachers still compute. The
HTTP work runs on an asyncio loop in a background thread, so the rollout never waits on the
network; only the waits in :meth:`collect_parts` are exposed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import torch

from common.codec import encode_request
from common.http1 import Http1Client
from services.router.direct import DirectRouter
from services.router.fanout import InputError, RouterPart, TeacherFault
from services.router.negotiate import speaks_binary
from services.router.pool import TeacherRejected
from services.router.pool import TeacherUnavailable as PoolUnavailable
from services.router.registry import RegistryError, Teacher
from student.client import (
    BUSY_WAIT_S,
    Posted,
    RetryPolicy,
    TeacherRequestError,
    post_infer,
    teacher_stamps,
)
from student.client import Retry as _Retry
from student.clients import (
    Answer,
    QueryCost,
    RequestSpan,
    TeacherClient,
    TeacherInfo,
    TeacherUnavailable,
)

ROUTER_MODEL = "opd-router"
#: where a request is routed: through the router process, or in this client
ROUTING = ("router", "client")
#: what one group of :meth:`HttpTeacherClient.collect_parts` holds
UPDATE_GROUPS = ("ready", "request")
# Requests, retries and busy waits: the public client's (student/client.py), the one
# implementation every client here shares.
# in-client routing: no live replica, an unusable answer, or a registry in transit may pass
DIRECT_RETRY_ERRORS = (PoolUnavailable, TeacherFault, RegistryError, asyncio.TimeoutError)


def _poll(parts: queue.SimpleQueue) -> Any:
    """The next item on ``parts`` if one is there, else None."""
    try:
        return parts.get_nowait()
    except queue.Empty:
        return None


@dataclass
class _Reply:
    """One request's answer, or one teacher's part of it (``span`` only on a request's last)."""

    v: np.ndarray
    teacher: np.ndarray
    v_anchor: np.ndarray | None
    span: RequestSpan | None
    sent: int
    received: int
    versions: dict[str, str]
    queue_s: float = 0.0  # the servers' reports for the calls behind this answer
    compute_s: float = 0.0
    digests: dict[str, str] = field(default_factory=dict)


#: a request's last item on its queue of answers: it has ended (answered, or failed)
_END = object()


@dataclass
class _Request:
    """One request in flight: ``(reply, rows or None)`` items arrive on ``parts`` from the HTTP
    thread, as the request or each teacher's share of it is answered, then :data:`_END`."""

    sizes: list[int]  # the submitted batches it carries
    offset: int  # how many of the step's states were submitted before it
    parts: queue.SimpleQueue
    fut: concurrent.futures.Future  # the request's coroutine on the HTTP loop


def fetch_registry(
    router_url: str, timeout_s: float = 10.0, retries: int = 5, backoff_s: float = 0.2
) -> tuple[list[TeacherInfo], list[TeacherInfo]]:
    """Teachers (in the router's index order) and anchors from ``GET /v1/teachers``.

    Retried with backoff like an infer request: a router (or its name, in a container network)
    that is a moment late should not end a run before its first step.
    """
    for attempt in range(retries + 1):
        try:
            doc = (
                httpx.get(f"{router_url}/v1/teachers", timeout=timeout_s).raise_for_status().json()
            )
            break
        except httpx.HTTPError as exc:
            if attempt == retries:
                raise TeacherUnavailable(
                    f"router {router_url} is unreachable after {retries + 1} attempts: {exc}"
                ) from exc
            time.sleep(min(backoff_s * 2**attempt, 5.0))

    def info(entry: dict) -> TeacherInfo:
        centers = entry.get("mode_centers")
        return TeacherInfo(
            entry["name"],
            entry.get("digest") or "",
            str(entry.get("version") or ""),
            list(entry.get("modes") or []),
            torch.tensor(centers, dtype=torch.float32) if centers else None,
        )

    return [info(e) for e in doc.get("teachers", [])], [info(e) for e in doc.get("anchors", [])]


class HttpTeacherClient(TeacherClient):
    """Teachers behind an ``opd-router`` (uvicorn or Ray Serve) at ``router_url``."""

    def __init__(
        self,
        router_url: str,
        teachers: list[str],
        anchor: bool = False,
        policy: str | None = None,
        stream_chunk: int = 1,
        max_in_flight: int = 8,
        timeout_s: float = 30.0,
        retries: int = 5,
        backoff_s: float = 0.2,
        routing: str = "router",
        spin_wait_s: float = 0.0,
        update_groups: str = "ready",
    ) -> None:
        """``routing``: ``router`` sends every request through the router; ``client`` routes
        here with the router's (watched) registry and calls the teachers directly (see
        :mod:`services.router.direct`): no router hop, same answers. ``spin_wait_s``: how long
        :meth:`collect_parts` busy-waits for an answer before sleeping (0: sleep at once).
        ``update_groups``: ``ready`` hands :meth:`collect_parts`' caller every answer that is in
        as one group (routing here, each teacher's rows come as soon as that teacher has
        answered); ``request``: one group per request, in submit order, whatever the timing."""
        if update_groups not in UPDATE_GROUPS:
            raise ValueError(
                f"update_groups must be one of {', '.join(UPDATE_GROUPS)}, got {update_groups!r}"
            )
        if routing not in ROUTING:
            raise ValueError(f"routing must be one of {', '.join(ROUTING)}, got {routing!r}")
        self.url = router_url.rstrip("/")
        self.endpoint = f"{self.url}/v2/models/{ROUTER_MODEL}/infer"
        self.policy, self.stream_chunk = policy, max(1, stream_chunk)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.spin_wait_s, self.ready = spin_wait_s, update_groups == "ready"
        self._retry = RetryPolicy(retries, backoff_s, BUSY_WAIT_S)
        self._outputs = ["v", "teacher"] + (["v_anchor"] if anchor else [])
        self._buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._inflight: list[_Request] = []
        self._offset = 0  # states sent this step
        self._slots = threading.Semaphore(max_in_flight)  # bounds requests in flight
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opd-http", daemon=True)
        self._thread.start()
        # The lean data-plane client (common/http1.py): every millisecond of client CPU here
        # competes with the rollout on the same cores (aiohttp cost ~4x its round-trip time).
        self._http = Http1Client(limit_per_host=max_in_flight, keepalive_s=30.0)
        self._direct: DirectRouter | None = None
        self._binary = True  # binary tensors, unless the router's GET /v2 does not declare them
        try:
            served, anchors = self._registry(routing, max_in_flight)
            names = [t.name for t in served]
            if names != teachers:
                raise ValueError(
                    f"the router at {self.url} serves teachers {names}, the run asks for "
                    f"{teachers}; register the same teachers in the same order"
                )
            if anchor and not anchors:
                raise ValueError(
                    f"the method needs an anchor, but the router at {self.url} has none "
                    "(start it with --anchor base=URL)"
                )
        except BaseException:
            self.close()
            raise
        self.teachers = served
        self.anchor = anchors[0] if anchor else None

    def _registry(
        self, routing: str, max_in_flight: int
    ) -> tuple[list[TeacherInfo], list[TeacherInfo]]:
        """The router's teachers and anchors; routing here, from the registry snapshot the
        in-client router starts with (one read, so both views agree)."""
        if routing != "client":
            found = fetch_registry(self.url, self.timeout_s, self.retries, self.backoff_s)
            self._binary = speaks_binary(self.url, self.timeout_s)
            return found
        direct = DirectRouter(self.url, deadline_s=self.timeout_s, max_connections=max_in_flight)
        try:
            self._run(direct.start(self.timeout_s, self.retries, self.backoff_s))
        except RegistryError as exc:
            self._run(direct.aclose())
            raise ValueError(f"in-client routing: {exc}") from None
        self._direct = direct

        def info(t: Teacher) -> TeacherInfo:
            return TeacherInfo(
                t.name, t.digest or "", str(t.version or ""), list(t.modes), t.centers
            )

        reg = direct.registry
        return [info(t) for t in reg.teachers], [info(t) for t in reg.anchors]

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -- the TeacherClient interface -------------------------------------------------------
    def submit(self, x: torch.Tensor, t: torch.Tensor, last: bool = False) -> None:
        self._buffer.append((x, t))
        # The step's last state goes at once: a short last chunk (DanceOPD's single state, or
        # a chunk size that does not divide the plan) must not wait for the rollout's end.
        if last or len(self._buffer) >= self.stream_chunk:
            self._flush()

    def collect_parts(self) -> Iterator[tuple[list[Answer], QueryCost]]:
        """Groups of answers as they come in, the rest still in flight: with ``update_groups``
        ``ready`` each group is everything that is in when the caller asks (waiting only when
        nothing is), so a trainer that is busy when answers land takes them in one update and
        one that waits takes the first teacher's rows alone; with ``request``, one group per
        request."""
        self._flush()
        pending, self._inflight, self._offset = self._inflight, [], 0
        reqs = collections.deque(pending)
        try:
            while reqs:
                group: list[tuple[_Request, _Reply, np.ndarray | None]] = []
                while reqs:
                    req = reqs[0]
                    item = self._next(req.parts) if not group else _poll(req.parts)
                    if item is None:  # nothing more is in yet
                        break
                    if item is _END:
                        req.fut.result()  # raises the request's failure, if it failed
                        reqs.popleft()
                        if not self.ready and group:
                            break
                        continue
                    group.append((req, *item))
                if group:
                    yield self._group(group)
        finally:
            # After a failure (or an abandoned iteration) wait for the rest, so no request of
            # this step is still running when the trainer checkpoints or retries the step.
            concurrent.futures.wait([r.fut for r in pending])

    def _next(self, parts: queue.SimpleQueue) -> Any:
        """The next item on ``parts``, busy-waiting up to ``spin_wait_s`` before sleeping on it.

        A trainer that sleeps through the teachers' few milliseconds comes back to a core the
        machine has meanwhile idled or given away: measured here, its next rollout and update
        ran 20-40% slower than in-process. Spinning keeps the core; each turn yields it (and
        the GIL, so the HTTP thread runs) to anything runnable, but on a core it shares with
        that thread it still slows the sending: off by default, see docs/http-training.md.
        Past ``spin_wait_s`` (a retry's backoff, a slow teacher) it sleeps.
        """
        if self.spin_wait_s > 0 and parts.empty():
            until = time.perf_counter() + self.spin_wait_s
            while parts.empty() and time.perf_counter() < until:
                os.sched_yield()
        return parts.get()

    def _group(
        self, items: list[tuple[_Request, _Reply, np.ndarray | None]]
    ) -> tuple[list[Answer], QueryCost]:
        """One group from answers ``(request, reply, rows of the request or None: all)``: a
        whole request's answer split back into its submitted batches, else one answer naming
        its rows of the step."""
        cost = QueryCost()
        for _, reply, _ in items:
            cost.add(self._cost(reply))
        if len(items) == 1 and items[0][2] is None:
            return self._answers(items[0][1], items[0][0]), cost

        def cat(arrays: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))

        replies = [reply for _, reply, _ in items]
        anchors = [r.v_anchor for r in replies]
        rows = [
            req.offset + (np.arange(len(reply.v)) if rows is None else rows)
            for req, reply, rows in items
        ]
        answer = Answer(
            cat([r.v for r in replies]),
            cat([r.teacher for r in replies]),
            None if anchors[0] is None else cat(anchors),  # type: ignore[arg-type]
            cat(rows),
        )
        return [answer], cost

    @staticmethod
    def _answers(reply: _Reply, req: _Request) -> list[Answer]:
        """Split one request's answer back into the batches it was submitted as."""
        sizes = req.sizes
        v, k = torch.from_numpy(reply.v).split(sizes), torch.from_numpy(reply.teacher).split(sizes)
        va = (
            torch.from_numpy(reply.v_anchor).split(sizes)
            if reply.v_anchor is not None
            else [None] * len(sizes)
        )
        return [Answer(*parts) for parts in zip(v, k, va, strict=True)]

    @staticmethod
    def _cost(reply: _Reply) -> QueryCost:
        """What the answer cost; a request's latency, transport and span go with its last part."""
        cost = QueryCost(
            states=len(reply.v),
            bytes_sent=reply.sent,
            bytes_received=reply.received,
            server_queue_s=reply.queue_s,
            server_compute_s=reply.compute_s,
            versions=dict(reply.versions),
            digests=dict(reply.digests),
        )
        if (s := reply.span) is not None:
            cost.requests, cost.latency_s, cost.spans = 1, s.end - s.start, [s]
            cost.transport_s = max(0.0, s.end - s.start - s.server_total_s)
        return cost

    def close(self) -> None:
        if self._loop.is_running():
            if self._direct is not None:
                self._run(self._direct.aclose())
                self._direct = None
            self._run(self._http.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    # -- sending -------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._buffer:
            return
        chunk, self._buffer = self._buffer, []
        sizes = [x.shape[0] for x, _ in chunk]
        x = torch.cat([c[0] for c in chunk]) if len(chunk) > 1 else chunk[0][0]
        t = torch.cat([c[1] for c in chunk]) if len(chunk) > 1 else chunk[0][1]
        params = {"policy": self.policy} if self.policy else None
        if self._direct is not None:
            # A copy when x is the rollout's own tensor: it may be written while in flight.
            inputs = {
                "x": x.numpy().copy() if len(chunk) == 1 else x.numpy(),
                "t": t.numpy().copy() if len(chunk) == 1 else t.numpy(),
            }
            self._send(lambda put: self._post_direct(inputs, params, put), sizes)
            return
        # Encoding copies the states into the body here, in the trainer thread, so the rollout
        # may go on writing its own buffers while the request is in flight.
        body, headers = encode_request(
            {"x": x.numpy(), "t": t.numpy()},
            outputs=self._outputs,
            binary=self._binary,
            parameters=params,
        )
        self._send(lambda put: self._post(body, headers, sum(sizes), put), sizes)

    def _send(self, make: Callable[[Callable[[tuple], None]], Awaitable[None]], sizes) -> None:
        """Run ``make(put)`` on the HTTP loop once a slot is free; it puts its answers on the
        request's queue, which :meth:`collect_parts` reads."""
        parts: queue.SimpleQueue = queue.SimpleQueue()
        self._slots.acquire()

        def ended(_: concurrent.futures.Future) -> None:
            self._slots.release()
            parts.put(_END)

        fut = asyncio.run_coroutine_threadsafe(make(parts.put), self._loop)
        fut.add_done_callback(ended)
        self._inflight.append(_Request(sizes, self._offset, parts, fut))
        self._offset += sum(sizes)

    @property
    def busy_waits(self) -> int:
        """Waits on busy servers' ``Retry-After``, over the client's life."""
        return self._retry.busy_waits

    @property
    def busy_wait_s(self) -> float:
        return self._retry.busy_wait_s

    @busy_wait_s.setter
    def busy_wait_s(self, value: float) -> None:
        self._retry.busy_wait_s = value

    async def _retrying(self, attempt: Callable[[], Awaitable[None]], where: str) -> None:
        """``attempt()`` under the public client's :class:`~student.client.RetryPolicy`:
        bounded retries with backoff, busy answers (503 + ``Retry-After``) waited out."""
        await self._retry.run(attempt, where)

    async def _post(self, body: bytes, headers: dict[str, str], states: int, put) -> None:
        async def attempt() -> None:
            posted = await post_infer(self._http, self.endpoint, body, headers, self.timeout_s)
            put((self._decode(posted, body, states), None))

        await self._retrying(attempt, f"through {self.endpoint}")

    async def _post_direct(self, inputs: dict[str, np.ndarray], params: dict | None, put) -> None:
        """:meth:`_post` for in-client routing: the same retries, over the direct router, and
        each teacher's rows ``put`` as soon as that teacher has answered. A retry asks only for
        the rows still unanswered, so no state is answered twice."""
        direct = self._direct
        assert direct is not None
        answered = np.zeros(len(inputs["x"]), dtype=bool)

        async def attempt() -> None:
            start = time.perf_counter()
            todo = np.flatnonzero(~answered) if answered.any() else None
            sub = inputs if todo is None else {k: a[todo] for k, a in inputs.items()}
            queue_s = compute_s = 0.0  # over this attempt's parts, for its span
            try:
                async for part in self._parts(direct, sub, params):
                    out, p = part.outputs, part.parameters
                    rows = part.rows if todo is None or part.rows is None else todo[part.rows]
                    if rows is None:
                        rows = todo  # every row asked for (None: every row of the request)
                    reply = self._reply(
                        p,
                        out["v"],
                        out["teacher"],
                        out.get("v_anchor"),
                        int(p.get("teacher_bytes_sent", 0)),
                        int(p.get("teacher_bytes_received", 0)),
                        len(sub["x"]),
                        start,
                        time.perf_counter(),
                        part.last,
                        (queue_s, compute_s),
                    )
                    queue_s, compute_s = queue_s + reply.queue_s, compute_s + reply.compute_s
                    answered[slice(None) if rows is None else rows] = True
                    put((reply, rows))
            except DIRECT_RETRY_ERRORS as exc:
                busy = getattr(exc, "retry_after_s", None)  # every replica was busy
                raise _Retry(f"{type(exc).__name__}: {exc}", busy) from exc
            except (TeacherRejected, InputError) as exc:
                raise TeacherRequestError(f"in-client routing via {self.url}: {exc}") from exc

        await self._retrying(attempt, f"(in-client routing, registry of {self.url})")

    async def _parts(
        self, direct: DirectRouter, inputs: dict[str, np.ndarray], params: dict | None
    ) -> AsyncIterator[RouterPart]:
        """The request's answer from ``direct``: teacher by teacher, or (``update_groups``
        ``request``) as one part."""
        if self.ready:
            async for part in direct.infer_parts(inputs, self._outputs, params):
                yield part
        else:
            res = await direct.infer(inputs, self._outputs, params)
            yield RouterPart(None, res.outputs, res.parameters)

    def _decode(self, posted: Posted, body: bytes, states: int) -> _Reply:
        out = posted.tensors
        return self._reply(
            posted.parameters,
            np.asarray(out["v"]),
            np.asarray(out["teacher"]),
            np.asarray(out["v_anchor"]) if "v_anchor" in out else None,
            len(body),
            posted.received,
            states,
            posted.start,
            posted.end,
        )

    def _reply(
        self,
        p: dict,
        v: np.ndarray,
        teacher: np.ndarray,
        v_anchor: np.ndarray | None,
        sent: int,
        received: int,
        states: int,
        start: float,
        end: float,
        last: bool = True,
        before: tuple[float, float] = (0.0, 0.0),
    ) -> _Reply:
        """An answer and its cost, from the ``opd-router`` parameters ``p``. ``last``: the
        request's last part, which carries its span (``states`` rows, from ``start`` to
        ``end``, with the queue and compute seconds of the parts ``before`` it added in)."""
        names = [
            *(str(p.get("teachers") or "").split(",")),
            *([self.anchor.name] if self.anchor else []),
        ]
        versions, digests = teacher_stamps(p, names)
        queue_s = float(p.get("queue_ms", 0.0)) / 1e3
        compute_s = float(p.get("compute_ms", 0.0)) / 1e3
        span = None
        if last:
            server_ms = float(p.get("route_ms", 0.0)) + float(p.get("fanout_ms", 0.0))
            span = RequestSpan(
                start,
                end,
                states,
                before[0] + queue_s,
                before[1] + compute_s,
                server_ms / 1e3,
            )
        return _Reply(
            v, teacher, v_anchor, span, sent, received, versions, queue_s, compute_s, digests
        )
