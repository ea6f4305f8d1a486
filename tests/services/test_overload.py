"""Overload on real processes (issue 23): the byte bounds of teacher and router, 503 with
Retry-After, 413 over the bound, slow clients cut off, and a training run through a flooded
teacher that loses no step. Small bounds and small requests: the machine is shared."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from common.codec import HEADER_LENGTH, decode_response, encode_request
from common.http1 import Http1Client
from common.procs import Service
from student.commands import TrainSettings, run_train
from tests.services.router_helpers import start_router, start_teacher
from tests.services.test_teacher import reference, states


def body_of(n: int, seed: int = 0) -> tuple[bytes, dict[str, str], np.ndarray, np.ndarray]:
    """A binary infer body of ``n`` states (12 bytes each plus a short JSON header)."""
    x, t = states(n, seed)
    body, headers = encode_request({"x": x, "t": t}, binary=True)
    return body, headers, x, t


def flood(url: str, body: bytes, headers: dict[str, str], n: int) -> list:
    """``n`` concurrent POSTs of ``body``: (status, headers, content) each, or the exception."""

    async def run() -> list:
        client = Http1Client(limit_per_host=n)
        try:
            return await asyncio.gather(
                *(client.post(url, body, headers, timeout=60) for _ in range(n)),
                return_exceptions=True,
            )
        finally:
            await client.aclose()

    return asyncio.run(run())


def metric(url: str, name: str, label: str = "") -> float:
    """The sum of a metric's samples in ``url``'s ``/metrics`` (those whose labels hold
    ``label``, e.g. ``kind="timeout"``, when given)."""
    text = httpx.get(f"{url}/metrics").text
    found = re.findall(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M)
    return sum(float(v) for labels, v in found if label in labels)


def wait_for(check, timeout_s: float = 20.0) -> bool:
    """Poll ``check()`` until true (a state reached, not a time measured)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.fixture(scope="module")
def bounded(tiny_models: Path):
    """Teacher ``a`` held to 1 MiB, with short body and send deadlines."""
    svc = start_teacher(
        tiny_models / "teacher-a.safetensors",
        "a",
        "--max-queue-mb",
        "1",
        "--max-body-mb",
        "16",
        "--body-timeout-s",
        "1",
        "--send-timeout-s",
        "2",
    )
    yield svc
    assert svc.stop() == 0, svc.output()


def test_teacher_says_its_bound_at_start(bounded: Service) -> None:
    assert "admission bound 1 MiB" in bounded.output() and "--max-queue-mb 1" in bounded.output()


def test_teacher_refuses_beyond_its_bound_with_503_retry_after_and_answers_the_rest(
    bounded: Service, tiny_models: Path
) -> None:
    body, headers, x, t = body_of(32768)  # 384 KiB: two fit in the bound, the rest wait outside
    before = metric(bounded.url, "opd_teacher_overloaded_total")
    replies = flood(f"{bounded.url}/v2/models/a/infer", body, headers, 24)
    assert all(not isinstance(r, BaseException) for r in replies), replies
    statuses = [r.status for r in replies]
    assert set(statuses) == {200, 503}, statuses
    ref = reference(tiny_models / "teacher-a.safetensors", x, t)
    for r in replies:
        if r.status == 200:
            v = decode_response(r.content, r.headers.get(HEADER_LENGTH.lower())).tensors["v"]
            assert np.abs(v - ref).max() <= 1e-6
        else:
            assert int(r.headers["retry-after"]) >= 1
            assert "--max-queue-mb" in json.loads(r.content)["error"]
    refused = statuses.count(503)
    assert metric(bounded.url, "opd_teacher_overloaded_total") - before == refused
    assert httpx.get(f"{bounded.url}/v2/health/ready").status_code == 200  # busy is not broken
    assert wait_for(lambda: metric(bounded.url, "opd_teacher_queue_bytes") == 0)


def test_request_larger_than_the_bound_gets_413_naming_it(bounded: Service) -> None:
    body, headers, _, _ = body_of(100_000)  # 1.2 MB: within --max-body-mb, over the 1 MiB bound
    r = httpx.post(f"{bounded.url}/v2/models/a/infer", content=body, headers=headers)
    assert r.status_code == 413
    assert "1048576 bytes" in r.json()["error"] and "--max-queue-mb" in r.json()["error"]
    assert metric(bounded.url, "opd_teacher_queue_bytes") == 0


def test_trickling_body_gets_408_and_the_teacher_keeps_serving(
    bounded: Service, tiny_models: Path
) -> None:
    host, port = bounded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            "POST /v2/models/a/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            "content-length: 500000\r\n\r\n"
        )
        sock.sendall(head.encode() + b"{")
        got = b""
        sock.settimeout(0.2)
        for _ in range(100):  # a byte a tick, until the teacher answers
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                sock.sendall(b" ")
                continue
            got += chunk
            break
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):  # the rest, until the teacher closes
                got += chunk
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"not received within 1 s" in got
    assert metric(bounded.url, "opd_teacher_queue_bytes") == 0  # its 500 kB admission released
    x, t = states(64)
    body, headers = encode_request({"x": x, "t": t}, binary=True)
    r = httpx.post(f"{bounded.url}/v2/models/a/infer", content=body, headers=headers)
    assert r.status_code == 200


