"""A diffusers teacher as a real uvicorn process: tiny SD3 transformers built from a config
(random weights, ``save_pretrained``), LoRA adapters, conditioning, cond_id, guidance.

Each answer is compared with the in-process forward of the same weights (no mocks).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from safetensors.torch import save_file

from common.codec import HEADER_LENGTH, bf16_to_float32, decode_response, encode_request
from common.procs import Service, start_service
from tests.services.diffusers_helpers import (
    TEXT_LEN,
    load_sd3,
    make_lora,
    make_sd3,
    merged,
    sd3_inputs,
    sd3_reference,
)

TOKEN = "diffusers-admin-token"
REPO = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
COND = ("encoder_hidden_states", "pooled_projections")


@pytest.fixture(scope="module")
def dmodels(tmp_path_factory) -> Path:
    """``root/``: ``base/`` (SD3 + ``uncond.safetensors``), LoRAs ``a``, ``b``, ``c`` and
    adapters that must be refused."""
    root = tmp_path_factory.mktemp("diffusers-models")
    make_sd3(root / "base", seed=0)
    g = torch.Generator().manual_seed(9)
    save_file(
        {
            "encoder_hidden_states": torch.randn(1, TEXT_LEN, 16, generator=g),
            "pooled_projections": torch.randn(1, 8, generator=g),
        },
        str(root / "base" / "uncond.safetensors"),
    )
    for i, name in enumerate("abc"):
        make_lora(root / "base", root / f"lora-{name}", seed=i + 1)
    sd = dict(_tensors(root / "lora-a"))
    key = next(k for k in sd if k.endswith("lora_A.weight"))
    wrong_rank = dict(sd)
    wrong_rank[key] = torch.randn(4, sd[key].shape[1] + 3)  # in_features do not fit the base
    save_file(wrong_rank, str(root / "wrong-shape.safetensors"))
    other = {k.replace("attn.to_q", "attn.to_nowhere"): v for k, v in sd.items()}
    save_file(other, str(root / "wrong-target.safetensors"))
    (root / "pickled").mkdir()
    torch.save({"x": torch.zeros(1)}, root / "pickled" / "pytorch_lora_weights.bin")
    return root


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(adapter_dir.glob("*.safetensors"))))


def start(model_dir: Path, *flags: str) -> Service:
    cmd = [sys.executable, "-m", "common.cli", "serve", "teacher", "--model-dir", str(model_dir)]
    cmd += ["--port", "0", "--threads", "1", *flags]
    env = {"OPD_ADMIN_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    return start_service(cmd, env=env, cwd=str(REPO), timeout_s=120)


@pytest.fixture(scope="module")
def server(dmodels: Path):
    svc = start(
        dmodels / "base",
        "--name",
        "base",
        "--adapter",
        f"teacher-a={dmodels / 'lora-a'}",
        "--adapter",
        f"teacher-b={dmodels / 'lora-b'}",
        "--max-delay-ms",
        "5",
    )
    yield svc
    assert svc.stop() == 0, svc.output()


def post(
    url: str,
    model: str,
    inputs: dict[str, np.ndarray],
    params: dict | None = None,
    binary: bool = True,
) -> httpx.Response:
    body, headers = encode_request(inputs, binary=binary, parameters=params)
    return httpx.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers, timeout=60)


def answer(r: httpx.Response) -> tuple[np.ndarray, dict]:
    assert r.status_code == 200, r.text
    msg = decode_response(r.content, r.headers.get(HEADER_LENGTH))
    return msg.tensors["v"], msg.parameters


def guided_reference(model, inputs: dict[str, np.ndarray], uncond: dict, scale: float):
    """``v_u + s (v_c - v_u)`` from two separate in-process forwards."""
    v_c = sd3_reference(model, inputs)
    v_u = sd3_reference(model, {**inputs, **uncond})
    return v_u + scale * (v_c - v_u)


def test_answers_equal_the_in_process_forward(server: Service, dmodels: Path) -> None:
    model = load_sd3(dmodels / "base")
    for binary in (True, False):
        for text_rows in (None, 1):  # one row per state, or one row shared by all
            inputs = sd3_inputs(3, seed=1, text_rows=text_rows)
            v, params = answer(post(server.url, "base", inputs, binary=binary))
            assert v.shape == (3, 4, 8, 8) and v.dtype == np.float32
            assert np.abs(v - sd3_reference(model, inputs)).max() <= 1e-5
            assert params["version"] == "1" and params["digest"].startswith("sha256:")
    # FP16 and BF16 states: v comes back in the state's datatype
    inputs = sd3_inputs(2, seed=2)
    ref = sd3_reference(model, inputs)
    v16, _ = answer(post(server.url, "base", {**inputs, "x": inputs["x"].astype(np.float16)}))
    assert v16.dtype == np.float16
    from common.codec import float32_to_bf16

    vb, _ = answer(post(server.url, "base", {**inputs, "x": float32_to_bf16(inputs["x"])}))
    assert vb.dtype.metadata == {"datatype": "BF16"}
    scale = np.abs(ref).max()
    for got in (v16.astype(np.float32), bf16_to_float32(vb)):
        assert np.abs(got - ref).max() <= 0.1 * scale  # the states themselves were rounded


def test_metadata_lists_inputs_convention_and_digests(server: Service) -> None:
    metas = {n: httpx.get(f"{server.url}/v2/models/{n}").json() for n in ("base", "teacher-a")}
    base = metas["base"]
    assert base["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4, -1, -1]},
        {"name": "t", "datatype": "FP32", "shape": [-1]},
        {"name": "encoder_hidden_states", "datatype": "FP32", "shape": [-1, -1, 16]},
        {"name": "pooled_projections", "datatype": "FP32", "shape": [-1, 8]},
    ]
    assert base["outputs"] == [{"name": "v", "datatype": "FP32", "shape": [-1, 4, -1, -1]}]
    pa, pb = base["parameters"], metas["teacher-a"]["parameters"]
    assert pa["backend"] == pb["backend"] == "diffusers"
    assert pa["time_convention"] == pb["time_convention"]
    assert pa["time_convention"].startswith("diffusers-flowmatch:")
    assert len(pa["time_convention"].split(":")[1]) == 12
    assert pa["digest"] != pb["digest"] and pb["base_digest"] == pa["digest"]
    assert pa["uncond"] == "server file"
    index = httpx.post(f"{server.url}/v2/repository/index").json()
    assert {e["name"] for e in index} == {"base", "teacher-a", "teacher-b"}


def test_guided_answer_is_the_two_forward_formula(server: Service, dmodels: Path) -> None:
    from safetensors.numpy import load_file

    uncond = load_file(str(dmodels / "base" / "uncond.safetensors"))
    model = load_sd3(dmodels / "base")
    inputs = sd3_inputs(4, seed=3)
    v, _ = answer(post(server.url, "base", inputs, {"guidance_scale": 4.5}))
    ref = guided_reference(model, inputs, uncond, 4.5)
    assert np.abs(v - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    plain = sd3_reference(model, inputs)
    assert np.abs(v - plain).max() > 1e-2  # guidance changed the answer


def test_cond_id_gives_the_same_answer_as_resent_tensors(server: Service) -> None:
    inputs = sd3_inputs(3, seed=4, text_rows=1)
    states = {"x": inputs["x"], "t": inputs["t"]}
    v_sent, _ = answer(post(server.url, "teacher-a", inputs))
    v_kept, _ = answer(post(server.url, "teacher-a", inputs, {"cond_id": "prompt-4"}))
    # later requests: states only, other states of the same prompt
    v_id, _ = answer(post(server.url, "teacher-a", states, {"cond_id": "prompt-4"}))
    assert np.array_equal(v_sent, v_kept) and np.abs(v_id - v_sent).max() <= 1e-6
    other = sd3_inputs(5, seed=5)
    v_ref, _ = answer(post(server.url, "teacher-a", {**other, **{k: inputs[k] for k in COND}}))
    v_other, _ = answer(
        post(server.url, "teacher-a", {"x": other["x"], "t": other["t"]}, {"cond_id": "prompt-4"})
    )
    assert np.abs(v_other - v_ref).max() <= 1e-6  # a 1-row cond_id broadcasts to any B
    # guidance with a cached id, and on another model of the same process
    g, _ = answer(post(server.url, "base", states, {"cond_id": "prompt-4", "guidance_scale": 3}))
    g_ref, _ = answer(post(server.url, "base", inputs, {"guidance_scale": 3}))
    assert np.abs(g - g_ref).max() <= 1e-5
    r = post(server.url, "teacher-a", states, {"cond_id": "never-sent"})
    assert r.status_code == 422
    assert r.json()["error"] == (
        "unknown cond_id 'never-sent': resend the conditioning tensors with it"
    )
    text = httpx.get(f"{server.url}/metrics").text
    gauges = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("opd_teacher_cond_cache_")
    }
    assert (
        gauges["opd_teacher_cond_cache_hits"] >= 2 and gauges["opd_teacher_cond_cache_misses"] >= 1
    )
    assert gauges["opd_teacher_cond_cache_ids"] >= 1 and gauges["opd_teacher_cond_cache_bytes"] > 0


def test_adapters_answer_differently_each_as_its_merged_model(
    server: Service, dmodels: Path
) -> None:
    inputs = sd3_inputs(3, seed=6)
    got = {n: answer(post(server.url, n, inputs))[0] for n in ("base", "teacher-a", "teacher-b")}
    assert np.abs(got["teacher-a"] - got["teacher-b"]).max() > 1e-2
    assert np.abs(got["teacher-a"] - got["base"]).max() > 1e-2
    for name, lora in (("teacher-a", "lora-a"), ("teacher-b", "lora-b")):
        ref = sd3_reference(merged(dmodels / "base", dmodels / lora), inputs)
        assert np.abs(got[name] - ref).max() <= 1e-4, name


def test_concurrent_mixed_requests_each_get_their_own_answer(
    server: Service, dmodels: Path
) -> None:
    """Requests of different adapters, latent sizes, text lengths and guidance in flight at
    once: the batcher merges only those that agree, and every answer is its own."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.numpy import load_file

    uncond = load_file(str(dmodels / "base" / "uncond.safetensors"))
    refs = {
        "base": load_sd3(dmodels / "base"),
        "teacher-a": merged(dmodels / "base", dmodels / "lora-a"),
    }
    cases = []
    for k in range(16):
        model = "base" if k % 2 else "teacher-a"
        inputs = sd3_inputs(1 + k % 3, seed=100 + k, text_rows=1 if k % 4 == 0 else None)
        if k % 3 == 1:  # a smaller latent: must not share a forward with 8 x 8 ones
            inputs["x"] = inputs["x"][:, :, :4, :4].copy()
        scale = 2.0 if k % 5 == 0 else None
        cases.append((model, inputs, scale))

    def run(case) -> float:
        model, inputs, scale = case
        params = {"guidance_scale": scale} if scale is not None else None
        v, _ = answer(post(server.url, model, inputs, params))
        if scale is None:
            ref = sd3_reference(refs[model], inputs)
        else:
            ref = guided_reference(refs[model], inputs, uncond, scale)
        return float(np.abs(v - ref).max())

    with ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(run, cases * 2))
    assert max(errors) <= 1e-4


