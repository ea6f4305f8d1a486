"""Tiny diffusers transformers built from a config with random weights, for the teacher tests.

Nothing comes from a hub: each model is made here, seeded, and ``save_pretrained`` into a
directory that the service under test loads like a user's own model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: SD3Transformer2DModel of a few thousand parameters: latents [B, 4, 8, 8], text [B, L, 16]
SD3_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    caption_projection_dim=16,
    pooled_projection_dim=8,
    out_channels=4,
    pos_embed_max_size=8,
)
#: FluxTransformer2DModel: latents [B, 4, 8, 8] (packed to 16 tokens of 16 inside the backend)
FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    pooled_projection_dim=8,
    axes_dims_rope=(2, 2, 4),
)
TEXT_LEN = 5


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere: diffusers zero-initialises the output layers (adaLN-Zero),
    which would make every velocity 0 and every comparison vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def make_sd3(out: Path, seed: int = 0) -> Path:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**SD3_CONFIG)
    _randomize(model, seed)
    model.save_pretrained(out)
    return out


def make_flux(out: Path, seed: int = 0) -> Path:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**FLUX_CONFIG)
    _randomize(model, seed)
    model.save_pretrained(out)
    return out


def make_lora(
    model_dir: Path,
    out: Path,
    seed: int,
    rank: int = 4,
    targets: tuple[str, ...] = ("to_q", "to_v"),
) -> Path:
    """A peft LoRA on the model in ``model_dir`` with random (non-zero) A and B, saved with
    diffusers' ``save_lora_adapter`` (one safetensors file in ``out``)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    model = SD3Transformer2DModel.from_pretrained(model_dir, local_files_only=True)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), "x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_lora_adapter(out, adapter_name="x")
    return out


def merged(model_dir: Path, adapter: Path) -> torch.nn.Module:
    """The base with ``adapter`` merged into its weights (peft's merge): the reference an
    adapter model's answers must equal."""
    from diffusers import SD3Transformer2DModel

    from services.teacher.lora import read_adapter

    model = SD3Transformer2DModel.from_pretrained(model_dir, local_files_only=True)
    sd, meta, _ = read_adapter(adapter)
    model.load_lora_adapter(sd, prefix=None, adapter_name="m", metadata=meta)
    model.fuse_lora(adapter_names=["m"])
    model.unload_lora()
    return model.eval()


def sd3_inputs(b: int, seed: int = 0, text_rows: int | None = None) -> dict[str, np.ndarray]:
    """``x [b, 4, 8, 8]``, ``t [b]``, ``encoder_hidden_states [r, L, 16]``,
    ``pooled_projections [r, 8]`` (``r = text_rows or b``), float32."""
    rng = np.random.default_rng(seed)
    r = b if text_rows is None else text_rows
    return {
        "x": rng.standard_normal((b, 4, 8, 8)).astype(np.float32),
        "t": rng.uniform(0.05, 0.95, b).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((r, TEXT_LEN, 16)).astype(np.float32),
        "pooled_projections": rng.standard_normal((r, 8)).astype(np.float32),
    }


def sd3_reference(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The in-process forward in our convention: ``timestep = 1000 t``; text rows broadcast."""
    x = torch.from_numpy(inputs["x"])
    b = len(x)
    ehs = torch.from_numpy(inputs["encoder_hidden_states"]).expand(b, -1, -1)
    pooled = torch.from_numpy(inputs["pooled_projections"]).expand(b, -1)
    with torch.no_grad():
        out = model(
            hidden_states=x,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            timestep=torch.from_numpy(inputs["t"]) * 1000,
            return_dict=False,
        )[0]
    return out.numpy()


def load_sd3(model_dir: Path) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(model_dir, local_files_only=True).eval()
