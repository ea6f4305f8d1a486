"""The teacher service as real uvicorn subprocesses on loopback (no mocks of the service)."""

from __future__ import annotations

import json
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from common.checkpoint import read_model
from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.procs import Service, start_service
from services.cluster import teacher_cmd

TOKEN = "test-admin-token"
REPO = Path(__file__).resolve().parents[2]


def start_teacher(checkpoint: Path, *flags: str, token: str | None = None) -> Service:
    env = {"OPD_ADMIN_TOKEN": token or "", "OPD_TEACHER_THREADS": "1"}
    cmd = teacher_cmd(checkpoint, extra=flags)
    return start_service(cmd, env=env, cwd=str(REPO))


def reference(checkpoint: Path, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The in-process forward of the same checkpoint."""
    net, _ = read_model(checkpoint)
    with torch.no_grad():
        return net(torch.from_numpy(x), torch.from_numpy(t)).numpy()


def states(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 2)) * 3).astype(np.float32), rng.uniform(size=n).astype(np.float32)


def infer_binary(
    client: httpx.Client, url: str, x: np.ndarray, t: np.ndarray, model: str = "teacher-a"
) -> tuple[np.ndarray, dict]:
    body, headers = encode_request({"x": x, "t": t}, binary=True)
    r = client.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    msg = decode_response(r.content, r.headers.get(HEADER_LENGTH))
    return msg.tensors["v"], msg.parameters


@pytest.fixture(scope="module")
def teacher(tiny_models: Path):
    """Teacher a, no admin token, a small body limit, a delay that lets batches form."""
    svc = start_teacher(
        tiny_models / "teacher-a.safetensors", "--max-body-mb", "1", "--max-delay-ms", "5"
    )
    yield svc
    assert svc.stop() == 0, svc.output()


def test_tritonclient_binary_and_json_match_in_process(teacher: Service, tiny_models: Path) -> None:
    client = triton.InferenceServerClient(teacher.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("teacher-a")
    x, t = states(300)
    ref = reference(tiny_models / "teacher-a.safetensors", x, t)
    for binary in (True, False):
        xi = triton.InferInput("x", list(x.shape), "FP32")
        xi.set_data_from_numpy(x, binary_data=binary)
        ti = triton.InferInput("t", list(t.shape), "FP32")
        ti.set_data_from_numpy(t, binary_data=binary)
        result = client.infer(
            "teacher-a", [xi, ti], outputs=[triton.InferRequestedOutput("v", binary_data=binary)]
        )
        v = result.as_numpy("v")
        assert v.shape == (300, 2) and v.dtype == np.float32
        assert np.abs(v - ref).max() <= 1e-6
        params = result.get_response()["parameters"]
        assert params["batch_size"] >= 300 and params["version"] == "1"
        assert params["queue_ms"] >= 0 and params["compute_ms"] > 0
    client.close()


def test_metadata_carries_version_digest_and_modes(teacher: Service, tiny_models: Path) -> None:
    _, meta = read_model(tiny_models / "teacher-a.safetensors")
    r = httpx.get(f"{teacher.url}/v2/models/teacher-a")
    assert r.status_code == 200
    p = r.json()["parameters"]
    assert p["version"] == "1" and p["digest"] == meta.digest
    assert p["modes"] == meta.modes and np.allclose(p["mode_centers"], meta.mode_centers)
    assert httpx.get(f"{teacher.url}/v2").json()["extensions"] == [
        "binary_tensor_data",
        "model_repository",
    ]
    index = httpx.post(f"{teacher.url}/v2/repository/index").json()
    assert index == [{"name": "teacher-a", "version": "1", "state": "READY", "reason": ""}]


def batch_requests_histogram(url: str) -> tuple[float, float]:
    """(forwards with exactly one request, all forwards) from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    one = float(re.search(r'opd_teacher_batch_requests_bucket\{le="1.0".*\} (\S+)', text).group(1))
    count = float(re.search(r"opd_teacher_batch_requests_count\{.*\} (\S+)", text).group(1))
    return one, count


def test_sixteen_concurrent_clients_are_batched(teacher: Service, tiny_models: Path) -> None:
    ck = tiny_models / "teacher-a.safetensors"
    one_before, count_before = batch_requests_histogram(teacher.url)

    def client_run(seed: int) -> int:
        with httpx.Client() as client:
            for i in range(10):
                x, t = states(64 + seed, seed * 100 + i)
                v, params = infer_binary(client, teacher.url, x, t)
                assert np.abs(v - reference(ck, x, t)).max() <= 1e-6
                assert params["batch_size"] >= len(x)
        return 10

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(client_run, range(16))) == 160
    one, count = batch_requests_histogram(teacher.url)
    assert count - count_before < 160, "some forwards should hold more than one request"
    assert (count - count_before) - (one - one_before) > 0


