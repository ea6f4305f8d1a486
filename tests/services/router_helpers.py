"""Helpers shared by the router tests: start teachers/routers as real processes, call opd-router."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import httpx
import numpy as np

from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.procs import Service, start_service
from services.cluster import teacher_cmd

TOKEN = "router-test-token"
REPO = Path(__file__).resolve().parents[2]


def start_teacher(checkpoint: Path, name: str, *flags: str, token: str | None = TOKEN) -> Service:
    env = {"OPD_ADMIN_TOKEN": token or "", "OPD_TEACHER_THREADS": "1"}
    cmd = teacher_cmd(checkpoint, name=name, extra=flags)
    return start_service(cmd, env=env, cwd=str(REPO))


def start_router(
    *flags: str, token: str | None = TOKEN, env: dict[str, str] | None = None
) -> Service:
    full_env = {"OPD_ADMIN_TOKEN": token or "", **(env or {})}
    cmd = [sys.executable, "-m", "common.cli", "serve", "router", "--port", "0", *flags]
    return start_service(cmd, env=full_env, cwd=str(REPO))


CHECKPOINTS = {"a": "teacher-a", "b": "teacher-b", "base": "base"}


def start_teachers(models: Path) -> dict[str, Service]:
    """Teachers a, b and the base anchor from ``models``, one process each."""
    return {n: start_teacher(models / f"{f}.safetensors", n) for n, f in CHECKPOINTS.items()}


def start_swap_pair(models: Path) -> tuple[Service, Service]:
    """Two processes of teacher ``a``; the second hot-reloaded once, so it serves version 2."""
    old = start_teacher(models / "teacher-a.safetensors", "a")
    new = start_teacher(models / "teacher-a.safetensors", "a")
    with client() as c:
        r = c.post(f"{new.url}/v2/repository/models/a/load", json={}, headers=admin())
    if r.status_code != 200 or r.json().get("version") != "2":
        old.stop()
        new.stop()
        raise RuntimeError(f"hot reload of the second teacher failed: {r.text}")
    return old, new


def client(timeout: float = 30.0) -> httpx.Client:
    """A test client with TCP_NODELAY (without it a small body waits ~40 ms for a delayed ACK)."""
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(transport=transport, timeout=timeout)


def states(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``x [n, 2]`` spread over the ring (scale 4) and ``t [n]`` in [0, 1)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 2)) * 4).astype(np.float32), rng.uniform(size=n).astype(np.float32)


def call_router(
    client: httpx.Client,
    url: str,
    x: np.ndarray,
    t: np.ndarray,
    route: np.ndarray | None = None,
    outputs: list[str] | None = None,
    parameters: dict | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """One binary opd-router call; asserts 200 and returns (outputs, response parameters)."""
    inputs = {"x": x, "t": t}
    if route is not None:
        inputs["route"] = route.astype(np.int32)
    body, headers = encode_request(
        inputs, outputs=outputs or ["v", "teacher"], binary=True, parameters=parameters
    )
    r = client.post(f"{url}/v2/models/opd-router/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    msg = decode_response(r.content, r.headers.get(HEADER_LENGTH))
    return msg.tensors, msg.parameters


def admin(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