def _bad(case: str) -> tuple[str, dict, dict | None, int, str]:
    """(model, inputs, parameters, status, text the error must hold) for a bad input."""
    good = sd3_inputs(2, seed=7)
    if case == "wrong latent channels":
        return "base", {**good, "x": np.zeros((2, 3, 8, 8), np.float32)}, None, 400, "[B, 4, H, W]"
    if case == "odd latent size":
        return (
            "base",
            {**good, "x": np.zeros((2, 4, 7, 8), np.float32)},
            None,
            400,
            "multiples of 2",
        )
    if case == "latent too large":
        x = np.zeros((2, 4, 32, 32), np.float32)
        return "base", {**good, "x": x}, None, 400, "at most 16 x 16"
    if case == "missing conditioning input":
        inputs = {k: v for k, v in good.items() if k != "pooled_projections"}
        return "base", inputs, None, 400, "missing conditioning input(s) pooled_projections [B, 8]"
    if case == "no conditioning, no cond_id":
        return "base", {"x": good["x"], "t": good["t"]}, None, 400, "missing conditioning"
    if case == "extra input":
        inputs = {**good, "mask": np.zeros((2, 4), np.float32)}
        return "base", inputs, None, 400, "unknown input(s) ['mask']"
    if case == "wrong x dtype":
        inputs = {**good, "x": good["x"].astype(np.float64)}
        return "base", inputs, None, 400, "input 'x' must be FP32, FP16 or BF16, got FP64"
    if case == "wrong t dtype":
        inputs = {**good, "t": good["t"].astype(np.float16)}
        return "base", inputs, None, 400, "input 't' must be FP32, got FP16"
    if case == "wrong cond dtype":
        inputs = {**good, "pooled_projections": np.zeros((2, 8), np.int32)}
        return "base", inputs, None, 400, "'pooled_projections' must be FP32, FP16 or BF16"
    if case == "wrong cond width":
        inputs = {**good, "encoder_hidden_states": np.zeros((2, 5, 12), np.float32)}
        return "base", inputs, None, 400, "encoder_hidden_states [B, *, 16]"
    if case == "cond rows":
        inputs = {**good, "pooled_projections": np.zeros((3, 8), np.float32)}
        return "base", inputs, None, 400, "has 3 rows; send 2 (one per state) or 1"
    if case == "guidance not a number":
        return "base", good, {"guidance_scale": "high"}, 400, "guidance_scale must be a finite"
    if case == "guidance with other text length":
        inputs = {**good, "encoder_hidden_states": np.zeros((2, 7, 16), np.float32)}
        return "base", inputs, {"guidance_scale": 2}, 400, "unconditional embedding"
    if case == "cond_id not a string":
        return "base", good, {"cond_id": 5}, 400, "cond_id must be a string"
    if case == "unknown cond_id":
        inputs = {"x": good["x"], "t": good["t"]}
        return "base", inputs, {"cond_id": "nope"}, 422, "unknown cond_id 'nope'"
    if case == "unknown adapter":
        return "teacher-z", good, None, 404, "unknown model 'teacher-z'"
    if case == "nan state":
        x = good["x"].copy()
        x[0, 0, 0, 0] = np.nan
        return "base", {**good, "x": x}, None, 400, "NaN or Inf"
    raise AssertionError(case)


