"""The public client for served teachers: call it from your own training loop.

One implementation of the teacher wire path, shared by every client in the project: the ring
trainer's streaming client (:mod:`student.remote`) and the latent world's
(:mod:`student.latent.http`) send through :func:`post_infer` and retry through
:class:`RetryPolicy`; :class:`AsyncOPDClient` / :class:`OPDClient` are the same path with a
``submit``-returns-a-future API for a user's loop (docs/client.md)::

    with OPDClient("http://127.0.0.1:8000", max_in_flight=8) as client:
        fut = client.submit(x, t, cond=cond, cond_id="prompt-17", labels=["a"] * len(x), anchor=True)
        reply = client.wait([fut])[0]   # reply.v [B, *S], reply.teacher [B], reply.digests
        cost = client.step_cost()       # per-step: exposed wait, latency, server queue/compute, bytes

Requests are OIP v2 binary-tensor infers of the router's ``opd-router`` model (or any teacher
model, ``model=``); states ``x [B, *S]`` float32, times ``t [B]`` in the project's convention
(1 = noise), conditioning as named tensors with ``B`` rows or one row (broadcast by the teacher).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np
import torch

from common.admission import jittered, retry_after_of
from common.codec import HEADER_LENGTH, CodecError, decode_response, encode_request
from common.http1 import Http1Client, HttpClientError
from student.clients import QueryCost, RequestSpan, TeacherUnavailable

__all__ = [
    "AsyncOPDClient",
    "OPDClient",
    "Reply",
    "RetryPolicy",
    "StepCost",
    "TeacherRequestError",
    "TeacherUnavailable",
    "UnknownCondId",
]

ROUTER_MODEL = "opd-router"
#: Statuses worth another attempt: the request is idempotent and the cause may pass.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
# connection refused/reset, protocol errors, timeouts: the request is idempotent, try again
RETRY_ERRORS = (HttpClientError, OSError, asyncio.TimeoutError)
#: how long a request waits in all for busy servers (503 + Retry-After) before it fails: an
#: overloaded teacher slows a run down; only one that stays overloaded this long ends it
BUSY_WAIT_S = 600.0

T = TypeVar("T")


class Retry(Exception):
    """A failed attempt worth another one (idempotent request, a cause that may pass);
    ``retry_after_s``: the server was busy and said when to come back (``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TeacherRequestError(RuntimeError):
    """A request refused for a reason retrying will not fix (a 4xx: the caller's mistake)."""


class UnknownCondId(TeacherRequestError):
    """The server does not hold a ``cond_id`` (never sent there, or dropped by its LRU): send
    the conditioning tensors with it again."""


@dataclass
class RetryPolicy:
    """Bounded retries with exponential backoff for idempotent failures; busy answers (503 +
    ``Retry-After``) wait what the server asked without using up a retry, up to ``busy_wait_s``."""

    retries: int = 5
    backoff_s: float = 0.2
    busy_wait_s: float = BUSY_WAIT_S
    busy_waits: int = 0  # waits on busy servers' Retry-After, over the policy's life

    async def run(self, attempt: Callable[[], Awaitable[T]], where: str) -> T:
        """``attempt()`` until it answers, at most ``retries`` more times after a :class:`Retry`;
        then :class:`TeacherUnavailable` naming ``where``. A busy wait is jittered, so the
        requests refused together do not return together."""
        last, failures, busy_until = "no attempt", 0, None
        while True:
            try:
                return await attempt()
            except Retry as exc:
                last = str(exc)
                if exc.retry_after_s is not None:
                    now = time.monotonic()
                    busy_until = busy_until or now + self.busy_wait_s
                    if now < busy_until:
                        self.busy_waits += 1
                        wait = jittered(max(exc.retry_after_s, self.backoff_s))
                        await asyncio.sleep(min(wait, busy_until - now))
                        continue
                failures += 1
                if failures > self.retries:
                    break
                await asyncio.sleep(min(self.backoff_s * 2 ** (failures - 1), 5.0))
        raise TeacherUnavailable(
            f"teachers unreachable {where} after {failures} failed attempt(s)"
            f"{f' and {self.busy_wait_s:g} s of busy answers' if busy_until else ''}; "
            f"last error: {last}"
        )


@dataclass
class Posted:
    """One answered infer: the decoded message, its raw size and when it was sent/answered."""

    tensors: dict[str, np.ndarray]
    parameters: dict[str, Any]
    received: int
    start: float
    end: float


async def post_infer(
    http: Http1Client, endpoint: str, body: bytes, headers: dict[str, str], timeout_s: float
) -> Posted:
    """One attempt at an OIP v2 infer: the answer, or :class:`Retry` (connection trouble, a
    retryable status, with the server's ``Retry-After``), :class:`UnknownCondId` (422 for a
    ``cond_id`` the server does not hold) or :class:`TeacherRequestError` (other non-200)."""
    start = time.perf_counter()
    try:
        r = await http.post(endpoint, body, headers, timeout=timeout_s)
    except RETRY_ERRORS as exc:
        raise Retry(f"{type(exc).__name__}: {exc}") from exc
    end = time.perf_counter()
    content, status = r.content, r.status
    text = content[:500].decode(errors="replace") if status != 200 else ""
    if status in RETRY_STATUSES:
        busy = retry_after_of(r.headers) if status in (429, 503) else None
        raise Retry(f"HTTP {status}: {text[:300]}", busy)
    if status == 422 and "unknown cond_id" in text:
        raise UnknownCondId(f"{endpoint}: {text}")
    if status != 200:
        raise TeacherRequestError(f"{endpoint} answered HTTP {status}: {text}")
    try:
        msg = decode_response(content, r.headers.get(HEADER_LENGTH.lower()))
    except CodecError as exc:
        raise TeacherRequestError(f"{endpoint} sent an unreadable answer: {exc}") from exc
    return Posted(msg.tensors, msg.parameters, len(content), start, end)


def teacher_stamps(p: Mapping[str, Any], names: Sequence[str]) -> tuple[dict, dict]:
    """``(versions, digests)`` by teacher name from an ``opd-router`` answer's parameters
    ``p`` (``{name}.version`` / ``{name}.digest`` for each of ``names``)."""
    versions = {n: str(p[f"{n}.version"]) for n in names if n and f"{n}.version" in p}
    digests = {n: str(p[f"{n}.digest"]) for n in names if n and p.get(f"{n}.digest")}
    return versions, digests


def request_cost(p: Mapping[str, Any], posted: Posted, sent: int, states: int) -> QueryCost:
    """What one answered request cost, from the router's parameters ``p``."""
    queue_s = float(p.get("queue_ms", 0.0)) / 1e3
    compute_s = float(p.get("compute_ms", 0.0)) / 1e3
    server_s = (float(p.get("route_ms", 0.0)) + float(p.get("fanout_ms", 0.0))) / 1e3
    span = RequestSpan(posted.start, posted.end, states, queue_s, compute_s, server_s)
    latency = posted.end - posted.start
    return QueryCost(
        states=states,
        requests=1,
        bytes_sent=sent,
        bytes_received=posted.received,
        latency_s=latency,
        server_queue_s=queue_s,
        server_compute_s=compute_s,
        transport_s=max(0.0, latency - server_s),
        spans=[span],
    )


@dataclass
class Reply:
    """The teachers' answer to one :meth:`AsyncOPDClient.submit`.

    ``v [B, *S]`` the supervised velocity; ``teacher [B]`` int64 the router's index of the
    teacher that answered each row (-1: the average of all); ``v_anchor [B, *S]`` the anchor's
    velocity when asked; ``versions`` / ``digests``: by teacher name, every teacher (and anchor)
    that answered; ``cost``: this request's bytes, latency and the servers' queue and compute.
    """

    v: torch.Tensor
    teacher: torch.Tensor
    v_anchor: torch.Tensor | None
    versions: dict[str, str]
    digests: dict[str, str]
    cost: QueryCost


@dataclass
class StepCost:
    """One training step's cost as the client saw it (what :meth:`OPDClient.step_cost` returns).

    ``exposed_wait_s``: time the caller blocked in :meth:`OPDClient.wait` (query latency not
    hidden behind its own work); ``rollout_s`` / ``update_s``: what the caller timed with
    :meth:`OPDClient.timed`; ``query``: the requests' summed cost (latency, server queue and
    compute, transport, bytes, states, teacher versions and digests)."""

    rollout_s: float = 0.0
    update_s: float = 0.0
    exposed_wait_s: float = 0.0
    query: QueryCost = field(default_factory=QueryCost)

    def as_dict(self) -> dict[str, Any]:
        q = self.query
        return {
            "rollout_s": self.rollout_s,
            "update_s": self.update_s,
            "exposed_wait_s": self.exposed_wait_s,
            "query_latency_s": q.latency_s,
            "server_queue_s": q.server_queue_s,
            "server_compute_s": q.server_compute_s,
            "transport_s": q.transport_s,
            "states": q.states,
            "requests": q.requests,
            "bytes_sent": q.bytes_sent,
            "bytes_received": q.bytes_received,
            "versions": dict(q.versions),
            "digests": dict(q.digests),
        }


@dataclass
class Prepared:
    """One encoded-to-be request: arrays copied from the caller's tensors."""

    inputs: dict[str, np.ndarray]  # x [B, *S], t [B], route [B] when labelled
    conds: dict[str, np.ndarray]  # conditioning, [B, ...] or [1, ...]
    cond_id: str | None
    params: dict[str, Any]
    outputs: list[str]


def _f32(a: torch.Tensor | np.ndarray) -> np.ndarray:
    """A contiguous float32 copy (the caller may overwrite its tensor while the request flies)."""
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.array(arr, dtype=np.float32, copy=True, order="C")


class AsyncOPDClient:
    """Teachers behind the router at ``url`` (uvicorn or Ray Serve), from an asyncio loop.

    ``await start()`` reads the router's registry (teacher names in index order, anchors,
    versions, digests); ``await submit(...)`` waits for one of ``max_in_flight`` slots, sends,
    and returns an :class:`asyncio.Task` resolving to a :class:`Reply`.
    """

    def __init__(
        self,
        url: str,
        model: str = ROUTER_MODEL,
        max_in_flight: int = 8,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        guidance_scale: float | None = None,
        policy: str | None = None,
    ) -> None:
        self.url, self.model = url.rstrip("/"), model
        self.endpoint = f"{self.url}/v2/models/{model}/infer"
        self.timeout_s, self.retry = timeout_s, retry or RetryPolicy()
        self.guidance_scale, self.policy = guidance_scale, policy
        self.teachers: list[str] = []
        self.anchors: list[str] = []
        self.cost = QueryCost()  # every answered request since the last take_cost()
        self._http = Http1Client(limit_per_host=max_in_flight, keepalive_s=30.0)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._cond_sent: set[str] = set()  # cond_ids this client has sent tensors for
        #: binary tensors unless the server's GET /v2 does not declare the extension (start())
        self.binary = True

    async def start(self) -> AsyncOPDClient:
        """Read the registry (retried: a router a moment late should not fail the run) and
        whether the server reads binary tensors (a third-party teacher may not: then JSON)."""
        self.binary = await self._speaks_binary()
        if self.model != ROUTER_MODEL:
            self.teachers = [self.model]
            return self

        async def attempt() -> dict:
            try:
                r = await self._http.get(f"{self.url}/v1/teachers", timeout=self.timeout_s)
            except RETRY_ERRORS as exc:
                raise Retry(f"{type(exc).__name__}: {exc}") from exc
            if r.status != 200:
                raise Retry(f"HTTP {r.status}", retry_after_of(r.headers))
            return httpx.Response(200, content=bytes(r.content)).json()

        doc = await self.retry.run(attempt, f"at {self.url}/v1/teachers")
        self.teachers = [e["name"] for e in doc.get("teachers", [])]
        self.anchors = [e["name"] for e in doc.get("anchors", [])]
        return self

    def route_of(self, labels: Sequence[str] | Sequence[int] | torch.Tensor) -> np.ndarray:
        """Per-row teacher index (the router's ``route`` input, INT32 ``[B]``) from teacher
        names or indices; -1 lets the router's policy decide."""
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        out = []
        for lab in labels:
            if isinstance(lab, str):
                if lab not in self.teachers:
                    raise ValueError(
                        f"no teacher {lab!r} at {self.url} (it serves {', '.join(self.teachers)})"
                    )
                out.append(self.teachers.index(lab))
            else:
                out.append(int(lab))
        return np.asarray(out, dtype=np.int32)

    def prepare(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Mapping[str, torch.Tensor] | None = None,
        cond_id: str | None = None,
        labels: Sequence[str] | Sequence[int] | torch.Tensor | None = None,
        anchor: bool = False,
    ) -> Prepared:
        """The request for :meth:`submit`'s arguments; copies the inputs (the caller may reuse
        its buffers as soon as this returns)."""
        inputs = {"x": _f32(x), "t": _f32(t).reshape(-1)}
        b = len(inputs["x"])
        if inputs["x"].ndim < 2 or len(inputs["t"]) != b:
            raise ValueError(
                f"x must be [B, *S] and t [B]: got x {list(inputs['x'].shape)}, "
                f"t {list(inputs['t'].shape)}"
            )
        if labels is not None:
            inputs["route"] = self.route_of(labels)
            if len(inputs["route"]) != b:
                raise ValueError(f"{len(inputs['route'])} labels for {b} states")
        conds = {k: _f32(c) for k, c in (cond or {}).items()}
        if bad := [k for k, c in conds.items() if c.ndim == 0 or len(c) not in (1, b)]:
            raise ValueError(
                f"conditioning {bad[0]!r} has {len(conds[bad[0]]) if conds[bad[0]].ndim else 0} "
                f"rows; give one (broadcast) or one per state ({b})"
            )
        params: dict[str, Any] = {}
        if self.policy:
            params["policy"] = self.policy
        if self.guidance_scale is not None:
            params["guidance_scale"] = self.guidance_scale
        if cond_id is not None:
            params["cond_id"] = cond_id
        outputs = ["v", "teacher", "v_anchor"] if anchor else ["v", "teacher"]
        if self.model != ROUTER_MODEL:
            outputs = ["v"]
        return Prepared(inputs, conds, cond_id, params, outputs)

    async def submit(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Mapping[str, torch.Tensor] | None = None,
        cond_id: str | None = None,
        labels: Sequence[str] | Sequence[int] | torch.Tensor | None = None,
        anchor: bool = False,
    ) -> asyncio.Task[Reply]:
        """Send states ``x [B, *S]`` at times ``t [B]`` once a slot is free; the task's result
        is their :class:`Reply`. ``cond``: named conditioning tensors (``B`` rows or one);
        with ``cond_id`` they are sent the first time only, later requests name the id (and
        resend the tensors if the server answers that it does not hold it). ``labels``: each
        row's teacher (name or router index): label routing. ``anchor``: also ask for
        ``v_anchor``. The inputs are copied before this returns."""
        prep = self.prepare(x, t, cond, cond_id, labels, anchor)
        await self._slots.acquire()
        return asyncio.get_running_loop().create_task(self._request(prep))

    async def run(self, prep: Prepared) -> Reply:
        """A prepared request, once a slot is free (the sync client's path)."""
        await self._slots.acquire()
        return await self._request(prep)

    async def _request(self, prep: Prepared) -> Reply:
        """``prep`` with its slot held (released here)."""
        inputs, conds, cond_id = prep.inputs, prep.conds, prep.cond_id
        params, outputs = prep.params, prep.outputs
        try:
            # By id alone once the tensors went out under it (or are on their way: a rollout's
            # later states need not wait for its first answer; a server that has not stored
            # them yet answers 'unknown cond_id' and the tensors follow). With them the first
            # time, or after the server said it does not hold the id (its LRU dropped it).
            if cond_id is not None and conds and cond_id in self._cond_sent:
                try:
                    return await self._send(inputs, params, outputs)
                except UnknownCondId:
                    pass
            if cond_id is not None and conds:
                self._cond_sent.add(cond_id)
            try:
                return await self._send({**inputs, **conds}, params, outputs)
            except BaseException:
                self._cond_sent.discard(cond_id)  # it may not hold them: send them next time
                raise
        finally:
            self._slots.release()

    async def _speaks_binary(self) -> bool:
        """Whether the server's ``GET /v2`` lists ``binary_tensor_data`` (unreachable: assume
        it does; the registry read or the first request reports the real failure)."""
        try:
            r = await self._http.get(f"{self.url}/v2", timeout=self.timeout_s)
            doc = httpx.Response(200, content=bytes(r.content)).json() if r.status == 200 else {}
        except (*RETRY_ERRORS, ValueError):
            return True
        exts = doc.get("extensions") if isinstance(doc, dict) else None
        return isinstance(exts, list) and "binary_tensor_data" in exts

    async def _send(
        self, inputs: dict[str, np.ndarray], params: dict[str, Any], outputs: list[str]
    ) -> Reply:
        body, headers = encode_request(
            inputs, outputs=outputs, binary=self.binary, parameters=params or None
        )

        async def attempt() -> Posted:
            return await post_infer(self._http, self.endpoint, body, headers, self.timeout_s)

        try:
            posted = await self.retry.run(attempt, f"through {self.endpoint}")
        except UnknownCondId:
            # the refused request was sent all the same: it counts in requests and bytes
            self.cost.add(QueryCost(requests=1, bytes_sent=len(body)))
            raise
        p, out = posted.parameters, posted.tensors
        cost = request_cost(p, posted, len(body), len(inputs["x"]))
        if self.model == ROUTER_MODEL:
            names = [*str(p.get("teachers") or "").split(","), *self.anchors]
            versions, digests = teacher_stamps(p, names)
            teacher = torch.from_numpy(np.asarray(out["teacher"]).astype(np.int64))
        else:  # one teacher model: its own version and digest
            versions = {self.model: str(p.get("version", ""))}
            digests = {self.model: str(p.get("digest", ""))} if p.get("digest") else {}
            teacher = torch.zeros(len(inputs["x"]), dtype=torch.int64)
        cost.versions, cost.digests = dict(versions), dict(digests)
        self.cost.add(cost)
        va = out.get("v_anchor")
        return Reply(
            torch.from_numpy(np.array(out["v"])),
            teacher,
            None if va is None else torch.from_numpy(np.array(va)),
            versions,
            digests,
            cost,
        )

    def take_cost(self) -> QueryCost:
        """The answered requests' summed cost since the last call (and start again from 0)."""
        cost, self.cost = self.cost, QueryCost()
        return cost

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncOPDClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class OPDClient:
    """:class:`AsyncOPDClient` for synchronous loops: the HTTP work runs on an asyncio loop in
    a background thread, so the caller's rollout never waits on the network; ``submit``
    returns a :class:`concurrent.futures.Future` and blocks only while ``max_in_flight``
    requests are already out (backpressure on a rollout that outruns the teachers)."""

    def __init__(self, url: str, **options: Any) -> None:
        """``options``: those of :class:`AsyncOPDClient` (``model``, ``max_in_flight``,
        ``timeout_s``, ``retry``, ``guidance_scale``, ``policy``)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="opd-client", daemon=True
        )
        self._thread.start()
        self._step = StepCost()
        self._slots = threading.Semaphore(int(options.get("max_in_flight", 8)))
        try:
            self.aio: AsyncOPDClient = self._run(self._make(url, options))
            self._run(self.aio.start())
        except BaseException:
            self.close()
            raise

    @staticmethod
    async def _make(url: str, options: dict[str, Any]) -> AsyncOPDClient:
        return AsyncOPDClient(url, **options)  # its semaphore belongs to this loop

    def _run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    @property
    def teachers(self) -> list[str]:
        """The router's teachers in index order (``Reply.teacher`` indexes this)."""
        return self.aio.teachers

    @property
    def anchors(self) -> list[str]:
        return self.aio.anchors

    def submit(self, x: torch.Tensor, t: torch.Tensor, **kw: Any) -> concurrent.futures.Future:
        """As :meth:`AsyncOPDClient.submit` (``cond``, ``cond_id``, ``labels``, ``anchor``): the
        inputs are copied here, in the caller's thread; a future of the :class:`Reply`."""
        prep = self.aio.prepare(x, t, **kw)
        self._slots.acquire()  # blocks while max_in_flight requests are out
        fut = asyncio.run_coroutine_threadsafe(self.aio.run(prep), self._loop)
        fut.add_done_callback(lambda _: self._slots.release())
        return fut

    def wait(self, futures: Sequence[concurrent.futures.Future]) -> list[Reply]:
        """The futures' replies in order; the time blocked here is the step's exposed wait."""
        start = time.perf_counter()
        try:
            return [f.result() for f in futures]
        finally:
            self._step.exposed_wait_s += time.perf_counter() - start

    @contextmanager
    def timed(self, what: str):
        """``with client.timed("rollout"):`` (or ``"update"``) adds the block's wall time to
        the step's cost, beside the queries'."""
        start = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - start
            setattr(self._step, f"{what}_s", getattr(self._step, f"{what}_s") + dt)

    def step_cost(self) -> StepCost:
        """This step's cost (timed blocks, exposed wait, answered requests); starts the next."""
        step, self._step = self._step, StepCost()
        step.query = self._run(self._take())
        return step

    async def _take(self) -> QueryCost:
        return self.aio.take_cost()

    @property
    def busy_waits(self) -> int:
        return self.aio.retry.busy_waits

    def close(self) -> None:
        if self._loop.is_running():
            if hasattr(self, "aio"):
                self._run(self.aio.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> OPDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
