"""`opd cluster up|status|down` as a user runs it, and a teacher swap during training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common.procs import pid_alive, start_service
from services.cluster import start_cluster, teacher_cmd
from student.models import checkpoint_path
from tests.trainer_proc import train_proc, wait_for_lines

OPD = [sys.executable, "-m", "common.cli"]


def opd(
    *args: str, cwd: Path, env: dict | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*OPD, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_cluster_up_status_down_leaves_no_process(tiny_models, tmp_path):
    state = tmp_path / "state"
    args = ["--models", str(tiny_models), "--state-dir", str(state)]
    try:
        up = opd("cluster", "up", *args, cwd=tmp_path)
        assert up.returncode == 0, up.stdout + up.stderr
        doc = json.loads((state / "cluster.json").read_text())
        pids = [s["pid"] for s in doc["services"].values()]
        assert set(doc["services"]) == {"a", "b", "base", "router"} and all(map(pid_alive, pids))
        teachers = httpx.get(f"{doc['router_url']}/v1/teachers", timeout=10).json()
        assert [t["name"] for t in teachers["teachers"]] == ["a", "b"]
        again = opd("cluster", "up", *args, cwd=tmp_path)
        assert again.returncode == 2 and "already running" in again.stderr
        status = opd("cluster", "status", *args, cwd=tmp_path)
        assert status.returncode == 0 and status.stdout.count("ready") == 4
        # teacher b dies with no traffic: the idle router's metadata re-read notices, and status
        # says which teacher the router lacks
        os.kill(doc["services"]["b"]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = opd("cluster", "status", *args, cwd=tmp_path)
            router_line = next(
                x for x in status.stdout.splitlines() if x.strip().startswith("router ")
            )
            if "NOT READY" in router_line:
                break
            time.sleep(0.5)
        assert status.returncode == 1 and '"down":["b"]' in router_line, status.stdout
        assert "(process gone)" in next(
            x for x in status.stdout.splitlines() if x.strip().startswith("b ")
        )
        # restart b on its port: the router admits it again, the cluster is whole
        bad = opd("cluster", "restart", *args, "--service", "zz", cwd=tmp_path)
        assert bad.returncode == 2 and "--service: give one of a, b, base, router" in bad.stderr
        again = opd("cluster", "restart", *args, "--service", "b", cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        new = json.loads((state / "cluster.json").read_text())["services"]["b"]
        assert (
            new["url"] == doc["services"]["b"]["url"] and new["pid"] != doc["services"]["b"]["pid"]
        )
        assert Path(new["log"]).read_text().count("OPD_URL=") == 2  # the first run's log is kept
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = opd("cluster", "status", *args, cwd=tmp_path)
            if status.returncode == 0:
                break
            time.sleep(0.5)
        assert status.returncode == 0 and "NOT READY" not in status.stdout, status.stdout
        pids.append(new["pid"])
        os.kill(new["pid"], signal.SIGKILL)
        down = opd("cluster", "down", *args, cwd=tmp_path)
        assert down.returncode == 0, down.stdout + down.stderr
        assert f"b       pid {new['pid']} already gone" in down.stdout
        deadline = time.monotonic() + 5
        while any(map(pid_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(pid_alive, pids))
        assert not (state / "cluster.json").exists()
        assert opd("cluster", "status", *args, cwd=tmp_path).returncode == 1
    finally:  # a failed assertion must not leave the cluster running
        if (state / "cluster.json").exists():
            opd("cluster", "down", *args, "--grace-s", "2", cwd=tmp_path)


def test_swapping_teacher_a_during_training_completes_and_shows_the_version(tiny_models, tmp_path):
    token = "swap-test-token"
    env = {"OPD_ADMIN_TOKEN": token}
    auth = {"Authorization": f"Bearer {token}"}
    with start_cluster(tiny_models, env=env) as c:
        # The replacement: teacher a's checkpoint on another port, reloaded once so that its
        # version (2) tells its answers apart from the original's (1).
        new = start_service(teacher_cmd(checkpoint_path(tiny_models, "a")), env=env)
        c.services["a-new"] = new
        r = httpx.post(
            f"{new.url}/v2/repository/models/teacher-a/load",
            headers=auth,
            timeout=30,
            json={"parameters": {"checkpoint": "teacher-a.safetensors"}},
        )
        assert r.status_code == 200, r.text
        out = tmp_path / "run"
        proc = train_proc(tiny_models, out, c.router_url, 80)
        steps = out / "steps.jsonl"
        wait_for_lines(steps, 15, proc)
        r = httpx.put(
            f"{c.router_url}/v1/teachers/a", headers=auth, timeout=30, json={"endpoints": [new.url]}
        )
        assert r.status_code == 200, r.text
        c.services["a"].stop()  # the old endpoint goes away for good
        assert proc.wait(300) == 0, proc.stdout.read()
    versions = [json.loads(line)["versions"]["a"] for line in steps.read_text().splitlines()]
    assert len(versions) == 80
    assert versions[0] == "1" and versions[-1] == "2"
    assert versions == sorted(versions)  # one switch, never back


def _running_state(state_dir: Path) -> None:
    """A state file whose service is alive (this test process): `up` must refuse."""
    state_dir.mkdir(parents=True, exist_ok=True)
    doc = {"services": {"router": {"pid": os.getpid(), "url": "http://127.0.0.1:9"}}}
    (state_dir / "cluster.json").write_text(json.dumps(doc))


def test_already_running_hint_names_a_custom_state_dir(opd_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    custom = tmp_path / "custom"
    _running_state(custom)
    code, _, err = opd_cli("cluster", "up", "--state-dir", custom)
    assert code == 2 and f"`opd cluster down --state-dir {custom}` first" in err
    _running_state(Path(".opd"))  # the default: the plain command is right
    code, _, err = opd_cli("cluster", "up")
    assert code == 2 and "`opd cluster down` first" in err


def test_cluster_up_keep_hint_names_the_command_with_force(
    opd_cli, tiny_models, tmp_path, monkeypatch
):
    from common.settings import UsageError
    from services import cluster_command

    def launch(*_args, **_kwargs):
        raise UsageError("stopped before starting services")

    monkeypatch.setattr(cluster_command, "launch", launch)
    code, out, err = opd_cli(
        "cluster", "up", "--models", tiny_models, "--state-dir", tmp_path / "state"
    )
    assert code == 2 and "stopped before starting services" in err
    assert f"(exists; `opd pretrain --out {tiny_models} --force` to retrain)" in out
    assert "; --force" not in out  # cluster up has no --force of its own


def test_cluster_up_models_that_is_a_file_names_the_flag(opd_cli, tmp_path):
    (tmp_path / "models").write_text("")
    code, _, err = opd_cli(
        "cluster", "up", "--models", tmp_path / "models", "--state-dir", tmp_path
    )
    assert code == 2 and err.startswith("opd cluster up: error: --models ")
    assert "exists and is not a directory" in err
