"""The standard topology as local processes: teachers ``a``, ``b``, ``base`` (anchor), router.

Used by ``opd cluster`` and by tests; every service is a real uvicorn process on loopback that
announces its URL (port 0, so nothing collides).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.procs import Service, start_service

PYTHON = [sys.executable, "-m", "common.cli"]


def teacher_cmd(
    checkpoint: Path,
    name: str | None = None,
    port: int = 0,
    threads: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    cmd = [
        *PYTHON,
        "serve",
        "teacher",
        "--checkpoint",
        str(checkpoint),
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--log-level",
        "warning",
        *extra,
    ]
    return cmd + (["--name", name] if name else [])


def router_cmd(
    teachers: dict[str, str],
    anchors: dict[str, str],
    port: int = 0,
    policy: str = "nearest",
    extra: Sequence[str] = (),
) -> list[str]:
    cmd = [
        *PYTHON,
        "serve",
        "router",
        "--port",
        str(port),
        "--policy",
        policy,
        "--log-level",
        "warning",
    ]
    for name, url in teachers.items():
        cmd += ["--teacher", f"{name}={url}"]
    for name, url in anchors.items():
        cmd += ["--anchor", f"{name}={url}"]
    return cmd + list(extra)


@dataclass
class Cluster:
    """Running services by name (``a``, ``b``, ``base``, ``router``)."""

    services: dict[str, Service] = field(default_factory=dict)

    @property
    def router_url(self) -> str:
        return self.services["router"].url

    def stop(self, grace_s: float = 10.0) -> None:
        # Router first, so nothing new reaches the teachers while they drain.
        for name in sorted(self.services, key=lambda n: n != "router"):
            self.services[name].stop(grace_s)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


#: Starts one named service from its command; returns ``(handle, url)``.
Starter = Callable[[str, list[str]], tuple[Any, str]]


def launch(
    models: str | Path,
    start: Starter,
    teachers: Sequence[str] = ("a", "b"),
    anchor: str | None = "base",
    policy: str = "nearest",
) -> dict[str, tuple[Any, str]]:
    """Start one teacher per name (+ the anchor) from ``models``, then the router over them.

    Returns ``name -> (handle, url)`` in start order; the router is ``"router"``.
    """
    from student.models import checkpoint_path

    names = [*teachers, *([anchor] if anchor else [])]
    # Teachers start concurrently: each spends seconds importing torch and loading weights.
    with ThreadPoolExecutor(len(names)) as pool:
        futures = {n: pool.submit(start, n, teacher_cmd(checkpoint_path(models, n))) for n in names}
        started: dict[str, tuple[Any, str]] = {n: f.result() for n, f in futures.items()}
    started["router"] = start(
        "router",
        router_cmd(
            {n: started[n][1] for n in teachers},
            {anchor: started[anchor][1]} if anchor else {},
            policy=policy,
        ),
    )
    return started


def start_cluster(
    models: str | Path,
    teachers: Sequence[str] = ("a", "b"),
    anchor: str | None = "base",
    policy: str = "nearest",
    env: dict[str, str] | None = None,
    timeout_s: float = 90.0,
) -> Cluster:
    """Start the topology as child processes of this one (tests, ``opd demo``)."""
    cluster = Cluster()

    def start(name: str, cmd: list[str]) -> tuple[Service, str]:
        cluster.services[name] = start_service(cmd, timeout_s, env=env)
        return cluster.services[name], cluster.services[name].url

    try:
        launch(models, start, teachers, anchor, policy)
    except BaseException:
        cluster.stop(2)
        raise
    return cluster
