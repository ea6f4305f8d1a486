"""Pretraining the latent world: the SD3 base on every family, LoRA specialists on their own.

Flow matching (SPEC §2's convention, ``t ~ U(0, 1)``) with Adam; a tenth of the prompts are
dropped to the unconditional (zero) embedding so that classifier-free guidance has an
unconditional model to extrapolate from. The base sees every family for a short schedule (a
generalist); each teacher is a LoRA fine-tune of the base on its two families only, longer: the
specialists of the ring, at real model shapes. Seeded and deterministic on CPU.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from services.teacher.diffusers_backend import load_backend
from student.latent.models import (
    BASE_DIR,
    LORA_RANK,
    LORA_TARGETS,
    build_transformer,
    save_base,
    teacher_dir,
    velocity,
    wrap,
)
from student.latent.world import TEACHER_FAMILIES, World, make_world

BASE_STEPS = 600
TEACHER_STEPS = 500
BATCH = 64
BASE_LR = 3e-3
LORA_LR = 3e-3
COND_DROPOUT = 0.1
#: fraction of the base's training pairs whose prompt is a random family's (web-scale captions
#: that do not match their image); the teachers' curated pairs have none
CAPTION_NOISE = 0.5


def flow_matching(
    model,
    world: World,
    families: Sequence[int],
    steps: int,
    lr: float,
    seed: int,
    params: list[torch.nn.Parameter],
    caption_noise: float = 0.0,
) -> list[float]:
    """``steps`` Adam steps of flow matching on ``families`` (uniform) for ``params`` of the
    backend-wrapped ``model``; returns the loss every step. Own generator: seeded.

    ``caption_noise``: that fraction of the pairs is shown a uniformly random family's prompt.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)
    fams = torch.tensor(list(families))
    losses = []
    for _ in range(steps):
        labels = fams[torch.randint(0, len(fams), (BATCH,), generator=g)]
        x0, _ = world.sample_data(labels, g)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.rand(BATCH, generator=g)
        x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        shown = torch.where(
            torch.rand(BATCH, generator=g) < caption_noise,
            torch.randint(0, len(world.text), (BATCH,), generator=g),
            labels,
        )
        drop = torch.rand(BATCH, generator=g) < COND_DROPOUT
        cond = world.cond(torch.where(drop, -1, shown))
        loss = (velocity(model, x_t, t, cond) - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def pretrain_base(out: Path, seed: int = 0, steps: int = BASE_STEPS) -> Path:
    """Train the base on all families and save it to ``out`` (a diffusers directory)."""
    world = make_world()
    model = wrap(build_transformer(seed).train())
    params = list(model.transformer.parameters())
    families = range(len(world.text))
    losses = flow_matching(model, world, families, steps, BASE_LR, seed, params, CAPTION_NOISE)
    save_base(model.transformer.eval(), out)
    _write_info(
        out,
        {"role": "base", "seed": seed, "steps": steps, "caption_noise": CAPTION_NOISE}
        | {"final_loss": losses[-1]},
    )
    return out


def pretrain_teacher(
    models: Path, name: str, seed: int, steps: int = TEACHER_STEPS, out: Path | None = None
) -> Path:
    """LoRA fine-tune the base in ``models`` on teacher ``name``'s families; save the adapter
    (``save_lora_adapter``: one safetensors file with its peft config as metadata)."""
    from peft import LoraConfig

    world = make_world()
    model = load_backend(Path(models) / BASE_DIR)
    torch.manual_seed(seed)  # the LoRA A matrices' init
    model.transformer.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(LORA_TARGETS)), name
    )
    params = [p for n, p in model.transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    model.transformer.train()
    fams = TEACHER_FAMILIES[name]
    losses = flow_matching(model, world, fams, steps, LORA_LR, seed, params)
    out = out or teacher_dir(models, name)
    model.transformer.save_lora_adapter(out, adapter_name=name)
    _write_info(
        out,
        {"role": "teacher", "name": name, "families": list(fams), "seed": seed, "steps": steps}
        | {"final_loss": losses[-1], "lora_rank": LORA_RANK, "lora_targets": list(LORA_TARGETS)},
    )
    return out


def _write_info(out: Path, info: dict) -> None:
    (out / "latent-world.json").write_text(json.dumps(info, indent=2) + "\n")


def ensure_models(
    models: Path,
    seed: int = 0,
    force: bool = False,
    base_steps: int = BASE_STEPS,
    teacher_steps: int = TEACHER_STEPS,
    say=print,
) -> Path:
    """Pretrain whatever of base, teacher-a, teacher-b is missing in ``models`` (all with
    ``force``; a new base retrains the teachers: they are adapters of it)."""
    models = Path(models)
    base = models / BASE_DIR
    fresh = force or not (base / "transformer" / "config.json").is_file()
    if fresh:
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        pretrain_base(base, seed, base_steps)
        say(f"pretrained {base} ({base_steps} steps, {time.perf_counter() - t0:.0f} s)")
    for k, name in enumerate(TEACHER_FAMILIES, start=1):
        out = teacher_dir(models, name)
        if fresh or not any(out.glob("*.safetensors")):
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            pretrain_teacher(models, name, seed + k, teacher_steps)
            say(f"pretrained {out} ({teacher_steps} steps, {time.perf_counter() - t0:.0f} s)")
    return models
