"""The router waits for teachers that are still starting (compose starts everything at once)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import httpx

from common.procs import start_service
from services.cluster import router_cmd, teacher_cmd
from student.models import checkpoint_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_router_start_waits_for_a_late_teacher(tiny_models):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    late: list = []
    # The teacher comes up a few seconds after the router has started asking for it.
    timer = threading.Timer(
        3.0,
        lambda: late.append(
            start_service(teacher_cmd(checkpoint_path(tiny_models, "a"), port=port))
        ),
    )
    timer.start()
    try:
        router = start_service(
            router_cmd({"a": url}, {}, extra=["--startup-timeout-s", "60"]), timeout_s=90
        )
        try:
            assert "retrying" in router.output()
            doc = httpx.get(f"{router.url}/v1/teachers", timeout=10).json()
            assert doc["teachers"][0]["replicas"][0]["live"] is True
        finally:
            router.stop()
    finally:
        timer.join()
        for s in late:
            s.stop()


def test_router_gives_up_on_a_teacher_that_never_comes(tiny_models):
    url = f"http://127.0.0.1:{free_port()}"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "common.cli",
            "serve",
            "router",
            "--teacher",
            f"a={url}",
            "--port",
            "0",
            "--startup-timeout-s",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "unreachable" in p.stderr and url in p.stderr
