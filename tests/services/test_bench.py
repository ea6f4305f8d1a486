"""``opd bench serve`` / ``opd bench cost`` and the synthetic teacher: short, bounded runs.

No timing assertions: the sweeps must finish within their bounds, write files that parse, and
count the same states as the servers' own Prometheus counters.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.procs import start_service
from services.bench.command import BenchServeSettings, run_bench_serve
from services.bench.prom import states_counter
from services.bench.sweep import InputSpec, make_inputs
from services.cluster import PYTHON, router_cmd
from services.teacher.synthetic import synthetic_model, synthetic_net

DIM, WIDTH = 256, 16


@pytest.fixture(scope="module")
def synthetic_teacher():
    svc = start_service(
        [
            *PYTHON,
            "serve",
            "teacher",
            "--synthetic",
            "--state-dim",
            str(DIM),
            "--width",
            str(WIDTH),
            "--seed",
            "3",
            "--name",
            "syn",
            "--port",
            "0",
            "--threads",
            "1",
        ]
    )
    yield svc
    svc.stop()


def quick(url: str, model: str, out: Path, **kw) -> BenchServeSettings:
    """A sweep bounded to a few seconds a point."""
    base = dict(
        url=url,
        model=model,
        concurrency="1,3",
        states="4,32",
        window_s=0.2,
        max_windows=4,
        max_seconds=60,
        out=out,
    )
    return BenchServeSettings(**{**base, **kw})


def check_files(out: Path, points: int) -> dict:
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    doc = json.loads((out / "sweep.json").read_text())
    assert len(rows) == len(doc["points"]) == points
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for p in doc["points"]:
        assert p["errors"] == 0, p["error_sample"]
        assert p["requests_total"] > 0 and p["states_s"] > 0 and p["latency_p50_ms"] > 0
    return doc


def agrees_with_server(doc: dict) -> None:
    """States the tool counted == the server's counter delta over the same point (within 1%)."""
    for p in doc["points"]:
        assert p["server_states"] is not None
        assert abs(p["server_states"] - p["states_total"]) <= 0.01 * p["states_total"], p


def test_synthetic_teacher_answers_like_its_net(synthetic_teacher):
    url = synthetic_teacher.url
    meta = httpx.get(f"{url}/v2/models/syn").json()
    params = meta["parameters"]
    assert params["synthetic"] and params["data_dim"] == DIM and params["width"] == WIDTH
    assert meta["inputs"][0]["shape"] == [-1, DIM]
    _, m = synthetic_model("syn", DIM, WIDTH, seed=3)
    assert params["digest"] == m.digest  # same seed, same weights, in any process
    x = np.random.default_rng(0).normal(size=(5, DIM)).astype(np.float32)
    t = np.linspace(0, 1, 5, dtype=np.float32)
    body, headers = encode_request({"x": x, "t": t})
    r = httpx.post(f"{url}/v2/models/syn/infer", content=body, headers=headers)
    v = decode_response(r.content, r.headers.get(HEADER_LENGTH)).tensors["v"]
    net = synthetic_net(m.arch, seed=3)
    with torch.inference_mode():
        np.testing.assert_allclose(
            v, net(torch.from_numpy(x), torch.from_numpy(t)).numpy(), rtol=1e-5, atol=1e-6
        )


def test_sweep_against_teacher_writes_files_and_matches_prometheus(synthetic_teacher, tmp_path):
    s = quick(synthetic_teacher.url, "syn", tmp_path, encoding="binary,json")
    assert run_bench_serve(s) == 0
    doc = check_files(tmp_path, points=2 * 2 * 2)
    agrees_with_server(doc)
    p = doc["points"][0]
    assert p["server_compute_ms"] is not None and p["server_batch_states"] >= 4
    lim = doc["limits"]
    assert set(lim["echo_mb_s"]) == {"4", "32"} and set(lim["forward_states_s"]) == {"4", "32"}
    assert lim["best_binary"]["fraction_of_echo"] > 0


def test_sweep_against_router(synthetic_teacher, tmp_path):
    router = start_service(router_cmd({"a": synthetic_teacher.url}, {}, policy="average"))
    try:
        s = quick(router.url, "opd-router", tmp_path, states="8", limits=False, state_dim=DIM)
        assert run_bench_serve(s) == 0
        agrees_with_server(check_files(tmp_path, points=2))
    finally:
        router.stop()


def test_sweep_bounded_by_total_time(synthetic_teacher, tmp_path):
    s = quick(
        synthetic_teacher.url,
        "syn",
        tmp_path,
        concurrency="1,2,4,8",
        states="4",
        max_seconds=0.5,
        limits=False,
        metrics_url="none",
    )
    assert run_bench_serve(s) == 0
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert 1 <= len(doc["points"]) < 4  # later points skipped once the bound was reached
    assert doc["points"][0]["server_states"] is None


def test_states_counter_parses_teacher_and_router_pages():
    teacher = (
        '# TYPE opd_teacher_states counter\nopd_teacher_states_total{model="a"} 12.0\n'
        'opd_teacher_states_total{model="b"} 5.0\n'
    )
    assert states_counter(teacher, "a") == 12.0
    assert (
        states_counter(
            "# TYPE opd_router_states counter\nopd_router_states_total 7.0\n", "opd-router"
        )
        == 7.0
    )
    assert states_counter("# TYPE other counter\nother_total 1.0\n", "a") is None
    fresh = "# HELP opd_teacher_states states answered\n# TYPE opd_teacher_states counter\n"
    assert states_counter(fresh, "a") == 0.0  # declared, never incremented


