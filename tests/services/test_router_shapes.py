"""The router with latent teachers (``x [B, C, H, W]``, ``encoder_hidden_states [B, L, E]``),
real processes on loopback: label routing passes each teacher its rows and their conditioning,
1-row conditioning is broadcast, request parameters reach the teachers, dtypes pass through,
time conventions are checked at registration, bad input is a clear 4xx; in-client routing
answers the same.

The teachers are :mod:`tests.services.latent_peer` processes, whose answers are a known function
of their inputs (``v = x * scale + mean(cond) + t + guidance_scale``): the inputs below are
multiples of 1/4, so every merged row can be checked exactly.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from common import routing
from common.codec import (
    HEADER_LENGTH,
    bf16_to_float32,
    datatype_of,
    decode_response,
    encode_request,
    float32_to_bf16,
)
from common.procs import Service, start_service
from services.router.direct import DirectRouter
from services.router.fanout import MAX_COND_ID, InputError, UndeclaredInput, split_cond_id
from services.router.pool import TeacherRejected
from tests.services.latent_peer import COND, velocity
from tests.services.router_helpers import REPO, admin, client, start_router

SHAPE = (2, 4, 4)  # S of x [B, C, H, W]
COND_SHAPE = (2, 4)  # L, E: mean over 8 values of multiples of 1/4 stays exact
SCALES = {"a": 2.0, "b": 3.0, "base": 1.0, "sigma": 5.0, "silent": 7.0}


def start_peer(*names: str, time_convention: str = "flow-t") -> Service:
    """One peer process serving the models ``names`` (one conditioning cache for all)."""
    cmd = [
        sys.executable,
        "-m",
        "tests.services.latent_peer",
        "--name",
        ",".join(names),
        "--scale",
        ",".join(str(SCALES[n]) for n in names),
        "--shape",
        ",".join(map(str, SHAPE)),
        "--cond",
        ",".join(map(str, COND_SHAPE)),
        "--time-convention",
        time_convention,
    ]
    return start_service(cmd, cwd=str(REPO))


@pytest.fixture(scope="module")
def peers():
    """Latent teachers a, b and base (flow-t), sigma (another convention), silent (none), and
    a and b again in one process (pair)."""
    svcs = {
        "a": start_peer("a"),
        "b": start_peer("b"),
        "base": start_peer("base"),
        "sigma": start_peer("sigma", time_convention="sigma-1000"),
        "silent": start_peer("silent", time_convention="none"),
        "pair": start_peer("a", "b"),
    }
    yield svcs
    for s in svcs.values():
        s.stop()


@pytest.fixture(scope="module")
def router(peers: dict[str, Service]):
    svc = start_router(
        "--teacher",
        f"a={peers['a'].url}",
        "--teacher",
        f"b={peers['b'].url}",
        "--anchor",
        f"base={peers['base'].url}",
        "--policy",
        "label",
    )
    yield svc
    assert svc.stop() == 0, svc.output()


def quarters(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 multiples of 1/4 in [-4, 4): exact through the peers' arithmetic."""
    return (rng.integers(-16, 16, size=shape) / 4).astype(np.float32)


def batch(n: int, seed: int = 0, cond_rows: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": quarters(rng, (n, *SHAPE)),
        "t": quarters(rng, (n,)) / 4 + 0.5,
        COND: quarters(rng, (cond_rows or n, *COND_SHAPE)),
    }


def post(
    c: httpx.Client,
    url: str,
    inputs: dict[str, np.ndarray],
    parameters: dict | None = None,
    outputs: list[str] | None = None,
) -> httpx.Response:
    body, headers = encode_request(
        inputs, outputs=outputs or ["v", "teacher"], binary=True, parameters=parameters
    )
    return c.post(f"{url}/v2/models/opd-router/infer", content=body, headers=headers)


