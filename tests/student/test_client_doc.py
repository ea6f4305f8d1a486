"""The public client (student/client.py) against real processes: one teacher process serving
the latent base and both LoRA adapters, a label router; and docs/client.md's examples, run as
written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from student.client import OPDClient, StepCost
from student.latent.http import served_teachers
from student.latent.world import SHAPE, make_world
from tests.student.latent_helpers import tiny_models

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def router(tmp_path_factory) -> str:
    models = tiny_models(tmp_path_factory.mktemp("client") / "models")
    with served_teachers(models) as url:
        yield url


def doc_blocks() -> list[str]:
    text = (REPO / "docs" / "client.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("block", [0, 1], ids=["sync", "asyncio"])
def test_the_docs_examples_run(router: str, block: int) -> None:
    code = doc_blocks()[block]
    env = {**os.environ, "OPD_ROUTER_URL": router, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, out.stdout
    if block == 0:
        assert all("anchor ['a', 'base']" in ln or "anchor ['b', 'base']" in ln for ln in lines)
        assert all(" 8 requests" in ln for ln in lines)
    else:
        assert all(ln.startswith("(4, 4, 8, 8)") and "'b'" in ln for ln in lines)


def test_replies_carry_the_registry_digests_and_the_cond_goes_once(router: str) -> None:
    registry = httpx.get(f"{router}/v1/teachers").json()
    want = {e["name"]: e["digest"] for e in registry["teachers"] + registry["anchors"]}
    cond = make_world().cond(torch.tensor([0]))
    x, t = torch.randn((4, *SHAPE)), torch.full((4,), 0.5)
    with OPDClient(router, max_in_flight=2) as client:
        first = client.wait([client.submit(x, t, cond=cond, cond_id="c0", labels=["a"] * 4)])
        by_id = client.wait([client.submit(x, t, cond=cond, cond_id="c0", labels=["a"] * 4)])
        plain = client.wait([client.submit(x, t, cond=cond, labels=["a"] * 4, anchor=True)])
        step = client.step_cost()
        with pytest.raises(ValueError, match="no teacher 'c'"):
            client.submit(x, t, cond=cond, labels=["c"] * 4)
        # the caller's mistakes are refused before anything is sent
        with pytest.raises(ValueError, match="3 labels for 4 states"):
            client.submit(x, t, cond=cond, labels=["a"] * 3)
        with pytest.raises(ValueError, match="x must be"):
            client.submit(x, t[:3], cond=cond)
        with pytest.raises(ValueError, match="'pooled_projections' has 2 rows"):
            client.submit(x, t, cond={**cond, "pooled_projections": torch.zeros(2, 8)})
        assert client.step_cost().query.requests == 0
    assert isinstance(step, StepCost) and step.query.requests == 3 and step.query.states == 12
    assert by_id[0].cost.bytes_sent < first[0].cost.bytes_sent  # states only
    assert torch.equal(first[0].v, by_id[0].v) and torch.allclose(first[0].v, plain[0].v)
    assert first[0].digests == {"a": want["a"]} and first[0].versions.keys() == {"a"}
    assert plain[0].digests == {"a": want["a"], "base": want["base"]}
    assert plain[0].v_anchor is not None and plain[0].v_anchor.shape == x.shape
    assert step.query.digests == {"a": want["a"], "base": want["base"]}
