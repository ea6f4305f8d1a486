"""The trainer against real served teachers: a router and teacher processes on loopback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from common.checkpoint import read_model
from common.procs import start_service
from services.cluster import start_cluster, teacher_cmd
from student.clients import TeacherUnavailable
from student.commands import TrainSettings, run_train
from student.models import checkpoint_path
from tests.trainer_proc import train_proc, wait_for_lines


@pytest.fixture(scope="module")
def cluster(tiny_models):
    with start_cluster(tiny_models) as c:
        yield c


def train(models, out, **kw) -> dict:
    s = TrainSettings(models=models, out=out, progress=False, **kw)
    assert run_train(s) == 0
    return json.loads((Path(out) / "report.json").read_text())


@pytest.mark.parametrize("routing", ["router", "client"])
@pytest.mark.parametrize("method", ["diffusionopd", "flowopd", "danceopd"])
def test_http_backend_equals_local(cluster, tiny_models, tmp_path, method, routing):
    kw = {"method": method, "steps": 12, "checkpoint_every": 0}
    local = train(tiny_models, tmp_path / "local", **kw)
    http = train(
        tiny_models,
        tmp_path / "http",
        backend="http",
        router_url=cluster.router_url,
        stream_chunk=3,
        routing=routing,
        **kw,
    )
    for key in ("avg_target_logp", "teacher_mode_mass", "effective_modes"):
        assert abs(http["metrics"][key] - local["metrics"][key]) <= 0.02, key
    for key in ("rollouts", "teacher_queries"):
        assert http["counts"][key] == local["counts"][key]
    per_step = 12 // 3 if method != "danceopd" else 1
    assert http["counts"]["requests"] == 12 * per_step
    assert http["counts"]["bytes_sent"] > 0 and http["counts"]["bytes_received"] > 0
    assert http["timings_s"]["teacher_compute"] > 0
    line = json.loads((tmp_path / "http" / "steps.jsonl").read_text().splitlines()[-1])
    assert set(line["versions"]) == ({"a", "b", "base"} if method == "flowopd" else {"a", "b"})
    # which weights answered: the same checkpoints as the in-process teachers
    local_line = json.loads((tmp_path / "local" / "steps.jsonl").read_text().splitlines()[-1])
    assert line["digests"] == local_line["digests"] and len(line["digests"]) == len(
        line["versions"]
    )
    digests = [[r["digest"] for r in run["teacher_refs"]] for run in (http, local)]
    assert digests[0] == digests[1] and all("," not in d for d in digests[0])
    trace = json.loads((tmp_path / "http" / "trace.json").read_text())
    names = {e["name"] for e in trace["traceEvents"]}
    assert {"update", "wait for teachers", "rollout 0", "server compute"} <= names


def test_average_supervision_over_http(cluster, tiny_models, tmp_path):
    kw = {"method": "danceopd", "steps": 6, "supervise": "average", "checkpoint_every": 0}
    local = train(tiny_models, tmp_path / "local", **kw)
    http = train(
        tiny_models,
        tmp_path / "http",
        backend="http",
        router_url=cluster.router_url,
        spin_wait_ms=20,  # the trainer spins on its answers before it sleeps
        **kw,
    )
    assert abs(http["metrics"]["avg_target_logp"] - local["metrics"]["avg_target_logp"]) <= 0.02


def test_sigkill_and_resume_equals_uninterrupted(cluster, tiny_models, tmp_path):
    steps = 40
    full = train_proc(tiny_models, tmp_path / "full", cluster.router_url, steps)
    assert full.wait(300) == 0, full.stdout.read()
    part = tmp_path / "part"
    proc = train_proc(tiny_models, part, cluster.router_url, steps, "--checkpoint-every", "5")
    wait_for_lines(part / "steps.jsonl", 17, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not (part / "report.json").exists()
    resumed = train_proc(
        tiny_models, part, cluster.router_url, steps, "--checkpoint-every", "5", "--resume"
    )
    assert resumed.wait(300) == 0, resumed.stdout.read()
    a, _ = read_model(tmp_path / "full" / "student.safetensors")
    b, _ = read_model(part / "student.safetensors")
    diff = max(
        float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )
    assert diff <= 1e-6
    report = json.loads((part / "report.json").read_text())
    assert report["counts"]["teacher_queries"] == steps * 1536
    assert [json.loads(x)["step"] for x in (part / "steps.jsonl").read_text().splitlines()] == list(
        range(steps)
    )


@pytest.mark.parametrize("routing", ["router", "client"])
def test_teacher_killed_and_restarted_mid_run_completes(tiny_models, tmp_path, routing):
    with start_cluster(tiny_models) as c:
        out = tmp_path / "run"
        proc = train_proc(
            tiny_models, out, c.router_url, 60, "--retries", "8", "--routing", routing
        )
        wait_for_lines(out / "steps.jsonl", 10, proc)
        url = c.services["a"].url
        c.services["a"].kill()
        time.sleep(0.5)
        port = url.rsplit(":", 1)[1]
        c.services["a"] = start_service(
            teacher_cmd(checkpoint_path(tiny_models, "a"), port=int(port))
        )
        assert proc.wait(300) == 0, proc.stdout.read()
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 60
    assert len((out / "steps.jsonl").read_text().splitlines()) == 60


def test_unreachable_router_fails_loudly_with_checkpoint(tiny_models, tmp_path):
    with start_cluster(tiny_models, teachers=("a", "b"), anchor=None) as c:
        out = tmp_path / "run"
        proc = train_proc(
            tiny_models, out, c.router_url, 100_000, "--retries", "2", "--request-timeout-s", "2"
        )
        wait_for_lines(out / "steps.jsonl", 5, proc)
        c.services["router"].kill()
        code = proc.wait(120)
        text = proc.stdout.read()
    assert code == 1
    assert c.router_url.split("//")[1] in text and "--resume" in text
    assert (out / "checkpoint.safetensors").exists() and not (out / "report.json").exists()


def test_http_backend_without_router_url_is_a_clear_cli_error(tiny_models, tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "common.cli",
            "train",
            "--method",
            "danceopd",
            "--backend",
            "http",
            "--models",
            str(tiny_models),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "--router-url" in p.stderr


def test_last_state_of_a_step_is_sent_without_waiting_for_a_full_chunk(cluster):
    """DanceOPD's one state (or a short last chunk) leaves at submit, not at collect."""
    from student.remote import HttpTeacherClient

    x, t = torch.randn(128, 2), torch.full((128,), 0.5)
    with HttpTeacherClient(cluster.router_url, ["a", "b"], stream_chunk=12) as client:
        client.submit(x, t)
        assert len(client._inflight) == 0  # buffered: 1 of a 12-state chunk
        client.submit(x, t, last=True)
        assert len(client._inflight) == 1  # sent before anyone collects
        [(answers, cost)] = list(client.collect_parts())
    assert [a.v.shape for a in answers] == [(128, 2), (128, 2)] and cost.requests == 1


