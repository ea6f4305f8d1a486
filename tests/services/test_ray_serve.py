"""deploy/serve_config.yaml's topology on a real local Ray instance (one per module, with a
second node joined by `ray start --address` that runs teacher-a's replicas): teacher
applications over OIP v2 HTTP, composed by the router application through Serve handles.

Training through the Ray router ends at the uvicorn services' student; a replica killed mid-run
loses no step; the router's registry changes at runtime (admin API and ``user_config``); a
``user_config`` swap under a request stream fails no request and leaves every replica on the
new digest; bad configs fail the deploy naming the key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from common.checkpoint import read_model
from common.codec import HEADER_LENGTH, decode_response, encode_request
from services.cluster import start_cluster
from services.teacher.ray_command import UsageError, deploy_config
from student.bench_backends import run as train_run
from student.clients import LocalTeacherClient, TeacherInfo
from tests.services.ray_cluster import NODE2, TOKEN, ServeCluster, app_doc, serve_cluster
from tests.services.router_helpers import call_router, states

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ray = pytest.importorskip("ray")

STEPS = 12
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def cluster(tiny_models: Path) -> Iterator[ServeCluster]:
    # two replicas of teacher-a, both on a second Ray node (a separate `ray start --address`
    # process): a killed one leaves the other, a swap must reach both
    with serve_cluster(tiny_models, {"teacher-a": 2}, on_node2=("teacher-a",)) as c:
        yield c


def _digest(models: Path, stem: str) -> str:
    return read_model(models / f"{stem}.safetensors")[1].digest


def _teacher_call(client: httpx.Client, url: str, model: str, n: int = 64) -> tuple[int, dict]:
    x, t = states(n, seed=n)
    body, headers = encode_request({"x": x, "t": t}, outputs=["v"])
    r = client.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers)
    if r.status_code != 200:
        return r.status_code, {"error": r.text}
    return 200, decode_response(r.content, r.headers.get(HEADER_LENGTH)).parameters


def test_router_composes_the_teacher_apps_by_handle(cluster: ServeCluster) -> None:
    models, url = cluster.models, cluster.url
    local = {}
    for n, f in [("a", "teacher-a"), ("b", "teacher-b"), ("base", "base")]:
        net, meta = read_model(models / f"{f}.safetensors")
        local[n] = (net, TeacherInfo.from_meta(meta, name=n))
    x, t = states(1024, seed=11)
    with httpx.Client(timeout=60) as c:
        for policy in ("nearest", "average"):
            reference = LocalTeacherClient(
                [local["a"], local["b"]], policy=policy, anchor=local["base"]
            )
            reference.submit(torch.from_numpy(x), torch.from_numpy(t))
            [want], _ = reference.collect()
            out, params = call_router(
                c,
                f"{url}/router",
                x,
                t,
                outputs=["v", "teacher", "v_anchor"],
                parameters={"policy": policy},
            )
            np.testing.assert_array_equal(out["teacher"], want.teacher.numpy())
            np.testing.assert_allclose(out["v"], want.v.numpy(), atol=1e-6, rtol=0)
            np.testing.assert_allclose(out["v_anchor"], want.v_anchor.numpy(), atol=1e-6, rtol=0)
            assert params["a.replica"] == "serve://teacher-a"
        # the router's teachers are the teacher applications (one copy of the weights)
        reg = c.get(f"{url}/router/v1/teachers").json()
        urls = {t["name"]: t["replicas"][0]["url"] for t in reg["teachers"] + reg["anchors"]}
        assert urls == {"a": "serve://teacher-a", "b": "serve://teacher-b", "base": "serve://base"}
        # passthrough to a teacher by name, through the handle: its own answer
        body, headers = encode_request({"x": x, "t": t}, outputs=["v"])
        via = c.post(f"{url}/router/v2/models/a/infer", content=body, headers=headers)
        direct = c.post(f"{url}/teacher-a/v2/models/teacher-a/infer", content=body, headers=headers)
        assert via.status_code == direct.status_code == 200
        v_via = decode_response(via.content, via.headers.get(HEADER_LENGTH)).tensors["v"]
        v_direct = decode_response(direct.content, direct.headers.get(HEADER_LENGTH)).tensors["v"]
        np.testing.assert_allclose(v_via, v_direct, atol=1e-6, rtol=0)
        # a teacher's 4xx comes back through the handle as the teacher's answer
        bad = c.post(f"{url}/router/v2/models/a/infer", content=b"{nope")
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]


def test_teacher_replicas_run_on_the_second_node(cluster: ServeCluster) -> None:
    """The cluster has two nodes, and teacher-a's two replicas hold the resource that only the
    node joined by `ray start --address` offers (0.25 each); the router's answers above came
    through them."""
    assert sum(n["Alive"] for n in ray.nodes()) == 2
    assert ray.cluster_resources()[NODE2] == 1
    assert ray.available_resources().get(NODE2, 0.0) == pytest.approx(0.5)


def test_training_through_the_ray_router_equals_uvicorn(
    cluster: ServeCluster, tmp_path: Path
) -> None:
    models = cluster.models
    ray_report = train_run(
        models,
        tmp_path / "ray",
        "diffusionopd",
        "http",
        STEPS,
        f"{cluster.url}/router",
        4,
        update_groups="request",
    )
    with start_cluster(models) as uvicorn:
        http_report = train_run(
            models,
            tmp_path / "uvicorn",
            "diffusionopd",
            "http",
            STEPS,
            uvicorn.router_url,
            4,
            update_groups="request",
        )
    ray_net, _ = read_model(tmp_path / "ray" / "student.safetensors")
    http_net, _ = read_model(tmp_path / "uvicorn" / "student.safetensors")
    for (k, a), (_, b) in zip(
        ray_net.state_dict().items(), http_net.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    assert ray_report["steps"] == http_report["steps"] == STEPS
    assert ray_report["counts"]["teacher_queries"] == http_report["counts"]["teacher_queries"]
    for key in ("avg_target_logp", "teacher_mode_mass"):
        assert ray_report["metrics"][key] == pytest.approx(http_report["metrics"][key], abs=1e-4)


def test_registry_changes_at_runtime(cluster: ServeCluster) -> None:
    url, models = f"{cluster.url}/router", cluster.models
    x, t = states(256, seed=5)
    route = np.zeros(256, dtype=np.int32)  # every row to teacher a
    with httpx.Client(timeout=60) as c:
        r = c.put(f"{url}/v1/teachers/a", json={"endpoints": ["serve://teacher-b"]})
        assert r.status_code == 401
        # the admin API, as on the uvicorn router: teacher a is now the teacher-b application
        r = c.put(f"{url}/v1/teachers/a", json={"endpoints": ["serve://teacher-b"]}, headers=ADMIN)
        assert r.status_code == 200, r.text
        _, params = call_router(c, url, x, t, route=route)
        assert params["a.digest"] == _digest(models, "teacher-b")
        r = c.put(f"{url}/v1/teachers/a", json={"endpoints": ["serve://nope"]}, headers=ADMIN)
        assert r.status_code == 422 and "nope" in r.json()["error"]
        r = c.put(f"{url}/v1/teachers/a", json={"endpoints": ["serve://teacher-a"]}, headers=ADMIN)
        assert r.status_code == 200, r.text
        _, params = call_router(c, url, x, t, route=route)
        assert params["a.digest"] == _digest(models, "teacher-a")
        # Ray-native: the router deployment's user_config replaces the registry
        router = app_doc(cluster.doc, "router")
        swapped = {
            **router["args"],
            "teachers": {"a": {"app": "teacher-b"}, "b": {"app": "teacher-a"}},
        }
        swapped.pop("policy"), swapped.pop("deadline_s")
        dep = {**router["deployments"][0], "user_config": swapped}
        deploy_config({"applications": [{**router, "deployments": [dep]}]})
        _, params = call_router(c, url, x, t, route=route)
        assert params["a.digest"] == _digest(models, "teacher-b")
        deploy_config({"applications": [router]})  # back to the config's registry
        _, params = call_router(c, url, x, t, route=route)
        assert params["a.digest"] == _digest(models, "teacher-a")


def test_a_replica_killed_mid_run_loses_no_step(cluster: ServeCluster, tmp_path: Path) -> None:
    out = tmp_path / "kill"
    result: dict = {}

    def train() -> None:
        result["report"] = train_run(
            cluster.models, out, "diffusionopd", "http", 3 * STEPS, f"{cluster.url}/router", 4
        )

    thread = threading.Thread(target=train)
    thread.start()
    steps = out / "steps.jsonl"
    deadline = time.monotonic() + 120
    while not (steps.exists() and len(steps.read_text().splitlines()) >= STEPS // 2):
        assert thread.is_alive() and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::teacher-a#")
    ]
    assert len(replicas) == 2, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
    killed_at = len(steps.read_text().splitlines())
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert killed_at < 3 * STEPS, "the kill came after the run"
    assert result["report"]["steps"] == 3 * STEPS
    assert len(steps.read_text().splitlines()) == 3 * STEPS


def test_user_config_swap_under_a_request_stream(cluster: ServeCluster) -> None:
    """Every request of a stream to teacher-a (direct and through the router) succeeds while
    its two replicas move to teacher b's checkpoint; afterwards both answer with b's digest."""
    new = _digest(cluster.models, "teacher-b")
    statuses: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def stream(target: str, model: str) -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                status, params = _teacher_call(c, target, model)
                statuses.append(status)
                if status != 200:
                    failures.append(f"{target}: {status} {params}")

    threads = [
        threading.Thread(target=stream, args=(f"{cluster.url}/teacher-a", "teacher-a")),
        threading.Thread(target=stream, args=(f"{cluster.url}/router", "a")),
    ]
    for th in threads:
        th.start()
    try:
        time.sleep(1.0)
        app = app_doc(cluster.doc, "teacher-a")
        dep = {**app["deployments"][0], "user_config": {"checkpoint": "teacher-b.safetensors"}}
        deploy_config({"applications": [{**app, "deployments": [dep]}]})
        time.sleep(1.0)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert statuses and not failures, failures
    with httpx.Client(timeout=60) as c:
        digests = {
            _teacher_call(c, f"{cluster.url}/teacher-a", "teacher-a", n)[1]["digest"]
            for n in range(16, 48)  # 32 calls over 2 replicas
        }
        assert digests == {new}
        _, params = call_router(c, f"{cluster.url}/router", *states(64), route=np.zeros(64))
        assert params["a.digest"] == new


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"kind": "vae"}, "kind"),
        ({"checkpoint": "/nowhere/teacher.safetensors"}, "checkpoint"),
        ({"threds": 2}, "threds"),
        ({"deployments": {"ray_actor_options": {"num_gpus": 1}}}, "num_gpus"),
    ],
)
def test_bad_config_fails_the_deploy_naming_the_key(
    cluster: ServeCluster, change: dict, key: str
) -> None:
    change = dict(change)
    app = {**app_doc(cluster.doc, "base"), "name": "bad", "route_prefix": "/bad"}
    dep = {**app["deployments"][0], **change.pop("deployments", {})}
    app = {**app, "args": {**app["args"], **change}, "deployments": [dep]}
    with pytest.raises(UsageError, match=key):
        deploy_config({"applications": [app]})


def test_multiplexed_lora_teacher_answers_per_adapter(
    cluster: ServeCluster, tmp_path: Path
) -> None:
    """LoRA specialists on one tiny SD3 base through ``@serve.multiplexed``: each model id is
    its adapter (equal to the peft-merged model), at most ``max_adapters`` stay loaded per
    replica (LRU), and an evicted adapter loads again on demand."""
    from tests.services.diffusers_helpers import (
        make_lora,
        make_sd3,
        merged,
        sd3_inputs,
        sd3_reference,
    )

    base, root = tmp_path / "base", tmp_path / "loras"
    make_sd3(base, seed=0)
    for i, name in enumerate(("teacher-a", "teacher-b", "teacher-c")):
        make_lora(base, root / name, seed=1 + i)
    app = {
        "name": "loras",
        "route_prefix": "/loras",
        "import_path": "services.teacher.ray_deployment:app_builder",
        "args": {
            "model_dir": str(base),
            "name": "base",
            "lora_root": str(root),
            "max_adapters": 2,
            "threads": 1,
        },
        "deployments": [{"name": "base", "ray_actor_options": {"num_cpus": 0.1}}],
    }
    deploy_config({"applications": [app]})
    inputs = sd3_inputs(2, seed=3, text_rows=1)
    url = f"{cluster.url}/loras"
    try:
        with httpx.Client(timeout=120) as c:
            for name in ("teacher-a", "teacher-b", "teacher-c", "teacher-a"):
                want = sd3_reference(merged(base, root / name), inputs)
                body, headers = encode_request(inputs)
                headers["serve_multiplexed_model_id"] = name
                r = c.post(f"{url}/v2/models/{name}/infer", content=body, headers=headers)
                assert r.status_code == 200, r.text
                v = decode_response(r.content, r.headers.get(HEADER_LENGTH)).tensors["v"]
                assert np.abs(v - want).max() <= 1e-4, name
                loaded = {e["name"] for e in c.post(f"{url}/v2/repository/index").json()}
                assert name in loaded and len(loaded - {"base"}) <= 2, loaded
            assert c.get(f"{url}/v2/models/teacher-z").status_code == 404
        # by handle, as the Ray router calls it (serve://loras#teacher-c): loaded on demand
        from ray import serve

        body, headers = encode_request(inputs)
        handle = serve.get_app_handle("loras").options(multiplexed_model_id="teacher-c")
        status, out_headers, content = handle.http.remote(
            "POST", "/v2/models/teacher-c/infer", body, headers
        ).result()
        assert status == 200
        v = decode_response(content, out_headers.get(HEADER_LENGTH.lower())).tensors["v"]
        want = sd3_reference(merged(base, root / "teacher-c"), inputs)
        assert np.abs(v - want).max() <= 1e-4
    finally:
        from ray import serve

        serve.delete("loras")
