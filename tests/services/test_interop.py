"""A third-party, JSON-only OIP v2 server as a teacher behind our router (issue 21).

The peer (``tests/services/oip_json_peer.py``) is a separate process written from the spec
alone: no binary tensor extension (``GET /v2`` declares ``"extensions": []``), no metadata
beyond the standard (no digest, version, mode centers or time convention). Behind the router it
must get JSON tensors, and a short training run through it must reach the student that our own
teacher serving the same checkpoint gives, through the router and with in-client routing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from common.checkpoint import read_model
from common.procs import Service, start_service
from student.commands import TrainSettings, run_train
from tests.services.router_helpers import (
    REPO,
    call_router,
    client,
    start_router,
    start_teacher,
    states,
)


def start_json_peer(checkpoint: Path, name: str) -> Service:
    """The standards-only, JSON-only v2 server serving ``checkpoint`` as model ``name``."""
    cmd = [sys.executable, "-m", "tests.services.oip_json_peer", str(checkpoint), name]
    return start_service(cmd, env={"OMP_NUM_THREADS": "1"}, cwd=str(REPO))


@pytest.fixture(scope="module")
def world(tiny_models: Path, tmp_path_factory):
    """Our teachers a, b and the base anchor, the JSON peer serving teacher-a's checkpoint, and
    two routers: ``ours`` (a = our teacher) and ``peer`` (a = the JSON peer, given its modes
    in the registry file: it cannot declare them)."""
    tmp = tmp_path_factory.mktemp("interop")
    procs: dict[str, Service] = {}
    try:
        procs["peer"] = start_json_peer(tiny_models / "teacher-a.safetensors", "velocity")
        for name, ckpt in (("a", "teacher-a"), ("b", "teacher-b"), ("base", "base")):
            procs[name] = start_teacher(tiny_models / f"{ckpt}.safetensors", name)
        _, meta = read_model(tiny_models / "teacher-a.safetensors")
        reg = {
            "policy": "nearest",
            "teachers": {
                "a": {"endpoints": [f"{procs['peer'].url}#velocity"], "modes": list(meta.modes)},
                "b": procs["b"].url,
            },
            "anchors": {"base": procs["base"].url},
        }
        (tmp / "peer.json").write_text(json.dumps(reg))
        procs["router_peer"] = start_router("--registry", str(tmp / "peer.json"))
        procs["router_ours"] = start_router(
            "--teacher",
            f"a={procs['a'].url}",
            "--teacher",
            f"b={procs['b'].url}",
            "--anchor",
            f"base={procs['base'].url}",
        )
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def test_registry_shows_the_encoding_each_replica_gets(world: dict[str, Service]) -> None:
    doc = httpx.get(f"{world['router_peer'].url}/v1/teachers").json()
    by_name = {t["name"]: t for t in doc["teachers"] + doc["anchors"]}
    peer = by_name["a"]["replicas"][0]
    assert peer["encoding"] == "json" and peer["extensions"] == []
    assert by_name["a"]["digest"] is None and by_name["a"]["modes"] == [0, 2]
    for name in ("b", "base"):
        replica = by_name[name]["replicas"][0]
        assert replica["encoding"] == "binary"
        assert "binary_tensor_data" in replica["extensions"]
    # the router said why in its log: JSON only, and what metadata the peer lacks
    out = world["router_peer"].output()
    assert "declare(s) no binary_tensor_data extension" in out
    assert "declares no digest in its model metadata" in out


def test_json_peer_answers_as_our_teacher_through_the_router(world: dict[str, Service]) -> None:
    x, t = states(256, seed=3)
    with client() as c:
        peer, p_params = call_router(c, world["router_peer"].url, x, t)
        ours, o_params = call_router(c, world["router_ours"].url, x, t)
    np.testing.assert_array_equal(peer["teacher"], ours["teacher"])
    assert p_params["a.rows"] > 0 and p_params["b.rows"] > 0
    # the JSON round trip of FP32 values is exact; only the forward's batching may differ
    np.testing.assert_allclose(peer["v"], ours["v"], rtol=1e-5, atol=1e-6)


def test_binary_body_refused_by_the_peer_itself(world: dict[str, Service]) -> None:
    """What the router avoids: the peer cannot read the binary extension's bytes."""
    from common.codec import encode_request

    x, t = states(4)
    body, headers = encode_request({"x": x, "t": t}, outputs=["v"], binary=True)
    r = httpx.post(f"{world['peer'].url}/v2/models/velocity/infer", content=body, headers=headers)
    assert r.status_code == 400