BAD_CASES = [
    "wrong latent channels",
    "odd latent size",
    "latent too large",
    "missing conditioning input",
    "no conditioning, no cond_id",
    "extra input",
    "wrong x dtype",
    "wrong t dtype",
    "wrong cond dtype",
    "wrong cond width",
    "cond rows",
    "guidance not a number",
    "guidance with other text length",
    "cond_id not a string",
    "unknown cond_id",
    "unknown adapter",
    "nan state",
]


def test_every_bad_input_is_a_4xx_and_the_server_stays_ready(server: Service) -> None:
    for case in BAD_CASES:
        model, inputs, params, status, text = _bad(case)
        r = post(server.url, model, inputs, params)
        assert r.status_code == status, (case, r.text)
        assert text in r.json()["error"], (case, r.json()["error"])
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    v, _ = answer(post(server.url, "base", sd3_inputs(2, seed=8)))
    assert v.shape == (2, 4, 8, 8)


def test_tritonclient_queries_a_diffusers_teacher(server: Service, dmodels: Path) -> None:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_model_ready("teacher-b")
    meta = client.get_model_metadata("teacher-b")
    assert [i["name"] for i in meta["inputs"]] == ["x", "t", *COND]
    inputs = sd3_inputs(2, seed=9)
    ref = sd3_reference(merged(dmodels / "base", dmodels / "lora-b"), inputs)
    for binary in (True, False):
        tensors = []
        for name, arr in inputs.items():
            tin = triton.InferInput(name, list(arr.shape), "FP32")
            tin.set_data_from_numpy(arr, binary_data=binary)
            tensors.append(tin)
        out = triton.InferRequestedOutput("v", binary_data=binary)
        v = client.infer("teacher-b", tensors, outputs=[out]).as_numpy("v")
        assert v.shape == (2, 4, 8, 8) and np.abs(v - ref).max() <= 1e-4
    client.close()


