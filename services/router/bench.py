"""Router vs direct teacher: latency p50/p99 and states/s at 1,536 states per request.

``python -m services.router.bench [--models models] [--requests 400] [--states 1536]``

Starts teachers a, b and base (one uvicorn process each, one torch thread) and three routers
(a alone: the pure cost of the extra hop; a+b: nearest-mode fan-out; a+b + base anchor: the
Flow-OPD query), then times sequential binary requests from one client (the lean data-plane
client the router itself uses), in ``--rounds`` alternating rounds so that the machine's drift
hits every target alike, plus a concurrent run for throughput. The router's added latency is
taken per round (router p50 minus direct p50 of that round) and reported as the median. ``route_ms`` is the router's own work per request as it reports
it (decode, route, split, merge, encode), which stays meaningful on a busy machine where wall
latencies are noisy. A benchmark, not a test: no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.http1 import Http1Client
from common.procs import Service, start_service


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


async def _run(
    client: Http1Client,
    url: str,
    body: bytes,
    headers: dict[str, str],
    n: int,
    concurrency: int,
) -> tuple[list[float], list[dict], float]:
    lat: list[float] = []
    params: list[dict] = []
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            start = time.perf_counter()
            r = await client.post(url, body, headers, timeout=30)
            lat.append(time.perf_counter() - start)
            assert r.status == 200, r.content[:300]
            params.append(
                decode_response(r.content, r.headers.get(HEADER_LENGTH.lower())).parameters
            )

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, params, time.perf_counter() - start


async def _bench(
    targets: dict[str, tuple[str, bool]], states: int, n: int, concurrency: int, rounds: int
) -> tuple[dict, list[float]]:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(states, 2)) * 4).astype(np.float32)
    t = rng.uniform(size=states).astype(np.float32)
    bodies = {}
    for label, (url, anchor) in targets.items():
        outputs = (
            ["v", "teacher", "v_anchor"]
            if anchor
            else (["v", "teacher"] if "opd-router" in url else ["v"])
        )
        bodies[label] = encode_request({"x": x, "t": t}, outputs=outputs)
    lat: dict[str, list[float]] = {k: [] for k in targets}
    params: dict[str, list[dict]] = {k: [] for k in targets}
    added: list[float] = []  # per round: one-hop router p50 minus direct p50
    client = Http1Client()
    per_round = max(1, n // rounds)
    for label, (url, _) in targets.items():
        await _run(client, url, *bodies[label], 50, 1)  # warm-up: connections, allocator
    for _ in range(rounds):
        p50 = {}
        for label, (url, _) in targets.items():
            lat_r, params_r, _ = await _run(client, url, *bodies[label], per_round, 1)
            lat[label] += lat_r
            params[label] += params_r
            p50[label] = float(np.percentile(lat_r, 50)) * 1e3
        added.append(p50["router -> a (one hop)"] - p50["direct teacher a"])
    results: dict[str, dict] = {}
    for label, (url, _) in targets.items():
        res = _stats(lat[label], states, sum(lat[label]))
        ps = params[label]
        if "route_ms" in ps[0]:
            res["route_ms_p50"] = round(float(np.median([p["route_ms"] for p in ps])), 3)
            res["server_ms_p50"] = round(float(np.median([p["server_ms"] for p in ps])), 3)
        if "compute_ms" in ps[0]:
            res["teacher_compute_ms_p50"] = round(
                float(np.median([p["compute_ms"] for p in ps])), 3
            )
        lat_c, _, wall_c = await _run(client, url, *bodies[label], n, concurrency)
        res[f"concurrent{concurrency}"] = _stats(lat_c, states, wall_c)
        results[label] = res
        print(
            f"{label:<28} p50 {res['p50_ms']:7.3f} ms  p99 {res['p99_ms']:7.3f} ms  "
            f"{res['states_per_s']:>9} states/s  (x{concurrency}: "
            f"{res[f'concurrent{concurrency}']['states_per_s']} states/s)",
            flush=True,
        )
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
    env = {"OPD_TEACHER_THREADS": "1"}
    services: list[Service] = []
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
            routers[label] = f"{svc.url}/v2/models/opd-router/infer"
        targets = {
            "direct teacher a": (f"{teachers['a']}/v2/models/a/infer", False),
            "router -> a (one hop)": (routers["a"], False),
            "router -> a|b (nearest)": (routers["ab"], False),
            "router -> a|b + base anchor": (routers["ab+anchor"], True),
        }
        results, added = asyncio.run(_bench(targets, a.states, a.requests, a.concurrency, a.rounds))
    finally:
        for svc in services:
            svc.stop()
    hop = results["router -> a (one hop)"]
    summary = {
        "states_per_request": a.states,
        "requests": a.requests,
        "results": results,
        "router_added_p50_ms": round(float(np.median(added)), 3),
        "router_added_p50_ms_per_round": [round(v, 3) for v in added],
    }
    print(
        f"router adds {summary['router_added_p50_ms']} ms p50 over a direct call: median of "
        f"{a.rounds} alternating rounds ({', '.join(f'{v:.3f}' for v in added)}); "
        f"router's own work p50 {hop.get('route_ms_p50')} ms; target <= 0.5 ms"
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
