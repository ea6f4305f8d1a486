"""``opd serve ray --config deploy/serve_config.yaml``: a Serve config on a Ray cluster.

Does what ``serve run CONFIG`` does, with Serve's public API only (start Serve with the config's
HTTP options, deploy its applications in file order, each with its ``deployments`` options),
announces the HTTP base URL (``OPD_URL=...``; application routes hang below it, e.g.
``/teacher-a``) and serves until SIGINT/SIGTERM, when it shuts Serve (and a Ray instance it
started) down. ``--apply --address GCS`` deploys onto a running cluster (the ``OPD_RAY_ADDRESS`` it
printed) and exits, leaving it serving: the way to change ``user_config`` on every replica.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
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
    apply: bool = Field(
        False,
        description="deploy onto the running cluster at --address and exit, leaving it serving "
        "(a changed user_config reaches every replica: the swap path)",
    )


#: Ray's token-auth switch, and where Ray keeps the token of clusters started on this machine
AUTH_MODE_ENV = "RAY_AUTH_MODE"
DEFAULT_TOKEN = Path.home() / ".ray" / "auth_token"


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


def deploy_config(doc: dict) -> list[str]:
    """Deploy every application of a Serve config through Serve's public API, in file order
    (teachers before the router that composes them); returns the application names.

    ``deployments`` entries are applied by our builders (``build(args, options)`` beside each
    ``app_builder``: one deployment per application); another import path takes ``args`` only.
    Redeploying a running application with a changed ``user_config`` is how a swap reaches
    every replica (docs/deploy.md).

    Raises:
        UsageError: a bad application (the message names it and the key), or one that
            failed to deploy (with Serve's message).
    """
    from ray import serve

    names = []
    for i, app in enumerate(doc["applications"]):
        name = app.get("name", "default")
        where = f"applications[{i}] ({name})"
        target = _application(app, where)
        try:
            serve.run(target, name=name, route_prefix=app.get("route_prefix", "/"))
        except Exception as exc:  # Serve reports a failed deploy as an exception with its cause
            raise UsageError(f"{where} failed to deploy: {exc}") from None
        names.append(name)
    return names


def _application(app: dict, where: str):
    """The bound application of one config entry (its builder called with its args)."""
    from pydantic import ValidationError

    module_name, _, attr = str(app.get("import_path", "")).partition(":")
    try:
        module = importlib.import_module(module_name)
        builder = getattr(module, attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UsageError(
            f"{where}.import_path: cannot import {app.get('import_path')!r}: {exc}"
        ) from None
    deployments = app.get("deployments") or []
    args = app.get("args") or {}
    try:
        if attr == "app_builder" and hasattr(module, "build"):
            if len(deployments) > 1:
                names = [d.get("name") for d in deployments]
                raise UsageError(
                    f"{where}.deployments: one deployment per application, got {names}"
                )
            return module.build(args, deployments[0] if deployments else None)
        if deployments:
            raise UsageError(
                f"{where}.deployments: only applied for opd builders; use `serve run` for "
                f"{app['import_path']}"
            )
        return builder(args) if callable(builder) and not hasattr(builder, "bind") else builder
    except ValidationError as exc:
        raise UsageError(f"{where}.args: {exc}") from None
    except ValueError as exc:  # our builders name the key (a missing file, GPUs)
        raise UsageError(f"{where}: {exc}") from None


@contextlib.contextmanager
def local_serve(
    doc: dict,
    num_cpus: int = 2,
    env: dict[str, str] | None = None,
    before_deploy: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """A throwaway local Ray instance (``num_cpus``) with Serve on a free loopback port and the
    config ``doc`` deployed; yields the proxy's base URL and tears everything down after
    (tests, benchmarks). ``env`` is set in this process before Ray starts, so replicas inherit
    it (e.g. the admin token), and restored after. ``before_deploy(gcs_address)`` runs once
    Ray is up (e.g. to join a second node that replicas are pinned to)."""
    import ray
    from ray import serve

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    port = free_port()
    # "local": always a new instance, never another job's cluster that happens to run here
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        namespace="serve",
    )
    try:
        if before_deploy is not None:
            before_deploy(ray.get_runtime_context().gcs_address)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy_config(doc)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_ray(s: RaySettings) -> int:
    if s.address and AUTH_MODE_ENV not in os.environ and DEFAULT_TOKEN.is_file():
        # A local `ray.init` cluster uses token auth with Ray's default token file, but a
        # driver that connects by address reads the mode from the environment: say it, before
        # Ray is imported (Ray reads the token file itself).
        os.environ[AUTH_MODE_ENV] = "token"
    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    if s.apply and not s.address:
        raise UsageError(
            "--apply deploys onto a running cluster: give --address (the OPD_RAY_ADDRESS "
            "that `opd serve ray` printed)"
        )
    doc = load_config(s.config, s.port)
    schema = ServeDeploySchema.model_validate(doc)
    started_ray = not ray.is_initialized() and s.address is None
    ray.init(
        # without --address a new local instance: never attach to another job's cluster
        address=s.address or "local",
        num_cpus=None if s.address else s.num_cpus,
        include_dashboard=False,
        namespace="serve",
        log_to_driver=False,
    )

    # where a later `--apply --address ...` finds this cluster (never "auto": another job's
    # Ray instance may run on the same machine)
    print(f"OPD_RAY_ADDRESS={ray.get_runtime_context().gcs_address}", file=sys.stderr, flush=True)
    if s.apply:
        # onto Serve as it runs (its HTTP options stay); a failed apply leaves it serving
        try:
            names = deploy_config(doc)
        finally:
            ray.shutdown()  # this driver only disconnects
        print(f"opd serve ray: applied {', '.join(names)}", file=sys.stderr, flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(
            proxy_location=schema.proxy_location, http_options=schema.http_options.model_dump()
        )
        deploy_config(doc)
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
