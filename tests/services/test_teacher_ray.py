"""deploy/serve_config.yaml on a real local Ray instance, started by ``opd serve ray``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

from common.checkpoint import read_model
from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.procs import start_service

REPO = Path(__file__).resolve().parents[2]
TOKEN = "ray-admin-token"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_serve_config_on_local_ray_answers_v2_and_swaps(tiny_models: Path, tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "deploy/serve_config.yaml").read_text())

    def use_test_models(args: dict) -> None:  # same config, the test's checkpoints
        if "checkpoint" in args:
            args.update(
                checkpoint=str(tiny_models / Path(args["checkpoint"]).name),
                model_root=str(tiny_models),
            )
        for value in args.values():
            if isinstance(value, dict):
                use_test_models(value)

    for app in doc["applications"]:  # the router app nests its teachers' args
        use_test_models(app["args"])
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(doc))
    svc = start_service(
        [
            sys.executable,
            "-m",
            "common.cli",
            "serve",
            "ray",
            "--config",
            str(config),
            "--port",
            "0",
            "--num-cpus",
            "2",
        ],
        timeout_s=240,
        cwd=str(REPO),
        env={"OPD_ADMIN_TOKEN": TOKEN},
    )
    try:
        rng = np.random.default_rng(3)
        x = (rng.normal(size=(500, 2)) * 3).astype(np.float32)
        t = rng.uniform(size=500).astype(np.float32)
        expected = {}
        with httpx.Client(timeout=60) as client:
            for app in doc["applications"]:
                if "checkpoint" not in app["args"]:
                    continue  # the router application: tests/services/test_router_ray.py
                model, prefix = app["deployments"][0]["name"], app["route_prefix"]
                net, meta = read_model(tiny_models / Path(app["args"]["checkpoint"]).name)
                with torch.no_grad():
                    expected[model] = net(torch.from_numpy(x), torch.from_numpy(t)).numpy()
                base = f"{svc.url}{prefix}"
                assert client.get(f"{base}/v2/health/ready").status_code == 200
                params = client.get(f"{base}/v2/models/{model}").json()["parameters"]
                assert params["digest"] == meta.digest and params["modes"] == meta.modes
                for binary in (True, False):
                    body, headers = encode_request({"x": x, "t": t}, binary=binary, outputs=["v"])
                    r = client.post(
                        f"{base}/v2/models/{model}/infer", content=body, headers=headers
                    )
                    assert r.status_code == 200, r.text
                    msg = decode_response(r.content, r.headers.get(HEADER_LENGTH))
                    assert np.abs(msg.tensors["v"] - expected[model]).max() <= 1e-6
                    assert msg.parameters["batch_size"] >= 500
                bad = client.post(f"{base}/v2/models/{model}/infer", content=b"{nope")
                assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
            # hot swap on Ray: teacher-a's application now serves teacher b's weights
            base = f"{svc.url}/teacher-a"
            r = client.post(
                f"{base}/v2/repository/models/teacher-a/load",
                headers={"Authorization": f"Bearer {TOKEN}"},
                json={"parameters": {"checkpoint": "teacher-b.safetensors"}},
            )
            assert r.status_code == 200 and r.json()["version"] == "2", r.text
            body, headers = encode_request({"x": x, "t": t})
            r = client.post(f"{base}/v2/models/teacher-a/infer", content=body, headers=headers)
            msg = decode_response(r.content, r.headers.get(HEADER_LENGTH))
            assert msg.model_version == "2"
            assert np.abs(msg.tensors["v"] - expected["teacher-b"]).max() <= 1e-6
            # every replica: teacher-b's user_config names teacher a's checkpoint, applied by a
            # second `opd serve ray --apply` onto the running cluster
            address = re.search(r"OPD_RAY_ADDRESS=(\S+)", svc.output())
            assert address, svc.output()
            app = next(a for a in doc["applications"] if a["name"] == "teacher-b")
            app["deployments"][0]["user_config"] = {"checkpoint": "teacher-a.safetensors"}
            changed = tmp_path / "changed.yaml"
            changed.write_text(yaml.safe_dump({**doc, "applications": [app]}))
            applied = subprocess.run(
                [sys.executable, "-m", "common.cli", "serve", "ray", "--config", str(changed)]
                + ["--address", address.group(1), "--apply"],
                cwd=str(REPO),
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert applied.returncode == 0, applied.stdout + applied.stderr
            digest = read_model(tiny_models / "teacher-a.safetensors")[1].digest
            for _ in range(4):
                params = client.get(f"{svc.url}/teacher-b/v2/models/teacher-b").json()
                assert params["parameters"]["digest"] == digest
            body, headers = encode_request({"x": x, "t": t})
            r = client.post(
                f"{svc.url}/teacher-b/v2/models/teacher-b/infer", content=body, headers=headers
            )
            msg = decode_response(r.content, r.headers.get(HEADER_LENGTH))
            assert np.abs(msg.tensors["v"] - expected["teacher-a"]).max() <= 1e-6
    finally:
        assert svc.stop(grace_s=60) == 0, svc.output()
