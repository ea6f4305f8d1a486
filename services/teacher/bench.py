"""Teacher throughput benchmark: states/s per request size, in-process vs over HTTP.

    python -m services.teacher.bench [--checkpoint models/teacher-a.safetensors] [--ray]

Measures, for 128, 1,536 and 16,384 states per request: the in-process forward, the uvicorn
teacher with binary tensors and with JSON tensors, and (``--ray``) the Ray Serve deployment, all
with the same torch thread count. HTTP clients keep ``--concurrency`` requests in flight. Not a
test: it asserts nothing and prints a table (and ``--out`` JSON) for docs/teacher-service.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import read_model
from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.http1 import Http1Client
from common.procs import start_service
from common.serving import run_async

SIZES = (128, 1536, 16384)


def rate(fn: Callable[[], None], states: int, min_s: float, concurrency: int = 1) -> float:
    """states/s of calling ``fn`` (``concurrency`` callers at once) for at least ``min_s``."""
    for _ in range(3):
        fn()  # warm-up: connections, allocator, lazy init
    count = 0
    start = time.perf_counter()

    def loop() -> int:
        n = 0
        while time.perf_counter() - start < min_s:
            fn()
            n += 1
        return n

    if concurrency == 1:
        count = loop()
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            count = sum(pool.map(lambda _: loop(), range(concurrency)))
    return count * states / (time.perf_counter() - start)


def inputs(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.normal(size=(n, 2)).astype(np.float32), rng.uniform(size=n).astype(np.float32)


def in_process(checkpoint: Path, n: int, min_s: float) -> float:
    net, _ = read_model(checkpoint)
    x, t = (torch.from_numpy(a) for a in inputs(n))

    def call() -> None:
        with torch.inference_mode():
            net(x, t)

    return rate(call, n, min_s)


def over_http(url: str, model: str, n: int, binary: bool, min_s: float, concurrency: int) -> float:
    """states/s of ``concurrency`` callers posting one request after another.

    The client is the lean data-plane client (common/http1.py) on uvloop, the one the router and
    the trainer use: it shares the two cores with the server, and aiohttp spends ~4x its CPU per
    request (httpx ~20x), which this table would then charge to the server.
    """
    x, t = inputs(n)
    body, headers = encode_request({"x": x, "t": t}, binary=binary)
    if not binary:  # JSON both ways: ask for a JSON output too
        body, headers = encode_request({"x": x, "t": t}, binary=False, outputs=["v"])
    endpoint = f"{url}/v2/models/{model}/infer"

    async def run() -> float:
        client = Http1Client(limit_per_host=concurrency)
        try:

            async def call() -> None:
                r = await client.post(endpoint, body, headers, timeout=60)
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {bytes(r.content[:200])!r}")
                v = decode_response(r.content, r.headers.get(HEADER_LENGTH.lower())).tensors["v"]
                assert v.shape == (n, 2)

            for _ in range(3):
                await call()  # warm-up: connections, allocator, lazy init
            start = time.perf_counter()

            async def loop() -> int:
                k = 0
                while time.perf_counter() - start < min_s:
                    await call()
                    k += 1
                return k

            count = sum(await asyncio.gather(*(loop() for _ in range(concurrency))))
            return count * n / (time.perf_counter() - start)
        finally:
            await client.aclose()

    return run_async(run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.teacher.bench", description=__doc__)
    p.add_argument("--checkpoint", type=Path, default=Path("models/teacher-a.safetensors"))
    p.add_argument("--threads", type=int, default=1, help="torch threads, in-process and servers")
    p.add_argument("--concurrency", type=int, default=1, help="HTTP requests in flight")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per cell")
    p.add_argument(
        "--rounds", type=int, default=3, help="alternating repetitions; medians reported"
    )
    p.add_argument("--ray", action="store_true", help="also measure the Ray Serve deployment")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = a.checkpoint.stem
    svc = start_service(
        [
            sys.executable,
            "-m",
            "common.cli",
            "serve",
            "teacher",
            "--checkpoint",
            str(a.checkpoint),
            "--port",
            "0",
            "--threads",
            str(a.threads),
        ]
    )
    # Rounds alternate in-process and HTTP cells: this VM's speed drifts by up to ±30% from one
    # minute to the next, so a ratio of cells measured minutes apart says little. Each figure is
    # the median over rounds, and each round's ratio is taken between adjacent cells.
    cells: dict[str, dict[int, list[float]]] = {
        k: {n: [] for n in SIZES} for k in ("in-process", "uvicorn binary", "uvicorn JSON")
    }
    ratios: list[float] = []
    try:
        for _ in range(a.rounds):
            for n in SIZES:
                cells["in-process"][n].append(in_process(a.checkpoint, n, a.seconds))
                cells["uvicorn binary"][n].append(
                    over_http(svc.url, model, n, True, a.seconds, a.concurrency)
                )
                cells["uvicorn JSON"][n].append(
                    over_http(svc.url, model, n, False, a.seconds, a.concurrency)
                )
                if n == 1536:
                    ratios.append(cells["uvicorn binary"][n][-1] / cells["in-process"][n][-1])
    finally:
        svc.stop()
    results: dict[str, dict[int, float]] = {
        k: {n: statistics.median(v) for n, v in row.items()} for k, row in cells.items()
    }
    if a.ray:
        from services.teacher.ray_deployment import local_ray_teacher

        with local_ray_teacher(a.checkpoint, threads=a.threads) as url:
            results["Ray Serve binary"] = {
                n: over_http(url, model, n, True, a.seconds, a.concurrency) for n in SIZES
            }
    print(
        f"# states/s (torch threads={a.threads}, HTTP concurrency={a.concurrency}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(f"{'backend':<18}" + "".join(f"{n:>14,}" for n in SIZES))
    for name, row in results.items():
        print(f"{name:<18}" + "".join(f"{row[n]:>14,.0f}" for n in SIZES))
    ratio = statistics.median(ratios)
    print(
        f"uvicorn binary / in-process at 1,536 states: median {ratio:.2f} over {a.rounds} rounds "
        f"(each round: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.75)"
    )
    if a.out:
        a.out.write_text(
            json.dumps(
                {
                    "threads": a.threads,
                    "concurrency": a.concurrency,
                    "states_per_s": results,
                    "ratio_1536": ratio,
                    "ratios_1536_per_round": ratios,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
