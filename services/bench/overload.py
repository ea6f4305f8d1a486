"""``opd bench overload``: flood a teacher, then a router, on loopback and show what each admits.

Starts teacher ``a`` (``--max-queue-mb``), teacher ``b`` and a router over both (the same
bound), then sends ``--requests`` concurrent infer requests of ``--states`` states each, once
each, first straight to the teacher, then through the router; optionally a DiffusionOPD run
(``--train-steps``) trains through the router while the teacher is flooded. Prints per flood the
answers by status (resets and timeouts counted apart), the ``Retry-After`` values, p50 / p99
latency of the accepted requests, the server's RSS before / peak / ``--after-s`` after, and the
readiness answers seen meanwhile; ``--out`` also gets them as ``overload.json``.

Bounded: ``--requests`` at most 2,048, every request has ``--timeout-s``, a run ``--train-steps``
at most 1,000; every process it starts is stopped on the way out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.cli import Command, UsageError
from common.codec import encode_request
from common.procs import Service, start_service
from common.serving import run_async
from common.settings import out_dir
from services.bench.flood import FloodResult, flood
from services.cluster import PYTHON, router_cmd, teacher_cmd


class BenchOverloadSettings(BaseSettings):
    """How hard, how big, and what bound the services run with."""

    model_config = SettingsConfigDict(env_prefix="OPD_BENCH_OVERLOAD_")

    models: Path = Field(Path("models"), description="directory of pretrained checkpoints")
    requests: int = Field(512, ge=1, le=2048, description="concurrent requests per flood")
    states: int = Field(
        65536, ge=1, le=1 << 20, description="states per request (12 bytes each: 768 KiB at 65536)"
    )
    max_queue_mb: float = Field(64.0, gt=0, description="the teacher's and router's bound (MiB)")
    max_body_mb: float = Field(64.0, gt=0, description="the services' body limit (MiB)")
    targets: str = Field("teacher,router", description="what to flood, in order")
    train_steps: int = Field(
        0, ge=0, le=1000, description="DiffusionOPD steps trained through the router meanwhile"
    )
    after_s: float = Field(10.0, ge=0, description="RSS is read this long after the flood")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout (s)")
    trim: bool = Field(
        True, description="services hand freed heap back after a burst (off: measure without)"
    )
    out: Path | None = Field(None, description="directory for overload.json")


def _table(results: list[FloodResult]) -> str:
    """The floods as a fixed-width table."""
    rows = [("target", "answers", "Retry-After s", "p50 ms", "p99 ms", "RSS before/peak/after MiB")]
    for r in results:
        s = r.summary()
        p50, p99 = s["p50_ms"], s["p99_ms"]
        rows.append(
            (
                r.target,
                " ".join(f"{k}:{v}" for k, v in s["statuses"].items()),
                " ".join(f"{k}:{v}" for k, v in s["retry_after_s"].items()) or "-",
                "-" if p50 is None else f"{p50:.0f}",
                "-" if p99 is None else f"{p99:.0f}",
                f"{s['rss_before_mib']:.0f} / {s['rss_peak_mib']:.0f} / {s['rss_after_mib']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def run_overload(s: BenchOverloadSettings) -> int:
    targets = [t.strip() for t in s.targets.split(",") if t.strip()]
    if not targets or any(t not in ("teacher", "router") for t in targets):
        raise UsageError(f"--targets takes teacher and/or router, got {s.targets!r}")
    for name in ("teacher-a", "teacher-b"):
        if not (s.models / f"{name}.safetensors").is_file():
            raise UsageError(f"{s.models}/{name}.safetensors is missing: run opd pretrain first")
    if s.out is not None:
        out_dir(s.out)
    env = {"OPD_TEACHER_THREADS": "1", **({} if s.trim else {"OPD_MALLOC_TRIM": "0"})}
    bound = ["--max-queue-mb", f"{s.max_queue_mb:g}", "--max-body-mb", f"{s.max_body_mb:g}"]
    services: list[Service] = []
    train: subprocess.Popen | None = None
    results: list[FloodResult] = []
    try:
        a = start_service(
            teacher_cmd(s.models / "teacher-a.safetensors", "a", extra=bound), env=env
        )
        services.append(a)
        b = start_service(teacher_cmd(s.models / "teacher-b.safetensors", "b"), env=env)
        services.append(b)
        router = start_service(router_cmd({"a": a.url, "b": b.url}, {}, extra=bound), env=env)
        services.append(router)
        for svc in services:
            lines = [ln for ln in svc.output().splitlines() if "admission bound" in ln]
            print(*lines, sep="\n")
        rng = np.random.default_rng(0)
        x = (rng.normal(size=(s.states, 2)) * 3).astype(np.float32)
        t = rng.uniform(size=s.states).astype(np.float32)
        body, headers = encode_request({"x": x, "t": t}, binary=True)
        print(
            f"flood: {s.requests} concurrent requests of {s.states} states "
            f"({len(body) / 2**10:.0f} KiB, {s.requests * len(body) / 2**20:.0f} MiB in all)"
        )
        run_dir = Path(tempfile.mkdtemp(prefix="opd-overload-train-"))
        if s.train_steps:
            train = subprocess.Popen(
                [
                    *PYTHON,
                    "train",
                    "--method",
                    "diffusionopd",
                    "--backend",
                    "http",
                    "--router-url",
                    router.url,
                    "--steps",
                    str(s.train_steps),
                    "--models",
                    str(s.models),
                    "--out",
                    str(run_dir),
                    "--checkpoint-every",
                    "0",
                    "--no-progress",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        for target in targets:
            svc, model = (a, "a") if target == "teacher" else (router, "opd-router")
            res = run_async(
                flood(
                    f"{svc.url}/v2/models/{model}/infer",
                    body,
                    headers,
                    s.requests,
                    svc.pid,
                    f"{svc.url}/v2/health/ready",
                    s.timeout_s,
                    s.after_s,
                    target,
                )
            )
            results.append(res)
        print(_table(results))
        doc: dict[str, Any] = {
            "command": " ".join(["opd", "bench", "overload", *sys.argv[3:]]),
            "floods": [r.summary() for r in results],
        }
        if train is not None:
            output, _ = train.communicate(timeout=max(600.0, 2.0 * s.train_steps))
            report = run_dir / "report.json"
            steps = json.loads(report.read_text())["steps"] if report.is_file() else None
            doc["training"] = {"steps_asked": s.train_steps, "steps_done": steps}
            doc["training"]["exit"] = train.returncode
            print(
                f"DiffusionOPD through the router meanwhile: {steps} of {s.train_steps} steps, "
                f"exit {train.returncode}"
            )
            if train.returncode != 0:
                print(output[-2000:])
        if s.out is not None:
            (s.out / "overload.json").write_text(json.dumps(doc, indent=2) + "\n")
            print(f"wrote {s.out / 'overload.json'}")
    finally:
        if train is not None and train.poll() is None:
            train.kill()
            train.wait(10)
        for svc in reversed(services):
            svc.stop()
    return 0


OVERLOAD = Command(
    "flood a teacher and a router: statuses, Retry-After, latency, RSS",
    BenchOverloadSettings,
    run_overload,
)