def _json_doc(x: list, t: list, xshape: list, tshape: list, dtype: str = "FP32") -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": dtype, "shape": xshape, "data": x},
                {"name": "t", "datatype": dtype, "shape": tshape, "data": t},
            ]
        }
    ).encode()


def _binary_with_shape(shape: list) -> tuple[bytes, dict]:
    x, t = states(4)
    body, headers = encode_request({"x": x, "t": t}, binary=True)
    n = int(headers[HEADER_LENGTH])
    head = json.loads(body[:n])
    head["inputs"][0]["shape"] = shape
    new_head = json.dumps(head).encode()
    return new_head + body[n:], {**headers, HEADER_LENGTH: str(len(new_head))}


BAD = {
    "malformed json": (b"{not json", {}, 400, "not valid JSON"),
    "bad header length": (
        _json_doc([0, 0], [0.5], [1, 2], [1]),
        {HEADER_LENGTH: "abc"},
        400,
        HEADER_LENGTH,
    ),
    "missing input": (
        json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 0]}]}
        ).encode(),
        {},
        400,
        "missing input 't'",
    ),
    "wrong datatype": (_json_doc([0, 0], [0.5], [1, 2], [1], "FP64"), {}, 400, "must be FP32"),
    "length vs shape": (_json_doc([0, 0, 1], [0.5], [1, 2], [1]), {}, 400, "3 values for shape"),
    "batch mismatch": (
        _json_doc([0, 0, 1, 1], [0.5], [2, 2], [1]),
        {},
        400,
        "x has 2 rows but t has 1",
    ),
    "state dimension": (_json_doc([0, 0, 1], [0.5], [1, 3], [1]), {}, 400, "shape [B, 2]"),
    "nan": (_json_doc([0, float("nan")], [0.5], [1, 2], [1]), {}, 400, "NaN or Inf"),
    "inf binary": (None, {}, 400, "NaN or Inf"),
    "huge declared shape": (None, {}, 400, "binary_data_size"),
    "unknown input": (
        json.dumps(
            {"inputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": [0]}]}
        ).encode(),
        {},
        400,
        "unknown input",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_service_keeps_serving(teacher: Service, case: str) -> None:
    body, headers, status, message = BAD[case]
    if case == "inf binary":
        x, t = states(4)
        x[1, 0] = np.inf
        body, headers = encode_request({"x": x, "t": t}, binary=True)
    elif case == "huge declared shape":
        body, headers = _binary_with_shape([10**12, 2])
    with httpx.Client() as client:
        r = client.post(f"{teacher.url}/v2/models/teacher-a/infer", content=body, headers=headers)
        assert r.status_code == status, r.text
        assert message in r.json()["error"]
        v, _ = infer_binary(client, teacher.url, *states(8))
        assert v.shape == (8, 2)


def test_unknown_model_body_limit_and_admin_without_token(teacher: Service) -> None:
    url = teacher.url
    with httpx.Client() as client:
        r = client.post(
            f"{url}/v2/models/nope/infer", content=_json_doc([0, 0], [0.5], [1, 2], [1])
        )
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
        assert client.get(f"{url}/v2/models/nope").status_code == 404
        big = np.zeros((200_000, 2), np.float32)  # 1.6 MB > --max-body-mb 1
        body, headers = encode_request({"x": big, "t": np.zeros(200_000, np.float32)})
        r = client.post(f"{url}/v2/models/teacher-a/infer", content=body, headers=headers)
        assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(40):
                yield b" " * 65536

        r = client.post(f"{url}/v2/models/teacher-a/infer", content=chunks())
        assert r.status_code == 413
        r = client.post(
            f"{url}/v2/repository/models/teacher-a/load",
            json={"parameters": {"checkpoint": "teacher-b.safetensors"}},
            headers={"Authorization": "Bearer anything"},
        )
        assert r.status_code == 403 and "OPD_ADMIN_TOKEN" in r.json()["error"]
        v, _ = infer_binary(client, url, *states(8))
        assert v.shape == (8, 2)


