"""A trainer as a user runs it: ``opd train --backend http`` in a subprocess, and waiting on it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def train_proc(models, out, router_url, steps, *extra) -> subprocess.Popen:
    """DiffusionOPD over HTTP through ``router_url`` for ``steps`` steps (stdout+stderr piped)."""
    cmd = [
        sys.executable,
        "-m",
        "common.cli",
        "train",
        "--method",
        "diffusionopd",
        "--backend",
        "http",
        "--router-url",
        router_url,
        "--models",
        str(models),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--no-progress",
        "--threads",
        "1",
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, limit_s: float = 120) -> None:
    """Wait until ``path`` (steps.jsonl) has ``n`` lines; fail if ``proc`` exits first."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {n} lines")