def test_make_inputs_fills_free_dims():
    specs = [
        InputSpec("x", "FP32", (-1, -1)),
        InputSpec("t", "FP32", (-1,)),
        InputSpec("k", "INT32", (-1, 3)),
    ]
    got = make_inputs(specs, 6, 10)
    assert got["x"].shape == (6, 10) and got["t"].shape == (6,) and got["k"].shape == (6, 3)
    assert got["x"].dtype == np.float32 and got["k"].dtype == np.int32


def test_bench_cost_synthetic_writes_table_and_figure(tmp_path):
    out = tmp_path / "cost"
    cmd = [
        *PYTHON,
        "bench",
        "cost",
        "--methods",
        "diffusionopd,flowopd",
        "--steps",
        "2",
        "--state-dim",
        "64",
        "--teacher-width",
        "8",
        "--batch",
        "4",
        "--rollout-steps",
        "4",
        "--out",
        str(out),
    ]
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| diffusionopd |" in proc.stdout and "| flowopd |" in proc.stdout
    rows = json.loads((out / "cost.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["diffusionopd", "flowopd"]
    for r in rows:
        assert r["rollout_ms"] > 0 and r["update_ms"] > 0 and r["states_per_step"] == 4 * 4
    assert (out / "cost.png").read_bytes()[:4] == b"\x89PNG"


def test_teacher_needs_checkpoint_or_synthetic():
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "serve", "teacher", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--synthetic" in proc.stderr
    # a model-level check: no made-up flag, no pydantic prefix, no dump of the settings
    assert proc.stderr.startswith("opd serve teacher: error: give either --checkpoint")
    assert "--settings" not in proc.stderr and "Value error" not in proc.stderr


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--states", "abc"], "--states: must be whole numbers >= 1, comma-separated"),
        (["--concurrency", "1,0"], "--concurrency: must be whole numbers >= 1"),
        (["--url", "notaurl"], "--url: must be an http:// or https:// base URL"),
    ],
)
def test_bench_serve_bad_flag_is_one_line(opd_cli, flags, says):
    # a flag given twice: the last one counts, so `flags` may replace the valid --url
    code, _, err = opd_cli("bench", "serve", "--url", "http://127.0.0.1:9", "--model", "m", *flags)
    assert code == 2 and err.startswith(f"opd bench serve: error: {says}"), err
    assert len(err.splitlines()) == 1 and "int()" not in err


@pytest.mark.parametrize("frequencies", [8, 0])
def test_wide_velocity_net_equals_velocity_net(frequencies):
    """The synthetic teacher's split first layer computes VelocityNet's function."""
    from common.nets import NetConfig, VelocityNet

    config = NetConfig(data_dim=300, width=16, depth=2, frequencies=frequencies)
    wide = synthetic_net(config, seed=5)
    plain = VelocityNet(config)
    plain.load_state_dict(wide.state_dict())
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(7, 300, generator=gen), torch.rand(7, generator=gen)
    with torch.inference_mode():
        assert torch.allclose(wide(x, t), plain(x, t), atol=1e-6, rtol=0)


def test_sweep_against_a_dead_backend_stops_and_fails(tmp_path):
    """The router stays up but its only teacher is gone: every infer is a 503. The sweep keeps
    the point it measured, skips the rest and exits 1 instead of reporting success."""
    teacher = start_service(
        [*PYTHON, "serve", "teacher", "--synthetic", "--state-dim", "8", "--width", "8"]
        + ["--name", "gone", "--port", "0", "--threads", "1"]
    )
    router = start_service(router_cmd({"a": teacher.url}, {}, policy="average"))
    try:
        teacher.kill()
        s = quick(router.url, "opd-router", tmp_path, limits=False, state_dim=8, max_requests=200)
        assert run_bench_serve(s) == 1
        doc = json.loads((tmp_path / "sweep.json").read_text())
        assert len(doc["points"]) == 1 and doc["points"][0]["requests_total"] == 0
        assert "remaining points skipped" in doc["failed"] and "503" in doc["failed"]
    finally:
        router.stop()
        teacher.stop()


def test_bench_cost_unreachable_router_is_one_line(opd_cli, tiny_models, tmp_path):
    code, _, err = opd_cli(
        "bench", "cost", "--router-url", "http://127.0.0.1:1", "--methods", "danceopd",
        "--steps", "2", "--models", tiny_models, "--out", tmp_path / "cost",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert err.startswith("opd bench cost: router http://127.0.0.1:1 is unreachable"), err


def test_bench_cost_missing_checkpoint_is_a_usage_error(opd_cli, tmp_path):
    code, _, err = opd_cli(
        "bench", "cost", "--router-url", "http://127.0.0.1:1", "--methods", "danceopd",
        "--steps", "2", "--models", tmp_path / "none", "--out", tmp_path / "cost",
    )  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert err.startswith("opd bench cost: error: no checkpoint for teacher 'base'"), err
