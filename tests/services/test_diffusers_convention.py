"""The diffusers backend's time, sign and layout conventions, pinned against diffusers itself.

Our convention: ``x_t = (1 - t) x_0 + t eps``, ``v = eps - x_0``, Euler ``x <- x - h v``. One
Euler step with the backend's ``v`` must equal ``FlowMatchEulerDiscreteScheduler.step`` on the
model output the diffusers pipelines compute at the same point (SD3: ``timestep``, FLUX:
``timestep / 1000`` on packed latents).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.teacher.diffusers_backend import load_backend, scheduler_config, time_convention
from tests.services.diffusers_helpers import TEXT_LEN, make_flux, make_sd3, sd3_inputs

STEPS = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convention")
    make_sd3(root / "sd3", seed=3)
    make_flux(root / "flux", seed=4)
    return root


def _cond(inputs: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(inputs[k]) for k in ("encoder_hidden_states", "pooled_projections")}


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's shift: sigmas != linear
    sched.set_timesteps(STEPS)
    return sched


def _step(sched, i: int, model_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sched._step_index = i  # diffusers' own bookkeeping: step() from index i
    return sched.step(model_out, sched.timesteps[i], x, return_dict=False)[0]


@pytest.mark.parametrize("i", [0, 5, STEPS - 1])
def test_sd3_euler_step_equals_the_scheduler_step(models: Path, i: int) -> None:
    backend = load_backend(models / "sd3")
    inputs = sd3_inputs(2, seed=i)
    x, cond = torch.from_numpy(inputs["x"]), _cond(inputs)
    sched = _scheduler()
    sigma, sigma_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
    timestep = sched.timesteps[i].expand(2)
    with torch.no_grad():  # what StableDiffusion3Pipeline computes at this step
        model_out = backend.transformer(
            hidden_states=x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            timestep=timestep,
            return_dict=False,
        )[0]
    v = backend.forward(x, torch.full((2,), sigma), cond)
    assert torch.allclose(v, model_out, atol=1e-5)
    ours = x - (sigma - sigma_next) * v  # our Euler step from t = sigma to t = sigma_next
    assert torch.allclose(ours, _step(sched, i, model_out, x), atol=1e-5)


@pytest.mark.parametrize("i", [0, 7])
def test_flux_packing_and_timestep_equal_the_pipeline(models: Path, i: int) -> None:
    from diffusers import FluxPipeline

    backend = load_backend(models / "flux")
    inputs = sd3_inputs(2, seed=10 + i)
    x, cond = torch.from_numpy(inputs["x"]), _cond(inputs)
    sched = _scheduler()
    sigma, sigma_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    with torch.no_grad():  # what FluxPipeline computes at this step
        out = backend.transformer(
            hidden_states=packed,
            timestep=sched.timesteps[i].expand(b) / 1000,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            txt_ids=torch.zeros(TEXT_LEN, 3),
            img_ids=img_ids,
            return_dict=False,
        )[0]
    packed_next = _step(sched, i, out, packed)
    vae_scale = 8  # _unpack_latents takes pixel sizes
    model_out = FluxPipeline._unpack_latents(out, h * vae_scale, w * vae_scale, vae_scale)
    x_next = FluxPipeline._unpack_latents(packed_next, h * vae_scale, w * vae_scale, vae_scale)
    v = backend.forward(x, torch.full((b,), sigma), cond)
    assert torch.allclose(v, model_out, atol=1e-5)
    assert torch.allclose(x - (sigma - sigma_next) * v, x_next, atol=1e-5)


def test_bf16_backend_is_close_to_fp32(models: Path) -> None:
    fp32, bf16 = load_backend(models / "sd3"), load_backend(models / "sd3", dtype="bf16")
    inputs = sd3_inputs(2, seed=1)
    x, t, cond = torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["t"]), _cond(inputs)
    ref = fp32.forward(x, t, cond)
    got = bf16.forward(x.to(torch.bfloat16), t, {k: v.to(torch.bfloat16) for k, v in cond.items()})
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() <= 0.1 * ref.abs().max()


def test_time_convention_is_a_scheduler_config_digest(tmp_path: Path) -> None:
    default = time_convention(scheduler_config(None))
    assert default == time_convention(scheduler_config(None))  # stable across calls
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(tmp_path)
    shifted = time_convention(scheduler_config(tmp_path / "scheduler_config.json"))
    assert shifted != default and shifted.startswith("diffusers-flowmatch:")
    np.testing.assert_equal(len(shifted.split(":")[1]), 12)
