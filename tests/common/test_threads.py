"""Thread budgets: the rules, the cgroup quota, the share launchers set, and what processes use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common.nets import VelocityNet
from common.procs import start_service
from common.threads import (
    CPU_SHARE_ENV,
    SMALL_MODEL_PARAMS,
    CpuWatch,
    cgroup_cpu_limit,
    cpu_share_env,
    model_params,
    thread_budget,
    usable_cpus,
)
from services.cluster import PYTHON, computing_processes, teacher_cmd


def test_small_models_take_one_thread_whatever_the_cores() -> None:
    toy = model_params(VelocityNet())
    assert toy == 35_714 < SMALL_MODEL_PARAMS
    assert thread_budget(toy, cpus=64) == 1
    assert thread_budget(toy, share=1, cpus=2) == 1


def test_large_models_share_the_cores_and_get_at_least_one() -> None:
    big = SMALL_MODEL_PARAMS * 100
    assert thread_budget(big, share=1, cpus=16) == 16
    assert thread_budget(big, share=4, cpus=16) == 4
    assert thread_budget(big, share=3, cpus=16) == 5  # whole shares: never oversubscribe
    assert thread_budget(big, share=8, cpus=2) == 1
    assert thread_budget(None, share=1, cpus=1.5) == 1  # unknown size counts as large
    assert thread_budget(big, share=1, cpus=0.25) == 1  # a fractional Ray replica


def test_the_launchers_share_comes_from_the_environment(monkeypatch) -> None:
    big = SMALL_MODEL_PARAMS * 100
    monkeypatch.setenv(CPU_SHARE_ENV, "4")
    assert thread_budget(big, cpus=16) == 4
    assert thread_budget(big, share=2, cpus=16) == 8  # an explicit share wins
    monkeypatch.setenv(CPU_SHARE_ENV, "not-a-number")
    assert thread_budget(big, cpus=16) == 16
    # opd cluster up / opd demo: teachers a, b, the anchor and the trainer compute
    assert cpu_share_env(computing_processes()) == {CPU_SHARE_ENV: "4"}
    assert computing_processes(("a",), None) == 2


def test_cgroup_quota_v2_and_v1(tmp_path) -> None:
    v2 = tmp_path / "cpu.max"
    v1 = (tmp_path / "quota", tmp_path / "period")
    missing = (tmp_path / "nope", tmp_path / "nope2")
    v2.write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2, missing) == 1.5
    v2.write_text("max 100000\n")
    assert cgroup_cpu_limit(v2, missing) is None
    v1[0].write_text("50000\n")
    v1[1].write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "absent", v1) == 0.5
    v1[0].write_text("-1\n")  # cgroup v1's "no limit"
    assert cgroup_cpu_limit(tmp_path / "absent", v1) is None
    assert cgroup_cpu_limit(tmp_path / "absent", missing) is None
    assert 0 < usable_cpus() <= (os.cpu_count() or 1)


def test_cpu_watch_counts_this_processes_run_time() -> None:
    watch = CpuWatch(threads=1, window_s=3600)
    sum(i * i for i in range(300_000))  # some CPU work
    assert watch.update() is None  # the window has not closed
    totals = watch.totals()
    assert totals["threads"] == 1
    assert totals["run_s"] > 0
    assert totals["runqueue_wait_s"] >= 0


def test_cpu_watch_warns_once_when_waiting_dominates() -> None:
    watch = CpuWatch(threads=1, window_s=0.0, threshold=0.0)  # any window counts as crowded
    sum(i * i for i in range(100_000))
    first = watch.update()
    assert first is not None and "oversubscribed" in first and "torch thread" in first
    assert watch.update() is None  # said once per run


def test_openmp_wait_policy_is_passive_before_torch_loads() -> None:
    code = "import common, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OPD_OMP_PASSIVE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE"


@pytest.mark.slow
def test_default_trainer_and_teacher_take_one_thread_for_the_toy_net(tiny_models, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_THREADS")}
    env[CPU_SHARE_ENV] = "1"
    done = subprocess.run(
        [*PYTHON, "train", "--method", "danceopd", "--steps", "3", "--models", str(tiny_models)]
        + ["--out", str(tmp_path / "run"), "--no-progress", "--checkpoint-every", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["cpu"]["threads"] == 1
    assert report["cpu"]["run_s"] > 0

    cmd = teacher_cmd(tiny_models / "teacher-a.safetensors")
    assert "--threads" not in cmd  # launchers leave the count to the teacher's budget
    teacher = start_service(cmd, timeout_s=90, env=env)
    try:
        assert "opd serve teacher: 1 torch thread (" in teacher.output()
    finally:
        teacher.stop(5)
