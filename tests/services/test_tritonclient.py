"""``tritonclient`` (NVIDIA's OIP v2 HTTP client, sync and aio) against our teacher and router.

A compliant client must be able to use every standard call on both services without knowing
they are ours: health, server and model metadata, model readiness, the repository index and
infer with binary and JSON tensors. The router's ``opd-router`` model answers the same rows as
the teacher behind it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio

from tests.services.router_helpers import start_router, start_teacher, states


@pytest.fixture(scope="module")
def services(tiny_models: Path):
    """Teacher ``a`` and a router with ``a`` as its only teacher."""
    teacher = start_teacher(tiny_models / "teacher-a.safetensors", "a")
    router = start_router("--teacher", f"a={teacher.url}")
    yield {"teacher": (teacher, "a"), "router": (router, "opd-router")}
    router.stop()
    teacher.stop()


def _inputs(module, x: np.ndarray, t: np.ndarray, binary: bool) -> list:
    out = []
    for name, arr in (("x", x), ("t", t)):
        i = module.InferInput(name, list(arr.shape), "FP32")
        i.set_data_from_numpy(arr, binary_data=binary)
        out.append(i)
    return out


def _direct_reference(services: dict, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    teacher, model = services["teacher"]
    client = triton.InferenceServerClient(teacher.url.removeprefix("http://"))
    try:
        result = client.infer(model, _inputs(triton, x, t, True))
        return result.as_numpy("v")
    finally:
        client.close()


@pytest.mark.parametrize("target", ["teacher", "router"])
def test_sync_client_uses_every_standard_call(services: dict, target: str) -> None:
    svc, model = services[target]
    client = triton.InferenceServerClient(svc.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(model)
        assert not client.is_model_ready("no-such-model")
        if target == "teacher":  # a version it does not serve: not found, so not ready
            assert not client.is_model_ready(model, model_version="99")
            r = httpx.get(f"{svc.url}/v2/models/{model}/versions/99/ready")
            assert r.status_code == 404 and "not served" in r.json()["error"]
        meta = client.get_server_metadata()
        assert "binary_tensor_data" in meta["extensions"]
        assert client.get_model_metadata(model)["name"] == model
        index = client.get_model_repository_index()
        assert any(e["name"] == model for e in index)
        assert all({"name", "state", "reason"} <= set(e) for e in index)
        x, t = states(64, seed=5)
        ref = _direct_reference(services, x, t)
        for binary in (True, False):
            outputs = [triton.InferRequestedOutput("v", binary_data=binary)]
            result = client.infer(model, _inputs(triton, x, t, binary), outputs=outputs)
            np.testing.assert_allclose(result.as_numpy("v"), ref, rtol=1e-6, atol=1e-6)
        with pytest.raises(triton.InferenceServerException):
            client.infer("no-such-model", _inputs(triton, x, t, True))
    finally:
        client.close()


@pytest.mark.parametrize("target", ["teacher", "router"])
def test_aio_client_uses_every_standard_call(services: dict, target: str) -> None:
    svc, model = services[target]
    x, t = states(64, seed=6)
    ref = _direct_reference(services, x, t)

    async def run() -> None:
        client = triton_aio.InferenceServerClient(svc.url.removeprefix("http://"))
        try:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready(model)
            meta = await client.get_server_metadata()
            assert "binary_tensor_data" in meta["extensions"]
            assert (await client.get_model_metadata(model))["name"] == model
            index = await client.get_model_repository_index()
            assert all({"name", "state", "reason"} <= set(e) for e in index)
            # concurrent requests in both encodings on one client
            calls = [
                client.infer(
                    model,
                    _inputs(triton_aio, x, t, binary),
                    outputs=[triton_aio.InferRequestedOutput("v", binary_data=binary)],
                )
                for binary in (True, False, True, False)
            ]
            for result in await asyncio.gather(*calls):
                np.testing.assert_allclose(result.as_numpy("v"), ref, rtol=1e-6, atol=1e-6)
        finally:
            await client.close()

    asyncio.run(run())