def test_client_that_never_reads_its_answer_is_cut_off_and_its_bytes_released(
    tiny_models: Path,
) -> None:
    # An answer larger than the kernel's socket buffers (up to 4 MiB each way on loopback):
    # 1M states in (12 MB), 8 MB out, to a client that never reads.
    teacher = start_teacher(
        tiny_models / "teacher-a.safetensors", "a", "--send-timeout-s", "1", "--max-body-mb", "16"
    )
    body, headers, _, _ = body_of(1_000_000)
    host, port = teacher.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect((host, int(port)))
    try:
        head = f"POST /v2/models/a/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode() + body)  # ...and never read the answer
        assert wait_for(
            lambda: metric(teacher.url, "opd_teacher_errors_total", 'kind="client_stalled"') == 1,
            60,
        ), teacher.output()
        assert metric(teacher.url, "opd_teacher_queue_bytes") == 0
        x, t = states(64)
        small, h = encode_request({"x": x, "t": t}, binary=True)
        assert httpx.post(f"{teacher.url}/v2/models/a/infer", content=small, headers=h).is_success
    finally:
        sock.close()
        teacher.stop()


def test_router_byte_bound_refuses_with_503_retry_after_and_413(tiny_models: Path) -> None:
    teacher = start_teacher(tiny_models / "teacher-a.safetensors", "a")
    router = start_router("--teacher", f"a={teacher.url}", "--max-queue-mb", "1")
    try:
        assert "admission bound 1 MiB" in router.output()
        url = f"{router.url}/v2/models/opd-router/infer"
        body, headers, _, _ = body_of(10_000)  # 120 kB, held 3x while routed: 2 fit in 1 MiB
        replies = flood(url, body, headers, 24)
        assert all(not isinstance(r, BaseException) for r in replies), replies
        statuses = [r.status for r in replies]
        assert set(statuses) == {200, 503}, statuses
        assert all(int(r.headers["retry-after"]) >= 1 for r in replies if r.status == 503)
        assert metric(router.url, "opd_router_overloaded_total") == statuses.count(503)
        big, big_headers, _, _ = body_of(100_000)
        r = httpx.post(url, content=big, headers=big_headers)
        assert r.status_code == 413 and "1048576 bytes" in r.json()["error"]
        assert httpx.get(f"{router.url}/v2/health/ready").status_code == 200
        assert wait_for(lambda: metric(router.url, "opd_router_queue_bytes") == 0)
    finally:
        router.stop()
        teacher.stop()


def hold_the_bound(url: str, nbytes: int) -> threading.Thread:
    """A client that declares an ``nbytes`` body and trickles it: the teacher holds those bytes
    until its body deadline cuts it off (408), refusing what does not fit meanwhile."""

    def trickle() -> None:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            head = (
                f"POST /v2/models/a/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {nbytes}\r\n\r\n"
            )
            sock.sendall(head.encode() + b"{")
            with contextlib.suppress(OSError):
                sock.recv(4096)  # the 408, when the deadline has passed

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("routing", ["router", "client"])
def test_training_through_a_flooded_teacher_completes_every_step(
    tiny_models: Path, tmp_path: Path, routing: str
) -> None:
    # Teacher a: a 256 KiB bound. A trickling client holds nearly all of it for the first 3 s
    # (the run's first calls of a are refused for sure), and bursts of 4 requests of nearly
    # the whole bound arrive every 0.3 s meanwhile: whatever comes during a burst is refused.
    a = start_teacher(
        tiny_models / "teacher-a.safetensors",
        "a",
        "--max-queue-mb",
        "0.25",
        "--body-timeout-s",
        "3",
    )
    b = start_teacher(tiny_models / "teacher-b.safetensors", "b")
    router = start_router("--teacher", f"a={a.url}", "--teacher", f"b={b.url}")
    stop = threading.Event()
    statuses: list[int] = []

    def flooding() -> None:
        body, headers, _, _ = body_of(21_800)  # 261.8 kB of the 262.1 kB bound
        url = f"{a.url}/v2/models/a/infer"
        while not stop.is_set():
            statuses.extend(getattr(r, "status", -1) for r in flood(url, body, headers, 4))
            stop.wait(0.3)

    holder = hold_the_bound(a.url, 262_000)
    assert wait_for(lambda: metric(a.url, "opd_teacher_queue_bytes") == 262_000)
    flooder = threading.Thread(target=flooding, daemon=True)
    flooder.start()
    try:
        settings = TrainSettings(
            models=tiny_models,
            out=tmp_path / "run",
            method="diffusionopd",
            steps=3,
            backend="http",
            router_url=router.url,
            routing=routing,
            stream_chunk=6,
            retries=1,  # busy answers must not use up retries: a failure would end the run
            checkpoint_every=0,
            progress=False,
        )
        assert run_train(settings) == 0
    finally:
        stop.set()
        flooder.join(60)
        holder.join(30)
        router.stop()
        b.stop()
        refused = metric(a.url, "opd_teacher_overloaded_total")
        a.stop()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 3
    assert len((tmp_path / "run" / "steps.jsonl").read_text().splitlines()) == 3
    assert set(statuses) <= {200, 503} and 503 in statuses  # the flood: no resets, no timeouts
    assert refused > statuses.count(503)  # the run's calls were refused too, and waited


def test_bench_overload_floods_teacher_and_router_and_reports(
    tiny_models: Path, tmp_path: Path
) -> None:
    from services.bench.overload import BenchOverloadSettings, run_overload

    settings = BenchOverloadSettings(
        models=tiny_models,
        requests=12,
        states=20_000,  # 240 kB each: 4 fit in the 1 MiB teacher bound, 1 in the router's
        max_queue_mb=1.0,
        after_s=0.5,
        out=tmp_path,
    )
    assert run_overload(settings) == 0
    doc = json.loads((tmp_path / "overload.json").read_text())
    teacher, router = doc["floods"]
    for flood_ in (teacher, router):
        assert set(flood_["statuses"]) <= {"200", "503"} and "200" in flood_["statuses"]
        assert sum(flood_["statuses"].values()) == 12
        assert flood_["rss_peak_mib"] >= flood_["rss_before_mib"] > 0
    assert "503" in router["statuses"] and set(teacher["ready"]) == {"200"}