@pytest.mark.slow
def test_hot_adapter_load_mid_stream_fails_no_request(dmodels: Path) -> None:
    svc = start(
        dmodels / "base",
        "--name",
        "base",
        "--adapter",
        f"teacher-a={dmodels / 'lora-a'}",
        "--model-root",
        str(dmodels),
    )
    inputs = sd3_inputs(2, seed=10)
    refs = {n: sd3_reference(merged(dmodels / "base", dmodels / f"lora-{n}"), inputs) for n in "ac"}
    stop, failures, seen = threading.Event(), [], []

    def hammer() -> None:
        with httpx.Client(timeout=60) as client:
            body, headers = encode_request(inputs, binary=True)
            while not stop.is_set():
                r = client.post(
                    f"{svc.url}/v2/models/teacher-a/infer", content=body, headers=headers
                )
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                v, params = answer(r)
                expect = refs["c" if params["version"] == "2" else "a"]
                if np.abs(v - expect).max() > 1e-4:
                    failures.append(f"version {params['version']} matches neither adapter")
                seen.append(params["version"])

    load = f"{svc.url}/v2/repository/models/teacher-a/load"
    threads = [threading.Thread(target=hammer) for _ in range(3)]
    try:
        for th in threads:
            th.start()
        while len(seen) < 10:
            stop.wait(0.05)
        with httpx.Client(timeout=60) as admin:
            r = admin.post(load, json={"parameters": {"adapter": "lora-c"}})
            assert r.status_code == 401
            r = admin.post(load, headers=AUTH, json={"parameters": {"adapter": "lora-c"}})
            assert r.status_code == 200 and r.json()["version"] == "2", r.text
            n = len(seen)
            while len(seen) < n + 10:
                stop.wait(0.05)
            # refused adapters: the old one keeps serving
            for bad, why in (
                ("wrong-shape.safetensors", "in the base model, the adapter's is"),
                ("wrong-target.safetensors", "to_nowhere"),
                ("pickled", "pickle"),
                ("missing.safetensors", "not found"),
                ("../outside.safetensors", "outside the model root"),
            ):
                r = admin.post(load, headers=AUTH, json={"parameters": {"adapter": bad}})
                assert r.status_code == 400, (bad, r.text)
                assert why in r.json()["error"] and "still serving version 2" in r.json()["error"]
            n = len(seen)
            while len(seen) < n + 5:
                stop.wait(0.05)
            # a new model name: a new adapter served beside the others, then unloaded
            new = f"{svc.url}/v2/repository/models/teacher-b/load"
            r = admin.post(new, headers=AUTH, json={"parameters": {"adapter": "lora-b"}})
            assert r.status_code == 200 and r.json()["version"] == "1", r.text
            v, _ = answer(post(svc.url, "teacher-b", inputs))
            ref_b = sd3_reference(merged(dmodels / "base", dmodels / "lora-b"), inputs)
            assert np.abs(v - ref_b).max() <= 1e-4
            r = admin.post(f"{svc.url}/v2/repository/models/teacher-b/unload", headers=AUTH)
            assert r.status_code == 200
            r = post(svc.url, "teacher-b", inputs)
            assert r.status_code == 503 and "unloaded" in r.json()["error"]
        stop.set()
        for th in threads:
            th.join()
        assert failures == []
        assert {"1", "2"} <= set(seen)
        index = {e["name"]: e for e in httpx.post(f"{svc.url}/v2/repository/index").json()}
        assert index["teacher-a"]["version"] == "2" and index["teacher-b"]["state"] == "UNAVAILABLE"
    finally:
        stop.set()
        assert svc.stop() == 0, svc.output()


