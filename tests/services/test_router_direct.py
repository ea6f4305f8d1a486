"""In-client routing (services/router/direct.py) against real teacher and router processes:
same answers as the router, registry watch, swaps and replica failure without failed requests."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from common.procs import Service
from services.router.direct import DirectRouter, registry_from_doc
from services.router.registry import RegistryError
from tests.services.router_helpers import (
    admin,
    call_router,
    client,
    start_router,
    start_swap_pair,
    start_teacher,
    start_teachers,
    states,
)

ROUTE = np.tile(np.array([0, 1], np.int32), 16)  # rows for both teachers in every request


@pytest.fixture(scope="module")
def cluster(tiny_models: Path):
    """Teachers a, b, anchor base and a router over them: name -> service."""
    svcs = start_teachers(tiny_models)
    svcs["router"] = start_router(
        "--teacher",
        f"a={svcs['a'].url}",
        "--teacher",
        f"b={svcs['b'].url}",
        "--anchor",
        f"base={svcs['base'].url}",
    )
    yield svcs
    for s in svcs.values():
        s.stop()


@pytest.mark.parametrize("policy", ["nearest", "label", "average"])
def test_in_client_routing_equals_the_router(cluster: dict[str, Service], policy: str) -> None:
    x, t = states(1536, seed=4)
    route = np.random.default_rng(5).integers(0, 2, size=1536).astype(np.int32)
    outputs = ["v", "teacher", "v_anchor"]
    inputs = {"x": x, "t": t} | ({"route": route} if policy == "label" else {})

    async def routed():
        async with DirectRouter(cluster["router"].url) as direct:
            return await direct.infer(inputs, outputs, {"policy": policy})

    got = asyncio.run(routed())
    with client() as c:
        want, params = call_router(
            c,
            cluster["router"].url,
            x,
            t,
            route=route if policy == "label" else None,
            outputs=outputs,
            parameters={"policy": policy},
        )
    np.testing.assert_array_equal(got.outputs["teacher"], want["teacher"])
    np.testing.assert_allclose(got.outputs["v"], want["v"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.outputs["v_anchor"], want["v_anchor"], atol=1e-6, rtol=0)
    p = got.parameters
    assert p["policy"] == policy and p["teachers"] == "a,b" and p["anchor"] == "base"
    for name in ("a", "b", "base"):
        assert p[f"{name}.rows"] == params[f"{name}.rows"]
        assert p[f"{name}.replica"] == cluster[name].url  # called directly, not via the router


@pytest.mark.parametrize("policy", ["nearest", "average"])
def test_parts_teacher_by_teacher_add_up_to_the_whole_answer(
    cluster: dict[str, Service], policy: str
) -> None:
    """``infer_parts``: one part per teacher with rows (each row in exactly one), anchor rows
    included; together they are ``infer``'s answer and its costs. Average needs every teacher
    on every row: one part."""
    x, t = states(1536, seed=6)
    outputs = ["v", "teacher", "v_anchor"]

    async def both():
        async with DirectRouter(cluster["router"].url) as direct:
            whole = await direct.infer({"x": x, "t": t}, outputs, {"policy": policy})
            parts = [
                p async for p in direct.infer_parts({"x": x, "t": t}, outputs, {"policy": policy})
            ]
            return whole, parts

    whole, parts = asyncio.run(both())
    assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
    if policy == "average":
        assert len(parts) == 1 and parts[0].rows is None
        got = parts[0].outputs
    else:
        assert len(parts) == 2
        rows = np.concatenate([p.rows for p in parts])
        np.testing.assert_array_equal(np.sort(rows), np.arange(1536))
        got = {k: np.empty_like(a) for k, a in whole.outputs.items()}
        for part in parts:
            assert len(set(part.outputs["teacher"].tolist())) == 1  # one teacher's rows
            for k, a in part.outputs.items():
                got[k][part.rows] = a
    np.testing.assert_array_equal(got["teacher"], whole.outputs["teacher"])
    np.testing.assert_allclose(got["v"], whole.outputs["v"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["v_anchor"], whole.outputs["v_anchor"], atol=1e-6, rtol=0)
    for key in ("requests", "teacher_bytes_sent"):  # (answers' JSON headers vary in length)
        assert sum(p.parameters[key] for p in parts) == whole.parameters[key]
    assert "route_ms" in parts[-1].parameters and "base.rows" in parts[-1].parameters


def test_bad_input_and_non_http_registry_are_refused(cluster: dict[str, Service]) -> None:
    from services.router.fanout import InputError

    async def bad() -> str:
        async with DirectRouter(cluster["router"].url) as direct:
            try:
                await direct.infer({"x": np.zeros((3, 2), np.float32)}, ["v"])
            except InputError as exc:
                return str(exc)
        return "no error"

    assert "missing input 't'" in asyncio.run(bad())
    doc = {"policy": "nearest", "teachers": [{"name": "a", "replicas": [{"url": "ray://a"}]}]}
    with pytest.raises(RegistryError, match="route through the router"):
        registry_from_doc(doc)
    with pytest.raises(RegistryError, match="cannot read the registry of router"):
        asyncio.run(DirectRouter("http://127.0.0.1:9").start(timeout_s=1.0))


def test_registry_watch_answers_on_change(cluster: dict[str, Service]) -> None:
    url = cluster["router"].url
    with client() as c:
        first = c.get(f"{url}/v1/teachers").json()
        gen = first["generation"]
        assert [t["name"] for t in first["teachers"]] == ["a", "b"]
        # unchanged: a short watch answers with the same generation
        same = c.get(f"{url}/v1/teachers", params={"after": gen, "wait_s": 0.2}).json()
        assert same["generation"] == gen
        assert c.get(f"{url}/v1/teachers", params={"after": "x"}).status_code == 422
        got: dict = {}

        def watch() -> None:  # held open for up to 60 s; the client gives up after 30
            with client(timeout=30) as w:
                got["doc"] = w.get(f"{url}/v1/teachers", params={"after": gen, "wait_s": 60}).json()

        waiter = threading.Thread(target=watch)
        waiter.start()
        endpoints = {"endpoints": [cluster["b"].url]}
        r = c.put(f"{url}/v1/teachers/b", json=endpoints, headers=admin())
        assert r.status_code == 200, r.text
        waiter.join(35)
    assert not waiter.is_alive() and "doc" in got, "the watch did not answer on the change"
    assert got["doc"]["generation"] > gen


def _stream(direct: DirectRouter, n: int, workers: int, on_done) -> list[dict]:
    """``n`` in-client requests from ``workers`` coroutines; each record: generation, outcome."""
    x, t = states(len(ROUTE), seed=7)
    records: list[dict] = []
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            gen = direct.generation
            try:
                res = await direct.infer({"x": x, "t": t, "route": ROUTE}, ["v", "teacher"])
                rec = {"ok": True, "gen": gen, "params": res.parameters}
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                rec = {"ok": False, "gen": gen, "error": repr(exc)}
            records.append(rec)
            await on_done(len(records))

    async def run() -> None:
        async with direct:
            await asyncio.gather(*(worker() for _ in range(workers)))

    asyncio.run(run())
    return records


@pytest.mark.slow
def test_swap_mid_stream_reaches_the_client(tiny_models: Path, cluster: dict[str, Service]) -> None:
    old, new = start_swap_pair(tiny_models)
    router = None
    try:
        router = start_router("--teacher", f"a={old.url}", "--teacher", f"b={cluster['b'].url}")
        direct = DirectRouter(router.url)

        async def swap_at_200(done: int) -> None:
            if done == 200:
                async with httpx.AsyncClient() as c:
                    r = await c.put(
                        f"{router.url}/v1/teachers/a",
                        json={"endpoints": [new.url]},
                        headers=admin(),
                    )
                assert r.status_code == 200, r.text

        records = _stream(direct, 1000, workers=4, on_done=swap_at_200)
    finally:
        for s in (old, new, router):
            if s is not None:
                s.stop()
    failures = [r for r in records if not r["ok"]]
    assert not failures, failures[:3]
    assert len(records) == 1000
    gens = sorted({r["gen"] for r in records})
    assert len(gens) == 2, gens  # the watch delivered the swap while the stream ran
    before = [r["params"] for r in records if r["gen"] == gens[0]]
    after = [r["params"] for r in records if r["gen"] == gens[1]]
    assert {p["a.version"] for p in before} == {"1"} and {p["a.replica"] for p in before} == {
        old.url
    }
    assert {p["a.version"] for p in after} == {"2"} and {p["a.replica"] for p in after} == {new.url}
    assert all(p["b.version"] == "1" for p in before + after)


@pytest.mark.slow
def test_replica_killed_mid_stream_no_failures(
    tiny_models: Path, cluster: dict[str, Service]
) -> None:
    ckpt = tiny_models / "teacher-a.safetensors"
    a1, a2 = start_teacher(ckpt, "a"), start_teacher(ckpt, "a")
    router = start_router("--teacher", f"a={a1.url},{a2.url}", "--teacher", f"b={cluster['b'].url}")
    try:
        direct = DirectRouter(router.url, deadline_s=3.0, health_interval_s=0.2)

        async def kill_at_100(done: int) -> None:
            if done == 100:
                a1.kill()

        records = _stream(direct, 400, workers=4, on_done=kill_at_100)
    finally:
        for s in (a1, a2, router):
            s.stop()
    failures = [r for r in records if not r["ok"]]
    assert not failures, failures[:3]
    assert {r["params"]["a.replica"] for r in records[-100:]} == {a2.url}