def answer(r: httpx.Response) -> tuple[dict[str, np.ndarray], dict]:
    assert r.status_code == 200, r.text
    msg = decode_response(r.content, r.headers.get(HEADER_LENGTH))
    return msg.tensors, msg.parameters


def expected(inputs: dict[str, np.ndarray], teacher: str, guidance: float = 0.0) -> np.ndarray:
    return velocity(inputs["x"], inputs["t"], inputs[COND], SCALES[teacher], guidance)


def per_row(inputs: dict[str, np.ndarray], route: np.ndarray, guidance: float = 0.0):
    """What label routing must answer: row i from teacher route[i], with its own conditioning."""
    want = {k: expected(inputs, k, guidance) for k in ("a", "b")}
    return np.where(route.reshape(-1, 1, 1, 1) == 0, want["a"], want["b"])


def assert_serving(c: httpx.Client, router: Service) -> None:
    """The router is ready and no replica was ejected."""
    assert c.get(f"{router.url}/v2/health/ready").status_code == 200
    for t in c.get(f"{router.url}/v1/teachers").json()["teachers"]:
        assert all(r["live"] for r in t["replicas"]), t


def test_merge_rows_keeps_any_row_shape_and_dtype() -> None:
    rng = np.random.default_rng(0)
    assignment = rng.integers(0, 3, size=11)
    rows = routing.split_rows(assignment, 3)
    answers = [np.full((len(r), *SHAPE), k, np.float16) for k, r in enumerate(rows)]
    merged = routing.merge_rows(assignment, rows, answers, SHAPE)
    assert merged.dtype == np.float16 and merged.shape == (11, *SHAPE)
    np.testing.assert_array_equal(merged[:, 0, 0, 0], assignment.astype(np.float16))
    avg = np.full(4, routing.AVERAGE_INDEX)
    mean = routing.merge_rows(avg, [np.arange(4)] * 2, [np.ones((4, 3), np.float16)] * 2, 3)
    assert mean.dtype == np.float16 and (mean == 1).all()


def test_split_cond_id_names_the_teacher_and_its_rows_within_the_teachers_limit() -> None:
    rows = np.array([0, 3, 4])
    one = split_cond_id("p", "a", rows)
    assert one.startswith("p@a:") and one == split_cond_id("p", "a", rows.astype(np.int32))
    assert one != split_cond_id("p", "b", rows) != split_cond_id("p", "a", np.array([0, 3, 5]))
    long = split_cond_id("x" * 256, "a", rows)
    assert len(long) <= MAX_COND_ID and long != split_cond_id("y" * 256, "a", rows)
    from services.teacher.conditioned import MAX_COND_ID as TEACHER_LIMIT

    assert MAX_COND_ID == TEACHER_LIMIT  # the router's copy of the teachers' limit


def test_label_routing_sends_each_row_its_own_conditioning(router: Service) -> None:
    inputs = batch(12, seed=1)
    route = np.array([0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0], np.int32)
    with client() as c:
        out, params = answer(
            post(
                c,
                router.url,
                {**inputs, "route": route},
                parameters={"guidance_scale": 0.75},
                outputs=["v", "teacher", "v_anchor"],
            )
        )
    np.testing.assert_array_equal(out["teacher"], route)
    assert out["v"].dtype == np.float32 and out["v"].shape == (12, *SHAPE)
    # guidance_scale reached both teachers and the anchor: it is part of each answer
    np.testing.assert_array_equal(out["v"], per_row(inputs, route, 0.75))
    np.testing.assert_array_equal(out["v_anchor"], expected(inputs, "base", 0.75))
    assert params["a.rows"] == 6 and params["b.rows"] == 6 and params["base.rows"] == 12


