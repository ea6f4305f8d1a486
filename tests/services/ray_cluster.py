"""A real local Ray instance serving deploy/serve_config.yaml (test checkpoints), shared by the
tests of one module: the teacher applications and the router that composes them by handle,
optionally with a second Ray node (``ray start --address``, a separate process) that takes
teacher-a's replicas."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TOKEN = "ray-admin-token"
#: custom resource only the second node has: replicas asking for it run there
NODE2 = "opd_node2"


@dataclass
class ServeCluster:
    url: str  # the Serve proxy's base URL; applications hang below it
    doc: dict  # the config deployed (test checkpoints)
    models: Path


def test_config(
    models: Path, replicas: dict[str, int] | None = None, on_node2: tuple[str, ...] = ()
) -> dict:
    """deploy/serve_config.yaml with ``models``' checkpoints, the given replica counts, and the
    deployments in ``on_node2`` pinned to the second node."""
    doc = yaml.safe_load((REPO / "deploy/serve_config.yaml").read_text())
    for app in doc["applications"]:
        args = app["args"]
        if "checkpoint" in args:
            args.update(
                checkpoint=str(models / Path(args["checkpoint"]).name), model_root=str(models)
            )
            args["threads"] = 1
        for d in app.get("deployments", []):
            d["ray_actor_options"] = {"num_cpus": 0.1}  # many replicas on 2 test CPUs
            if replicas and d["name"] in replicas:
                d["num_replicas"] = replicas[d["name"]]
            if d["name"] in on_node2:
                d["ray_actor_options"]["resources"] = {NODE2: 0.25}
    return doc


def app_doc(doc: dict, name: str) -> dict:
    return next(a for a in doc["applications"] if a["name"] == name)


class SecondNode:
    """``ray start --address GCS --block`` (1 CPU, resource ``NODE2``) as its own process
    group: :meth:`join` starts it and waits until it is in the cluster, :meth:`stop` ends it
    (best while the head is still up: the node then drains at once)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def join(self, gcs: str) -> None:
        import ray

        ray_cli = str(Path(sys.executable).with_name("ray"))
        self.proc = subprocess.Popen(
            [ray_cli, "start", "--block", f"--address={gcs}", "--num-cpus=1"]
            + [f'--resources={{"{NODE2}": 1}}'],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert self.proc.poll() is None, "ray start --address exited"
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def serve_cluster(
    models: Path, replicas: dict[str, int] | None = None, on_node2: tuple[str, ...] = ()
) -> Iterator[ServeCluster]:
    """Ray (2 CPUs; plus a 1-CPU second node when ``on_node2`` names deployments for it) and
    Serve on a free loopback port with the config deployed; torn down after. Replicas inherit
    the admin token. (The second node authenticates to the head as any `ray start --address`
    on the same machine does: Ray's default local token.)"""
    from services.teacher.ray_command import local_serve

    doc = test_config(models, replicas, on_node2)
    env = {"OPD_ADMIN_TOKEN": TOKEN}
    node = SecondNode()
    try:
        with local_serve(doc, env=env, before_deploy=node.join if on_node2 else None) as url:
            try:
                yield ServeCluster(url, doc, models)
            finally:
                node.stop()
    finally:
        node.stop()  # the deploy failed after it joined
