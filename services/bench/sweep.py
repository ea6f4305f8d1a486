"""A perf_analyzer-style load generator for any Open Inference Protocol v2 ``infer`` endpoint.

One *point* is (encoding, states per request, concurrency): ``concurrency`` asyncio workers each
keep one request in flight, re-sending the same pre-encoded body (encoding is not what is
measured, and a fresh body per request would make the client the bottleneck). The data plane
(the infer requests measured) goes through :class:`common.http1.Http1Client`, one keep-alive
connection per worker: the body is handed to the transport as is (no per-request copy on
uvloop) and a response is received into one preallocated buffer that binary tensors decode
into as views. The control plane (metadata, ``/metrics``) keeps httpx. The controller
cuts time into windows and stops when the last ``stable_windows`` agree on states/s and p50
latency within ``stability`` (perf_analyzer's rule), or when the point's bounds (windows,
requests) or the sweep's total time run out, in which case the point is marked unstable.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

from common.codec import DATATYPES, HEADER_LENGTH, CodecError, decode_response, encode_request
from common.http1 import Http1Client, HttpClientError

#: Http1Client lower-cases response header names
_HEADER_LENGTH = HEADER_LENGTH.lower()

#: TCP_NODELAY on the control-plane (httpx) sockets: httpx writes headers and body separately,
#: and with Nagle on, the body waits for the server's delayed ACK (~40 ms a request on Linux).
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass(frozen=True)
class InputSpec:
    """One model input from ``GET /v2/models/{name}``: name, datatype, shape (-1 = free)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass
class SweepBounds:
    """How long each point and the whole sweep may run."""

    window_s: float = 1.0
    stable_windows: int = 3
    stability: float = 0.10  # ±10% of the windows' mean, like perf_analyzer's default
    max_windows: int = 10  # per point
    min_window_requests: int = 3  # a window with fewer answers is extended (up to 4×)
    max_requests: int = 20_000  # per point
    max_seconds: float = 300.0  # the whole sweep


@dataclass
class Point:
    """The result of one point. Rates and latencies cover the stable (last) windows;
    ``states_total`` counts every state answered during the point, warm-up included, which is
    the figure compared with the server's own counter (``server_states``)."""

    encoding: str
    states_per_request: int
    concurrency: int
    requests_s: float = 0.0
    states_s: float = 0.0
    payload_mb_s: float = 0.0  # tensor bytes both directions (inputs + outputs), MB = 1e6 B
    body_mb_s: float = 0.0  # HTTP body bytes both directions (JSON text included)
    latency_p50_ms: float = 0.0
    latency_p90_ms: float = 0.0
    latency_p99_ms: float = 0.0
    errors: int = 0
    server_queue_ms: float | None = None  # means over answers that report them
    server_compute_ms: float | None = None
    server_batch_states: float | None = None
    windows: int = 0
    stable: bool = False
    measured_s: float = 0.0
    requests_total: int = 0
    states_total: int = 0
    server_states: float | None = None  # the server's counter delta over the point
    request_bytes: int = 0
    response_bytes: int = 0
    payload_bytes: int = 0  # tensor bytes of one request + its answer
    error_sample: str | None = None

    def row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Answer:
    end: float
    latency: float
    queue_ms: float | None
    compute_ms: float | None
    batch: float | None


@dataclass
class _Log:
    answers: list[_Answer] = field(default_factory=list)
    errors: int = 0
    error_sample: str | None = None
    response_bytes: int = 0


def nodelay_client(connections: int, timeout_s: float = 60.0) -> httpx.AsyncClient:
    """An async httpx client with ``connections`` NODELAY sockets and no retries (control
    plane: metadata and ``/metrics``)."""
    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        retries=0,
        socket_options=NODELAY,
    )
    return httpx.AsyncClient(transport=transport, timeout=timeout_s)


async def model_inputs(client: httpx.AsyncClient, url: str, model: str) -> list[InputSpec]:
    """The required inputs from the model's metadata (optional ones are not sent)."""
    r = await client.get(f"{url}/v2/models/{model}")
    if r.status_code != 200:
        raise ValueError(
            f"GET {url}/v2/models/{model} answered HTTP {r.status_code}: {r.text[:300]}"
        )
    specs = []
    for entry in r.json().get("inputs", []):
        if entry.get("optional"):
            continue
        specs.append(InputSpec(entry["name"], entry["datatype"], tuple(entry["shape"])))
    if not specs:
        raise ValueError(f"model {model!r} at {url} lists no inputs in its metadata")
    return specs