def test_unsafe_model_directories_are_refused(dmodels: Path, tmp_path: Path, opd_cli) -> None:
    import shutil

    from services.teacher.diffusers_backend import DiffusersLoadError, load_backend

    pickled = tmp_path / "pickled"
    shutil.copytree(dmodels / "base", pickled)
    torch.save({"w": torch.zeros(1)}, pickled / "extra.bin")
    code, _, err = opd_cli("serve", "teacher", "--model-dir", pickled, "--port", "0")
    assert code == 2 and "extra.bin is a pickle-capable file" in err, err
    remote = tmp_path / "remote"
    shutil.copytree(dmodels / "base", remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"x": "m.X"}}))
    with pytest.raises(DiffusersLoadError, match="auto_map"):
        load_backend(remote)
    other = tmp_path / "other"
    shutil.copytree(dmodels / "base", other)
    (other / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(DiffusersLoadError, match="'UNet2DModel' is not served"):
        load_backend(other)
    code, _, err = opd_cli(
        "serve", "teacher", "--model-dir", dmodels / "base", "--adapter", "x=/nonexistent"
    )
    assert code == 2 and "--adapter" in err


def test_a_bf16_flux_teacher_serves_the_same_latents(tmp_path: Path) -> None:
    """FLUX packs 2x2 latent patches inside the backend: clients send the same
    ``[B, C, H, W]`` latents as to SD3; ``--dtype bf16`` is advertised and answered."""
    from services.teacher.diffusers_backend import load_backend
    from tests.services.diffusers_helpers import make_flux

    make_flux(tmp_path / "flux", seed=5)
    svc = start(tmp_path / "flux", "--dtype", "bf16")
    try:
        meta = httpx.get(f"{svc.url}/v2/models/flux").json()
        assert meta["inputs"][0] == {"name": "x", "datatype": "BF16", "shape": [-1, 4, -1, -1]}
        assert meta["parameters"]["family"] == "flux" and meta["parameters"]["dtype"] == "bf16"
        inputs = sd3_inputs(2, seed=11)
        v, _ = answer(post(svc.url, "flux", inputs))
        assert v.dtype == np.float32  # x's datatype, computed in bf16
        backend = load_backend(tmp_path / "flux", dtype="bf16")
        cond = {k: torch.from_numpy(inputs[k]).to(torch.bfloat16) for k in COND}
        x = torch.from_numpy(inputs["x"]).to(torch.bfloat16)
        ref = backend.forward(x, torch.from_numpy(inputs["t"]), cond).float().numpy()
        assert np.abs(v - ref).max() <= 1e-2 * np.abs(ref).max()
    finally:
        assert svc.stop() == 0, svc.output()