def test_one_row_of_conditioning_is_broadcast_and_average_works(router: Service) -> None:
    inputs = batch(5, seed=2, cond_rows=1)
    route = np.array([1, 0, 1, 1, 0], np.int32)
    with client() as c:
        out, _ = answer(post(c, router.url, {**inputs, "route": route}))
        avg, params = answer(post(c, router.url, inputs, parameters={"policy": "average"}))
    np.testing.assert_array_equal(out["v"], per_row(inputs, route))
    want = (expected(inputs, "a") + expected(inputs, "b")) / 2
    np.testing.assert_array_equal(avg["v"], want)
    assert (avg["teacher"] == -1).all() and params["a.rows"] == params["b.rows"] == 5


def test_fp16_states_pass_through_unconverted(router: Service) -> None:
    inputs = batch(6, seed=3)
    inputs["x"] = inputs["x"].astype(np.float16)
    route = np.array([0, 1, 0, 1, 0, 1], np.int32)
    with client() as c:
        out, _ = answer(post(c, router.url, {**inputs, "route": route}))
    # the peers answer in the datatype they were sent: FP16 came back, so FP16 went out
    assert datatype_of(out["v"]) == "FP16"
    np.testing.assert_array_equal(out["v"], per_row(inputs, route))


def test_bf16_states_pass_through_and_average_in_bf16(router: Service) -> None:
    inputs = batch(6, seed=9)
    inputs["x"] = float32_to_bf16(inputs["x"])
    route = np.array([1, 1, 0, 1, 0, 0], np.int32)
    with client() as c:
        out, _ = answer(post(c, router.url, {**inputs, "route": route}))
        avg, _ = answer(post(c, router.url, inputs, parameters={"policy": "average"}))
    assert datatype_of(out["v"]) == "BF16" and datatype_of(avg["v"]) == "BF16"
    np.testing.assert_array_equal(out["v"], per_row(inputs, route))
    a, b = (bf16_to_float32(expected(inputs, k)) for k in "ab")
    np.testing.assert_array_equal(avg["v"], float32_to_bf16((a + b) / 2))


def test_cond_id_reaches_the_teachers_and_an_unknown_one_is_their_4xx(router: Service) -> None:
    inputs = batch(8, seed=4)
    route = np.array([0, 0, 1, 1, 0, 1, 0, 1], np.int32)
    with client() as c:
        # sent once with the tensors: each teacher keeps its own rows under the id
        first, _ = answer(
            post(c, router.url, {**inputs, "route": route}, parameters={"cond_id": "prompt-1"})
        )
        states = {k: inputs[k] for k in ("x", "t")}
        again, _ = answer(
            post(c, router.url, {**states, "route": route}, parameters={"cond_id": "prompt-1"})
        )
        np.testing.assert_array_equal(first["v"], per_row(inputs, route))
        np.testing.assert_array_equal(again["v"], first["v"])
        # an id the teachers never got: their 4xx comes back as is, saying to resend
        r = post(c, router.url, {**states, "route": route}, parameters={"cond_id": "never-sent"})
        assert r.status_code == 404, r.text
        assert "resend" in r.json()["error"] and "never-sent" in r.json()["error"]
        assert_serving(c, router)
        answer(post(c, router.url, {**inputs, "route": route}))


