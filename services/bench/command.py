"""``opd bench serve``: sweep concurrency × states per request × encoding against a v2 endpoint.

Writes ``sweep.csv``, ``sweep.json`` and ``sweep.png`` to ``--out``, and (``--limits``) measures
the physical limits in the same run: a raw TCP echo of the same body size over loopback, and the
in-process forward's states/s (synthetic teachers are rebuilt from their metadata; others need
``--checkpoint``).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.cli import Command, UsageError
from common.http1 import Http1Client
from common.serving import run_async
from common.settings import BaseUrl, out_dir
from services.bench.echo import echo_rate
from services.bench.limits import forward_rate, net_from_metadata
from services.bench.prom import scrape_states
from services.bench.report import plot, write_csv, write_json
from services.bench.sweep import (
    Point,
    SweepBounds,
    data_client,
    make_inputs,
    model_inputs,
    nodelay_client,
    run_point,
)
from services.router.negotiate import BINARY, encoding_of, server_extensions

#: seconds of raw TCP echo sampled right after each binary point, at its body size
ECHO_SAMPLE_S = 0.5


def int_list(value: str) -> list[int]:
    """``"1,2,4"`` → ``[1, 2, 4]`` (positive integers)."""
    problem = f"must be whole numbers >= 1, comma-separated (e.g. 1,2,4); got {value!r}"
    try:
        out = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:  # int()'s own message names neither the flag nor the rule
        raise ValueError(problem) from None
    if not out or min(out) < 1:
        raise ValueError(problem)
    return out


class BenchServeSettings(BaseSettings):
    """What to load, how hard, and for how long."""

    model_config = SettingsConfigDict(env_prefix="OPD_BENCH_")

    url: BaseUrl = Field(description="base URL of the v2 server, e.g. http://127.0.0.1:8000")
    model: str = Field(description="model name, e.g. teacher-a, synthetic, opd-router")
    concurrency: str = Field("1,2,4,8,16,32", description="requests in flight, comma-separated")
    states: str = Field("16,128,1536", description="states per request, comma-separated")
    encoding: str = Field("binary", description="binary, json, or binary,json to compare")
    state_dim: int | None = Field(
        None,
        ge=1,
        description="D for free (-1) input dims (default: the model's parameters.data_dim, else 2)",
    )
    window_s: float = Field(1.0, gt=0, description="measurement window (s)")
    stable_windows: int = Field(3, ge=1, description="windows that must agree")
    stability: float = Field(0.10, gt=0, description="allowed spread of those windows (fraction)")
    max_windows: int = Field(10, ge=1, description="most windows per point")
    max_requests: int = Field(20_000, ge=1, description="most requests per point")
    max_seconds: float = Field(300.0, gt=0, description="bound on the whole sweep (s)")
    metrics_url: str | None = Field(
        None,
        description="Prometheus page with the states counter (default URL/metrics; 'none' to skip)",
    )
    limits: bool = Field(True, description="also measure raw TCP echo and in-process forward")
    checkpoint: Path | None = Field(
        None, description="checkpoint for the in-process forward (synthetic teachers need none)"
    )
    threads: int = Field(
        1,
        ge=1,
        description="torch threads of the in-process forward (match the server's --threads)",
    )
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout (s)")
    out: Path = Field(Path("bench-serve"), description="directory for sweep.csv/json/png")

    @field_validator("concurrency", "states")
    @classmethod
    def _ints(cls, v: str) -> str:
        int_list(v)
        return v

    @field_validator("encoding")
    @classmethod
    def _encodings(cls, v: str) -> str:
        bad = [e for e in v.split(",") if e.strip() not in ("binary", "json")]
        if bad or not v.strip():
            raise ValueError(f"encodings are binary and json, got {v!r}")
        return v


class SweepFailed(Exception):
    """A point failed more requests than it answered; the points so far go with it."""

    def __init__(self, points: list[Point], meta: dict[str, Any], why: str) -> None:
        super().__init__(why)
        self.points, self.meta = points, meta


async def sweep(
    s: BenchServeSettings, echo_samples: dict[str, list[float]] | None = None
) -> tuple[list[Point], dict[str, Any]]:
    """Every point of the sweep, in order, within ``s.max_seconds``; plus the model metadata.

    With ``echo_samples``, a raw TCP echo of each binary point's body size is sampled right
    after the point (server idle, same minute), keyed by states per request.
    """
    url = s.url.rstrip("/")
    concurrency = int_list(s.concurrency)
    bounds = SweepBounds(
        s.window_s,
        s.stable_windows,
        s.stability,
        s.max_windows,
        max_requests=s.max_requests,
        max_seconds=s.max_seconds,
    )
    metrics_url = (
        None if (s.metrics_url or "").lower() == "none" else (s.metrics_url or f"{url}/metrics")
    )
    data = data_client(max(concurrency))  # the infer requests measured
    try:
        return await _sweep(s, url, concurrency, bounds, metrics_url, data, echo_samples)
    finally:
        await data.aclose()


async def _sweep(
    s: BenchServeSettings,
    url: str,
    concurrency: list[int],
    bounds: SweepBounds,
    metrics_url: str | None,
    data: Http1Client,
    echo_samples: dict[str, list[float]] | None,
) -> tuple[list[Point], dict[str, Any]]:
    points: list[Point] = []
    # control plane: metadata and /metrics
    async with nodelay_client(2, s.timeout_s) as client:
        try:
            specs = await model_inputs(client, url, s.model)
            meta = (await client.get(f"{url}/v2/models/{s.model}")).json()
        except Exception as exc:  # unreachable server, not v2, unknown model
            raise UsageError(f"cannot read {url}/v2/models/{s.model}: {exc}") from None
        params = meta.get("parameters") or {}
        dim = s.state_dim or int(params.get("data_dim") or 2)
        encodings = await negotiated_encodings(client, url, s.encoding, s.timeout_s)
        meta["encodings"] = encodings
        deadline = time.perf_counter() + bounds.max_seconds
        for enc in encodings:
            for states in int_list(s.states):
                inputs = make_inputs(specs, states, dim)
                for c in concurrency:
                    if time.perf_counter() >= deadline:
                        sys.stderr.write(
                            "opd bench serve: --max-seconds reached; remaining points skipped\n"
                        )
                        return points, meta
                    point = Point(enc, states, c)
                    before = await scrape_states(client, metrics_url, s.model)
                    await run_point(
                        data,
                        f"{url}/v2/models/{s.model}/infer",
                        inputs,
                        enc == "binary",
                        c,
                        bounds,
                        deadline,
                        point,
                        timeout_s=s.timeout_s,
                    )
                    after = await scrape_states(client, metrics_url, s.model)
                    if before is not None and after is not None:
                        point.server_states = after - before
                    points.append(point)
                    print(_line(point), flush=True)
                    if point.errors and point.errors >= point.requests_total:
                        # Mostly refusals: the server is gone or broken. The remaining points
                        # would only fire --max-requests more of them each.
                        raise SweepFailed(
                            points,
                            meta,
                            f"{point.errors} of {point.errors + point.requests_total} requests "
                            f"failed at {states:,} states/req c{c} ({point.error_sample}); "
                            "remaining points skipped",
                        )
                    if echo_samples is not None and enc == "binary":
                        size = max(point.request_bytes, point.response_bytes)
                        echo_samples.setdefault(str(states), []).append(
                            echo_rate(size, seconds=ECHO_SAMPLE_S).mb_s
                        )
    return points, meta


async def negotiated_encodings(
    client: httpx.AsyncClient, url: str, asked: str, timeout_s: float
) -> list[str]:
    """The encodings of ``asked`` (``binary,json``) that the server speaks: binary only when its
    ``GET /v2`` declares the binary tensor extension; a server without it is swept in JSON
    (said on stderr) rather than sent bodies it cannot read."""
    wanted = [e.strip() for e in asked.split(",")]
    try:
        binary = encoding_of(await server_extensions(client, url, timeout_s)) == BINARY
    except httpx.HTTPError:
        binary = False
    if binary or "binary" not in wanted:
        return wanted
    sys.stderr.write(
        f"opd bench serve: {url} declares no binary_tensor_data extension (GET /v2); "
        "sweeping JSON tensors instead of binary\n"
    )
    return list(dict.fromkeys("json" if e == "binary" else e for e in wanted))


def _line(p: Point) -> str:
    extra = "".join(
        f"  {label} {value:.2f}"
        for label, value in (
            ("server queue ms", p.server_queue_ms),
            ("compute ms", p.server_compute_ms),
            ("batch", p.server_batch_states),
        )
        if value is not None
    )
    return (
        f"{p.encoding:>6} {p.states_per_request:>7,} st/req  c{p.concurrency:<3} "
        f"{p.requests_s:>9,.1f} req/s {p.states_s:>12,.0f} st/s {p.payload_mb_s:>9,.1f} MB/s  "
        f"p50 {p.latency_p50_ms:8.2f}  p99 {p.latency_p99_ms:8.2f} ms  err {p.errors}"
        f"{'' if p.stable else '  (unstable)'}{extra}"
    )


def physical_limits(
    s: BenchServeSettings,
    points: list[Point],
    meta: dict[str, Any],
    echo_samples: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """Echo MB/s at each request body size and the in-process forward states/s per size.

    The echo of a size is the best of its samples in this run: those taken right after each
    binary point (``echo_samples``) and one more of 1 s here. Taking the best keeps the
    reference conservative on a noisy machine, as the sweep's best point is a best too.
    """
    sizes = sorted({p.states_per_request for p in points})
    samples = {k: list(v) for k, v in (echo_samples or {}).items()}
    echo_bytes: dict[str, int] = {}
    for p in points:
        key = str(p.states_per_request)
        if p.encoding == "binary" and key not in echo_bytes:
            # body bytes each way; the echo moves this many both directions per round trip,
            # at least the payload (tensor) bytes the sweep credits itself with
            echo_bytes[key] = size = max(p.request_bytes, p.response_bytes)
            samples.setdefault(key, []).append(echo_rate(size, seconds=1.0).mb_s)
    echo = {k: max(v) for k, v in samples.items() if k in echo_bytes}
    net = net_from_metadata(meta.get("parameters") or {})
    if net is None and s.checkpoint is not None:
        from common.checkpoint import read_model

        net, _ = read_model(s.checkpoint)
    forward = {str(n): forward_rate(net, n, threads=s.threads) for n in sizes} if net else {}
    best = max(
        (p for p in points if p.encoding == "binary"), key=lambda p: p.payload_mb_s, default=None
    )
    out: dict[str, Any] = {
        "echo_mb_s": echo,
        "echo_samples_mb_s": {k: samples[k] for k in echo},
        "echo_bytes": echo_bytes,
        "forward_states_s": forward,
    }
    if best is not None and str(best.states_per_request) in echo:
        ref = echo[str(best.states_per_request)]
        out["best_binary"] = {
            "states_per_request": best.states_per_request,
            "concurrency": best.concurrency,
            "payload_mb_s": best.payload_mb_s,
            "echo_mb_s": ref,
            "fraction_of_echo": best.payload_mb_s / ref,
        }
    return out


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_bench_serve(s: BenchServeSettings) -> int:
    out_dir(s.out)  # before the sweep, not after minutes of it
    started = time.time()
    context: dict[str, Any] = {
        "url": s.url,
        "model": s.model,
        "machine_start": machine(),
        "settings": s.model_dump(mode="json"),
    }
    echo_samples: dict[str, list[float]] | None = {} if s.limits else None
    failed = None
    try:
        points, meta = run_async(sweep(s, echo_samples))
    except SweepFailed as exc:  # keep what was measured, then fail loudly
        points, meta, failed = exc.points, exc.meta, str(exc)
        context["failed"] = failed
    context["model_parameters"] = meta.get("parameters") or {}
    if s.limits and points:
        context["limits"] = lim = physical_limits(s, points, meta, echo_samples)
        for size, mb in lim["echo_mb_s"].items():
            fwd = lim["forward_states_s"].get(size)
            print(
                f"limits at {int(size):,} states/req: raw TCP echo {mb:,.1f} MB/s"
                + (f", in-process forward {fwd:,.0f} states/s" if fwd else "")
            )
        if "best_binary" in lim:
            b = lim["best_binary"]
            print(
                f"best binary point: {b['payload_mb_s']:,.1f} MB/s payload at "
                f"{b['states_per_request']:,} states/req c{b['concurrency']} = "
                f"{b['fraction_of_echo']:.0%} of raw TCP echo"
            )
    context["machine_end"] = machine()
    context["elapsed_s"] = round(time.time() - started, 2)
    write_csv(s.out / "sweep.csv", points)
    write_json(s.out / "sweep.json", points, context)
    plot(s.out / "sweep.png", points, f"{s.model} at {s.url}")
    print(f"wrote {s.out}/sweep.csv, sweep.json, sweep.png ({len(points)} points)")
    if failed:
        sys.stderr.write(f"opd bench serve: {failed}\n")
        return 1
    return 0


BENCH_SERVE = Command(
    "perf_analyzer-style sweep against any OIP v2 endpoint", BenchServeSettings, run_bench_serve
)