def test_in_client_routing_answers_teacher_by_teacher_and_retries_only_the_rest(tiny_models):
    """Routed in the client, answers come in groups naming their rows; when teacher
    ``a`` is down (SIGKILL, back on its port a second later), ``b``'s rows still come at once,
    the retries ask for ``a``'s rows only, and every state is answered exactly once, with the
    answers of a healthy cluster."""
    from student.clients import in_submit_order
    from student.remote import HttpTeacherClient

    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(256, 2, generator=gen) * 2.0, torch.full((256,), 0.4)
    with (
        start_cluster(tiny_models) as c,
        HttpTeacherClient(
            c.router_url, ["a", "b"], routing="client", retries=10, backoff_s=0.2, timeout_s=3.0
        ) as client,
    ):
        client.submit(x, t, last=True)
        healthy = list(client.collect_parts())  # teacher by teacher, or both if both are in
        assert all(len(g) == 1 and g[0].rows is not None for g, _ in healthy)
        assert sum(cost.requests for _, cost in healthy) == 1
        want = in_submit_order([g[0] for g, _ in healthy])

        url = c.services["a"].url
        c.services["a"].kill()
        restart = threading.Timer(
            1.0,
            lambda: c.services.__setitem__(
                "a",
                start_service(
                    teacher_cmd(checkpoint_path(tiny_models, "a"), port=int(url.rsplit(":", 1)[1]))
                ),
            ),
        )
        restart.start()
        client.submit(x, t, last=True)
        groups = list(client.collect_parts())
        restart.join()
    # b's rows from the first attempt, a's from a retry that asked for a's rows only
    assert [set(g[0].teacher.tolist()) for g, _ in groups] == [{1}, {0}]
    got = in_submit_order([a for g, _ in groups for a in g])  # raises unless rows cover once
    assert torch.equal(got.teacher, want.teacher)
    assert float((got.v - want.v).abs().max()) <= 1e-6
    assert sum(cost.states for _, cost in groups) == 256