def make_inputs(
    specs: list[InputSpec], states: int, state_dim: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs: the first dimension is ``states``; other free (-1) ones are ``state_dim``.

    Floats are uniform in [0, 1) (valid times for ``t``), integers are 0.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        dims = list(spec.shape) or [-1]
        shape = [states] + [state_dim if d < 0 else d for d in dims[1:]]
        dtype = DATATYPES.get(spec.datatype)
        if dtype is None:
            raise ValueError(
                f"input {spec.name!r} has datatype {spec.datatype}, not supported here"
            )
        out[spec.name] = (
            rng.random(shape, dtype=np.float32).astype(dtype, copy=False)
            if dtype.kind == "f"
            else np.zeros(shape, dtype)
        )
    return out


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _server_timing(params: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    def num(key: str) -> float | None:
        v = params.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return num("queue_ms"), num("compute_ms"), num("batch_size")


def data_client(concurrency: int) -> Http1Client:
    """The data-plane client: room for ``concurrency`` keep-alive connections to the server."""
    return Http1Client(limit_per_host=max(1, concurrency))


async def _worker(
    client: Http1Client,
    endpoint: str,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float | None,
    log: _Log,
    stop: asyncio.Event,
    budget: list[int],
) -> None:
    while not stop.is_set() and budget[0] > 0:
        budget[0] -= 1
        start = time.perf_counter()
        try:
            r = await client.post(endpoint, body, headers, timeout=timeout_s)
            content = r.content
            if r.status != 200:
                raise CodecError(f"HTTP {r.status}: {bytes(content[:200])!r}")
            # A real client decodes the answer; binary tensors stay views of the received
            # buffer (no copy), JSON ones are parsed in full, part of what JSON costs.
            msg = decode_response(content, r.headers.get(_HEADER_LENGTH))
        except (HttpClientError, TimeoutError, CodecError, json.JSONDecodeError) as exc:
            log.errors += 1
            log.error_sample = log.error_sample or f"{type(exc).__name__}: {exc}"[:300]
            continue
        end = time.perf_counter()
        log.response_bytes = len(content)
        log.answers.append(_Answer(end, end - start, *_server_timing(msg.parameters)))


def _stable(rates: list[float], p50s: list[float], n: int, tol: float) -> bool:
    if len(rates) < n:
        return False
    for series in (rates[-n:], p50s[-n:]):
        mean = float(np.mean(series))
        if mean <= 0 or any(abs(v - mean) > tol * mean for v in series):
            return False
    return True


async def run_point(
    client: Http1Client,
    endpoint: str,
    inputs: dict[str, np.ndarray],
    binary: bool,
    concurrency: int,
    bounds: SweepBounds,
    deadline: float,
    point: Point,
    timeout_s: float | None = None,
) -> Point:
    """Measure one point (fills and returns ``point``); the body is encoded once, here."""
    body, headers = encode_request(inputs, binary=binary)
    states = len(next(iter(inputs.values())))
    log, stop, budget = _Log(), asyncio.Event(), [bounds.max_requests]
    workers = [
        asyncio.create_task(_worker(client, endpoint, body, headers, timeout_s, log, stop, budget))
        for _ in range(concurrency)
    ]
    windows: list[tuple[float, float]] = []
    rates: list[float] = []
    p50s: list[float] = []
    try:
        w_start, seen = time.perf_counter(), 0
        while len(windows) < bounds.max_windows and time.perf_counter() < deadline:
            limit = w_start + 4 * bounds.window_s
            await asyncio.sleep(bounds.window_s)
            # Extend a window that saw too few answers (slow points), within 4× its length.
            while (
                len(log.answers) - seen < bounds.min_window_requests
                and time.perf_counter() < min(limit, deadline)
                and not _done(workers)
            ):
                await asyncio.sleep(bounds.window_s / 4)
            w_end = time.perf_counter()
            got = [a for a in log.answers[seen:] if a.end <= w_end]
            seen += len(got)
            windows.append((w_start, w_end))
            rates.append(len(got) * states / (w_end - w_start))
            p50s.append(_percentile(np.array([a.latency for a in got]), 50))
            w_start = w_end
            if _stable(rates, p50s, bounds.stable_windows, bounds.stability) or _done(workers):
                break
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)  # in-flight requests finish
    n = min(bounds.stable_windows, len(windows))
    t0, t1 = (windows[-n][0], windows[-1][1]) if n else (0.0, 0.0)
    sel = [a for a in log.answers if t0 < a.end <= t1]
    lat = np.array([a.latency for a in sel]) * 1e3
    span = max(t1 - t0, 1e-9)
    point.payload_bytes = sum(a.nbytes for a in inputs.values()) + _output_bytes(inputs)
    point.request_bytes, point.response_bytes = len(body), log.response_bytes
    point.requests_s = len(sel) / span
    point.states_s = point.requests_s * states
    point.payload_mb_s = point.requests_s * point.payload_bytes / 1e6
    point.body_mb_s = point.requests_s * (point.request_bytes + point.response_bytes) / 1e6
    point.latency_p50_ms, point.latency_p90_ms, point.latency_p99_ms = (
        _percentile(lat, 50),
        _percentile(lat, 90),
        _percentile(lat, 99),
    )
    point.errors, point.error_sample = log.errors, log.error_sample
    point.server_queue_ms = _mean([a.queue_ms for a in sel])
    point.server_compute_ms = _mean([a.compute_ms for a in sel])
    point.server_batch_states = _mean([a.batch for a in sel])
    point.windows, point.measured_s = len(windows), span if n else 0.0
    point.stable = _stable(rates, p50s, bounds.stable_windows, bounds.stability)
    point.requests_total = len(log.answers)
    point.states_total = len(log.answers) * states
    return point


def _done(workers: list[asyncio.Task]) -> bool:
    return all(w.done() for w in workers)


def _output_bytes(inputs: dict[str, np.ndarray]) -> int:
    """Tensor bytes of the answer, assumed ``v`` shaped like ``x`` (our teachers and router);
    for other models the first 2-D float input stands in."""
    for arr in inputs.values():
        if arr.ndim == 2 and arr.dtype.kind == "f":
            return arr.nbytes
    return 0