@pytest.fixture
def swap_root(tiny_models: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    for f in ("teacher-a.safetensors", "teacher-b.safetensors"):
        shutil.copy(tiny_models / f, root / f)
    (root / "broken.safetensors").write_bytes(b"not a checkpoint")
    (tmp_path / "outside.safetensors").write_bytes((root / "teacher-b.safetensors").read_bytes())
    return root


def test_hot_swap_under_load(swap_root: Path) -> None:
    svc = start_teacher(
        swap_root / "teacher-a.safetensors",
        "--model-root",
        str(swap_root),
        "--name",
        "teacher",
        token=TOKEN,
    )
    url, auth = svc.url, {"Authorization": f"Bearer {TOKEN}"}
    x, t = states(256, 7)
    outputs = {name: reference(swap_root / f"teacher-{name}.safetensors", x, t) for name in "ab"}
    assert np.abs(outputs["a"] - outputs["b"]).max() > 1e-3
    stop, failures, seen = threading.Event(), [], []

    def hammer() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                try:
                    v, params = infer_binary(client, url, x, t, model="teacher")
                except AssertionError as exc:
                    failures.append(str(exc))
                    continue
                # version 1, 3 = teacher a; 2 = teacher b: the answer must be all one model
                expect = outputs["b" if params["version"] == "2" else "a"]
                if np.abs(v - expect).max() > 1e-6:
                    failures.append(f"version {params['version']} answer matches neither model")
                seen.append(params["version"])

    load = f"{url}/v2/repository/models/teacher/load"
    try:
        threads = [threading.Thread(target=hammer) for _ in range(6)]
        for th in threads:
            th.start()
        with httpx.Client(timeout=30) as admin:
            assert (
                admin.post(
                    load, json={"parameters": {"checkpoint": "teacher-b.safetensors"}}
                ).status_code
                == 401
            )
            r = admin.post(
                load,
                headers={"Authorization": "Bearer wrong"},
                json={"parameters": {"checkpoint": "teacher-b.safetensors"}},
            )
            assert r.status_code == 403
            while len(seen) < 20:
                stop.wait(0.05)
            r = admin.post(
                load, headers=auth, json={"parameters": {"checkpoint": "teacher-b.safetensors"}}
            )
            assert r.status_code == 200 and r.json()["version"] == "2", r.text
            assert r.json()["modes"] == [1, 3] and "of modes [0, 2]" in r.json()["warning"]
            n = len(seen)
            while len(seen) < n + 20:
                stop.wait(0.05)
            # failed loads keep version 2 serving and say why
            for bad, why in (
                ("broken.safetensors", "not a readable safetensors"),
                ("missing.safetensors", "not found"),
                ("../outside.safetensors", "outside the model root"),
                (str(swap_root.parent / "outside.safetensors"), "outside the model root"),
            ):
                r = admin.post(load, headers=auth, json={"parameters": {"checkpoint": bad}})
                assert r.status_code == 400 and why in r.json()["error"], r.text
                assert "still serving version 2" in r.json()["error"]
            assert httpx.get(f"{url}/v2/models/teacher").json()["parameters"]["version"] == "2"
            r = admin.post(
                load, headers=auth, json={"parameters": {"checkpoint": "teacher-a.safetensors"}}
            )
            assert r.status_code == 200 and r.json()["version"] == "3"
            n = len(seen)
            while len(seen) < n + 20:
                stop.wait(0.05)
        stop.set()
        for th in threads:
            th.join()
        assert failures == []
        assert {"1", "2", "3"} <= set(seen)
        # unload: not ready, infer refused; load without a file reloads the last checkpoint
        with httpx.Client() as client:
            assert (
                client.post(f"{url}/v2/repository/models/teacher/unload", headers=auth).status_code
                == 200
            )
            assert client.get(f"{url}/v2/models/teacher/ready").status_code == 503
            assert client.get(f"{url}/v2/health/ready").status_code == 503
            body, headers = encode_request({"x": x, "t": t})
            r = client.post(f"{url}/v2/models/teacher/infer", content=body, headers=headers)
            assert r.status_code == 503 and "unloaded" in r.json()["error"]
            assert client.post(load, headers=auth).json()["version"] == "4"
            v, _ = infer_binary(client, url, x, t, model="teacher")
            assert np.abs(v - outputs["a"]).max() <= 1e-6
    finally:
        stop.set()
        assert svc.stop() == 0, svc.output()


def test_bad_checkpoint_fails_at_start_with_a_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="not a readable safetensors"):
        start_teacher(bad, token=None)
