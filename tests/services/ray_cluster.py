"""A real local Ray instance serving deploy/serve_config.yaml (test checkpoints), shared by the
tests of one module: the teacher applications and the router that composes them by handle."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TOKEN = "ray-admin-token"


@dataclass
class ServeCluster:
    url: str  # the Serve proxy's base URL; applications hang below it
    doc: dict  # the config deployed (test checkpoints)
    models: Path


def test_config(models: Path, replicas: dict[str, int] | None = None) -> dict:
    """deploy/serve_config.yaml with ``models``' checkpoints and the given replica counts."""
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
    return doc


def app_doc(doc: dict, name: str) -> dict:
    return next(a for a in doc["applications"] if a["name"] == name)


@contextlib.contextmanager
def serve_cluster(models: Path, replicas: dict[str, int] | None = None) -> Iterator[ServeCluster]:
    """Ray (2 CPUs) + Serve on a free loopback port with the config deployed; torn down after.
    Replicas inherit the admin token (set before Ray starts)."""
    from services.teacher.ray_command import local_serve

    doc = test_config(models, replicas)
    with local_serve(doc, env={"OPD_ADMIN_TOKEN": TOKEN}) as url:
        yield ServeCluster(url, doc, models)
