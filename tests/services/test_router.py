"""The router as a real process in front of real teacher processes on loopback: policies equal the
in-process client, anchor, passthrough, bad input, registry API and refused registries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common import routing
from common.checkpoint import read_model
from common.codec import encode_request
from common.procs import Service
from student.clients import LocalTeacherClient, TeacherInfo
from tests.services.router_helpers import (
    admin,
    call_router,
    client,
    start_router,
    start_teachers,
    states,
)


@pytest.fixture(scope="module")
def teachers(tiny_models: Path):
    """Teachers a, b and the base anchor, one process each."""
    svcs = start_teachers(tiny_models)
    yield svcs
    for s in svcs.values():
        s.stop()


@pytest.fixture(scope="module")
def router(teachers: dict[str, Service]):
    svc = start_router(
        "--teacher",
        f"a={teachers['a'].url}",
        "--teacher",
        f"b={teachers['b'].url}#b",
        "--anchor",
        f"base={teachers['base'].url}",
    )
    yield svc
    assert svc.stop() == 0, svc.output()


@pytest.fixture(scope="module")
def local(tiny_models: Path) -> dict:
    nets = {}
    for n, f in [("a", "teacher-a"), ("b", "teacher-b"), ("base", "base")]:
        net, meta = read_model(tiny_models / f"{f}.safetensors")
        nets[n] = (net, TeacherInfo.from_meta(meta, name=n))
    return nets


@pytest.mark.parametrize("policy", ["nearest", "average"])
def test_policy_equals_in_process_client(router: Service, local: dict, policy: str) -> None:
    x, t = states(1536, seed=1)
    in_process = LocalTeacherClient([local["a"], local["b"]], policy=policy, anchor=local["base"])
    in_process.submit(torch.from_numpy(x), torch.from_numpy(t))
    [want], _ = in_process.collect()
    with client() as c:
        out, params = call_router(
            c, router.url, x, t, outputs=["v", "teacher", "v_anchor"], parameters={"policy": policy}
        )
    np.testing.assert_array_equal(out["teacher"], want.teacher.numpy())
    np.testing.assert_allclose(out["v"], want.v.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(out["v_anchor"], want.v_anchor.numpy(), atol=1e-6, rtol=0)
    assert params["policy"] == policy and params["teachers"] == "a,b" and params["anchor"] == "base"
    if policy == "nearest":  # each teacher got only its own rows
        counts = np.bincount(out["teacher"], minlength=2)
        assert params["a.rows"] == counts[0] and params["b.rows"] == counts[1]
        assert 0 < counts[0] < 1536
    else:
        assert params["a.rows"] == params["b.rows"] == 1536 and (out["teacher"] == -1).all()
    assert params["base.rows"] == 1536 and params["requests"] == 3
    for name in ("a", "b", "base"):
        assert params[f"{name}.version"] == "1"
        assert params[f"{name}.latency_ms"] > 0 and params[f"{name}.compute_ms"] >= 0
    assert params["server_ms"] >= params["fanout_ms"] >= 0


def test_label_policy_and_route_overrides(router: Service, local: dict) -> None:
    x, t = states(1000, seed=2)
    route = np.random.default_rng(3).integers(-1, 2, size=1000).astype(np.int32)
    with client() as c:
        # label: every row labelled
        labels = np.where(route < 0, 1, route).astype(np.int32)
        out, params = call_router(c, router.url, x, t, route=labels, parameters={"policy": "label"})
        # nearest with -1 rows left to the policy
        mixed, _ = call_router(c, router.url, x, t, route=route)
    assert "v_anchor" not in out and "anchor" not in params
    centers = [local["a"][1].centers, local["b"][1].centers]
    for got, r, policy in ((out, labels, "label"), (mixed, route, "nearest")):
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)
        assignment = routing.assign(policy, xt, centers, torch.from_numpy(r))
        rows = routing.rows_by_teacher(assignment, 2)
        with torch.no_grad():
            answers = [local[n][0](xt[i], tt[i]) for n, i in zip("ab", rows, strict=True)]
        want = routing.merge_answers(assignment, rows, answers, 2)
        np.testing.assert_array_equal(got["teacher"], assignment.numpy())
        np.testing.assert_allclose(got["v"], want.numpy(), atol=1e-6, rtol=0)


def test_json_request_anchor_parameter_and_passthrough(
    router: Service, teachers: dict, local: dict
) -> None:
    x, t = states(20, seed=4)
    with client() as c:
        body = {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [20, 2], "data": x.ravel().tolist()},
                {"name": "t", "datatype": "FP32", "shape": [20], "data": t.tolist()},
            ],
            "parameters": {"anchor": True},
        }
        r = c.post(f"{router.url}/v2/models/opd-router/infer", json=body)
        assert r.status_code == 200, r.text
        outs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
        assert set(outs) == {"v", "teacher", "v_anchor"}
        with torch.no_grad():
            base = local["base"][0](torch.from_numpy(x), torch.from_numpy(t)).numpy()
        np.testing.assert_allclose(outs["v_anchor"], base, atol=1e-6)
        # passthrough: the teacher's own answer through the router
        req, headers = encode_request({"x": x, "t": t})
        direct = c.post(f"{teachers['b'].url}/v2/models/b/infer", content=req, headers=headers)
        via = c.post(f"{router.url}/v2/models/b/infer", content=req, headers=headers)
        assert via.status_code == 200 and via.content[-160:] == direct.content[-160:]
        meta = c.get(f"{router.url}/v2/models/opd-router").json()
        assert meta["parameters"]["teachers"] == "a,b"
        assert c.get(f"{router.url}/v2/health/ready").json()["ready"] is True


def test_bad_input_is_a_clear_4xx_and_router_keeps_serving(router: Service) -> None:
    x, t = states(8)
    with client() as c:
        url = f"{router.url}/v2/models/opd-router/infer"
        cases = [
            (c.post(url, content=b"not json"), "JSON"),
            (
                c.post(
                    url,
                    json={
                        "inputs": [
                            {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
                        ]
                    },
                ),
                "missing input 't'",
            ),
            (
                c.post(
                    url,
                    content=encode_request({"x": x.astype(np.float64), "t": t})[0],
                    headers=encode_request({"x": x.astype(np.float64), "t": t})[1],
                ),
                "input 'x' must be FP32, got FP64",
            ),
            (
                c.post(
                    url,
                    content=encode_request({"x": x, "t": t[:3]})[0],
                    headers=encode_request({"x": x, "t": t[:3]})[1],
                ),
                "rows",
            ),
            (
                c.post(
                    url,
                    content=encode_request({"x": x, "t": t, "route": np.full(8, 5, np.int32)})[0],
                    headers=encode_request({"x": x, "t": t, "route": np.full(8, 5, np.int32)})[1],
                ),
                "route labels",
            ),
            (
                c.post(
                    url,
                    content=encode_request({"x": x, "t": t}, parameters={"policy": "label"})[0],
                    headers=encode_request({"x": x, "t": t}, parameters={"policy": "label"})[1],
                ),
                "needs the 'route' input",
            ),
            (
                c.post(
                    url,
                    content=encode_request({"x": x, "t": t}, parameters={"anchor": "nope"})[0],
                    headers=encode_request({"x": x, "t": t}, parameters={"anchor": "nope"})[1],
                ),
                "registered anchors are: base",
            ),
        ]
        for resp, needle in cases:
            assert 400 <= resp.status_code < 500, resp.text
            assert needle in resp.json()["error"], resp.json()
        x3 = np.zeros((4, 3), np.float32)  # wrong dimension: nearest cannot route it
        r = c.post(
            url,
            content=encode_request({"x": x3, "t": t[:4]})[0],
            headers=encode_request({"x": x3, "t": t[:4]})[1],
        )
        assert r.status_code == 400
        assert (
            "input 'x' must be [B, 2]: teacher 'a' takes states of dimension 2; got [4, 3]"
            in (r.json()["error"])
        )
        assert c.post(f"{router.url}/v2/models/nobody/infer", json={}).status_code == 404
        nobody = c.get(f"{router.url}/v1/teachers/nobody")
        assert nobody.status_code == 404 and "no teacher named 'nobody'" in nobody.json()["error"]
        call_router(c, router.url, x, t)  # still serving


def test_registry_api_auth_and_refusals(router: Service, teachers: dict) -> None:
    with client() as c:
        reg = c.get(f"{router.url}/v1/teachers").json()
        assert [t["name"] for t in reg["teachers"]] == ["a", "b"] and reg["policy"] == "nearest"
        assert reg["anchors"][0]["name"] == "base" and reg["teachers"][0]["mode_centers"]
        body = {"endpoints": [teachers["a"].url]}
        assert c.put(f"{router.url}/v1/teachers/a", json=body).status_code == 401
        assert (
            c.put(f"{router.url}/v1/teachers/a", json=body, headers=admin("wrong")).status_code
            == 403
        )
        # replicas of one teacher with different checkpoints: refused, registry unchanged
        bad = c.put(
            f"{router.url}/v1/teachers/a",
            headers=admin(),
            json={"endpoints": [teachers["a"].url, teachers["b"].url]},
        )
        assert bad.status_code == 422
        msg = bad.json()["error"]
        assert teachers["b"].url in msg and "digest" in msg and "same checkpoint" in msg
        unreachable = c.put(
            f"{router.url}/v1/teachers/c",
            headers=admin(),
            json={"endpoints": ["http://127.0.0.1:9"]},
        )
        assert (
            unreachable.status_code == 422 and "no replica answered" in unreachable.json()["error"]
        )
        # modes off the ring, or centers of the wrong dimension: refused before they serve
        for doc, needle in [
            ({"modes": [9]}, "ring mode indices 0..7"),
            ({"modes": [-3]}, "ring mode indices 0..7"),
            ({"mode_centers": [[1.0, 2.0, 3.0]]}, "dimension 3 but its input x is [B, 2]"),
        ]:
            r = c.put(
                f"{router.url}/v1/teachers/a",
                headers=admin(),
                json={"endpoints": [teachers["a"].url], **doc},
            )
            assert r.status_code == 422 and needle in r.json()["error"], r.text
        assert c.get(f"{router.url}/v1/teachers/a").json()["modes"] == [0, 2]  # unchanged
        # add, then delete, a third teacher (b's server under another name)
        added = c.put(
            f"{router.url}/v1/teachers/c",
            headers=admin(),
            json={"endpoints": [f"{teachers['b'].url}#b"], "modes": [5]},
        )
        assert added.status_code == 201 and added.json()["index"] == 2
        assert added.json()["warnings"] == [
            f"'c' now serves the same checkpoint as 'b' ({added.json()['digest']})"
        ]
        moved = c.put(
            f"{router.url}/v1/teachers/c",
            headers=admin(),
            json={"endpoints": [f"{teachers['b'].url}#b"], "modes": [6]},
        )
        assert moved.status_code == 200
        assert "'c' routes by modes [6] now, [5] before" in moved.json()["warnings"]
        x, t = states(64)
        out, params = call_router(
            c, router.url, x, t, parameters={"policy": "label"}, route=np.full(64, 2, np.int32)
        )
        assert (out["teacher"] == 2).all() and params["c.rows"] == 64
        assert c.delete(f"{router.url}/v1/teachers/c", headers=admin()).status_code == 200
        assert c.delete(f"{router.url}/v1/teachers/c", headers=admin()).status_code == 404
        assert c.get(f"{router.url}/v1/teachers").json()["teachers"][1]["name"] == "b"


def test_no_token_configured_refuses_changes(teachers: dict) -> None:
    svc = start_router("--teacher", f"a={teachers['a'].url}", "--policy", "label", token=None)
    try:
        with client() as c:
            r = c.delete(f"{svc.url}/v1/teachers/a", headers=admin())
            assert r.status_code == 403 and "OPD_ADMIN_TOKEN" in r.json()["error"]
            x, t = states(16)
            out, _ = call_router(c, svc.url, x, t, route=np.zeros(16, np.int32))
            assert (out["teacher"] == 0).all()
    finally:
        svc.stop()


def test_bad_registries_refused_at_start(teachers: dict, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as err:  # replicas with different digests
        start_router("--teacher", f"a={teachers['a'].url},{teachers['b'].url}")
    assert "replicas of one teacher must serve the same checkpoint" in str(err.value)
    assert teachers["b"].url in str(err.value)
    # a registry file whose teacher has no mode centers for nearest: refused with the reason
    f = tmp_path / "reg.yaml"
    f.write_text(
        f"policy: nearest\nteachers:\n  a: [{teachers['a'].url}]\n  c: {{endpoints: ['{teachers['b'].url}'], mode_centers: [[0.0, 0.0, 0.0]]}}\n"
    )
    with pytest.raises(RuntimeError) as err:
        start_router("--registry", str(f))
    assert "dimension 3 but its input x is [B, 2]" in str(err.value)
    # out-of-range ring modes, in a file: a clear refusal (it was an IndexError traceback)
    f.write_text(f"teachers:\n  a: {{endpoints: ['{teachers['a'].url}'], modes: [9, -3]}}\n")
    with pytest.raises(RuntimeError) as err:
        start_router("--registry", str(f))
    assert "ring mode indices 0..7, got [9, -3]" in str(err.value)
    # one name given twice on the command line: refused, not silently the last one
    with pytest.raises(RuntimeError) as err:
        start_router("--teacher", f"a={teachers['a'].url}", "--anchor", f"a={teachers['b'].url}")
    assert "'a' is given twice (--teacher and --anchor)" in str(err.value)
    # a v2 server that does not serve the named model: said so, not "not an OIP v2 server"
    with pytest.raises(RuntimeError) as err:
        start_router("--teacher", f"a={teachers['a'].url}#nomodel")
    assert "model 'nomodel' metadata answered 404" in str(err.value)
    assert "not an OIP v2 server" not in str(err.value)
