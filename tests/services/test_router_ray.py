"""The Ray Serve router (real local Ray) answers like the in-process client, i.e. like the
uvicorn router: same assignments, same targets and anchor within 1e-6."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import read_model
from student.clients import LocalTeacherClient, TeacherInfo
from tests.services.router_helpers import call_router, client, states

ray = pytest.importorskip("ray")


@pytest.mark.slow
@pytest.mark.ray
def test_ray_router_answers_like_in_process(tiny_models: Path) -> None:
    from ray import serve

    from services.router.ray_deployment import app_builder
    from services.teacher.ray_command import free_port

    local = {}
    for n, f in [("a", "teacher-a"), ("b", "teacher-b"), ("base", "base")]:
        net, meta = read_model(tiny_models / f"{f}.safetensors")
        local[n] = (net, TeacherInfo.from_meta(meta, name=n))
    x, t = states(1536, seed=11)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {
            "policy": "nearest",
            "teachers": {
                "a": {"checkpoint": str(tiny_models / "teacher-a.safetensors")},
                "b": {"checkpoint": str(tiny_models / "teacher-b.safetensors")},
            },
            "anchors": {"base": {"checkpoint": str(tiny_models / "base.safetensors")}},
        }
        serve.run(app_builder(args), name="router", route_prefix="/router")
        url = f"http://127.0.0.1:{port}/router"
        with client(timeout=60) as c:
            assert c.get(f"{url}/v2/health/ready").status_code == 200
            for policy in ("nearest", "average"):
                reference = LocalTeacherClient(
                    [local["a"], local["b"]], policy=policy, anchor=local["base"]
                )
                reference.submit(torch.from_numpy(x), torch.from_numpy(t))
                [want], _ = reference.collect()
                out, params = call_router(
                    c,
                    url,
                    x,
                    t,
                    outputs=["v", "teacher", "v_anchor"],
                    parameters={"policy": policy},
                )
                np.testing.assert_array_equal(out["teacher"], want.teacher.numpy())
                np.testing.assert_allclose(out["v"], want.v.numpy(), atol=1e-6, rtol=0)
                np.testing.assert_allclose(
                    out["v_anchor"], want.v_anchor.numpy(), atol=1e-6, rtol=0
                )
                assert params["teachers"] == "a,b" and params["a.version"] == "1"
            reg = c.get(f"{url}/v1/teachers").json()
            assert [t["name"] for t in reg["teachers"]] == ["a", "b"]
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
