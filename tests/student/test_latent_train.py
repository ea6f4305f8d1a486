"""``opd train --world latent``: the project's one trainer on a diffusers student.

Over real HTTP (one teacher process with the base and both LoRA adapters, a label router) it
ends at the student the in-process teachers train; an unreachable router ends the run with a
checkpoint that ``--resume`` continues to the uninterrupted run's student; setups that cannot
work are refused before step 1 with exit status 2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.cli import main
from common.procs import start_service
from student.latent.http import router_command, serve_latent
from tests.student.latent_helpers import tiny_models
from tests.trainer_proc import wait_for_lines

REPO = Path(__file__).resolve().parents[2]
#: a short recipe: 4 rollouts of 4 steps, guidance on, few evaluation samples
RECIPE = ["--batch", "4", "--rollout-steps", "4", "--guidance-scale", "2.0"]
RECIPE += ["--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tiny_models(tmp_path_factory.mktemp("latent-train") / "models")


@pytest.fixture(scope="module")
def served(models: Path):
    with serve_latent(models) as (teacher, router):
        yield teacher, router


def _args(models: Path, out: Path, method: str, steps: int, *more: str) -> list[str]:
    return [
        "train", "--world", "latent", "--method", method, "--models", str(models),
        "--out", str(out), "--steps", str(steps), *RECIPE, *more,
    ]  # fmt: skip


def _student(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "student" / "transformer" / "diffusion_pytorch_model.safetensors")


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "chunk"), [("diffusionopd", 1), ("flowopd", 12)])
def test_over_http_it_ends_at_the_in_process_student(
    models: Path, served, tmp_path: Path, method: str, chunk: int
) -> None:
    _, router = served
    local, http = tmp_path / "local", tmp_path / "http"
    assert main(_args(models, local, method, 4)) == 0
    more = ["--backend", "http", "--router-url", router.url, "--stream-chunk", str(chunk)]
    assert main(_args(models, http, method, 4, *more)) == 0
    assert _close(_student(local), _student(http), atol=1e-5)
    want, got = (json.loads((d / "report.json").read_text()) for d in (local, http))
    # per step: one request per prompt family present (1-4) per chunk of the 4 queried states
    chunks = -(-4 // chunk)
    assert 4 * chunks <= got["counts"]["requests"] <= 4 * chunks * 4
    assert got["counts"]["bytes_sent"] > 0
    assert want["counts"]["teacher_queries"] == got["counts"]["teacher_queries"] == 4 * 4 * 4
    # the served LoRA teachers report the digests the in-process ones compute
    assert want["teacher_refs"] == got["teacher_refs"]
    assert ("base" in {r["name"] for r in got["teacher_refs"]}) == (method == "flowopd")
    assert got["config"]["world"] == "latent" and "family_mass" in got["latent_metrics"]


@pytest.mark.slow
def test_an_unreachable_router_ends_with_a_checkpoint_and_resume_finishes_the_run(
    models: Path, tmp_path: Path
) -> None:
    """Killed router: exit 1 naming --resume, a checkpoint and no report; ``--resume`` (here
    with the in-process teachers: the backend is not part of the recipe) ends at the student of
    one uninterrupted run."""
    out = tmp_path / "run"
    with serve_latent(models) as (_, router):
        cmd = [sys.executable, "-m", "common.cli", *_args(models, out, "diffusionopd", 100_000)]
        cmd += ["--backend", "http", "--router-url", router.url, "--retries", "1"]
        cmd += ["--request-timeout-s", "2"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_for_lines(out / "steps.jsonl", 3, proc)
            router.kill()
            code = proc.wait(120)
        finally:
            proc.kill()
    text = proc.stdout.read().decode()
    assert code == 1, text[-3000:]
    assert "--resume" in text and router.url.split("//")[1] in text
    assert (out / "checkpoint.safetensors").exists() and not (out / "report.json").exists()
    done = len((out / "steps.jsonl").read_text().splitlines())
    steps = 30
    assert done < steps
    assert main(_args(models, out, "diffusionopd", steps, "--resume")) == 0
    whole = tmp_path / "whole"
    assert main(_args(models, whole, "diffusionopd", steps)) == 0
    assert _close(_student(out), _student(whole), atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == steps and report["counts"]["rollouts"] == steps * 4
    assert len((out / "steps.jsonl").read_text().splitlines()) == steps


@pytest.mark.slow
def test_setups_that_cannot_work_exit_2_before_step_one(
    models: Path, served, tmp_path: Path, capsys
) -> None:
    _, router = served
    out = tmp_path / "o"
    # a label no teacher serves
    assert main(_args(models, out, "danceopd", 2, "--teachers", "a,c")) == 2
    assert "no teacher 'c' in the latent world" in capsys.readouterr().err
    # a student whose scheduler grid differs from the served teachers' (shift 3 vs 1)
    shifted = tmp_path / "shifted"
    shutil.copytree(models, shifted)
    sched = shifted / "base" / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(json.loads(sched.read_text()) | {"shift": 3.0}))
    http = ["--backend", "http", "--router-url", router.url]
    assert main(_args(shifted, out, "danceopd", 2, *http)) == 2
    assert "time convention" in capsys.readouterr().err
    # a prompt set whose embeddings do not fit the teachers' conditioning (E = 8, not 16)
    from safetensors.torch import save_file

    narrow = tmp_path / "prompts.safetensors"
    save_file(
        {"encoder_hidden_states": torch.zeros(4, 4, 8), "pooled_projections": torch.zeros(4, 8)},
        str(narrow),
    )
    assert main(_args(models, out, "danceopd", 2, "--prompts", str(narrow))) == 2
    assert "encoder_hidden_states is [4, 8] per prompt" in capsys.readouterr().err
    save_file({"pooled_projections": torch.zeros(3, 8)}, str(narrow))
    assert main(_args(models, out, "danceopd", 2, "--prompts", str(narrow))) == 2
    assert "encoder_hidden_states must be [4, ...]" in capsys.readouterr().err
    # nothing to resume
    assert main(_args(models, out, "danceopd", 2, "--resume")) == 2
    assert "no checkpoint was written yet" in capsys.readouterr().err
    # Flow-OPD through a router that has no anchor
    teacher, _ = served
    no_anchor = start_service(router_command(teacher.url, anchor=False), cwd=str(REPO))
    try:
        bare = ["--backend", "http", "--router-url", no_anchor.url]
        assert main(_args(models, out, "flowopd", 2, *bare)) == 2
        assert "Flow-OPD needs the anchor 'base'" in capsys.readouterr().err
    finally:
        no_anchor.stop()
    assert not (out / "checkpoint.safetensors").exists()
