"""The ``diffusers`` backend: an SD3 or FLUX transformer from a local ``save_pretrained`` directory.

Loading is local and pickle-free: ``local_files_only=True``, ``use_safetensors=True``, and a
directory holding ``.bin`` / ``.pt`` / pickle files, Python files or an ``auto_map`` (remote code)
is refused before diffusers reads anything. ``--model-dir`` is either the transformer's own
directory (``config.json`` + ``*.safetensors``) or a pipeline directory with ``transformer/``
(and optionally ``scheduler/``) inside.

Time and sign conventions (pinned by ``tests/services/test_diffusers_convention.py`` against
``FlowMatchEulerDiscreteScheduler.step``): diffusers' flow-matching schedulers use
``x_t = (1 - sigma) x_0 + sigma eps`` and the transformers predict ``eps - x_0``, so our ``t`` is
their ``sigma`` and ``v`` is the model output as is. Only the timestep scale differs: SD3 takes
``timestep = sigma * num_train_timesteps`` (1000); FLUX takes ``sigma`` itself (its pipeline passes
``timestep / 1000`` and the model multiplies by 1000 inside).

Layouts: ``x`` is ``[B, C, H, W]`` for both. SD3 patchifies inside the model. FLUX works on packed
2x2 tokens ``[B, H/2 * W/2, 4C]`` with position ids; the backend packs ``x``, builds ``img_ids`` /
``txt_ids`` and unpacks ``v``, so FLUX teachers take the same ``[B, C, H, W]`` latents as SD3 ones.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.teacher.backend import TensorSpec

#: transformer classes this backend knows the call convention of (config.json ``_class_name``)
FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
#: files that may hold pickled code: never read, and their presence refuses the directory
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIRE_NAMES = {torch.float32: "FP32", torch.bfloat16: "BF16", torch.float16: "FP16"}
#: the file beside the model holding the server's unconditional conditioning (CFG)
UNCOND_FILE = "uncond.safetensors"


class DiffusersLoadError(Exception):
    """A model directory or LoRA adapter that cannot be served; the message says why."""


def _refuse_unsafe(directory: Path) -> None:
    """Refuse a directory holding pickle-capable files or code (remote-code models)."""
    for path in sorted(directory.rglob("*")):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise DiffusersLoadError(
                f"{path} is a pickle-capable file ({path.suffix}); this server loads "
                "safetensors only: convert it or remove it from the model directory"
            )
        if path.suffix == ".py":
            raise DiffusersLoadError(
                f"{path} is Python code; remote/custom model code is not run: remove it"
            )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffusersLoadError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise DiffusersLoadError(f"{path} must hold a JSON object")
    return doc


def locate(model_dir: Path) -> tuple[Path, Path | None]:
    """``(transformer directory, scheduler config file or None)`` inside ``model_dir``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DiffusersLoadError(f"model directory {str(model_dir)!r} does not exist")
    transformer = model_dir / "transformer" if (model_dir / "transformer").is_dir() else model_dir
    if not (transformer / "config.json").is_file():
        raise DiffusersLoadError(
            f"{transformer} has no config.json; give the directory a diffusers transformer was "
            "saved to with save_pretrained (or a pipeline directory holding transformer/)"
        )
    for candidate in (
        model_dir / "scheduler" / "scheduler_config.json",
        model_dir / "scheduler_config.json",
        transformer.parent / "scheduler" / "scheduler_config.json",
    ):
        if candidate.is_file():
            return transformer, candidate
    return transformer, None


