"""The latent world over HTTP: one teacher process serving the base and both LoRA adapters,
the router with label routing; the same OPD steps end at the same student as in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from student.latent.http import HttpLatentTeachers, served_teachers
from student.latent.models import declared_scheduler, load_student, load_teachers, sigma_grid
from student.latent.teachers import LatentSetupError, LocalLatentTeachers
from student.latent.train import LatentConfig, train_latent
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
def test_flow_opd_over_http_ends_at_the_in_process_student(models: Path, router: str) -> None:
    cfg = LatentConfig(
        "flowopd", steps=3, batch=4, rollout_steps=4, eval_per_family=2, eval_steps=2
    )
    world = make_world()
    teachers = load_teachers(models, ["a", "b"])
    sched = declared_scheduler(models)
    grids = sigma_grid(sched, 4), sigma_grid(sched, 2)
    local = load_student(models)
    train_latent(cfg, local, teachers, world, *grids)
    remote = load_student(models)
    client = HttpLatentTeachers(router, ["a", "b"], world)
    try:
        rep = train_latent(cfg, remote, teachers, world, *grids, client=client)
    finally:
        client.close()
    assert client.requests == 3 and client.bytes_sent > 3 * 4 * 4 * 256 * 4
    assert rep["param_change_l2"] > 0
    for p, q in zip(local.transformer.parameters(), remote.transformer.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)