def test_teachers_sharing_a_process_keep_their_own_rows_under_one_cond_id(
    peers: dict[str, Service],
) -> None:
    # a and b in one process share its conditioning cache, as LoRA specialists on one base do:
    # the caller's one cond_id must not make either teacher use the other's rows
    pair = peers["pair"].url
    svc = start_router("--teacher", f"a={pair}#a", "--teacher", f"b={pair}#b", "--policy", "label")
    try:
        inputs = batch(8, seed=10)
        states = {k: inputs[k] for k in ("x", "t")}
        route = np.array([0, 1, 0, 1, 1, 0, 0, 1], np.int32)
        with client() as c:
            sent, _ = answer(
                post(c, svc.url, {**inputs, "route": route}, parameters={"cond_id": "batch-7"})
            )
            by_id, _ = answer(
                post(c, svc.url, {**states, "route": route}, parameters={"cond_id": "batch-7"})
            )
            np.testing.assert_array_equal(sent["v"], per_row(inputs, route))
            np.testing.assert_array_equal(by_id["v"], sent["v"])
            # other rows per teacher (same counts): not what either holds, so their 4xx, never
            # another row's prompt; sent again with the tensors, it is answered
            other = route[::-1].copy()
            r = post(c, svc.url, {**states, "route": other}, parameters={"cond_id": "batch-7"})
            assert r.status_code == 404 and "resend" in r.json()["error"], r.text
            again, _ = answer(
                post(c, svc.url, {**inputs, "route": other}, parameters={"cond_id": "batch-7"})
            )
            np.testing.assert_array_equal(again["v"], per_row(inputs, other))
            # one teacher with every row keeps the caller's id as it is
            every = np.zeros(8, np.int32)
            answer(post(c, svc.url, {**inputs, "route": every}, parameters={"cond_id": "all"}))
            body, headers = encode_request(states, parameters={"cond_id": "all"})
            direct = c.post(f"{pair}/v2/models/a/infer", content=body, headers=headers)
            np.testing.assert_array_equal(answer(direct)[0]["v"], expected(inputs, "a"))
    finally:
        svc.stop()


