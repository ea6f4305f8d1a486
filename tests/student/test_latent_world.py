"""The latent world: deterministic data and evaluation, a valid diffusers base, LoRA teachers
that load through the teacher service's own loader, and the declared sigma grid."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from services.teacher.diffusers_backend import load_backend
from services.teacher.lora import read_adapter
from student.latent.models import (
    BASE_DIR,
    declared_scheduler,
    load_teachers,
    sigma_grid,
    teacher_dir,
    wrap,
)
from student.latent.pretrain import pretrain_base
from student.latent.rollout import rollout, teacher_field
from student.latent.world import (
    DATA_STD,
    FAMILIES,
    SHAPE,
    SUBMODES,
    eval_labels,
    make_world,
    metrics_of,
    target_families,
)
from student.methods import METHODS
from tests.student.latent_helpers import BASE_STEPS, tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tiny_models(tmp_path_factory.mktemp("latent") / "models")


def test_world_is_deterministic_and_families_are_separable() -> None:
    w1, w2 = make_world(), make_world()
    assert torch.equal(w1.prototypes, w2.prototypes) and torch.equal(w1.text, w2.text)
    assert w1.prototypes.shape == (FAMILIES, SUBMODES, *SHAPE)
    labels = eval_labels(range(FAMILIES), 200)
    x0, sub = w1.sample_data(labels, torch.Generator().manual_seed(0))
    x1, _ = w1.sample_data(labels, torch.Generator().manual_seed(0))
    assert torch.equal(x0, x1)
    # data classifies back to its own prototype: the evaluation can tell families and sub-modes
    assert torch.equal(w1.classify(x0), labels * SUBMODES + sub)
    m = metrics_of(w1, x0, labels)
    assert m["family_mass"] == 1.0
    assert m["effective_modes"] == pytest.approx(8.0, abs=0.1)
    assert m["submode_balance"] == pytest.approx(2.0, abs=0.02)
    assert m["proto_rmse"] == pytest.approx(DATA_STD, rel=0.05)
    # log N(x; P, σ²) per dimension for data: −½ log(2πσ²) − ½ (a sub-mode's own term dominates)
    expected = -0.5 * math.log(2 * math.pi * DATA_STD**2) - 0.5 - math.log(2) / x0[0].numel()
    assert m["target_logp"] == pytest.approx(expected, abs=0.05)
    # the same data scored against another family's prompt is off target
    wrong = metrics_of(w1, x0, (labels + 1) % FAMILIES)
    assert wrong["family_mass"] == 0.0 and wrong["target_logp"] < -50


def test_prompt_conditioning_and_unconditional_rows() -> None:
    w = make_world()
    cond = w.cond(torch.tensor([2, -1, 0]))
    assert cond["encoder_hidden_states"].shape == (3, *w.text.shape[1:])
    assert torch.equal(cond["encoder_hidden_states"][0], w.text[2])
    assert torch.equal(cond["pooled_projections"][2], w.pooled[0])
    assert not cond["encoder_hidden_states"][1].any() and not cond["pooled_projections"][1].any()
    assert target_families(["b", "a"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="no teacher 'c'"):
        target_families(["c"])


def test_base_is_a_diffusers_save_dir_and_pretraining_is_deterministic(
    models: Path, tmp_path: Path
) -> None:
    from diffusers import SD3Transformer2DModel

    base = models / BASE_DIR
    assert (base / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    SD3Transformer2DModel.from_pretrained(base / "transformer", local_files_only=True)
    served = load_backend(base)  # what `opd serve teacher --model-dir` loads
    assert served.time_convention == wrap(served.transformer).time_convention
    again = load_backend(pretrain_base(tmp_path / "again", seed=0, steps=BASE_STEPS))
    assert again.digest == served.digest  # same seed, same weights, same files


def test_lora_teachers_load_through_the_teacher_loader_and_differ(models: Path) -> None:
    for name in ("a", "b"):
        sd, meta, digest = read_adapter(teacher_dir(models, name))
        assert meta is not None and meta["r"] > 0 and len(digest) == 64
        assert all(".lora_A." in k or ".lora_B." in k for k in sd)
    teachers = load_teachers(models, ["a", "b"])
    w = make_world()
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn((6, *SHAPE), generator=g), torch.tensor([0, 1, 2, 3, 0, 2])
    t = torch.linspace(0.1, 0.9, 6)
    cond = w.cond(labels)
    v = {name: teachers.forward(x, t, cond, name) for name in (None, "a", "b")}
    assert not torch.allclose(v["a"], v[None], atol=1e-4)
    assert not torch.allclose(v["b"], v[None], atol=1e-4)
    assert not torch.allclose(v["a"], v["b"], atol=1e-4)
    # guidance: the backend's one-forward formula, unconditional = zeros
    guided = teachers.forward(x, t, cond, "a", 3.0)
    uncond = teachers.forward(x, t, w.cond(torch.full((6,), -1)), "a")
    assert torch.allclose(guided, uncond + 3.0 * (v["a"] - uncond), atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rollout_steps_on_the_declared_grid_like_the_scheduler(models: Path, shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = declared_scheduler(models) | {"shift": shift}
    sigmas = sigma_grid(sched, 5)
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(5)
    assert sigmas == pytest.approx(ref.sigmas.tolist())
    teachers = load_teachers(models, [])
    field = teacher_field(teachers, None)
    w = make_world()
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(2))
    cond = w.cond(torch.tensor([1, 3]))
    states, final = rollout(field, x, cond, sigmas)
    for i in range(5):  # each of our Euler updates is diffusers' scheduler step
        ref._step_index = i
        out = field(states[i], torch.full((2,), sigmas[i]), cond)
        nxt = ref.step(out, ref.timesteps[i], states[i], return_dict=False)[0]
        assert torch.allclose(nxt, states[i + 1] if i < 4 else final, atol=1e-5)


def test_method_losses_on_latents_equal_the_flattened_loss() -> None:
    g = torch.Generator().manual_seed(3)
    v, vt, va = (torch.randn((5, *SHAPE), generator=g) for _ in range(3))
    t = torch.rand(5, generator=g)
    for method in METHODS.values():
        flat = method.loss(v.flatten(1), t, vt.flatten(1), va.flatten(1))
        assert torch.equal(method.loss(v, t, vt, va), flat)
