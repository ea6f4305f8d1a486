"""The standard topology as local processes: teachers ``a``, ``b``, ``base`` (anchor), router.

Used by ``opd cluster`` and by tests; every service is a real uvicorn process on loopback that
announces its URL (port 0, so nothing collides).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.procs import Service, start_service

PYTHON = [sys.executable, "-m", "common.cli"]


def teacher_cmd(checkpoint: Path, name: str | None = None, port: int = 0, threads: int = 1,
                extra: Sequence[str] = ()) -> list[str]:
    cmd = [*PYTHON, "serve", "teacher", "--checkpoint", str(checkpoint), "--port", str(port),
           "--threads", str(threads), "--log-level", "warning", *extra]
    return cmd + (["--name", name] if name else [])


def router_cmd(teachers: dict[str, str], anchors: dict[str, str], port: int = 0,
               policy: str = "nearest", extra: Sequence[str] = ()) -> list[str]:
    cmd = [*PYTHON, "serve", "router", "--port", str(port), "--policy", policy, "--log-level", "warning"]
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


def start_cluster(models: str | Path, teachers: Sequence[str] = ("a", "b"), anchor: str | None = "base",
                  policy: str = "nearest", env: dict[str, str] | None = None,
                  timeout_s: float = 90.0) -> Cluster:
    """Start one teacher process per name (+ the anchor) from ``models``, then the router."""
    from student.models import checkpoint_path

    cluster = Cluster()
    try:
        for name in [*teachers, *([anchor] if anchor else [])]:
            cluster.services[name] = start_service(teacher_cmd(checkpoint_path(models, name)),
                                                   timeout_s, env=env)
        cluster.services["router"] = start_service(router_cmd(
            {n: cluster.services[n].url for n in teachers},
            {anchor: cluster.services[anchor].url} if anchor else {}, policy=policy), timeout_s, env=env)
    except BaseException:
        cluster.stop(2)
        raise
    return cluster
