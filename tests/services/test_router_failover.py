"""Runtime registry swaps, replica failure and overload, with real processes on loopback."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.procs import Service
from tests.services.router_helpers import (
    admin,
    client,
    start_router,
    start_swap_pair,
    start_teacher,
    states,
)

ROUTE = np.tile(np.array([0, 1], np.int32), 16)  # rows for both teachers in every request


@pytest.fixture(scope="module")
def teacher_b(tiny_models: Path):
    svc = start_teacher(tiny_models / "teacher-b.safetensors", "b")
    yield svc
    svc.stop()


def _stream(url: str, n: int, workers: int, on_done=None) -> list[dict]:
    """``n`` opd-router requests from ``workers`` threads; each record: status, times, params."""
    x, t = states(len(ROUTE), seed=7)
    body, headers = encode_request({"x": x, "t": t, "route": ROUTE}, outputs=["v", "teacher"])
    records: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        with client() as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.monotonic()
                try:
                    r = c.post(f"{url}/v2/models/opd-router/infer", content=body, headers=headers)
                    rec = {"status": r.status_code, "start": start, "end": time.monotonic()}
                    if r.status_code == 200:
                        rec["params"] = decode_response(
                            r.content, r.headers.get(HEADER_LENGTH)
                        ).parameters
                    else:
                        rec["error"] = r.text
                except httpx.HTTPError as exc:
                    rec = {
                        "status": -1,
                        "start": start,
                        "end": time.monotonic(),
                        "error": repr(exc),
                    }
                with lock:
                    records.append(rec)
                    done = len(records)
                if on_done:
                    on_done(done)

    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(worker) for _ in range(workers)]:
            f.result()
    return records


@pytest.mark.slow
def test_swap_mid_stream_no_failures_and_new_version(tiny_models: Path, teacher_b: Service) -> None:
    old, new = start_swap_pair(tiny_models)
    router = None
    try:
        router = start_router("--teacher", f"a={old.url}", "--teacher", f"b={teacher_b.url}")
        swapped: dict[str, float] = {}

        def swap_at_300(done: int) -> None:
            if done == 300 and not swapped:
                swapped["start"] = time.monotonic()
                r = httpx.put(
                    f"{router.url}/v1/teachers/a", json={"endpoints": [new.url]}, headers=admin()
                )
                assert r.status_code == 200, r.text
                swapped["end"] = time.monotonic()

        records = _stream(router.url, 1000, workers=4, on_done=swap_at_300)
    finally:
        for s in (old, new, router):
            if s is not None:
                s.stop()
    failures = [r for r in records if r["status"] != 200]
    assert not failures, failures[:3]
    assert len(records) == 1000 and swapped
    before = [r["params"] for r in records if r["end"] < swapped["start"]]
    after = [r["params"] for r in records if r["start"] > swapped["end"]]
    assert before and after
    assert {p["a.version"] for p in before} == {"1"} and {p["a.replica"] for p in before} == {
        old.url
    }
    assert {p["a.version"] for p in after} == {"2"} and {p["a.replica"] for p in after} == {new.url}
    assert all(p["b.version"] == "1" for p in before + after)


@pytest.mark.slow
def test_replica_killed_mid_stream_then_all_down(tiny_models: Path, teacher_b: Service) -> None:
    ckpt = tiny_models / "teacher-a.safetensors"
    a1, a2 = start_teacher(ckpt, "a"), start_teacher(ckpt, "a")
    deadline_s = 3.0
    router = start_router(
        "--teacher",
        f"a={a1.url},{a2.url}",
        "--teacher",
        f"b={teacher_b.url}",
        "--deadline-s",
        str(deadline_s),
        "--health-interval-s",
        "0.2",
    )
    extra: list[Service] = []
    try:
        records = _stream(
            router.url, 400, workers=4, on_done=lambda done: a1.kill() if done == 100 else None
        )
        failures = [r for r in records if r["status"] != 200]
        assert not failures, failures[:3]
        replicas = {p["a.replica"] for p in (r["params"] for r in records[-100:])}
        assert replicas == {a2.url}
        with client() as c:
            reg = c.get(f"{router.url}/v1/teachers/a").json()
            dead = next(r for r in reg["replicas"] if r["url"] == a1.url)
            assert dead["live"] is False and dead["cause"]
            # a replica back on the same address is health-checked back in
            port = a1.url.rsplit(":", 1)[1]
            extra.append(start_teacher(ckpt, "a", "--port", port))
            for _ in range(100):
                reg = c.get(f"{router.url}/v1/teachers/a").json()
                if all(r["live"] for r in reg["replicas"]):
                    break
                time.sleep(0.1)
            assert all(r["live"] for r in reg["replicas"]), reg
            # every replica of a down: 503 naming the teacher, within the deadline
            extra[0].kill()
            a2.kill()
            x, t = states(len(ROUTE))
            body, headers = encode_request({"x": x, "t": t, "route": ROUTE})
            start = time.monotonic()
            r = c.post(
                f"{router.url}/v2/models/opd-router/infer",
                content=body,
                headers=headers,
                timeout=30,
            )
            elapsed = time.monotonic() - start
            assert r.status_code == 503 and "Retry-After" in r.headers
            assert "teacher 'a'" in r.json()["error"], r.json()
            assert elapsed < deadline_s + 1.0
            # teacher b alone still answers
            body, headers = encode_request({"x": x, "t": t, "route": np.ones(len(ROUTE), np.int32)})
            assert (
                c.post(
                    f"{router.url}/v2/models/opd-router/infer", content=body, headers=headers
                ).status_code
                == 200
            )
            assert c.get(f"{router.url}/v2/health/ready").status_code == 503
    finally:
        for s in (a1, a2, router, *extra):
            s.stop()


def test_full_queue_answers_503_with_retry_after(tiny_models: Path) -> None:
    slow = start_teacher(tiny_models / "teacher-a.safetensors", "a", "--max-delay-ms", "300")
    router = start_router(
        "--teacher",
        f"a={slow.url}",
        "--policy",
        "average",
        "--max-inflight",
        "1",
        "--max-queue",
        "1",
    )
    try:
        x, t = states(16)
        body, headers = encode_request({"x": x, "t": t})

        def one(_: int) -> httpx.Response:
            return httpx.post(
                f"{router.url}/v2/models/opd-router/infer",
                content=body,
                headers=headers,
                timeout=30,
            )

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(one, range(8)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes, codes
        full = next(r for r in responses if r.status_code == 503)
        assert full.headers["Retry-After"] and "queue is full" in full.json()["error"]
        assert one(0).status_code == 200  # overload passed, serving again
    finally:
        slow.stop()
        router.stop()


def test_checkpoint_loaded_behind_the_router_is_picked_up(tiny_models: Path) -> None:
    """Teacher a's server loads teacher b's checkpoint through its own repository API: the
    routers' registries follow (version, digest, mode centers). One router learns it from an
    answer (periodic re-reads off), the other, never asked, from its periodic metadata re-read
    (how an in-client router's registry, whose answers the router never sees, follows)."""
    a = start_teacher(tiny_models / "teacher-a.safetensors", "a")
    asked = start_router("--teacher", f"a={a.url}", "--metadata-refresh-s", "0")
    idle = start_router("--teacher", f"a={a.url}", "--metadata-refresh-s", "0.2")
    try:
        with client() as c:
            before = {r.url: c.get(f"{r.url}/v1/teachers").json() for r in (asked, idle)}
            assert before[asked.url]["teachers"][0]["modes"] == [0, 2]
            r = c.post(
                f"{a.url}/v2/repository/models/a/load",
                headers=admin(),
                json={"parameters": {"checkpoint": "teacher-b.safetensors"}},
            )
            assert r.status_code == 200, r.text
            x, t = states(16)
            body, headers = encode_request({"x": x, "t": t}, outputs=["v", "teacher"])
            # the first answer comes from the new checkpoint and triggers the refresh
            first = c.post(f"{asked.url}/v2/models/opd-router/infer", content=body, headers=headers)
            assert first.status_code == 200
            params = decode_response(first.content, first.headers[HEADER_LENGTH]).parameters
            assert params["a.version"] == r.json()["version"]
            assert params["a.digest"] == r.json()["digest"]  # which weights, not just a count
            for url in (asked.url, idle.url):
                deadline = time.monotonic() + 20
                after = before[url]
                while time.monotonic() < deadline:
                    after = c.get(f"{url}/v1/teachers").json()
                    if after["generation"] > before[url]["generation"]:
                        break
                    time.sleep(0.1)
                teacher = after["teachers"][0]
                assert teacher["modes"] == [1, 3], after
                assert teacher["digest"] != before[url]["teachers"][0]["digest"]
                assert teacher["version"] == r.json()["version"]
                assert teacher["replicas"][0]["digest"] == teacher["digest"]
                metrics = c.get(f"{url}/metrics").text
                assert 'opd_router_registry_changes_total{op="refresh"} 1.0' in metrics
    finally:
        asked.stop()
        idle.stop()
        a.stop()