def test_nearest_without_centers_says_use_label_or_average(router: Service) -> None:
    inputs = batch(4, seed=5)
    with client() as c:
        r = post(c, router.url, inputs, parameters={"policy": "nearest"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert "use label or average routing" in error and "D = prod(S)" in error, error


def test_bad_latent_input_is_a_clear_4xx_and_the_router_keeps_serving(router: Service) -> None:
    inputs = batch(6, seed=6)
    route = np.zeros(6, np.int32)
    rng = np.random.default_rng(7)
    with client() as c:
        cases = [
            # an input no teacher declares: 422 naming it
            (
                {**inputs, "route": route, "pooled_projections": quarters(rng, (6, 8))},
                422,
                "input 'pooled_projections' is not an input of teacher 'a'",
            ),
            # conditioning rows that are neither B nor 1
            ({**inputs, "route": route, COND: inputs[COND][:4]}, 400, "must have 6 rows"),
            # conditioning rows of another shape than declared
            (
                {**inputs, "route": route, COND: quarters(rng, (6, 2, 5))},
                400,
                f"input '{COND}' must be [B, 2, 4] for teacher 'a'; got [6, 2, 5]",
            ),
            # states of another shape
            (
                {**inputs, "route": route, "x": quarters(rng, (6, 2, 4, 5))},
                400,
                "input 'x' must be [B, 2, 4, 4]: teacher 'a' takes states of shape [2, 4, 4]",
            ),
            ({**inputs, "route": route, "x": inputs["x"].astype(np.float64)}, 400, "FP64"),
            # missing conditioning: the teacher's own 4xx, passed on
            ({k: inputs[k] for k in ("x", "t")} | {"route": route}, 400, f"missing input '{COND}'"),
        ]
        for doc, status, needle in cases:
            r = post(c, router.url, doc)
            assert r.status_code == status, (needle, r.text)
            assert needle in r.json()["error"], r.json()
        assert_serving(c, router)
        answer(post(c, router.url, {**inputs, "route": route}))


def test_registry_shows_and_checks_time_conventions(
    router: Service, peers: dict[str, Service], tmp_path: Path
) -> None:
    with client() as c:
        reg = c.get(f"{router.url}/v1/teachers").json()
        a = reg["teachers"][0]
        assert a["time_convention"] == "flow-t" and a["backend"] == "diffusers"
        assert {"name": COND, "datatype": "FP32", "shape": [-1, *COND_SHAPE]} in a["inputs"]
        assert {"name": "x", "datatype": "FP32", "shape": [-1, *SHAPE]} in a["inputs"]
        assert reg["anchors"][0]["time_convention"] == "flow-t"
        meta = c.get(f"{router.url}/v2/models/opd-router").json()
        assert meta["parameters"]["time_convention"] == "flow-t"
        assert {"name": "x", "datatype": "FP32", "shape": [-1, *SHAPE]} in meta["inputs"]
        assert COND in [i["name"] for i in meta["inputs"]]
        assert c.get(f"{router.url}/v2/models/a").json()["parameters"]["backend"] == "diffusers"
        # another convention: refused, naming both teachers and both conventions
        r = c.put(
            f"{router.url}/v1/teachers/c", headers=admin(), json={"endpoints": [peers["sigma"].url]}
        )
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert "registry unchanged" in error
        assert "'c'" in error and "'sigma-1000'" in error and "'a'" in error, error
        assert "'flow-t'" in error
        assert [t["name"] for t in c.get(f"{router.url}/v1/teachers").json()["teachers"]] == [
            "a",
            "b",
        ]
        # a teacher that does not say: accepted as unknown
        r = c.put(
            f"{router.url}/v1/teachers/d",
            headers=admin(),
            json={"endpoints": [peers["silent"].url]},
        )
        assert r.status_code == 201 and r.json()["time_convention"] is None, r.text
        assert c.delete(f"{router.url}/v1/teachers/d", headers=admin()).status_code == 200
        assert_serving(c, router)
    # at start-up: latent teachers without mode centers cannot take the default policy
    with pytest.raises(RuntimeError) as err:
        start_router("--teacher", f"a={peers['a'].url}")
    assert "use label or average routing" in str(err.value)
    # at start-up, from flags and from a registry file
    with pytest.raises(RuntimeError) as err:
        start_router(
            "--teacher",
            f"a={peers['a'].url}",
            "--teacher",
            f"c={peers['sigma'].url}",
            "--policy",
            "label",
        )
    assert "'sigma-1000'" in str(err.value) and "'flow-t'" in str(err.value)
    f = tmp_path / "reg.yaml"
    f.write_text(
        f"policy: label\nteachers:\n  a: [{peers['a'].url}]\n"
        f"anchors:\n  base: [{peers['sigma'].url}]\n"
    )
    with pytest.raises(RuntimeError) as err:
        start_router("--registry", str(f))
    assert "anchor 'base'" in str(err.value) and "teacher 'a'" in str(err.value)


def test_in_client_routing_answers_like_the_router(router: Service) -> None:
    inputs = batch(10, seed=8)
    route = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 1], np.int32)

    async def run() -> None:
        async with DirectRouter(router.url) as direct:
            res = await direct.infer(
                {**inputs, "route": route},
                outputs=["v", "teacher", "v_anchor"],
                parameters={"guidance_scale": 0.5, "cond_id": "direct-1"},
            )
            np.testing.assert_array_equal(res.outputs["v"], per_row(inputs, route, 0.5))
            np.testing.assert_array_equal(res.outputs["v_anchor"], expected(inputs, "base", 0.5))
            # teacher by teacher: each part holds its rows, in any order of arrival
            merged = np.zeros_like(res.outputs["v"])
            states = {k: inputs[k] for k in ("x", "t")}
            async for part in direct.infer_parts(
                {**states, "route": route}, parameters={"cond_id": "direct-1"}
            ):
                merged[part.rows] = part.outputs["v"]
            np.testing.assert_array_equal(merged, per_row(inputs, route))
            with pytest.raises(TeacherRejected) as rejected:
                await direct.infer({**states, "route": route}, parameters={"cond_id": "nope"})
            assert rejected.value.status == 404 and "resend" in str(rejected.value)
            with pytest.raises(UndeclaredInput, match="'pooled_projections'"):
                await direct.infer(
                    {**inputs, "route": route, "pooled_projections": np.zeros((10, 8), np.float32)}
                )
            with pytest.raises(InputError, match="use label or average routing"):
                await direct.infer(inputs, parameters={"policy": "nearest"})

    asyncio.run(run())
