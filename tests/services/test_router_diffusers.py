"""The router in front of a real diffusers teacher process: two LoRA specialists on one tiny SD3
base (random weights, built here), label routing by task, conditioning per row, cond_id and
guidance through the router, and a toy teacher refused for its other time convention.

Each routed row must equal what its own teacher answers for it directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.procs import Service, start_service
from tests.services.diffusers_helpers import make_lora, make_sd3, sd3_inputs
from tests.services.router_helpers import REPO, TOKEN, admin, client, start_router, start_teacher

COND = ("encoder_hidden_states", "pooled_projections")
TOL = 1e-5  # one teacher's answer to the same rows, batched differently


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory) -> Service:
    """One process: SD3 base ``base`` and LoRA specialists ``teacher-a``, ``teacher-b``."""
    root = tmp_path_factory.mktemp("router-diffusers")
    make_sd3(root / "base", seed=0)
    for i, name in enumerate("ab"):
        make_lora(root / "base", root / f"lora-{name}", seed=i + 1)
    cmd = [sys.executable, "-m", "common.cli", "serve", "teacher", "--port", "0"]
    cmd += ["--model-dir", str(root / "base"), "--name", "base", "--threads", "1"]
    cmd += [
        "--adapter",
        f"teacher-a={root / 'lora-a'}",
        "--adapter",
        f"teacher-b={root / 'lora-b'}",
    ]
    svc = start_service(
        cmd, env={"OPD_ADMIN_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}, cwd=str(REPO), timeout_s=180
    )
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def router(lora_server: Service) -> Service:
    url = lora_server.url
    svc = start_router(
        "--teacher",
        f"a={url}#teacher-a",
        "--teacher",
        f"b={url}#teacher-b",
        "--anchor",
        f"base={url}#base",
        "--policy",
        "label",
    )
    yield svc
    assert svc.stop() == 0, svc.output()


def post(c: httpx.Client, url: str, inputs: dict, params: dict | None = None, outputs=None):
    body, headers = encode_request(inputs, outputs=outputs, binary=True, parameters=params)
    return c.post(url, content=body, headers=headers)


def answer(r: httpx.Response) -> tuple[dict[str, np.ndarray], dict]:
    assert r.status_code == 200, r.text
    msg = decode_response(r.content, r.headers.get(HEADER_LENGTH))
    return msg.tensors, msg.parameters


def direct(c: httpx.Client, server: Service, model: str, inputs: dict, params=None) -> np.ndarray:
    """``model``'s own answer, asked directly (no router)."""
    return answer(post(c, f"{server.url}/v2/models/{model}/infer", inputs, params))[0]["v"]


def test_label_routing_over_lora_specialists_equals_each_teacher(
    router: Service, lora_server: Service
) -> None:
    inputs = sd3_inputs(6, seed=11)
    route = np.array([0, 1, 1, 0, 1, 0], np.int32)
    infer = f"{router.url}/v2/models/opd-router/infer"
    with client(timeout=60) as c:
        out, params = answer(
            post(
                c,
                infer,
                {**inputs, "route": route},
                {"guidance_scale": 2.0},
                ["v", "teacher", "v_anchor"],
            )
        )
        assert out["v"].shape == (6, 4, 8, 8) and (out["teacher"] == route).all()
        for k, model in enumerate(("teacher-a", "teacher-b")):
            rows = np.flatnonzero(route == k)
            mine = {name: arr[rows] for name, arr in inputs.items()}
            want = direct(c, lora_server, model, mine, {"guidance_scale": 2.0})
            assert np.abs(out["v"][rows] - want).max() <= TOL
        base = direct(c, lora_server, "base", inputs, {"guidance_scale": 2.0})
        assert np.abs(out["v_anchor"] - base).max() <= TOL
        assert params["a.rows"] == 3 and params["b.rows"] == 3
        # the specialists differ: routing matters
        a_all = direct(c, lora_server, "teacher-a", inputs)
        b_all = direct(c, lora_server, "teacher-b", inputs)
        assert np.abs(a_all - b_all).max() > 1e-3


def test_cond_id_through_the_router_and_an_unknown_one(router: Service) -> None:
    inputs = sd3_inputs(4, seed=12, text_rows=1)  # one prompt for the batch, broadcast
    states = {"x": inputs["x"], "t": inputs["t"]}
    route = np.array([1, 0, 0, 1], np.int32)
    infer = f"{router.url}/v2/models/opd-router/infer"
    with client(timeout=60) as c:
        sent, _ = answer(post(c, infer, {**inputs, "route": route}, {"cond_id": "p-12"}))
        by_id, _ = answer(post(c, infer, {**states, "route": route}, {"cond_id": "p-12"}))
        assert np.abs(by_id["v"] - sent["v"]).max() <= TOL
        r = post(c, infer, {**states, "route": route}, {"cond_id": "never-sent"})
        assert r.status_code == 422 and "resend" in r.json()["error"], r.text
        # a conditioning input the model does not take: the router's 422, naming it
        extra = {**inputs, "route": route, "text_ids": np.zeros((4, 3), np.float32)}
        r = post(c, infer, extra)
        assert r.status_code == 422 and "'text_ids'" in r.json()["error"], r.text
        assert c.get(f"{router.url}/v2/health/ready").status_code == 200
        reg = c.get(f"{router.url}/v1/teachers").json()
        assert all(rep["live"] for t in reg["teachers"] for rep in t["replicas"])
        assert reg["teachers"][0]["time_convention"].startswith("diffusers-flowmatch:")


def test_a_toy_teacher_is_refused_for_its_time_convention(
    router: Service, tiny_models: Path
) -> None:
    toy = start_teacher(tiny_models / "teacher-a.safetensors", "toy")
    try:
        with client() as c:
            r = c.put(
                f"{router.url}/v1/teachers/toy", headers=admin(), json={"endpoints": [toy.url]}
            )
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert "'toy'" in error and "'flow-t'" in error and "diffusers-flowmatch:" in error
    finally:
        toy.stop()
