"""The raw-ASGI infer path and the chunked forward, in process (no sockets, no subprocess)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from common.asgi import InferFastPath
from common.codec import HEADER_LENGTH, decode_response, encode_request
from services.teacher.app import create_app
from services.teacher.repository import LoadedModel, row_chunks
from services.teacher.settings import TeacherSettings
from services.teacher.synthetic import synthetic_model


def states(n: int, seed: int = 0, dim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.uniform(size=n).astype(np.float32)


def make_app(**overrides) -> InferFastPath:
    settings = TeacherSettings(synthetic=True, name="toy", threads=1, max_body_mb=0.05, **overrides)
    return create_app(settings, admin_token="")


def call(app: InferFastPath, requests: list[tuple], root_path: str = "") -> list[httpx.Response]:
    """Send ``(method, path, body, headers)`` requests through ``app`` over ASGI."""

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [
                await client.request(m, root_path + p, content=b, headers=h)
                for m, p, b, h in requests
            ]

    return asyncio.run(go())


def counter(app: InferFastPath, name: str, **labels: str) -> float:
    text = app.state.core.metrics.render().decode()
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"{name}\{{[^}}]*{sel}[^}}]*\}} (\S+)", text)
    return float(found.group(1)) if found else 0.0


def test_infer_paths_answer_the_model_and_count() -> None:
    app = make_app()
    x, t = states(300)
    body, headers = encode_request({"x": x, "t": t}, binary=True)
    jbody, jheaders = encode_request({"x": x, "t": t}, binary=False, outputs=["v"])
    r1, r2, r3, live = call(
        app,
        [
            ("POST", "/v2/models/toy/infer", body, headers),
            ("POST", "/v2/models/toy/versions/1/infer", body, headers),
            ("POST", "/v2/models/toy/infer", jbody, jheaders),
            ("GET", "/v2/health/live", None, {}),
        ],
    )
    expected = app.state.core.repository.current.forward(x, t)
    for r in (r1, r2, r3):
        assert r.status_code == 200, r.text
        assert int(r.headers["content-length"]) == len(r.content)
        msg = decode_response(r.content, r.headers.get(HEADER_LENGTH))
        np.testing.assert_allclose(msg.tensors["v"], expected, atol=1e-6)
        assert msg.model_name == "toy" and msg.model_version == "1"
        assert msg.parameters["batch_size"] >= 300
    assert r1.headers["content-type"] == "application/octet-stream"
    assert r3.headers["content-type"] == "application/json"
    assert live.json() == {"live": True}  # everything else is the FastAPI app's
    assert counter(app, "opd_teacher_requests_total", protocol="binary") == 2
    assert counter(app, "opd_teacher_requests_total", protocol="json") == 1
    assert counter(app, "opd_teacher_states_total") == 900


def test_refusals_keep_status_body_and_metrics() -> None:
    app = make_app()
    x, t = states(4)
    body, headers = encode_request({"x": x, "t": t}, binary=True)
    big = np.zeros((5000, 2), np.float32)  # 60 kB > max_body_mb 0.05
    big_body, big_headers = encode_request({"x": big, "t": np.zeros(5000, np.float32)})

    async def chunks():  # no Content-Length: bounded while reading
        for _ in range(20):
            yield b" " * 4096

    nan_x = x.copy()
    nan_x[0, 0] = np.nan
    nan_body, nan_headers = encode_request({"x": nan_x, "t": t}, binary=True)
    rs = call(
        app,
        [
            ("POST", "/v2/models/nope/infer", body, headers),
            ("POST", "/v2/models/toy/versions/7/infer", body, headers),
            ("GET", "/v2/models/toy/infer", None, {}),
            ("POST", "/v2/models/toy/infer", big_body, big_headers),
            ("POST", "/v2/models/toy/infer", chunks(), {}),
            ("POST", "/v2/models/toy/infer", b"{not json", {}),
            ("POST", "/v2/models/toy/infer", b"", {}),
            ("POST", "/v2/models/toy/infer", nan_body, nan_headers),
            ("POST", "/v2/models/toy/infer", body, {**headers, "content-length": "x1"}),
            ("POST", "/v2/models/a/b/infer", body, headers),  # not an infer path: FastAPI's 404
        ],
    )
    expected = [
        (404, "unknown model 'nope'"),
        (404, "version '7' of 'toy' is not served"),
        (405, "Method Not Allowed"),
        (413, "--max-body-mb"),
        (413, "exceeds the limit"),
        (400, "not valid JSON"),
        (400, "empty body"),
        (400, "NaN or Inf"),
        (400, "is not an integer"),
        (404, "Not Found"),
    ]
    for r, (status, message) in zip(rs, expected, strict=True):
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        assert message in r.json()["error"], r.json()
    assert rs[2].headers["allow"] == "POST"
    assert counter(app, "opd_teacher_errors_total", kind="not_found") == 3
    assert counter(app, "opd_teacher_errors_total", kind="too_large") == 2
    assert counter(app, "opd_teacher_errors_total", kind="decode") == 3
    assert counter(app, "opd_teacher_errors_total", kind="input") == 1
    assert counter(app, "opd_teacher_requests_total", protocol="binary") == 0


def test_unloaded_and_failed_forward() -> None:
    app = make_app()
    x, t = states(4)
    body, headers = encode_request({"x": x, "t": t}, binary=True)
    core = app.state.core

    async def broken(*_):
        raise RuntimeError("boom")

    core.run = broken
    (failed,) = call(app, [("POST", "/v2/models/toy/infer", body, headers)])
    assert failed.status_code == 500
    assert failed.json() == {"error": "forward failed: RuntimeError: boom"}
    assert counter(app, "opd_teacher_errors_total", kind="internal") == 1
    core.repository.unload()
    (gone,) = call(app, [("POST", "/v2/models/toy/infer", body, headers)])
    assert gone.status_code == 503 and "is unloaded" in gone.json()["error"]
    assert counter(app, "opd_teacher_errors_total", kind="unavailable") == 1


def test_mounted_under_a_route_prefix() -> None:
    """Ray Serve mounts each teacher under its route prefix (ASGI ``root_path``)."""
    app = make_app()
    x, t = states(5)
    body, headers = encode_request({"x": x, "t": t}, binary=True)
    r, meta = call(
        app,
        [
            ("POST", "/v2/models/toy/infer", body, headers),
            ("GET", "/v2/models/toy", None, {}),
        ],
        root_path="/toy",
    )
    assert r.status_code == 200, r.text
    assert meta.json()["name"] == "toy"


def _model(chunk: int, dim: int = 3, width: int = 64) -> LoadedModel:
    net, meta = synthetic_model("toy", dim, width, seed=3)
    return LoadedModel(net, meta, 1, Path("synthetic"), "cpu", chunk)


@pytest.mark.parametrize("sizes", [[5000], [3, 4096, 1, 700], [1536] * 4, [8192, 8192], [1] * 9])
def test_chunked_forward_equals_one_forward(sizes: list[int]) -> None:
    parts = [states(n, seed=i, dim=3) for i, n in enumerate(sizes)]
    xs, ts = [p[0] for p in parts], [p[1] for p in parts]
    alone = [_model(0).forward(x, t) for x, t in zip(xs, ts, strict=True)]
    for chunk in (1, 7, 1000, 4096):
        vs = _model(chunk).forward_parts(xs, ts)
        assert len(vs) == len(xs)
        for v, want in zip(vs, alone, strict=True):
            assert v.shape == want.shape and v.dtype == np.float32
            assert np.abs(v - want).max() <= 1e-6


def test_row_chunks_cover_in_order_and_view_single_parts() -> None:
    xs = [np.arange(2 * n, dtype=np.float32).reshape(n, 2) + 1000 * i for i, n in enumerate([5, 2])]
    ts = [np.arange(len(x), dtype=np.float32) for x in xs]
    chunks = list(row_chunks(xs, ts, 3))
    assert [owners for owners, _, _ in chunks] == [[(0, 3)], [(0, 2), (1, 1)], [(1, 1)]]
    assert np.shares_memory(chunks[0][1], xs[0])  # inside one part: a view
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), np.concatenate(xs))
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), np.concatenate(ts))


def test_row_chunks_merge_parts_only_within_the_float_bound() -> None:
    """Image-scale parts run alone (views, no copy); small ones still share a chunk."""
    xs = [np.full((n, 4), i, np.float32) for i, n in enumerate([3, 1, 1, 2])]
    ts = [np.zeros(len(x), np.float32) for x in xs]
    chunks = list(row_chunks(xs, ts, 100, merge_floats=8))
    assert [owners for owners, _, _ in chunks] == [[(0, 3)], [(1, 1), (2, 1)], [(3, 2)]]
    assert np.shares_memory(chunks[0][1], xs[0]) and np.shares_memory(chunks[2][1], xs[3])
    # with no bound the same parts share one chunk
    assert [o for o, _, _ in row_chunks(xs, ts, 100)] == [[(0, 3), (1, 1), (2, 1), (3, 2)]]


def test_forward_chunk_setting_reaches_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPD_TEACHER_FORWARD_CHUNK_STATES", "123")
    app = make_app()
    assert app.state.core.repository.current.chunk_states == 123
    assert TeacherSettings.model_fields["forward_chunk_states"].default == 4096
