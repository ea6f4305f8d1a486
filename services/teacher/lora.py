"""LoRA adapters on a shared diffusers base: read (safetensors only), check they fit, install.

An adapter file is what ``save_lora_adapter`` (diffusers) or ``get_peft_model_state_dict`` +
``safetensors.torch.save_file`` (peft) write: keys ``<module>.lora_A.weight [r, in]`` and
``<module>.lora_B.weight [out, r]``, optionally prefixed ``transformer.`` (pipeline LoRA files),
with the peft config (rank, alpha, targets) in the file's ``lora_adapter_metadata``.

Every change to the transformer's adapters happens under the backend's lock, so forwards never
see an adapter half installed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from services.teacher.diffusers_backend import (
    PICKLE_SUFFIXES,
    DiffusersBackend,
    DiffusersLoadError,
)

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def adapter_file(path: Path) -> Path:
    """The safetensors file of adapter ``path`` (a file, or a directory holding exactly one)."""
    path = Path(path)
    if path.is_dir():
        bad = [p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if bad:
            raise DiffusersLoadError(
                f"{bad[0]} is a pickle-capable file; LoRA adapters load from safetensors only"
            )
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise DiffusersLoadError(
                f"adapter directory {path} must hold exactly one .safetensors file, "
                f"found {len(files)}"
            )
        return files[0]
    if not path.is_file():
        raise DiffusersLoadError(f"adapter {str(path)!r} not found")
    if path.suffix != ".safetensors":
        raise DiffusersLoadError(
            f"adapter {path.name}: LoRA adapters load from .safetensors files only"
        )
    return path


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """``(state dict without prefix, peft config metadata or None, sha256 of the file)``."""
    from safetensors import safe_open

    file = adapter_file(path)
    try:
        with safe_open(str(file), framework="pt") as fh:
            raw_meta = (fh.metadata() or {}).get(METADATA_KEY)
            sd = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no iter)
    except Exception as exc:  # safetensors raises its own error types
        raise DiffusersLoadError(
            f"{file.name} is not a readable safetensors file ({exc})"
        ) from None
    if not sd:
        raise DiffusersLoadError(f"{file.name} holds no tensors")
    meta = None
    if raw_meta:
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError:
            raise DiffusersLoadError(f"{file.name}: its {METADATA_KEY} is not JSON") from None
    if all(k.startswith("transformer.") for k in sd):
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        if meta is not None and all(k.startswith("transformer.") for k in meta):
            meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    return sd, meta, digest


def check_fits(transformer: torch.nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
    """Refuse an adapter whose modules, ranks or shapes do not fit ``transformer``.

    Checked here rather than left to peft: peft may skip unmatched keys with a warning and serve
    an adapter that silently does less than it should.
    """
    modules = dict(transformer.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                pairs.setdefault(key.split(marker)[0], {})[part] = tensor
                break
        else:
            if not key.endswith(".lora_magnitude_vector") and ".lora_" not in key:
                raise DiffusersLoadError(
                    f"adapter {name!r}: key {key!r} is not a LoRA weight (lora_A / lora_B)"
                )
    if not pairs:
        raise DiffusersLoadError(f"adapter {name!r} holds no lora_A / lora_B weights")
    for target, ab in sorted(pairs.items()):
        module = modules.get(target)
        if module is not None and hasattr(module, "base_layer"):
            module = module.base_layer  # already wrapped by another adapter
        if not isinstance(module, torch.nn.Linear):
            raise DiffusersLoadError(
                f"adapter {name!r} targets {target!r}, which is "
                f"{'not a module' if module is None else type(module).__name__} in this base "
                "model (LoRA targets must be its Linear layers): it was trained for another model"
            )
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2:
            raise DiffusersLoadError(f"adapter {name!r}: {target} needs 2-D lora_A and lora_B")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise DiffusersLoadError(
                f"adapter {name!r}: {target} is {module.in_features} -> {module.out_features} "
                f"in the base model, the adapter's is {a.shape[1]} -> {b.shape[0]}"
            )
        if a.shape[0] != b.shape[1]:
            raise DiffusersLoadError(
                f"adapter {name!r}: {target} has lora_A rank {a.shape[0]} and lora_B rank "
                f"{b.shape[1]}"
            )


def adapter_digest(base_digest: str, file_sha: str) -> str:
    """What a served adapter reports as its digest: the base's weights and the adapter file's
    (an adapter answers differently on another base)."""
    return "sha256:" + hashlib.sha256(f"{base_digest}+{file_sha}".encode()).hexdigest()


def install(
    backend: DiffusersBackend,
    internal: str,
    sd: dict[str, torch.Tensor],
    meta: dict[str, Any] | None,
) -> None:
    """Add adapter ``internal`` to the base model (blocking; takes the backend's lock)."""
    check_fits(backend.transformer, sd, internal)
    with backend.lock:
        try:
            backend.transformer.load_lora_adapter(
                dict(sd), prefix=None, adapter_name=internal, metadata=meta
            )
        except Exception as exc:  # peft/diffusers raise assorted types for a bad adapter
            _drop(backend, internal)
            raise DiffusersLoadError(f"adapter {internal!r} does not load: {exc}") from None
        # peft may create the LoRA weights in fp32 on a bf16 model: keep one dtype and device
        # (only the new weights: casting the whole model warns about fp32-kept modules)
        for pname, param in backend.transformer.named_parameters():
            if f".{internal}." in pname or pname.endswith(f".{internal}"):
                param.data = param.data.to(backend.device, backend.dtype)


def remove(backend: DiffusersBackend, internal: str) -> None:
    """Delete adapter ``internal`` (blocking; takes the backend's lock)."""
    with backend.lock:
        _drop(backend, internal)


def _drop(backend: DiffusersBackend, internal: str) -> None:
    if internal in getattr(backend.transformer, "peft_config", {}):
        backend.transformer.delete_adapters(internal)
