"""The latent world over HTTP: one teacher process serving the base and both LoRA adapters,
the router with label routing; the same OPD steps end at the same student as in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from student.latent.http import HttpLatentTeachers, served_teachers
from student.latent.models import declared_scheduler, load_student, load_teachers
from student.latent.teachers import LatentSetupError, LocalLatentTeachers
from student.latent.train import latent_config, train_latent
from student.latent.world import SHAPE, make_world
from tests.student.latent_helpers import tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tiny_models(tmp_path_factory.mktemp("latent-http") / "models")


@pytest.fixture(scope="module")
def router(models: Path):
    with served_teachers(models) as url:
        yield url


def test_a_teacher_the_router_does_not_have_is_refused(router: str) -> None:
    with pytest.raises(LatentSetupError, match="'c' is not registered at the router"):
        HttpLatentTeachers(router, ["a", "c"], make_world())


@pytest.mark.parametrize(
    ("supervise", "guidance", "cache"),
    [
        ("router", None, False),
        ("average", 2.0, False),
        ("router", 2.0, True),
        ("average", None, True),
    ],
)
def test_served_answers_equal_in_process(
    models: Path, router: str, supervise: str, guidance: float | None, cache: bool
) -> None:
    world = make_world()
    teachers = load_teachers(models, ["a", "b"])
    labels = torch.tensor([3, 0, 1, 2, 2, 0])
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn((6, *SHAPE), generator=g), torch.rand(6, generator=g)
    want = LocalLatentTeachers(teachers, ["a", "b"], world, supervise, guidance).query(
        x, t, labels, anchor=True
    )
    served = HttpLatentTeachers(router, ["a", "b"], world, supervise, guidance, cond_cache=cache)
    try:
        sent = []
        for _ in range(2):  # with the cache: the second time by cond_id, states only
            got = served.query(x, t, labels, anchor=True)
            sent.append(served.bytes_sent - sum(sent))
            assert torch.equal(got.teacher, want.teacher)
            assert torch.allclose(got.v, want.v, atol=1e-5)
            assert torch.allclose(got.v_anchor, want.v_anchor, atol=1e-5)
    finally:
        served.close()
    if cache:
        assert served.requests == 2 * 4 and sent[1] < sent[0]
    else:
        assert served.requests == 2 and sent[1] == sent[0]


def test_a_cond_id_the_server_does_not_hold_is_resent(models: Path, router: str) -> None:
    world = make_world()
    labels = torch.tensor([1, 2])
    x, t = torch.randn((2, *SHAPE)), torch.tensor([0.3, 0.7])
    served = HttpLatentTeachers(router, ["a", "b"], world, cond_cache=True)
    served.cond_prefix = "never-sent-"
    served.client.aio._cond_sent = {f"never-sent-{f}" for f in range(4)}  # it thinks it sent them
    try:
        got = served.query(x, t, labels)
    finally:
        served.close()
    want = LocalLatentTeachers(load_teachers(models, ["a", "b"]), ["a", "b"], world).query(
        x, t, labels
    )
    assert torch.allclose(got.v, want.v, atol=1e-5)
    assert served.requests == 4  # per family: the id alone (422), then with the tensors


@pytest.mark.slow
def test_flow_opd_over_http_ends_at_the_in_process_student(
    models: Path, router: str, tmp_path: Path
) -> None:
    """The trainer, streaming each rollout state through the router with its rollouts'
    conditioning sent once (cond_id), ends at the student the in-process teachers train."""
    cfg = latent_config(
        "flowopd", teachers=["a", "b"], steps=3, batch=4, rollout_steps=4, eval_samples=2,
        eval_steps=2,
    )  # fmt: skip
    world, sched = make_world(), declared_scheduler(models)
    teachers = load_teachers(models, ["a", "b"])
    local = load_student(models)
    train_latent(cfg, local, world, sched, tmp_path / "local", teachers=teachers)
    remote = load_student(models)
    # chunks of 3 of the 4 queried states: a short last chunk goes with the step's last state
    client = HttpLatentTeachers(
        router, ["a", "b"], world, cond_cache=True, anchor=True, stream_chunk=3
    )
    try:
        rep, _ = train_latent(cfg, remote, world, sched, tmp_path / "http", client)
    finally:
        client.close()
    # per chunk (2 a step) one request per prompt family in it (1-4: the cache's key)
    assert 3 * 2 <= rep["counts"]["requests"] == client.requests <= 3 * 2 * 4
    assert rep["param_change_l2"] > 0
    refs = {r["name"]: r["digest"] for r in rep["teacher_refs"]}
    assert refs["a"] == teachers.adapter_digests["a"] and refs["base"] == teachers.digest
    for p, q in zip(local.transformer.parameters(), remote.transformer.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)