def scheduler_config(path: Path | None) -> dict[str, Any]:
    """The flow-matching scheduler config the model was trained with (default: diffusers'
    ``FlowMatchEulerDiscreteScheduler()``), minus diffusers' bookkeeping keys (library version,
    ``_use_default_values`` in set order): only what fixes the convention."""
    if path is None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(FlowMatchEulerDiscreteScheduler().config)
        config["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    else:
        config = _read_json(path)
    name = str(config.get("_class_name", ""))
    if not name.startswith("FlowMatch"):
        raise DiffusersLoadError(
            f"scheduler {name or '(unnamed)'} is not a flow-matching scheduler; this backend "
            "serves velocity (flow-matching) models only"
        )
    return {k: v for k, v in config.items() if k == "_class_name" or not k.startswith("_")}


def time_convention(config: dict[str, Any]) -> str:
    """``diffusers-flowmatch:<12 hex>``: a digest of the scheduler config (equal = compatible)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()
    return "diffusers-flowmatch:" + hashlib.sha256(blob).hexdigest()[:12]


def _files_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass
class DiffusersBackend:
    """A loaded transformer, shared by the base model and every LoRA adapter served on it.

    ``lock`` serialises forwards and adapter changes: the active adapter is model state.
    """

    transformer: torch.nn.Module
    family: str  # "sd3" | "flux"
    dtype: torch.dtype
    device: str
    time_convention: str
    num_train_timesteps: float
    digest: str  # sha256 over config.json and the weight files
    source: Path
    uncond: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [1, ...]
    lock: threading.Lock = field(default_factory=threading.Lock)
    kind: str = "diffusers"
    #: in-process users' record of installed LoRA adapters: name -> the digest a server reports
    adapter_digests: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.transformer.config

    def state_spec(self) -> TensorSpec:
        """``x [B, C, H, W]`` (H, W any size the model accepts: see :meth:`check_state`)."""
        c = self.config.in_channels if self.family == "sd3" else self.config.in_channels // 4
        return TensorSpec("x", (c, -1, -1), WIRE_NAMES[self.dtype])

    def cond_specs(self) -> tuple[TensorSpec, ...]:
        """The conditioning inputs, named as the transformer's forward names them."""
        dt = WIRE_NAMES[self.dtype]
        specs = [
            TensorSpec("encoder_hidden_states", (-1, self.config.joint_attention_dim), dt),
            TensorSpec("pooled_projections", (self.config.pooled_projection_dim,), dt),
        ]
        if self.family == "flux" and self.config.guidance_embeds:
            specs.append(TensorSpec("guidance", (), "FP32"))  # FLUX-dev's embedded guidance
        return tuple(specs)

    def check_state(self, shape: tuple[int, ...]) -> str | None:
        """Why per-state shape ``shape`` does not fit the model, or ``None``."""
        spec = self.state_spec()
        want = f"[B, {spec.shape[0]}, H, W]"
        if not spec.fits(shape):
            return f"input 'x' must have shape {want}, got [B, {', '.join(map(str, shape))}]"
        h, w = shape[1:]
        step = self.config.patch_size if self.family == "sd3" else 2
        if h % step or w % step or h == 0 or w == 0:
            return f"input 'x' has H, W = {h}, {w}; both must be positive multiples of {step}"
        limit = getattr(self.config, "pos_embed_max_size", None) if self.family == "sd3" else None
        if limit and (h // step > limit or w // step > limit):
            return (
                f"input 'x' has H, W = {h}, {w}; this model takes at most "
                f"{limit * step} x {limit * step} latents"
            )
        return None

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor],
        adapter: str | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """``v [B, C, H, W]`` (model dtype) at ``x [B, C, H, W]``, ``t [B]`` (our convention),
        ``cond[name] [B, ...]`` on the device in the model dtype, with LoRA ``adapter``
        (``None``: the base model).

        ``guidance_scale``: classifier-free guidance; the unconditional rows (the server's
        :attr:`uncond`, zeros where it has none) run in the *same* forward as the conditional
        ones (``2B`` rows), and ``v = v_u + s (v_c - v_u)``.
        """
        guided = guidance_scale is not None and guidance_scale != 1.0
        if guided:
            b = len(x)
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            cond = {k: torch.cat([c, self._uncond_rows(k, c)]) for k, c in cond.items()}
        with self.lock, torch.inference_mode():
            self._select(adapter)
            v = self.velocity(x, t, cond)
        if guided:
            v_c, v_u = v[:b], v[b:]
            v = v_u + guidance_scale * (v_c - v_u)
        return v

    def _uncond_rows(self, name: str, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of ``cond [B, ...]``: the server's own, never sent."""
        if name == "guidance":  # FLUX-dev's embedded guidance is not a conditioning to drop
            return cond
        u = self.uncond.get(name)
        if u is None:
            return torch.zeros_like(cond)
        if u.shape[1:] != cond.shape[1:]:
            raise ValueError(
                f"the server's unconditional {name} has shape {list(u.shape[1:])} per row, the "
                f"request's {list(cond.shape[1:])}: guidance needs them equal"
            )
        return u.expand(len(cond), *u.shape[1:])

    def _select(self, adapter: str | None) -> None:
        """Make ``adapter`` the active LoRA (``None``: none). Under :attr:`lock`."""
        if not getattr(self.transformer, "_hf_peft_config_loaded", False):
            return  # no adapter was ever loaded: the base model as it is
        if adapter is None:
            self.transformer.disable_adapters()
        else:
            self.transformer.enable_adapters()
            self.transformer.set_adapter(adapter)

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's output ``v [B, C, H, W]`` at ``x [B, C, H, W]``, ``t [B]`` (our
        convention: diffusers' sigma) with ``cond[name] [B, ...]``: no lock, no adapter change,
        no guidance, and with grad when the caller enables it. What :meth:`forward` runs, and
        what a student trained on this model's convention calls (one place converts ``t``)."""
        m = self.transformer
        if self.family == "sd3":
            return m(
                hidden_states=x,
                encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"],
                timestep=t * self.num_train_timesteps,
                return_dict=False,
            )[0]
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        ehs = cond["encoder_hidden_states"]
        out = m(
            hidden_states=packed,
            encoder_hidden_states=ehs,
            pooled_projections=cond["pooled_projections"],
            timestep=t,  # FLUX multiplies by 1000 itself
            img_ids=img_ids.reshape(-1, 3).to(x.dtype),
            txt_ids=torch.zeros(ehs.shape[1], 3, device=x.device, dtype=x.dtype),
            guidance=cond.get("guidance"),
            return_dict=False,
        )[0]
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


def load_backend(model_dir: Path, dtype: str = "fp32", device: str = "cpu") -> DiffusersBackend:
    """Load the transformer in ``model_dir`` (safetensors only, local files only)."""
    transformer_dir, sched_path = locate(model_dir)
    _refuse_unsafe(transformer_dir)
    config = _read_json(transformer_dir / "config.json")
    if "auto_map" in config:
        raise DiffusersLoadError(
            f"{transformer_dir / 'config.json'} has an auto_map (remote code); refused"
        )
    name = config.get("_class_name")
    family = FAMILIES.get(str(name))
    if family is None:
        raise DiffusersLoadError(
            f"{transformer_dir / 'config.json'}: _class_name {name!r} is not served; "
            f"supported: {', '.join(FAMILIES)}"
        )
    weights = sorted(transformer_dir.glob("*.safetensors"))
    if not weights:
        raise DiffusersLoadError(f"{transformer_dir} holds no .safetensors weights")
    sched = scheduler_config(sched_path)
    import diffusers

    cls = getattr(diffusers, str(name))
    try:
        transformer = cls.from_pretrained(
            transformer_dir,
            torch_dtype=DTYPES[dtype],
            use_safetensors=True,
            local_files_only=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise DiffusersLoadError(f"cannot load {transformer_dir}: {exc}") from None
    if device != "cpu":
        transformer.to(device)
    transformer.eval().requires_grad_(False)
    backend = DiffusersBackend(
        transformer=transformer,
        family=family,
        dtype=DTYPES[dtype],
        device=device,
        time_convention=time_convention(sched),
        num_train_timesteps=float(sched.get("num_train_timesteps", 1000)),
        digest=_files_digest([transformer_dir / "config.json", *weights]),
        source=Path(model_dir).resolve(),
    )
    backend.uncond = _read_uncond(Path(model_dir), backend)
    return backend


def _read_uncond(model_dir: Path, backend: DiffusersBackend) -> dict[str, torch.Tensor]:
    """The server's unconditional conditioning (``uncond.safetensors`` in or beside the model
    directory: tensors named as the conditioning inputs, ``[1, ...]`` or one row without the
    batch dim); empty when there is none (zeros are used)."""
    from safetensors.torch import load_file

    for path in (model_dir / UNCOND_FILE, model_dir.parent / UNCOND_FILE):
        if not path.is_file():
            continue
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise DiffusersLoadError(f"{path} is not readable safetensors ({exc})") from None
        specs = {s.name: s for s in backend.cond_specs()}
        out = {}
        for name, tensor in tensors.items():
            spec = specs.get(name)
            if spec is None:
                raise DiffusersLoadError(
                    f"{path}: tensor {name!r} is not a conditioning input of this model "
                    f"({', '.join(specs)})"
                )
            if tensor.ndim == len(spec.shape):
                tensor = tensor.unsqueeze(0)
            if tensor.shape[0] != 1 or not spec.fits(tuple(tensor.shape[1:])):
                raise DiffusersLoadError(
                    f"{path}: {name} has shape {list(tensor.shape)}; expected {spec.describe()} "
                    "with B = 1"
                )
            out[name] = tensor.to(backend.device, backend.dtype)
        return out
    return {}
