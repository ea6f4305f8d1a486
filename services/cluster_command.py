"""``opd cluster up|status|restart|down``: the standard topology as detached local processes.

``up`` pretrains missing checkpoints, starts teachers ``a``, ``b``, the ``base`` anchor and the
router on free loopback ports, waits until each is ready and records URLs, PIDs and commands in
a state file; ``restart --service NAME`` stops one service and starts it again on its port (the
router's registry keeps pointing at it); ``down`` stops them (SIGTERM, drain, SIGKILL after a
grace period).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.checkpoint import atomic_write_bytes
from common.cli import Command, UsageError
from common.procs import pid_alive, start_detached, stop_pid
from common.threads import cpu_share_env
from services.cluster import PYTHON, computing_processes, launch

STATE_NAME = "cluster.json"
ROUTER_PREFIX = "/router"  # the router application's route_prefix in deploy/serve_config.yaml


class ClusterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_CLUSTER_")
    models: Path = Field(Path("models"), description="checkpoints (pretrained first when missing)")
    state_dir: Path = Field(Path(".opd"), description="where the state file and service logs live")
    policy: Literal["nearest", "label", "average"] = Field("nearest", description="router policy")
    backend: Literal["local", "ray"] = Field(
        "local",
        description="local: one uvicorn process per service; "
        "ray: the same through Ray Serve (--ray-config)",
    )
    ray_config: Path = Field(
        Path("deploy/serve_config.yaml"), description="Ray Serve config for --backend ray"
    )
    ray_cpus: int = Field(2, ge=1, description="CPUs of the local Ray instance (--backend ray)")
    grace_s: float = Field(10.0, ge=0, description="down: seconds to drain before SIGKILL")
    timeout_s: float = Field(
        120.0, gt=0, description="up: seconds each service may take to get ready"
    )
    service: str | None = Field(
        None, description="restart: the service to restart (a, b, base, router; ray)"
    )


def _state_path(s: ClusterSettings) -> Path:
    return s.state_dir / STATE_NAME


def _read_state(s: ClusterSettings) -> dict | None:
    path = _state_path(s)
    return json.loads(path.read_text()) if path.is_file() else None


def _down_command(s: ClusterSettings) -> str:
    """The ``opd cluster down`` that stops this cluster: a custom state dir must be named."""
    default = ClusterSettings.model_fields["state_dir"].default
    return "opd cluster down" + ("" if s.state_dir == default else f" --state-dir {s.state_dir}")


def up(s: ClusterSettings) -> int:
    state = _read_state(s)
    if state and any(pid_alive(v["pid"]) for v in state["services"].values()):
        raise UsageError(
            f"a cluster is already running (state {_state_path(s)}); "
            f"`{_down_command(s)}` first, or use another --state-dir"
        )
    from student.pretrain import ensure_models

    ensure_models(s.models)
    if s.backend == "ray" and not s.ray_config.is_file():
        raise UsageError(f"--ray-config {s.ray_config} does not exist")
    services: dict[str, dict] = {}
    share = cpu_share_env(computing_processes())

    def start(name: str, cmd: list[str]) -> tuple[int, str]:
        log = s.state_dir / "logs" / f"{name}.log"
        pid, url = start_detached(cmd, log, s.timeout_s, env=share)
        services[name] = {"pid": pid, "url": url, "log": str(log), "cmd": cmd}
        print(f"  {name:<7} ready at {url}  (pid {pid})", flush=True)
        return pid, url

    try:
        if s.backend == "ray":
            # One process holds the local Ray instance with every application of the config;
            # the router application lives under its route prefix.
            start(
                "ray",
                [
                    *PYTHON,
                    "serve",
                    "ray",
                    "--config",
                    str(s.ray_config),
                    "--port",
                    "0",
                    "--num-cpus",
                    str(s.ray_cpus),
                ],
            )
            router_url = services["ray"]["url"].rstrip("/") + ROUTER_PREFIX
            services["ray"]["ready_url"] = router_url
        else:
            launch(s.models, start, policy=s.policy)
            router_url = services["router"]["url"]
    except BaseException:
        for svc in services.values():
            stop_pid(svc["pid"], 2)
        raise
    doc = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": str(s.models),
        "backend": s.backend,
        "router_url": router_url,
        "services": services,
    }
    atomic_write_bytes(_state_path(s), (json.dumps(doc, indent=2) + "\n").encode())
    print(f"cluster up: router at {doc['router_url']}  (state {_state_path(s)})")
    return 0


def status(s: ClusterSettings) -> int:
    state = _read_state(s)
    if state is None:
        print(f"no cluster (no state file {_state_path(s)})")
        return 1
    healthy = True
    for name, svc in state["services"].items():
        why = ""
        try:
            base = svc.get("ready_url", svc["url"])
            resp = httpx.get(f"{base}/v2/health/ready", timeout=2)
            ready = resp.status_code == 200
            if not ready:  # the router names its teachers that are down: worth a glance
                why = f": {resp.text.strip()[:200]}" if resp.text.strip() else ""
        except httpx.HTTPError as exc:
            ready, why = False, f": {type(exc).__name__}"
        alive = pid_alive(svc["pid"])
        healthy &= ready and alive
        print(
            f"  {name:<7} {svc['url']:<28} pid {svc['pid']:<8} "
            f"{'ready' if ready else 'NOT READY' + why}{'' if alive else ' (process gone)'}"
        )
    print(f"router: {state['router_url']}")
    return 0 if healthy else 1


def restart(s: ClusterSettings) -> int:
    """Stop ``--service`` (if it still runs) and start its command again on the same port."""
    state = _read_state(s)
    if state is None:
        raise UsageError(f"no cluster (no state file {_state_path(s)}); `opd cluster up` first")
    names = ", ".join(sorted(state["services"]))
    if s.service not in state["services"]:
        raise UsageError(f"--service: give one of {names} (got {s.service!r})")
    svc = state["services"][s.service]
    if "cmd" not in svc:
        raise UsageError(
            f"the state file {_state_path(s)} predates restarts (no commands in it); "
            f"`{_down_command(s)}` and `opd cluster up` once"
        )
    # The same port: the router (and trainers) keep the URL they have.
    cmd = list(svc["cmd"])
    cmd[cmd.index("--port") + 1] = str(urlsplit(svc["url"]).port)
    if pid_alive(svc["pid"]):
        stop_pid(svc["pid"], s.grace_s)
    pid, url = start_detached(
        cmd,
        svc["log"],
        s.timeout_s,
        env=cpu_share_env(computing_processes()),
        append=True,
    )
    state["services"][s.service].update(pid=pid, url=url)
    atomic_write_bytes(_state_path(s), (json.dumps(state, indent=2) + "\n").encode())
    print(f"  {s.service:<7} ready at {url}  (pid {pid}; log {svc['log']})")
    return 0


def down(s: ClusterSettings) -> int:
    state = _read_state(s)
    if state is None:
        print(f"no cluster (no state file {_state_path(s)})")
        return 0
    # Router first: nothing new reaches the teachers while they drain. A Ray instance gets
    # longer: it shuts Serve and Ray down on SIGTERM.
    order = sorted(state["services"], key=lambda n: n != "router")
    grace = {"ray": max(s.grace_s, 60.0)}
    for name in order:
        pid = state["services"][name]["pid"]
        if not pid_alive(pid):
            print(f"  {name:<7} pid {pid} already gone")
            continue
        killed = stop_pid(pid, grace.get(name, s.grace_s))
        print(f"  {name:<7} pid {pid} {'killed after grace period' if killed else 'stopped'}")
    left = [n for n in order if pid_alive(state["services"][n]["pid"])]
    if left:
        print(f"still running: {', '.join(left)}")
        return 1
    _state_path(s).unlink()
    print("cluster down")
    return 0


UP = Command("start teachers a, b, base and the router on loopback", ClusterSettings, up)
STATUS = Command("show the local cluster's services and readiness", ClusterSettings, status)
RESTART = Command(
    "restart one service of the local cluster on its port (--service NAME)",
    ClusterSettings,
    restart,
)
DOWN = Command("stop the local cluster (SIGTERM, drain, SIGKILL)", ClusterSettings, down)
