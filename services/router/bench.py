"""Router vs direct teacher: latency p50/p99 and states/s at 1,536 states per request.

``python -m services.router.bench [--models models] [--requests 400] [--states 1536]``

Starts teachers a, b and base (one uvicorn process each, one torch thread) and three routers
(a alone: the pure cost of the extra hop; a+b: nearest-mode fan-out; a+b + base anchor: the
Flow-OPD query). Each router is reached two ways: through its HTTP hop, and by in-client
routing (:mod:`services.router.direct`: its registry, routed in this process, teachers called
directly). Every target is timed as a full client call (encode, round trip, decode) from one
client, sequentially, in ``--rounds`` alternating rounds so that the machine's drift hits every
target alike, plus a concurrent run for throughput. The added latency of the router hop and of
in-client routing is taken per round (their p50 minus the direct call's p50 in that round) and
reported as the median over rounds. ``route_ms`` is the routing work per request as reported
(decode, route, split, merge, encode); ``server_cpu_ms_per_request`` the CPU time of the process
answering the client (the router, or teacher a for the direct call) over the sequential rounds,
steadier than latency on a noisy host (Linux). A benchmark, not a test: no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import torch

from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.http1 import Http1Client
from common.procs import Service, start_service
from services.router.direct import DirectRouter

DIRECT = "direct teacher a"
#: router registry key → how its targets are labelled
ROUTED = {"a": "a (one hop)", "ab": "a|b (nearest)", "ab+anchor": "a|b + base anchor"}
ROUTER_HOP = "router -> " + ROUTED["a"]
IN_CLIENT = "in-client -> a (one hop)"


def _start(args: list[str], env: dict[str, str] | None = None) -> Service:
    return start_service([sys.executable, "-m", "common.cli", *args], env=env)


def _stats(lat_s: list[float], states: int, wall_s: float) -> dict[str, float]:
    ms = np.asarray(lat_s) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "states_per_s": round(states * len(ms) / wall_s),
    }


Call = Callable[[], Awaitable[dict]]


def _router_target(key: str) -> str:
    """The label of the target that reaches router ``key`` through its HTTP hop."""
    return f"router -> {ROUTED[key]}"


def cpu_ms(pid: int) -> float | None:
    """CPU time the process ``pid`` has used so far (all its threads), in ms; None where
    ``/proc/<pid>/task/*/schedstat`` cannot be read (not Linux). Nanosecond resolution, so a
    few hundred requests measure a server's CPU per request, which on a noisy host is steadier
    than its latency."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e6


async def _run(call: Call, n: int, concurrency: int) -> tuple[list[float], list[dict], float]:
    lat: list[float] = []
    params: list[dict] = []
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            start = time.perf_counter()
            p = await call()
            lat.append(time.perf_counter() - start)
            params.append(p)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, params, time.perf_counter() - start


def _http_call(
    client: Http1Client, url: str, inputs: dict[str, np.ndarray], outputs: list[str]
) -> Call:
    """One full client round trip: encode, POST, decode (as a real caller pays it)."""

    async def call() -> dict:
        body, headers = encode_request(inputs, outputs=outputs)
        r = await client.post(url, body, headers, timeout=30)
        assert r.status == 200, r.content[:300]
        msg = decode_response(r.content, r.headers.get(HEADER_LENGTH.lower()))
        return msg.parameters

    return call


def _direct_call(direct: DirectRouter, inputs: dict[str, np.ndarray], outputs: list[str]) -> Call:
    """The same request routed in this process (in-client routing): no router hop."""

    async def call() -> dict:
        return (await direct.infer(inputs, outputs)).parameters

    return call


async def _bench(
    routers: dict[str, str],
    teacher_a: str,
    states: int,
    n: int,
    concurrency: int,
    rounds: int,
    pids: dict[str, int],
) -> tuple[dict, dict[str, list[float]]]:
    """``pids``: per target label, the process that answers it (a router, or teacher a for
    the direct call), whose CPU per request is reported."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(states, 2)) * 4).astype(np.float32)
    t = rng.uniform(size=states).astype(np.float32)
    inputs = {"x": x, "t": t}
    client = Http1Client()
    directs = {k: DirectRouter(url) for k, url in routers.items()}
    for d in directs.values():
        await d.start()
    routed = ["v", "teacher"]
    targets: dict[str, Call] = {
        DIRECT: _http_call(client, f"{teacher_a}/v2/models/a/infer", inputs, ["v"]),
    }
    for key, label in ROUTED.items():
        outputs = routed + (["v_anchor"] if key == "ab+anchor" else [])
        url = f"{routers[key]}/v2/models/opd-router/infer"
        targets[_router_target(key)] = _http_call(client, url, inputs, outputs)
        targets[f"in-client -> {label}"] = _direct_call(directs[key], inputs, outputs)
    lat: dict[str, list[float]] = {k: [] for k in targets}
    params: dict[str, list[dict]] = {k: [] for k in targets}
    added: dict[str, list[float]] = {ROUTER_HOP: [], IN_CLIENT: []}  # per round, minus direct
    per_round = max(1, n // rounds)
    cpu: dict[str, float] = {}  # per target: the answering process's CPU ms, summed over rounds
    for call in targets.values():
        await _run(call, 50, 1)  # warm-up: connections, allocator
    for _ in range(rounds):
        p50 = {}
        for label, call in targets.items():
            pid = pids.get(label)
            before = None if pid is None else cpu_ms(pid)
            lat_r, params_r, _ = await _run(call, per_round, 1)
            after = None if pid is None else cpu_ms(pid)
            if before is not None and after is not None:
                cpu[label] = cpu.get(label, 0.0) + after - before
            lat[label] += lat_r
            params[label] += params_r
            p50[label] = float(np.percentile(lat_r, 50)) * 1e3
        for label in added:
            added[label].append(p50[label] - p50[DIRECT])
    results: dict[str, dict] = {}
    for label, call in targets.items():
        res = _stats(lat[label], states, sum(lat[label]))
        if label in cpu:
            res["server_cpu_ms_per_request"] = round(cpu[label] / len(lat[label]), 3)
        ps = params[label]
        if "route_ms" in ps[0]:
            res["route_ms_p50"] = round(float(np.median([p["route_ms"] for p in ps])), 3)
        if "server_ms" in ps[0]:
            res["server_ms_p50"] = round(float(np.median([p["server_ms"] for p in ps])), 3)
        if "compute_ms" in ps[0]:
            res["teacher_compute_ms_p50"] = round(
                float(np.median([p["compute_ms"] for p in ps])), 3
            )
        lat_c, _, wall_c = await _run(call, n, concurrency)
        res[f"concurrent{concurrency}"] = _stats(lat_c, states, wall_c)
        results[label] = res
        server_cpu = res.get("server_cpu_ms_per_request")
        print(
            f"{label:<32} p50 {res['p50_ms']:7.3f} ms  p99 {res['p99_ms']:7.3f} ms  "
            f"{res['states_per_s']:>9} states/s  (x{concurrency}: "
            f"{res[f'concurrent{concurrency}']['states_per_s']} states/s)"
            + ("" if server_cpu is None else f"  server CPU {server_cpu:.3f} ms/request"),
            flush=True,
        )
    for d in directs.values():
        await d.aclose()
    await client.aclose()
    return results, added


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m services.router.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--states", type=int, default=1536)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians reported")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    # One torch thread here, as in the router: idle OpenMP workers of a second one spin on the
    # cores the teachers need (the in-client targets run torch ops in this process).
    torch.set_num_threads(1)
    env = {"OPD_TEACHER_THREADS": "1"}
    services: list[Service] = []
    pids: dict[str, int] = {}  # target label -> the process that answers it
    try:
        teachers = {}
        for name, f in [("a", "teacher-a"), ("b", "teacher-b"), ("base", "base")]:
            svc = _start(
                [
                    "serve",
                    "teacher",
                    "--checkpoint",
                    str(a.models / f"{f}.safetensors"),
                    "--name",
                    name,
                    "--port",
                    "0",
                ],
                env,
            )
            services.append(svc)
            teachers[name] = svc.url
            if name == "a":
                pids[DIRECT] = svc.proc.pid
        routers = {}
        for label, flags in [
            ("a", ["--teacher", f"a={teachers['a']}"]),
            ("ab", ["--teacher", f"a={teachers['a']}", "--teacher", f"b={teachers['b']}"]),
            (
                "ab+anchor",
                [
                    "--teacher",
                    f"a={teachers['a']}",
                    "--teacher",
                    f"b={teachers['b']}",
                    "--anchor",
                    f"base={teachers['base']}",
                ],
            ),
        ]:
            svc = _start(["serve", "router", "--port", "0", *flags])
            services.append(svc)
            routers[label] = svc.url
            pids[_router_target(label)] = svc.proc.pid
        results, added = asyncio.run(
            _bench(routers, teachers["a"], a.states, a.requests, a.concurrency, a.rounds, pids)
        )
    finally:
        for svc in services:
            svc.stop()
    summary = {
        "states_per_request": a.states,
        "requests": a.requests,
        "results": results,
        "router_added_p50_ms": round(float(np.median(added[ROUTER_HOP])), 3),
        "router_added_p50_ms_per_round": [round(v, 3) for v in added[ROUTER_HOP]],
        "in_client_added_p50_ms": round(float(np.median(added[IN_CLIENT])), 3),
        "in_client_added_p50_ms_per_round": [round(v, 3) for v in added[IN_CLIENT]],
    }
    for key, what in (("router", "the router hop"), ("in_client", "in-client routing")):
        rounds = ", ".join(f"{v:.3f}" for v in summary[f"{key}_added_p50_ms_per_round"])
        print(
            f"{what} adds {summary[f'{key}_added_p50_ms']} ms p50 over a direct call: median "
            f"of {a.rounds} alternating rounds ({rounds}); target <= 0.5 ms"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
