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
from common.threads import cpu_share_env

PYTHON = [sys.executable, "-m", "common.cli"]
#: the standard topology's teachers and Flow-OPD anchor
DEFAULT_TEACHERS: tuple[str, ...] = ("a", "b")
DEFAULT_ANCHOR = "base"


def teacher_cmd(
    checkpoint: Path,
    name: str | None = None,
    port: int = 0,
    threads: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``opd serve teacher`` for ``checkpoint``; ``threads=None`` leaves the count to the
    teacher's budget (common/threads.py: one thread for the toy net)."""
    cmd = [*PYTHON, "serve", "teacher", "--checkpoint", str(checkpoint), "--port", str(port)]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--log-level", "warning", *extra]
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


def computing_processes(
    teachers: Sequence[str] = DEFAULT_TEACHERS, anchor: str | None = DEFAULT_ANCHOR
) -> int:
    """Processes of the standard topology that compute on the host's cores: each teacher, the
    anchor and the trainer that will use them (the router's routing math is negligible)."""
    return len(teachers) + (1 if anchor else 0) + 1


def launch(
    models: str | Path,
    start: Starter,
    teachers: Sequence[str] = DEFAULT_TEACHERS,
    anchor: str | None = DEFAULT_ANCHOR,
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
    teachers: Sequence[str] = DEFAULT_TEACHERS,
    anchor: str | None = DEFAULT_ANCHOR,
    policy: str = "nearest",
    env: dict[str, str] | None = None,
    timeout_s: float = 90.0,
) -> Cluster:
    """Start the topology as child processes of this one (tests, ``opd demo``)."""
    cluster = Cluster()
    env = {**cpu_share_env(computing_processes(teachers, anchor)), **(env or {})}

    def start(name: str, cmd: list[str]) -> tuple[Service, str]:
        cluster.services[name] = start_service(cmd, timeout_s, env=env)
        return cluster.services[name], cluster.services[name].url

    try:
        launch(models, start, teachers, anchor, policy)
    except BaseException:
        cluster.stop(2)
        raise
    return cluster
