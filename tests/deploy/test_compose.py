"""docker-compose.yml: validated by docker-compose, then run for real with podman.

The real run (marked ``compose`` and ``slow``) needs root on Debian: deploy/podman-setup.sh
installs podman, runc, debootstrap, docker-compose and podman-compose and builds the local base
image (no container registry is reachable here). It builds the image from a temporary context
(the repository's sources plus the local CPU torch wheel and this machine's CA bundle), brings the
cluster up under its own project name, waits for readiness by polling (podman runs no
healthchecks by itself), lets the trainer container run a short DanceOPD job through the router,
checks its report.json and removes every container, volume and network, also on failure.
Set OPD_COMPOSE_TEST=0 to skip it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
SETUP = REPO / "deploy" / "podman-setup.sh"
SERVERS = ("teacher-a", "teacher-b", "base", "router")
STEPS, BATCH, METHOD, RUN = 20, 128, "danceopd", "compose-test"


def _compose_config(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip(
            "docker-compose is not installed (apt-get install docker-compose, "
            "or run deploy/podman-setup.sh as root)"
        )
    return subprocess.run(
        [exe, "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_compose_file_is_valid() -> None:
    """`docker-compose config -q` accepts the file (every profile), with no engine running."""
    res = _compose_config("--profile", "metrics", "config", "-q")
    assert res.returncode == 0, res.stderr


def test_compose_file_shape() -> None:
    """The services, readiness checks, env-only configuration and no baked admin token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPD_")}
    env["PATH"] = os.environ.get("PATH", "")
    res = _compose_config("--profile", "metrics", "config", env=None)
    res = subprocess.run(res.args, capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    doc = yaml.safe_load(res.stdout)
    services = doc["services"]
    assert {*SERVERS, "trainer", "pretrain", "prometheus"} <= set(services)
    assert services["prometheus"]["profiles"] == ["metrics"]
    for name in SERVERS:
        svc = services[name]
        assert "/v2/health/ready" in " ".join(svc["healthcheck"]["test"]), name
        assert svc["environment"]["OPD_ADMIN_TOKEN"] in ("", None), name
        assert "command" in svc and svc["init"] is True
    for svc in services.values():
        if "stop_grace_period" in svc:
            assert svc["stop_grace_period"] in ("3s", 3, 3.0)
    trainer = services["trainer"]["environment"]
    assert trainer["OPD_TRAIN_BACKEND"] == "http"
    assert trainer["OPD_TRAIN_ROUTER_URL"] == "http://router:8000"
    assert "OPD_ADMIN_TOKEN" not in (REPO / "deploy" / "Dockerfile").read_text().replace(
        "OPD_ADMIN_TOKEN at run time", ""
    )


# --- the real run ------------------------------------------------------------------------------


def _run(
    cmd: list[str], env: dict, timeout: float, check: bool = True
) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res


def _setup_env() -> dict:
    """Run deploy/podman-setup.sh (idempotent) and return the environment it exports."""
    if os.environ.get("OPD_COMPOSE_TEST", "1") == "0":
        pytest.skip("OPD_COMPOSE_TEST=0")
    have = shutil.which("podman") and shutil.which("podman-compose")
    if os.geteuid() != 0 and not have:
        pytest.skip("needs root to install podman (deploy/podman-setup.sh)")
    env = dict(os.environ)
    _run(["bash", str(SETUP)], env, timeout=1200)
    cache = Path(os.environ.get("OPD_PODMAN_CACHE", Path.home() / ".cache" / "opd-podman"))
    for line in (cache / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip('"').replace("$PATH", env.get("PATH", ""))
        env[key] = value
    return env


def _build_context(dest: Path) -> Path:
    """The repository's sources, the local CPU torch wheel (if any) and the CA bundle."""
    files = subprocess.run(
        [
            "git",
            "ls-files",
            "-co",
            "--exclude-standard",
            "--",
            "pyproject.toml",
            "constraints.txt",
            "README.md",
            ".dockerignore",
            "common",
            "services",
            "student",
            "deploy",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and "__pycache__" not in rel:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "deploy" / "wheels").mkdir(parents=True, exist_ok=True)
    (dest / "deploy" / "certs").mkdir(parents=True, exist_ok=True)
    # the CPU wheel from the machine's local wheel directory (pip config find-links); never the
    # registry: PyPI's torch is the CUDA build (GBs), the Dockerfile's TORCH_INDEX handles that
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-index",
            "--no-deps",
            "torch==2.13.0",
            "-d",
            str(dest / "deploy" / "wheels"),
        ],
        capture_output=True,
        timeout=300,
    )
    bundle = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
    if bundle.is_file():  # a TLS-intercepting proxy's CA, when this machine trusts one
        shutil.copy(bundle, dest / "deploy" / "certs" / "host.crt")
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _logs(env: dict, project: str) -> str:
    out = []
    for svc in ("pretrain", *SERVERS, "trainer"):
        res = subprocess.run(
            ["podman", "logs", "--tail", "25", f"{project}_{svc}_1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        out.append(f"--- {svc} ---\n{res.stdout[-2500:]}{res.stderr[-2500:]}")
    return "\n".join(out)


def _teardown(env: dict, project: str) -> None:
    compose = ["podman-compose", "-f", str(COMPOSE), "-p", project]
    subprocess.run([*compose, "down", "-t", "1", "-v"], env=env, capture_output=True, timeout=180)
    # whatever `down` left (a failed start): containers, pod, volumes, network of this project
    label = f"label=io.podman.compose.project={project}"
    for kind in ("container", "pod", "volume"):
        ids = subprocess.run(
            ["podman", kind, "ls", "-q", "--filter", label],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        if ids:
            subprocess.run(
                ["podman", kind, "rm", "-f", *ids], env=env, capture_output=True, timeout=120
            )
    subprocess.run(
        ["podman", "network", "rm", "-f", f"{project}_default"],
        env=env,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.compose
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_compose_cluster_runs_a_job(tmp_path: Path) -> None:
    t0 = time.monotonic()
    env = _setup_env()
    image = "localhost/opd-serve:compose-test"
    ctx = _build_context(tmp_path / "ctx")
    _run(
        [
            "podman",
            "build",
            "-q",
            "-f",
            "deploy/Dockerfile",
            "--build-arg",
            "BASE_IMAGE=localhost/debian-py",
            "-t",
            image,
            str(ctx),
        ],
        env,
        timeout=1200,
    )
    t_build = time.monotonic()

    project = f"opdtest{os.getpid()}"
    ports = {svc: _free_port() for svc in SERVERS}
    env.update(
        {
            "OPD_IMAGE": image,
            "OPD_BASE_IMAGE": "localhost/debian-py",
            "OPD_PRETRAIN_STEPS": "50",
            "OPD_TRAIN_METHOD": METHOD,
            "OPD_TRAIN_STEPS": str(STEPS),
            "OPD_TRAIN_BATCH": str(BATCH),
            "OPD_RUN_NAME": RUN,
            "OPD_ROUTER_PUBLISH": f"127.0.0.1:{ports['router']}",
            "OPD_TEACHER_A_PUBLISH": f"127.0.0.1:{ports['teacher-a']}",
            "OPD_TEACHER_B_PUBLISH": f"127.0.0.1:{ports['teacher-b']}",
            "OPD_BASE_PUBLISH": f"127.0.0.1:{ports['base']}",
        }
    )
    env.pop("OPD_ADMIN_TOKEN", None)
    compose = ["podman-compose", "-f", str(COMPOSE), "-p", project]
    try:
        _run([*compose, "up", "-d"], env, timeout=300)
        # readiness, polled from the host through the published ports
        deadline = time.monotonic() + 420
        waiting = set(SERVERS)
        while waiting and time.monotonic() < deadline:
            waiting = {
                s for s in waiting if not _ready(f"http://127.0.0.1:{ports[s]}/v2/health/ready")
            }
            time.sleep(1)
        assert not waiting, f"not ready after 420 s: {sorted(waiting)}\n{_logs(env, project)}"
        t_ready = time.monotonic()

        trainer = f"{project}_trainer_1"
        res = _run(["podman", "wait", trainer], env, timeout=420)
        code = res.stdout.strip().splitlines()[-1]
        assert code == "0", f"trainer exited {code}\n{_logs(env, project)}"
        _run(["podman", "cp", f"{trainer}:/runs/{RUN}/report.json", str(tmp_path)], env, 60)
        report = json.loads((tmp_path / "report.json").read_text())
        t_job = time.monotonic()
    finally:
        _teardown(env, project)
    left = subprocess.run(
        ["podman", "ps", "-aq", "--filter", f"label=io.podman.compose.project={project}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    assert not left, f"containers left behind: {left}"

    assert report["backend"] == "http" and report["method"] == METHOD
    assert report["steps"] == STEPS
    counts = report["counts"]
    assert counts["rollouts"] == STEPS * BATCH
    assert counts["teacher_queries"] > 0 and counts["requests"] > 0
    assert counts["bytes_sent"] > 0 and counts["bytes_received"] > 0
    for key in ("avg_target_logp", "teacher_mode_mass", "effective_modes"):
        assert math.isfinite(report["metrics"][key]), key
    timing = (
        f"setup+build {t_build - t0:.0f} s, up+ready {t_ready - t_build:.0f} s, "
        f"job {t_job - t_ready:.0f} s, total {time.monotonic() - t0:.0f} s"
    )
    print(f"\ncompose test: {timing}")