def test_update_groups_request_gives_one_group_per_request_in_submit_order(cluster):
    """``update_groups="request"``: whatever the timing, one group per request, its batches in
    submit order, with the answers that ``ready`` groups give."""
    from student.clients import in_submit_order
    from student.remote import HttpTeacherClient

    gen = torch.Generator().manual_seed(8)
    batches = [(torch.randn(64, 2, generator=gen) * 2.0, torch.full((64,), s)) for s in (0.9, 0.5)]
    got = {}
    for groups in ("request", "ready"):
        with HttpTeacherClient(
            cluster.router_url, ["a", "b"], routing="client", update_groups=groups
        ) as client:
            for x, t in batches:
                client.submit(x, t)  # stream_chunk 1: one request each
            time.sleep(0.5)  # every answer is in before collecting: "ready" takes them at once
            got[groups] = list(client.collect_parts())
    assert [[a.rows for a in g] for g, _ in got["request"]] == [[None], [None]]
    assert len(got["ready"]) == 1  # everything was in: one group
    ready = in_submit_order(got["ready"][0][0])
    request = in_submit_order([a for g, _ in got["request"] for a in g])
    assert torch.equal(ready.teacher, request.teacher)
    assert torch.equal(ready.v, request.v)


@pytest.mark.parametrize("routing", ["router", "client"])
def test_client_start_errors_name_the_router_and_leave_no_thread(cluster, routing):
    """A registry that does not fit the run, or a router that cannot be read, is a clear error
    at start, after the retries, and the client's HTTP thread is gone."""
    from student.remote import HttpTeacherClient

    def http_threads() -> int:
        return sum(t.name == "opd-http" and t.is_alive() for t in threading.enumerate())

    before = http_threads()
    with pytest.raises(ValueError, match="serves teachers"):
        HttpTeacherClient(cluster.router_url, ["b", "a"], routing=routing)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises((ValueError, TeacherUnavailable), match=r"after 2 attempt"):
        HttpTeacherClient(dead, ["a", "b"], routing=routing, retries=1, backoff_s=0.05)
    assert http_threads() == before


def test_checkpoint_swapped_on_a_teacher_mid_run_is_recorded(tiny_models, tmp_path):
    """Teacher a's server loads another checkpoint while a run trains through the router: the
    run completes, steps.jsonl names the digest that answered each step, the trainer says when
    a new checkpoint started answering, and the report lists both."""
    from tests.services.router_helpers import admin, start_router, start_teachers

    teachers = start_teachers(tiny_models)
    router = start_router(
        "--teacher",
        f"a={teachers['a'].url}",
        "--teacher",
        f"b={teachers['b'].url}",
        "--anchor",
        f"base={teachers['base'].url}",
    )
    try:
        out = tmp_path / "run"
        proc = train_proc(tiny_models, out, router.url, 40, "--checkpoint-every", "0")
        wait_for_lines(out / "steps.jsonl", 8, proc)
        r = httpx.post(
            f"{teachers['a'].url}/v2/repository/models/a/load",
            headers=admin(),
            json={"parameters": {"checkpoint": "base.safetensors"}},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output
        lines = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
        first, new = lines[0]["digests"]["a"], r.json()["digest"]
        assert first != new and lines[-1]["digests"]["a"] == new
        switch = next(x["step"] for x in lines if x["digests"]["a"] == new)
        assert all(x["digests"]["a"] == first for x in lines[:switch])
        assert f"step {switch}: teacher 'a' answered from checkpoint {new}" in output
        report = json.loads((out / "report.json").read_text())
        ref = next(t for t in report["teacher_refs"] if t["name"] == "a")
        assert ref["digest"] == ",".join(sorted([first, new]))
    finally:
        router.stop()
        for svc in teachers.values():
            svc.stop()
