"""``opd serve ray --config deploy/serve_config.yaml``: a Serve config on a Ray cluster.

Does what ``serve run CONFIG`` does (start Serve with the config's HTTP options, deploy its
applications), then waits until every application is RUNNING, announces the HTTP base URL
(``OPD_URL=...``; application routes hang below it, e.g. ``/teacher-a``) and serves until
SIGINT/SIGTERM, when it shuts Serve (and a Ray instance it started) down.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.cli import Command, UsageError
from common.procs import announce_url


class RaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_RAY_")

    config: Path = Field(Path("deploy/serve_config.yaml"), description="Ray Serve config file")
    address: str | None = Field(
        None, description="Ray cluster address (default: start a local one)"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance")
    port: int | None = Field(None, ge=0, description="override http_options.port (0 = free port)")
    ready_timeout_s: float = Field(180.0, gt=0, description="how long to wait for RUNNING")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (Ray's proxy binds it itself, so we cannot pass a socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def load_config(path: Path, port: int | None) -> dict:
    """The Serve config as a dict, with the HTTP port overridden when asked."""
    if not path.is_file():
        raise UsageError(f"Serve config {path} does not exist")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict) or not doc.get("applications"):
        raise UsageError(f"{path} has no 'applications' list")
    http = doc.setdefault("http_options", {})
    http.setdefault("host", "127.0.0.1")  # loopback unless the config says otherwise
    if port is not None:
        http["port"] = port or free_port(http["host"])
    http.setdefault("port", 8000)
    return doc


def wait_running(names: list[str], timeout_s: float) -> None:
    """Block until every application is RUNNING; raise with Serve's message if one fails."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = {
            n: apps[n].message for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"
        }
        if failed:
            raise UsageError(f"Serve applications failed to deploy: {failed}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise UsageError(f"applications not RUNNING after {timeout_s:.0f} s: {states}")
        time.sleep(0.5)


def run_ray(s: RaySettings) -> int:
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    doc = load_config(s.config, s.port)
    schema = ServeDeploySchema.model_validate(doc)
    started_ray = not ray.is_initialized() and s.address is None
    ray.init(
        address=s.address,
        num_cpus=s.num_cpus,
        include_dashboard=False,
        namespace="serve",
        log_to_driver=False,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        client = serve_api.serve_start(
            http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
        )
        client.deploy_apps(schema, _blocking=False)
        wait_running([a.name for a in schema.applications], s.ready_timeout_s)
        announce_url(f"http://{doc['http_options']['host']}:{doc['http_options']['port']}")
        stop.wait()
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return 0


RAY = Command(
    "deploy a Ray Serve config (teachers, router) and serve until stopped", RaySettings, run_ray
)
