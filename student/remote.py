"""The trainer's client for served teachers: OIP v2 over HTTP, binary tensors, routed by the
router process or (``routing="client"``) in this process from the router's registry.

States are sent as soon as the rollout produces them (every ``stream_chunk`` queried rollout
steps make one request), several requests are in flight at once, and :meth:`collect_parts`
hands each request's answer to the trainer as soon as it is in, while later ones are still in
flight. The HTTP work runs on an asyncio loop in a background thread, so the
rollout never waits on the network; only the waits in :meth:`collect_parts` are exposed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import torch

from common.codec import HEADER_LENGTH, CodecError, decode_response, encode_request
from common.http1 import Http1Client, HttpClientError
from services.router.direct import DirectRouter
from services.router.fanout import InputError, TeacherFault
from services.router.pool import TeacherRejected
from services.router.pool import TeacherUnavailable as PoolUnavailable
from services.router.registry import RegistryError
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
#: Statuses worth another attempt: the request is idempotent and the cause may pass.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
# connection refused/reset, protocol errors, timeouts: the request is idempotent, try again
RETRY_ERRORS = (HttpClientError, OSError, asyncio.TimeoutError)
# in-client routing: no live replica, an unusable answer, or a registry in transit may pass
DIRECT_RETRY_ERRORS = (PoolUnavailable, TeacherFault, RegistryError, asyncio.TimeoutError)


class _Retry(Exception):
    """A failed attempt worth another one (idempotent request, a cause that may pass)."""


class TeacherRequestError(RuntimeError):
    """The router refused a request for a reason retrying will not fix (a 4xx: a bug of ours)."""


@dataclass
class _Reply:
    v: np.ndarray
    teacher: np.ndarray
    v_anchor: np.ndarray | None
    span: RequestSpan
    sent: int
    received: int
    versions: dict[str, str]


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
    ) -> None:
        """``routing``: ``router`` sends every request through the router; ``client`` routes
        here with the router's (watched) registry and calls the teachers directly (see
        :mod:`services.router.direct`): no router hop, same answers. ``spin_wait_s``: how long
        :meth:`collect_parts` busy-waits for an answer before sleeping (0: sleep at once)."""
        if routing not in ROUTING:
            raise ValueError(f"routing must be one of {', '.join(ROUTING)}, got {routing!r}")
        self.url = router_url.rstrip("/")
        self.endpoint = f"{self.url}/v2/models/{ROUTER_MODEL}/infer"
        served, anchors = fetch_registry(self.url, timeout_s, retries, backoff_s)
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
        self.teachers = served
        self.anchor = anchors[0] if anchor else None
        self.policy, self.stream_chunk = policy, max(1, stream_chunk)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.spin_wait_s = spin_wait_s
        self._outputs = ["v", "teacher"] + (["v_anchor"] if anchor else [])
        self._buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._inflight: list[concurrent.futures.Future] = []
        self._slots = threading.Semaphore(max_in_flight)  # bounds requests in flight
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opd-http", daemon=True)
        self._thread.start()
        # The lean data-plane client (common/http1.py): every millisecond of client CPU here
        # competes with the rollout on the same cores (aiohttp cost ~4x its round-trip time).
        self._http = Http1Client(limit_per_host=max_in_flight, keepalive_s=30.0)
        self._direct: DirectRouter | None = None
        if routing == "client":
            direct = DirectRouter(self.url, deadline_s=timeout_s, max_connections=max_in_flight)
            try:
                self._run(direct.start(timeout_s))
            except RegistryError as exc:
                self._run(direct.aclose())
                self.close()
                raise ValueError(f"in-client routing: {exc}") from None
            self._direct = direct

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
        """One group per request, each as soon as it is answered (the rest still in flight)."""
        self._flush()
        pending, self._inflight = self._inflight, []
        try:
            for fut in pending:
                reply, sizes = self._wait(fut)
                yield self._answers(reply, sizes), self._cost(reply)
        finally:
            # After a failure (or an abandoned iteration) wait for the rest, so no request of
            # this step is still running when the trainer checkpoints or retries the step.
            concurrent.futures.wait(pending)

    def _wait(self, fut: concurrent.futures.Future):
        """``fut``'s result, busy-waiting up to ``spin_wait_s`` before sleeping on it.

        A trainer that sleeps through the teachers' few milliseconds comes back to a core the
        machine has meanwhile idled or given away: measured here, its next rollout and update
        ran 20-40% slower than in-process. Spinning keeps the core; each turn yields it (and
        the GIL, so the HTTP thread runs) to anything runnable, but on a core it shares with
        that thread it still slows the sending: off by default, see docs/http-training.md.
        Past ``spin_wait_s`` (a retry's backoff, a slow teacher) it sleeps.
        """
        if self.spin_wait_s > 0 and not fut.done():
            until = time.perf_counter() + self.spin_wait_s
            while not fut.done() and time.perf_counter() < until:
                os.sched_yield()
        return fut.result()

    @staticmethod
    def _answers(reply: _Reply, sizes: list[int]) -> list[Answer]:
        """Split one request's answer back into the batches it was submitted as."""
        v, k = torch.from_numpy(reply.v).split(sizes), torch.from_numpy(reply.teacher).split(sizes)
        va = (
            torch.from_numpy(reply.v_anchor).split(sizes)
            if reply.v_anchor is not None
            else [None] * len(sizes)
        )
        return [Answer(*parts) for parts in zip(v, k, va, strict=True)]

    @staticmethod
    def _cost(reply: _Reply) -> QueryCost:
        s = reply.span
        return QueryCost(
            states=s.states,
            requests=1,
            bytes_sent=reply.sent,
            bytes_received=reply.received,
            latency_s=s.end - s.start,
            server_queue_s=s.server_queue_s,
            server_compute_s=s.server_compute_s,
            transport_s=max(0.0, s.end - s.start - s.server_total_s),
            versions=dict(reply.versions),
            spans=[s],
        )

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
            self._send(self._post_direct(inputs, params, sum(sizes), sizes))
            return
        # Encoding copies the states into the body here, in the trainer thread, so the rollout
        # may go on writing its own buffers while the request is in flight.
        body, headers = encode_request(
            {"x": x.numpy(), "t": t.numpy()}, outputs=self._outputs, binary=True, parameters=params
        )
        self._send(self._post(body, headers, sum(sizes), sizes))

    def _send(self, coro) -> None:
        """Run ``coro`` on the HTTP loop once a slot is free; :meth:`collect_parts` awaits it."""
        self._slots.acquire()
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        fut.add_done_callback(lambda _: self._slots.release())
        self._inflight.append(fut)

    async def _retrying(self, attempt: Callable[[], Awaitable[_Reply]], where: str, sizes):
        """``attempt()`` until it answers, at most ``retries`` more times after a :class:`_Retry`,
        with exponential backoff; then :class:`TeacherUnavailable` naming ``where``."""
        last = "no attempt"
        for n in range(self.retries + 1):
            if n:
                await asyncio.sleep(min(self.backoff_s * 2 ** (n - 1), 5.0))
            try:
                return await attempt(), sizes
            except _Retry as exc:
                last = str(exc)
        raise TeacherUnavailable(
            f"teachers unreachable {where} after {self.retries + 1} attempts; last error: {last}"
        )

    async def _post(self, body: bytes, headers: dict[str, str], states: int, sizes: list[int]):
        async def attempt() -> _Reply:
            start = time.perf_counter()
            try:
                r = await self._http.post(self.endpoint, body, headers, timeout=self.timeout_s)
            except RETRY_ERRORS as exc:
                raise _Retry(f"{type(exc).__name__}: {exc}") from exc
            end = time.perf_counter()
            content, status = r.content, r.status
            if status in RETRY_STATUSES:
                raise _Retry(f"HTTP {status}: {content[:300].decode(errors='replace')}")
            if status != 200:
                raise TeacherRequestError(
                    f"{self.endpoint} answered HTTP {status}: "
                    f"{content[:500].decode(errors='replace')}"
                )
            header_length = r.headers.get(HEADER_LENGTH.lower())
            return self._decode(content, header_length, body, states, start, end)

        return await self._retrying(attempt, f"through {self.endpoint}", sizes)

    async def _post_direct(
        self, inputs: dict[str, np.ndarray], params: dict | None, states: int, sizes: list[int]
    ):
        """:meth:`_post` for in-client routing: the same retries, over the direct router."""
        direct = self._direct
        assert direct is not None

        async def attempt() -> _Reply:
            start = time.perf_counter()
            try:
                res = await direct.infer(inputs, self._outputs, params)
            except DIRECT_RETRY_ERRORS as exc:
                raise _Retry(f"{type(exc).__name__}: {exc}") from exc
            except (TeacherRejected, InputError) as exc:
                raise TeacherRequestError(f"in-client routing via {self.url}: {exc}") from exc
            out, p = res.outputs, res.parameters
            return self._reply(
                p,
                out["v"],
                out["teacher"],
                out.get("v_anchor"),
                int(p.get("teacher_bytes_sent", 0)),
                int(p.get("teacher_bytes_received", 0)),
                states,
                start,
                time.perf_counter(),
            )

        where = f"(in-client routing, registry of {self.url})"
        return await self._retrying(attempt, where, sizes)

    def _decode(
        self,
        content: bytearray,
        header_length: str | None,
        body: bytes,
        states: int,
        start: float,
        end: float,
    ) -> _Reply:
        try:
            msg = decode_response(content, header_length)
        except CodecError as exc:
            raise TeacherRequestError(f"{self.endpoint} sent an unreadable answer: {exc}") from exc
        return self._reply(
            msg.parameters,
            np.asarray(msg.tensors["v"]),
            np.asarray(msg.tensors["teacher"]),
            np.asarray(msg.tensors["v_anchor"]) if "v_anchor" in msg.tensors else None,
            len(body),
            len(content),
            states,
            start,
            end,
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
    ) -> _Reply:
        """A request's answer and its cost, from the ``opd-router`` parameters ``p``."""
        names = [
            *(str(p.get("teachers") or "").split(",")),
            *([self.anchor.name] if self.anchor else []),
        ]
        versions = {n: str(p[f"{n}.version"]) for n in names if n and f"{n}.version" in p}
        server_ms = float(p.get("route_ms", 0.0)) + float(p.get("fanout_ms", 0.0))
        span = RequestSpan(
            start,
            end,
            states,
            float(p.get("queue_ms", 0.0)) / 1e3,
            float(p.get("compute_ms", 0.0)) / 1e3,
            server_ms / 1e3,
        )
        return _Reply(v, teacher, v_anchor, span, sent, received, versions)
