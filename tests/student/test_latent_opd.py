"""OPD at latent shapes, in-process: every method runs and moves the student; label routing
sends each row to its family's teacher, exactly; bad setups are refused before step 1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from services.teacher.backend import TensorSpec
from student.latent.models import declared_scheduler, load_student, load_teachers
from student.latent.run import LatentSettings, run_latent
from student.latent.teachers import (
    LatentSetupError,
    LocalLatentTeachers,
    TeacherContract,
    family_routes,
)
from student.latent.train import check_setup, latent_config, train_latent
from student.latent.world import SHAPE, World, make_world
from tests.student.latent_helpers import tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tiny_models(tmp_path_factory.mktemp("latent-opd") / "models")


@pytest.fixture(scope="module")
def teachers(models: Path):
    return load_teachers(models, ["a", "b"])


def _states(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SHAPE), generator=g), torch.rand(n, generator=g)


def test_label_routing_sends_each_row_to_its_familys_teacher(teachers) -> None:
    world = make_world()
    client = LocalLatentTeachers(teachers, ["a", "b"], world)
    labels = torch.tensor([2, 0, 3, 1, 1, 2, 0, 3])
    x, t = _states(len(labels), 0)
    ans = client.query(x, t, labels)
    owner = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1])  # a serves families 0, 1; b serves 2, 3
    assert torch.equal(ans.teacher, owner)
    cond = world.cond(labels)
    for k, name in enumerate(["a", "b"]):
        rows = (owner == k).nonzero().flatten()
        part = {key: c[rows] for key, c in cond.items()}
        # each teacher saw exactly its rows, with their own prompts
        assert torch.equal(ans.v[rows], teachers.forward(x[rows], t[rows], part, name))
    assert ans.v_anchor is None


def test_average_gives_every_row_the_mean_and_the_anchor_is_the_base(teachers) -> None:
    world = make_world()
    client = LocalLatentTeachers(teachers, ["a", "b"], world, supervise="average")
    labels = torch.tensor([0, 3, 1, 2])
    x, t = _states(4, 1)
    ans = client.query(x, t, labels, anchor=True)
    cond = world.cond(labels)
    mean = (teachers.forward(x, t, cond, "a") + teachers.forward(x, t, cond, "b")) / 2
    assert torch.equal(ans.teacher, torch.full((4,), -1))
    assert torch.allclose(ans.v, mean, atol=1e-6)
    assert torch.equal(ans.v_anchor, teachers.forward(x, t, cond, None))


def test_guidance_reaches_the_teacher_query(teachers) -> None:
    world = make_world()
    labels = torch.tensor([0, 2])
    x, t = _states(2, 2)
    plain = LocalLatentTeachers(teachers, ["a", "b"], world).query(x, t, labels)
    guided = LocalLatentTeachers(teachers, ["a", "b"], world, guidance_scale=4.5).query(
        x, t, labels
    )
    assert not torch.allclose(plain.v, guided.v, atol=1e-4)


@pytest.mark.parametrize(
    ("method", "supervise"),
    [
        ("diffusionopd", "router"),
        ("flowopd", "router"),
        ("danceopd", "router"),
        ("diffusionopd", "average"),
    ],
)
def test_a_few_opd_steps_move_the_student(
    models: Path, teachers, method: str, supervise: str, tmp_path: Path
) -> None:
    cfg = latent_config(
        method,
        supervise=supervise,
        steps=2,
        batch=4,
        rollout_steps=4,
        eval_samples=4,
        eval_steps=3,
    )
    student = load_student(models)
    sched = declared_scheduler(models)
    out = tmp_path / "run"
    rep, task = train_latent(cfg, student, make_world(), sched, out, teachers=teachers)
    losses = [json.loads(line)["loss"] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert rep["param_change_l2"] > 0
    per_step = 4 * (1 if method == "danceopd" else 4)  # single query vs all N states
    assert rep["counts"]["rollouts"] == 8 and rep["counts"]["teacher_queries"] == 2 * per_step
    assert all(np.isfinite(v) for v in rep["latent_metrics"].values())
    assert task.samples[0].shape == (16, *SHAPE)
    refs = {r["name"]: r["digest"] for r in rep["teacher_refs"]}
    assert refs["a"] == teachers.adapter_digests["a"] != refs["b"]
    assert ("base" in refs) == (method == "flowopd")
    # the student is a diffusers directory the teacher service serves
    from services.teacher.diffusers_backend import load_backend

    saved = load_backend(out / "student")
    assert saved.time_convention == teachers.time_convention and saved.digest != teachers.digest


def test_bad_setups_are_refused_before_step_one(models: Path, teachers) -> None:
    student = load_student(models)
    with pytest.raises(LatentSetupError, match="prompt family 2 has no teacher"):
        family_routes(["a"], [0, 1, 2])
    world, served = make_world(), TeacherContract.of(teachers)
    ok = latent_config("diffusionopd", teachers=["a", "b"])
    assert check_setup(ok, student, served, world) == [0, 1, 2, 3]
    with pytest.raises(LatentSetupError, match="no teacher 'c'"):
        check_setup(latent_config("diffusionopd", teachers=["c"]), student, served, world)
    narrow = World(world.prototypes, world.text[..., :8], world.pooled)
    with pytest.raises(LatentSetupError, match=r"encoder_hidden_states is \[4, 8\] per prompt"):
        check_setup(ok, student, served, narrow)
    wide = TeacherContract(served.time_convention, TensorSpec("x", (16, -1, -1)), served.conds)
    with pytest.raises(LatentSetupError, match=r"does not fit the teachers' x \[B, 16, \*, \*\]"):
        check_setup(ok, student, wide, world)
    student.time_convention = "diffusers-flowmatch:000000000000"
    with pytest.raises(LatentSetupError, match="time convention"):
        check_setup(ok, student, served, world)


def test_the_command_refuses_bad_input_with_exit_2(tmp_path: Path, capsys) -> None:
    from common.cli import main

    assert main(["latent", "--runs", "single,ppo", "--out", str(tmp_path / "o")]) == 2
    assert "unknown row 'ppo'" in capsys.readouterr().err
    broken = tmp_path / "models" / "base" / "transformer"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text('{"_class_name": "SD3Transformer2DModel"}')
    (broken / "weights.bin").write_bytes(b"pickle")
    assert main(["latent", "--models", str(tmp_path / "models"), "--out", str(tmp_path / "o")]) == 2
    assert "pickle-capable file" in capsys.readouterr().err


def test_the_command_writes_the_quality_table(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    lines: list[str] = []
    settings = LatentSettings(
        models=models, out=out, runs="danceopd,average", steps=2, batch=4, rollout_steps=4
    )
    assert run_latent(settings, say=lines.append) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["run"] for r in rows] == [
        "base student, target = a",
        "base student, target = a ∪ b",
        "teachers a, b label-routed (ceiling)",
        "DanceOPD single query (a, b)",
        "naive average of a and b (dense)",
    ]
    assert (out / "samples.png").stat().st_size > 0
    from services.teacher.diffusers_backend import load_backend

    student = load_backend(Path(rows[-1]["student_dir"]))  # servable as a teacher
    assert student.time_convention == load_backend(models / "base").time_convention
    assert student.digest != load_backend(models / "base").digest
    assert "| naive average of a and b (dense) |" in "\n".join(lines)


@pytest.mark.slow
def test_routing_moves_mass_to_the_prompts_family_and_beats_the_average(tmp_path: Path) -> None:
    """SPEC §5's two claims at latent shapes, on a shortened recipe (about 25 s on 2 cores)."""
    from common.threads import apply_threads
    from student.latent.pretrain import ensure_models
    from student.latent.train import LatentStudent

    apply_threads(1)
    models = ensure_models(tmp_path / "m", base_steps=300, teacher_steps=250, say=lambda _: None)
    world, teachers = make_world(), load_teachers(models, ["a", "b"])
    sched = declared_scheduler(models)
    mass = {}
    for supervise in ("router", "average"):
        cfg = latent_config(
            "diffusionopd",
            teachers=["a", "b"],
            supervise=supervise,
            steps=60,
            batch=16,
            rollout_steps=6,
            eval_samples=32,
            eval_steps=8,
        )
        out = tmp_path / supervise
        rep, _ = train_latent(cfg, load_student(models), world, sched, out, teachers=teachers)
        mass[supervise] = rep["latent_metrics"]["family_mass"]
    base = LatentStudent(load_student(models), world, sched).evaluate(cfg)
    mass["base"] = base["family_mass"]
    assert mass["router"] > mass["base"] + 0.15, mass
    assert mass["router"] > mass["average"] + 0.1, mass
