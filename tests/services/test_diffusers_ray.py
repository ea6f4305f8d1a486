"""A diffusers teacher (base + LoRA adapter) as a Ray Serve application on a real local Ray
instance: the same answers, conditioning cache and guidance as the uvicorn process."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.procs import start_service
from tests.services.diffusers_helpers import (
    load_sd3,
    make_lora,
    make_sd3,
    merged,
    sd3_inputs,
    sd3_reference,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_diffusers_teacher_on_ray_serve(tmp_path: Path) -> None:
    make_sd3(tmp_path / "base", seed=0)
    make_lora(tmp_path / "base", tmp_path / "lora-a", seed=1)
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {
                "name": "sd3",
                "route_prefix": "/sd3",
                "import_path": "services.teacher.ray_deployment:app_builder",
                "args": {
                    "model_dir": str(tmp_path / "base"),
                    "name": "base",
                    "adapters": {"teacher-a": str(tmp_path / "lora-a")},
                    "threads": 1,
                },
                "deployments": [{"name": "base", "ray_actor_options": {"num_cpus": 0.5}}],
            }
        ],
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    svc = start_service(
        [sys.executable, "-m", "common.cli", "serve", "ray", "--config", str(path)]
        + ["--port", "0", "--num-cpus", "2"],
        timeout_s=240,
        cwd=str(REPO),
        env={"HF_HUB_OFFLINE": "1"},
    )
    try:
        base = f"{svc.url}/sd3"
        inputs = sd3_inputs(3, seed=2, text_rows=1)
        states = {"x": inputs["x"], "t": inputs["t"]}
        refs = {
            "base": sd3_reference(load_sd3(tmp_path / "base"), inputs),
            "teacher-a": sd3_reference(merged(tmp_path / "base", tmp_path / "lora-a"), inputs),
        }
        with httpx.Client(timeout=120) as client:
            meta = client.get(f"{base}/v2/models/teacher-a").json()
            assert meta["parameters"]["backend"] == "diffusers"
            assert [i["name"] for i in meta["inputs"]][:2] == ["x", "t"]
            for model, ref in refs.items():
                body, headers = encode_request(inputs, parameters={"cond_id": f"p-{model}"})
                r = client.post(f"{base}/v2/models/{model}/infer", content=body, headers=headers)
                assert r.status_code == 200, r.text
                v = decode_response(r.content, r.headers.get(HEADER_LENGTH)).tensors["v"]
                assert np.abs(v - ref).max() <= 1e-4, model
                # states only: the replica's conditioning cache answers
                body, headers = encode_request(states, parameters={"cond_id": f"p-{model}"})
                r = client.post(f"{base}/v2/models/{model}/infer", content=body, headers=headers)
                assert r.status_code == 200, r.text
                v2 = decode_response(r.content, r.headers.get(HEADER_LENGTH)).tensors["v"]
                assert np.abs(v2 - v).max() <= 1e-6
            body, headers = encode_request(states, parameters={"cond_id": "never"})
            r = client.post(f"{base}/v2/models/base/infer", content=body, headers=headers)
            assert r.status_code == 422 and "resend the conditioning" in r.json()["error"]
    finally:
        assert svc.stop(grace_s=60) == 0, svc.output()