def _train(models: Path, out: Path, url: str, routing: str) -> dict[str, torch.Tensor]:
    s = TrainSettings(
        models=models,
        out=out,
        progress=False,
        method="flowopd",
        steps=10,
        checkpoint_every=0,
        backend="http",
        router_url=url,
        stream_chunk=3,
        routing=routing,
        update_groups="request",
    )
    assert run_train(s) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 10 and report["counts"]["requests"] > 0
    net, _ = read_model(out / "student.safetensors")
    return net.state_dict()


@pytest.mark.parametrize("routing", ["router", "client"])
def test_training_through_the_json_peer_reaches_our_student(
    world: dict[str, Service], tiny_models: Path, tmp_path: Path, routing: str
) -> None:
    ours = _train(tiny_models, tmp_path / "ours", world["router_ours"].url, routing)
    peer = _train(tiny_models, tmp_path / "peer", world["router_peer"].url, routing)
    for key, value in ours.items():
        torch.testing.assert_close(peer[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_nearest_without_modes_is_refused_label_serves_with_a_warning(
    world: dict[str, Service],
) -> None:
    """A peer registered without its modes: ``nearest`` cannot route to it (a clear refusal at
    start, never a 0-step run); ``label`` serves it and the log says why."""
    peer = f"a={world['peer'].url}#velocity"
    with pytest.raises(RuntimeError, match="policy 'nearest' needs mode centers"):
        start_router("--teacher", peer, "--teacher", f"b={world['b'].url}")
    router = start_router(
        "--teacher", peer, "--teacher", f"b={world['b'].url}", "--policy", "label"
    )
    try:
        x, t = states(8)
        route = np.array([0, 1] * 4, dtype=np.int32)
        with client() as c:
            out, params = call_router(c, router.url, x, t, route=route)
        assert list(out["teacher"]) == list(route) and params["a.rows"] == 4
        assert "served by label or average routing" in router.output()
    finally:
        router.stop()


def test_bench_serve_sweeps_the_json_peer_in_json(
    world: dict[str, Service], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``opd bench serve`` asked for binary against a server without the extension: JSON,
    said on stderr, every request answered."""
    from services.bench.command import BenchServeSettings, run_bench_serve

    s = BenchServeSettings(
        url=world["peer"].url,
        model="velocity",
        encoding="binary",
        concurrency="1",
        states="4",
        window_s=0.2,
        max_windows=3,
        max_seconds=30,
        limits=False,
        metrics_url="none",
        out=tmp_path,
    )
    assert run_bench_serve(s) == 0
    assert "declares no binary_tensor_data extension" in capsys.readouterr().err
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["encoding"] for p in doc["points"]] == ["json"]
    assert doc["points"][0]["errors"] == 0 and doc["points"][0]["requests_total"] > 0


def test_trainer_client_asks_the_server_for_its_encoding(world: dict[str, Service]) -> None:
    """What the trainer's client (student/remote.py) decides its encoding by: our router
    declares the binary extension, the standards-only peer does not (JSON for it)."""
    from services.router.negotiate import speaks_binary

    assert speaks_binary(world["router_peer"].url, 5.0) is True
    assert speaks_binary(world["peer"].url, 5.0) is False
    assert speaks_binary("http://127.0.0.1:9", 1.0) is False  # nothing there: the base protocol


def test_binary_client_reaches_the_json_peer_through_router_passthrough(
    world: dict[str, Service],
) -> None:
    """tritonclient asks the router for teacher a in binary; the router re-encodes the request
    as JSON for the peer, and the client reads the peer's JSON answer."""
    import tritonclient.http as triton

    x, t = states(32, seed=8)
    answers = []
    for router in ("router_peer", "router_ours"):
        client = triton.InferenceServerClient(world[router].url.removeprefix("http://"))
        try:
            inputs = []
            for name, arr in (("x", x), ("t", t)):
                i = triton.InferInput(name, list(arr.shape), "FP32")
                i.set_data_from_numpy(arr, binary_data=True)
                inputs.append(i)
            out = [triton.InferRequestedOutput("v", binary_data=True)]
            answers.append(client.infer("a", inputs, outputs=out).as_numpy("v"))
        finally:
            client.close()
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-5, atol=1e-6)


def test_public_client_talks_json_to_the_peer_directly(world: dict[str, Service]) -> None:
    """student.client.OPDClient on one teacher model: binary to ours, JSON to the peer (it
    reads the server's GET /v2 at start), the same velocities."""
    from student.client import OPDClient

    x, t = (torch.from_numpy(a) for a in states(16, seed=9))
    answers = []
    for url, model, binary in ((world["peer"].url, "velocity", False), (world["a"].url, "a", True)):
        with OPDClient(url, model=model) as client:
            assert client.aio.binary is binary
            (reply,) = client.wait([client.submit(x, t)])
            answers.append(reply.v)
    torch.testing.assert_close(answers[0].float(), answers[1].float(), rtol=1e-5, atol=1e-6)
