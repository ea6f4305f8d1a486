"""The latent world's models: a tiny SD3 transformer, its directory layout and its time grid.

The time convention is the teacher backend's (``services/teacher/diffusers_backend.py``): our
``t`` is diffusers' sigma, ``v = eps − x0`` is the model output, SD3 takes ``timestep = 1000·t``.
Students and pretraining call the model through :meth:`DiffusersBackend.velocity`, the same code the
served teachers run, so there is one place that converts ``t``.

Layout of a latent models directory (``models/latent`` by default)::

    base/transformer/{config.json, diffusion_pytorch_model.safetensors}   save_pretrained
    base/scheduler/scheduler_config.json                                  the declared time grid
    teacher-a/pytorch_lora_weights.safetensors                            save_lora_adapter
    teacher-b/pytorch_lora_weights.safetensors

``opd serve teacher --model-dir DIR/base --adapter a=DIR/teacher-a --adapter b=DIR/teacher-b``
serves exactly these files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from services.teacher.diffusers_backend import (
    DiffusersBackend,
    load_backend,
    locate,
    scheduler_config,
    time_convention,
)
from services.teacher.lora import adapter_digest, install, read_adapter
from student.latent.world import POOLED_DIM, SHAPE, TEXT_DIM

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the hub: models are built from a config

#: SD3Transformer2DModel, 76k parameters: latents [B, 4, 8, 8] as 16 patch tokens of width 32
SD3_CONFIG: dict[str, Any] = dict(
    sample_size=SHAPE[1],
    patch_size=2,
    in_channels=SHAPE[0],
    out_channels=SHAPE[0],
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TEXT_DIM,
    caption_projection_dim=32,
    pooled_projection_dim=POOLED_DIM,
    pos_embed_max_size=SHAPE[1],
)
#: the FlowMatchEulerDiscreteScheduler the base declares (its sigmas are the rollout grid)
SCHEDULER_CONFIG: dict[str, Any] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}
#: LoRA on the joint attention's projections (image and text streams)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
LORA_RANK = 8
BASE_DIR = "base"


def teacher_dir(models: Path, name: str) -> Path:
    """Where teacher ``name``'s LoRA adapter lives: ``models/teacher-NAME/``."""
    return Path(models) / f"teacher-{name}"


def build_transformer(seed: int) -> torch.nn.Module:
    """A fresh SD3 transformer of :data:`SD3_CONFIG` (diffusers' own init, seeded)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**SD3_CONFIG)


def wrap(transformer: torch.nn.Module, sched: dict[str, Any] | None = None) -> DiffusersBackend:
    """A :class:`DiffusersBackend` around an in-memory ``transformer`` (trainable or not)."""
    cfg = scheduler_config(None) | (sched or SCHEDULER_CONFIG)
    return DiffusersBackend(
        transformer=transformer,
        family="sd3",
        dtype=torch.float32,
        device="cpu",
        time_convention=time_convention(cfg),
        num_train_timesteps=float(cfg.get("num_train_timesteps", 1000)),
        digest="in-memory",
        source=Path("."),
    )


def velocity(
    model: DiffusersBackend, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``v [B, C, H, W]`` at ``x [B, C, H, W]``, ``t [B]`` (our convention), with grad if the
    model has it: the backend's own call, outside its inference mode."""
    return model.velocity(x, t, cond)


def save_base(transformer: torch.nn.Module, out: Path) -> Path:
    """``save_pretrained`` (safetensors) into ``out/transformer`` and the scheduler config into
    ``out/scheduler``: a directory ``opd serve teacher --model-dir`` serves."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    kwargs = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    FlowMatchEulerDiscreteScheduler(**kwargs).save_pretrained(out / "scheduler")
    return out


def load_teachers(models: Path, names: list[str]) -> DiffusersBackend:
    """The base (frozen) with the LoRA adapters ``names`` installed, as the teacher server
    holds them: one model, adapter ``NAME`` per teacher, ``None`` = the base itself.
    ``backend.adapter_digests[NAME]`` is the digest the server reports for that adapter."""
    import logging
    import warnings

    backend = load_backend(Path(models) / BASE_DIR)
    # diffusers reports "missing keys" of a new adapter by `adapter_name in key`: a one-letter
    # name matches every key of the adapters already loaded (a false alarm listing them all),
    # and peft warns that a second adapter is a second adapter. Both are expected here.
    peft_log = logging.getLogger("diffusers.utils.peft_utils")
    level = peft_log.level
    peft_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name in names:
                sd, meta, file_sha = read_adapter(teacher_dir(models, name))
                install(backend, name, sd, meta)
                backend.adapter_digests[name] = adapter_digest(backend.digest, file_sha)
    finally:
        peft_log.setLevel(level)
    return backend


def load_student(models: Path) -> DiffusersBackend:
    """A trainable copy of the base (full fine-tune: see docs/latent-world.md)."""
    student = load_backend(Path(models) / BASE_DIR)  # its own copy of the weights
    student.transformer.train().requires_grad_(True)
    return student


def declared_scheduler(models: Path) -> dict[str, Any]:
    """The scheduler config the base directory declares (what its teachers' convention digests)."""
    return scheduler_config(locate(Path(models) / BASE_DIR)[1])


def sigma_grid(sched: dict[str, Any], num_steps: int) -> list[float]:
    """The ``num_steps + 1`` sigmas (``1 → 0``) diffusers' scheduler ``sched`` sets for
    ``num_steps`` steps, its shift included: the rollout grid the teachers declare."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in sched.items() if not k.startswith("_")})
    s.set_timesteps(num_steps)
    return [float(v) for v in s.sigmas]
